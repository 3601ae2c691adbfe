#!/usr/bin/env bash
# ONE device call (1 GPU, under 10 minutes): issue 11's fixed costs, SmolLM2's small layers (0.74x
# FP16 compiled, H100, 2026-12-07).
# Results land as flat files in $OUT:
#   1. GPU tests of cmpq::linear_group -> pytest-group.txt
#   2. studies/small_layer_splits.py: each SmolLM2 shape at every split count vs FP16 and an empty
#      kernel -> small-layer-splits.json (is the split-K epilogue the fixed cost?)
#   3. benchmarks/group_launch.py with the SmolLM2 groups -> group-launch.json
#   4. with the model assembled (call 1 of the recipe before; carry .carry/p2 and shared-data):
#      SmolLM2 decode compiled, unfused and fused (the graph pass) -> decode-smollm2.json
# (Run 2026-12-07 22:0x UTC on an H100, with a prefill-overlap step since deleted: notes-kernels.md.)
# Usage: bash device/device_latency.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
if [[ -f /root/m/part.00 && -d .carry/p2 ]]; then
  source device/device_model.sh >/dev/null
  MODEL=1
else
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  MODEL=0
fi
OUT=${OUT:-benchmarks/results/small}
mkdir -p "$OUT"
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
  -k "group" > "$OUT/pytest-group.txt" 2>&1
echo "[$(el)s] tests rc=$?"; tail -3 "$OUT/pytest-group.txt"
timeout 120 python3 studies/small_layer_splits.py --out "$OUT/small-layer-splits.json" 2>&1 | tee "$OUT/splits.log" | grep -v Warn
echo "[$(el)s] splits rc=${PIPESTATUS[0]}"
timeout 90 python3 benchmarks/group_launch.py --out "$OUT/group-launch.json" 2>&1 | tail -12
echo "[$(el)s] group launch rc=${PIPESTATUS[0]}"
if (( MODEL )) && (( 560 - $(el) > 90 )); then
  timeout $(( 560 - $(el) )) python3 benchmarks/decode.py --model smollm2-135m --skip-7b --fuse --compile on \
    --out "$OUT/decode-smollm2.json" > "$OUT/decode-smollm2.log" 2>&1
  echo "[$(el)s] decode rc=$?"; grep "tok/s" "$OUT/decode-smollm2.log" | tail -4
fi
echo "done at $(el)s"
