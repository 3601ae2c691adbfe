#!/usr/bin/env bash
# One GPU call for the decode kernels (issue 4), about 150 s on one H200.
# Default (2..16 tokens): build v3b + mma libraries in parallel -> GPU correctness tests of the mma
#   kernel (tests/test_kernels.py -k "mma or multi") -> timing of mma vs v3b vs FP16 cuBLAS at
#   T = 2, 4, 8, 16, 7B + 70B shapes, 3/2/4 bits (benchmarks/kernel_variants.py).
# V4=1 bash device/kernel_variants.sh: the one-token run instead (v3b and v4s, 1/4/16 tokens,
#   split sweep, optional ncu; the other v4 variants measured 2026-11-30 lost and were deleted).
# Everything lands in $OUT (default benchmarks/results/variants); the table is printed last.
# Run from anywhere: bash device/kernel_variants.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/variants}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }

V4=${V4:-0}
$PY -c "from cmpq.kernels import cuda_decode as c; assert c.library(), c.library_error()" >"$OUT/build_v3b.log" 2>&1 &
B1=$!
if [ "$V4" = 1 ]; then
  $PY -c "from cmpq.kernels import kernel_v4 as k; assert k.library(), k.library_error()" >"$OUT/build_v4.log" 2>&1 &
else
  $PY -c "from cmpq.kernels import kernel_mma as k; assert k.library(), k.library_error()" >"$OUT/build_mma.log" 2>&1 &
fi
B2=$!
wait $B1; R1=$?; wait $B2; R2=$?
echo "[$(el)s] build v3b rc=$R1 v4/mma rc=$R2"; tail -3 "$OUT"/build_*.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1

if [ "$V4" = 1 ]; then
  timeout 55 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda and not mma" -rf >"$OUT/tests.log" 2>&1
else
  timeout 40 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "mma or multi" -rf >"$OUT/tests.log" 2>&1
fi
echo "[$(el)s] tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -25

LEFT=$(( 140 - $(el) )); BUDGET=$(( LEFT - 20 )); [ $BUDGET -lt 20 ] && BUDGET=20
if [ "$V4" = 1 ]; then
  BENCH_ARGS="--sweep --variants v3b,v4s"
else
  BENCH_ARGS="--variants v3b,mma --bits 3,2,4 --batches 2,4,8,16"
fi
timeout $(( LEFT > 30 ? LEFT : 30 )) $PY benchmarks/kernel_variants.py --out "$OUT" --budget $BUDGET $BENCH_ARGS \
  >"$OUT/bench.log" 2>&1
echo "[$(el)s] bench rc=$?"

if [ "$V4" = 1 ] && command -v ncu >/dev/null 2>&1 && [ $(el) -lt 128 ]; then
  timeout $(( 148 - $(el) )) ncu --clock-control none -k regex:"v4_kernel|lut_kernel" -c 6 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    $PY benchmarks/kernel_ncu.py v3b,v4s >"$OUT/ncu.txt" 2>&1
  echo "[$(el)s] ncu rc=$? (see ncu.txt)"
  grep -E "v4_kernel|lut_kernel|Duration|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -40
else
  echo "[$(el)s] ncu skipped (missing or no time left)"
fi
# the table last: the reply carries the end of the output (rebuilt from the JSON if the bench was cut)
[ -f "$OUT/kernel_variants.md" ] || $PY benchmarks/kernel_variants.py --out "$OUT" --table-only >/dev/null 2>&1
sed -n '/^| layer/,$p' "$OUT/kernel_variants.md" 2>/dev/null || tail -40 "$OUT/bench.log"
