#!/usr/bin/env bash
# ONE device call (1 GPU, no carry, under 10 minutes) for issue 4's per-layer tables. Steps (default all;
# CMPQ_KERNELS_STEPS="tests prefill" picks some):
#   (always) build the three kernel libraries (v3b, v4, mma) in parallel
#   tests    GPU correctness tests of every CUDA kernel (tests/test_kernels.py); failures printed
#   variants one-token kernels v3b and v4s at 3/2/4 bits, 7B + 70B shapes
#   grid     the issue's table with the shipped dispatch (what CMPQLinear.forward runs): 1/4/8/16 tokens,
#            2/2.5/3/3.5/4 bits, 7B, 70B, 13B shapes -> kernels-$GPU.{json,md}
#   prefill  dequantize + cuBLAS at 4..2048 tokens, same shapes and bits -> kernels-prefill-$GPU.{json,md}
#            (next to the grid, it shows where the dispatch should switch from mma to prefill)
#   small    SmolLM2-135M's layer shapes, dispatch and prefill, 1/4/16 tokens, 3 bits -> kernels-135m-$GPU.*
# JSON and tests.log land in $OUT (the device returns at most 8 files: logs and Markdown stay in $LOGS;
# `python benchmarks/kernel_bench.py --table-only --out X.json` rebuilds a table). Usage: bash device/device_kernels.sh   (CMPQ_KERNELS_LIMIT_S, default 570)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/device-kernels}
LOGS=${LOGS:-/tmp/cmpq-kernel-logs}
mkdir -p "$OUT" "$LOGS"
PY=${PYTHON:-python3}
# results are named after the card they ran on (kernels-h100.json, kernels-h200.json, ...)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE "[HAB][0-9]+" | head -1 | tr 'A-Z' 'a-z')
GPU=${GPU:-gpu}
LIMIT=${CMPQ_KERNELS_LIMIT_S:-570}
STEPS=" ${CMPQ_KERNELS_STEPS:-tests variants grid prefill small} "
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(el) )); }
want() { [[ "$STEPS" == *" $1 "* ]]; }

for k in cuda_decode kernel_v4 kernel_mma; do
  $PY -c "from cmpq.kernels import $k as k; assert k.library(), k.library_error()" >"$LOGS/build_$k.log" 2>&1 &
done
wait
echo "[$(el)s] built"; tail -q -n 1 "$LOGS"/build_*.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOGS/gpu.txt" 2>&1

if want tests; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -rf --tb=line >"$OUT/tests.log" 2>&1
  echo "[$(el)s] tests rc=$?"; grep -E "passed|failed|FAILED|Error|assert" "$OUT/tests.log" | tail -20
fi
if want variants; then
  mkdir -p "$OUT/variants"
  timeout 110 $PY benchmarks/kernel_variants.py --out "$OUT/variants" --budget 90 --variants ${VARIANTS:-v3b,v4s} \
    --bits 3,2,4 --batches 1 >"$LOGS/variants.log" 2>&1
  echo "[$(el)s] variants rc=$?"; tail -n 20 "$OUT/variants/kernel_variants.md" 2>/dev/null
  # the grid below runs the shipped table (cmpq/kernels/dispatch.py); this says whether its one-token
  # size limit for v4s (100 M weights, v3b above) still holds, for a person to change the table
  $PY - "$OUT/variants/kernel_variants.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if not r.get("sweep") and r["bits"] == 3.0 and r["tokens"] == 1]
big = {}
for r in rows:
    if r["out"] * r["inp"] > 100_000_000 and r.get("us") is not None:
        big.setdefault((r["out"], r["inp"]), {})[r["variant"]] = r["us"]
ok = big and all(v.get("v4s", 1e9) <= v.get("v3b", 0) for v in big.values())
print("v4s vs v3b above 100 M weights, 3 bits:", big, "->",
      "v4s wins everywhere: dispatch.TABLE's v3b row can go" if ok else "the table's v3b row stands")
PY
fi
if want grid; then
  timeout $(( $(left) > 200 ? 180 : $(left) / 2 )) $PY benchmarks/kernel_bench.py --models 7B,70B,13B --batches 1,2,4,8,16 \
    --max-minutes 2 --out "$OUT/kernels-$GPU.json" >"$LOGS/grid.log" 2>&1
  echo "[$(el)s] grid rc=$?"
fi
if want prefill; then
  timeout $(( $(left) > 240 ? 200 : $(left) / 2 )) $PY benchmarks/kernel_bench.py --impl prefill --models 7B,70B,13B \
    --batches 4,8,16,64,512,2048 --max-minutes 2.5 --out "$OUT/kernels-prefill-$GPU.json" >"$LOGS/prefill.log" 2>&1
  echo "[$(el)s] prefill rc=$?"; grep -E "^\| 7B 4096x11008 \| 3.0" "$OUT/kernels-prefill-$GPU.md" 2>/dev/null
fi
if want small; then
  timeout $(( $(left) - 5 )) $PY benchmarks/kernel_bench.py --models 135M --bits 3 --batches 1,4,16 \
    --out "$OUT/kernels-135m-$GPU.json" >"$LOGS/small.log" 2>&1
  timeout $(( $(left) - 5 )) $PY benchmarks/kernel_bench.py --impl prefill --models 135M --bits 3 --batches 1,4,16,128 \
    --out "$OUT/kernels-135m-prefill-$GPU.json" >>"$LOGS/small.log" 2>&1
  echo "[$(el)s] small rc=$?"; grep -E "^\| 135M" "$OUT"/kernels-135m-*.md 2>/dev/null
fi
if want grid; then
  echo "grid, 3 bits:"; grep -E "^\| (7B|13B|70B).*\| 3.0 \|" "$OUT/kernels-$GPU.md" 2>/dev/null | cut -c1-90
fi
mv "$OUT"/*.md "$LOGS"/ 2>/dev/null; true
