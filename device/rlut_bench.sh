#!/usr/bin/env bash
# One GPU call for the rlut kernel (issue 11), under 3 minutes on one H100/H200:
# build rlut + the kernels it is compared with (in parallel) -> GPU tests of rlut
# (tests/test_kernel_rlut.py, incl. kernel == CPU emulation) -> timing of rlut vs v4s/mma vs FP16
# cuBLAS at T = 1, 2, 4, 8, 16 on 7B + 70B shapes, 3 then 2 then 4 bits (benchmarks/rlut_bench.py).
# Everything lands in $OUT (default benchmarks/results/rlut); the table is printed last.
# Extra arguments go to rlut_bench.py (e.g. --groups --tokens 4,5,8 to time the 5-8-token tile groupings).
# Usage: OUT=/some/dir PYTHON=python3 bash device/rlut_bench.sh [rlut_bench.py args]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/rlut}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }

pids=()
for mod in kernel_rlut cuda_decode kernel_v4 kernel_mma; do
  $PY -c "from cmpq.kernels import $mod as k; assert k.library(), k.library_error()" >"$OUT/build_$mod.log" 2>&1 &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
echo "[$(el)s] builds rc=$rc"; tail -n 3 "$OUT"/build_*.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1

timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_kernel_rlut.py -k gpu -rf >"$OUT/tests.log" 2>&1
echo "[$(el)s] tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -25

LEFT=$(( 170 - $(el) )); [ $LEFT -lt 40 ] && LEFT=40
timeout $LEFT $PY benchmarks/rlut_bench.py --out "$OUT" --budget $(( LEFT - 25 )) "$@" >"$OUT/bench.log" 2>&1
echo "[$(el)s] bench rc=$?"
if [ -f "$OUT/rlut_bench.md" ]; then cat "$OUT/rlut_bench.md"; else tail -60 "$OUT/bench.log"; fi
