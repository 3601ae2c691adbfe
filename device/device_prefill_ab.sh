#!/usr/bin/env bash
# Part of ONE device call (1 GPU, no carry, ~2 minutes): the prefill dequantizer in one launch per
# layer (dequant.ONE_LAUNCH) against one launch per width group, after their GPU tests.
#   1. tests/test_kernels.py's dequantizer and prefill tests (pytest-prefill.txt)
#   2. kernel_bench.py --impl prefill, 7B shapes, 3 bits, 512 and 2048 tokens, both ways
#      (prefill-one-launch.json, prefill-per-group.json; the loser is deleted)
# Usage: bash device/device_prefill_ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/prefill-ab}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "dequantize or prefill" \
  > "$OUT/pytest-prefill.txt" 2>&1
rc=$?; echo "[$(el)s] prefill tests rc $rc"; tail -2 "$OUT/pytest-prefill.txt"
(( rc == 0 )) || exit 1
for mode in one-launch per-group; do
  one=True; [[ $mode == per-group ]] && one=False
  timeout 120 python3 -c "
import runpy, sys
from cmpq.kernels import dequant
dequant.ONE_LAUNCH = $one
sys.argv = ['kernel_bench.py', '--impl', 'prefill', '--models', '7B', '--bits', '3', '--batches', '512,2048',
            '--out', '$OUT/prefill-$mode.json']
runpy.run_path('benchmarks/kernel_bench.py', run_name='__main__')" > "$OUT/prefill-$mode.txt" 2>&1
  echo "[$(el)s] prefill $mode rc $?"; grep "|" "$OUT/prefill-$mode.txt" | tail -9
done
