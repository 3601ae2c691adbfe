#!/usr/bin/env bash
# ONE device call (1 GPU, no carry, ~9 minutes) for issue 4's final per-layer tables:
#   1. build the three kernel libraries (v3b, v4, mma) in parallel
#   2. GPU correctness tests of every CUDA kernel (tests/test_kernels.py, CUDA parts)
#   3. one-token variants with more blocks per SM (v4s5, v4s6) against v4s and v3b, 3 bits, 7B + 70B shapes
#   4. the issue's table with the shipped dispatch (what CMPQLinear.forward runs): 1/4/16 tokens,
#      2/2.5/3/3.5/4 bits, 7B, 70B then 13B shapes, until the time budget -> kernels-h200.{json,md}
#   5. prefill (dequantize + cuBLAS) at 64/512/2048 tokens, 3 bits -> kernels-prefill-h200.{json,md}
# Everything lands in $OUT. Usage: bash benchmarks/device_kernels.sh   (CMPQ_KERNELS_LIMIT_S, default 570)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/device-kernels}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT=${CMPQ_KERNELS_LIMIT_S:-570}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(el) )); }

for k in cuda_decode kernel_v4 kernel_mma; do
  $PY -c "from cmpq.kernels import $k as k; assert k.library(), k.library_error()" >"$OUT/build_$k.log" 2>&1 &
done
wait
echo "[$(el)s] built"; tail -n 2 "$OUT"/build_*.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1

timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -rf >"$OUT/tests.log" 2>&1
echo "[$(el)s] tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -15

mkdir -p "$OUT/variants"
timeout 110 $PY benchmarks/kernel_variants.py --out "$OUT/variants" --budget 90 --variants v3b,v4s,v4s5,v4s6 \
  --bits 3,2,4 --batches 1 >"$OUT/variants.log" 2>&1
echo "[$(el)s] variants rc=$?"; cat "$OUT/variants/kernel_variants.md" 2>/dev/null | tail -n 22

GRID_MIN=$(( ($(left) - 100) / 60 ))
timeout $(( $(left) - 80 )) $PY benchmarks/kernels.py --models 7B,70B,13B --max-minutes "$GRID_MIN" \
  --out "$OUT/kernels-h200.json" >"$OUT/grid.log" 2>&1
echo "[$(el)s] grid rc=$?"

timeout $(( $(left) - 5 )) $PY benchmarks/kernels.py --impl prefill --models 7B,70B --bits 3 --batches 64,512,2048 \
  --out "$OUT/kernels-prefill-h200.json" >"$OUT/prefill.log" 2>&1
echo "[$(el)s] prefill rc=$?"; tail -n 12 "$OUT/kernels-prefill-h200.md" 2>/dev/null
echo "grid:"; grep -E "^\| (7B|13B|70B)" "$OUT/kernels-h200.md" 2>/dev/null | awk -F'|' '$5+0==1' | head -40
