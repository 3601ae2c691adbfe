#!/usr/bin/env bash
# ONE device call (~6 minutes, no carry): the group launch (q/k/v, gate/up in one kernel) -- GPU
# tests, per-group timing, then end-to-end decode of the 7B-shaped model with torch.compile: FP16,
# CMPQ, CMPQ fused. -> $OUT: tests-fuse.log, group-launch-h200.json, decode-7b-fuse-h200.json
# (2026-11-30: the decode step timed out at 110 s, after 66 s of quantizing the random model; it
# now has 420 s.)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/fuse}
mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
for k in cuda_decode kernel_v4 kernel_mma; do
  python3 -c "from cmpq.kernels import $k as k; assert k.library(), k.library_error()" &
done
wait
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "group" -rf --tb=short >"$OUT/tests-fuse.log" 2>&1
echo "[$(el)s] tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests-fuse.log" | tail -8
timeout 50 python3 benchmarks/group_launch.py --out "$OUT/group-launch-h200.json" 2>&1 | tail -n 7
echo "[$(el)s] group"
timeout 420 python3 benchmarks/decode.py --skip-model --compile on --fuse --out "$OUT/decode-7b-fuse-h200.json" 2>&1 | tail -n 7
echo "[$(el)s] decode"
