#!/usr/bin/env bash
# ONE device call (1 GPU, no carry, under 10 minutes): Lloyd's loop in one Triton launch
# (cmpq/kernels/lloyd.py, kmeans.FUSED_LLOYD, the default on CUDA since 2026-12-07) timed against the
# PyTorch loop, then the 7B default with it (run on 2026-12-07: docs/results.md):
#   1. its GPU tests and k-means' (pytest.txt)
#   2. one 7B-shaped block's compensated pass and allocation, without and with it
#      (studies/kmeans_launch_time.py --groups 7b --lloyd torch|fused -> groups-7b-torch.json, groups-7b-fused.json)
#   3. if the fused loop was faster and 300 s are left: the 7B-shaped default with it on
#      (quantize_speed.py build + row; default-7b-fused.log has every phase with its elapsed seconds)
# Usage: bash device/device_lloyd.sh   (CMPQ_LLOYD_PARTS="tests groups" or "7b" runs only those parts;
#        "7b" alone runs the default with the fused loop without the comparison)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/lloyd}; mkdir -p "$OUT"
T0=$(date +%s); LIMIT=${CMPQ_LLOYD_LIMIT_S:-585}
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; date -u | tee -a "$OUT/gpu.txt"

PARTS=${CMPQ_LLOYD_PARTS:-tests groups 7b}
has() { [[ " $PARTS " == *" $1 "* ]]; }
win=fused
if has tests; then
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_lloyd_kernel.py tests/test_kmeans.py > "$OUT/pytest.txt" 2>&1
rc=$?; echo "[$(el)s] pytest rc $rc"; tail -3 "$OUT/pytest.txt"
(( rc == 0 )) || { echo "GPU tests failed: the fused loop is not timed"; exit 1; }
fi
if has groups; then
for mode in torch fused; do
  timeout 150 python3 studies/kmeans_launch_time.py --groups 7b --device cuda --lloyd $mode --out "$OUT/groups-7b-$mode.json" \
    > "$OUT/groups-7b-$mode.txt" 2>&1
  echo "[$(el)s] groups-7b $mode rc $?"; tail -4 "$OUT/groups-7b-$mode.txt"
done
win=$(python3 - "$OUT" <<'PY'
import json, sys
t = {}
for m in ("torch", "fused"):
    try:
        r = json.load(open(f"{sys.argv[1]}/groups-7b-{m}.json"))["rows"]
    except (OSError, KeyError, ValueError):
        print("none"); raise SystemExit
    t[m] = sum(x.get("grouped_s", 0) + x.get("alloc_grouped_s", 0) for x in r)
print("fused" if t["fused"] < t["torch"] else "torch", file=sys.stdout)
print(f"grouped block seconds: {t}", file=sys.stderr)
PY
)
echo "[$(el)s] faster: $win"
fi
L=$(( LIMIT - $(el) ))
if has 7b && [[ $win == fused ]] && (( L >= 300 )); then
  W=/tmp/cmpq-scale
  timeout $(( L - 20 )) python3 benchmarks/quantize_speed.py build --shape 7b --workdir "$W" > "$OUT/build-7b.log" 2>&1
  echo "[$(el)s] build-7b rc $?"
  L=$(( LIMIT - $(el) - 10 ))
  (( L > 30 )) && timeout "$L" python3 benchmarks/quantize_speed.py row --shape 7b --workdir "$W" --nproc 1 \
    --append "$OUT/device_scale.jsonl" > "$OUT/default-7b-fused.log" 2>&1
  echo "[$(el)s] default-7b (fused Lloyd) rc $?"; grep -v "it/s\]" "$OUT/default-7b-fused.log" | tail -8
fi
echo "done at $(el)s"
