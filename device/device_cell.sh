#!/usr/bin/env bash
# One quality cell of the default in ONE call, for a session with little device time: call 2 of
# ../shared/tools/split-for-device.sh's recipe (call 1 only copies the first part:
#   carry [".carry/p1", ".carry/whl"], command: the recipe's call 1 line).
#   carry: [".carry/p2", "shared-data"]     command: bash device/device_cell.sh [quality.py args]
# Steps, results under $OUT:
#   1. device/smoke_gpu.py (the default on a tiny Llama, CUDA; ~1 min): if it fails, the cell would
#      too, so the GPU tests run instead for the diagnosis (pytest.txt); CMPQ_CELL_SMOKE=0 skips it
#      where the same call has already run the GPU paths
#   2. benchmarks/quality.py, one worker, --verbose (per-phase seconds), default --cmpq-budgets 3.36;
#      args given here are appended (e.g. --cmpq-budgets 2.5, --cmpq-variant ...)
#   3. with the time left: the GPU tests of the paths built on CPU (pytest.txt); CMPQ_CELL_TESTS=0
#      skips them (a call that only needs the cells ends, and stops counting device time, sooner)
set -uo pipefail
T0=$(date +%s)
LIMIT=${CMPQ_CELL_LIMIT_S:-585}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
[[ -f /root/m/part.00 ]] || { echo "no /root/m/part.00: the machine was given back since call 1; redo call 1"; exit 3; }
source device/device_model.sh >/dev/null
cp benchmarks/results/quality-smollm2-135m.json "$OUT/" 2>/dev/null || true
tests() {
  timeout "$1" python3 -m pytest -q -x -p no:cacheprovider tests/test_feedback_kernel.py tests/test_distill.py \
    tests/test_compensated.py tests/test_kmeans.py > "$OUT/pytest.txt" 2>&1
  echo "pytest rc $? at $(( $(date +%s) - T0 ))s"; tail -3 "$OUT/pytest.txt"
}
if [[ ${CMPQ_CELL_SMOKE:-1} == 1 ]] && ! timeout 90 python3 device/smoke_gpu.py cuda > "$OUT/smoke.txt" 2>&1; then
  echo "smoke failed at $(( $(date +%s) - T0 ))s:"; tail -15 "$OUT/smoke.txt"
  tests $(( $(left) - 5 ))
  exit 1
fi
echo "smoke passed or skipped (CMPQ_CELL_SMOKE=0) at $(( $(date +%s) - T0 ))s"
budgets=(--cmpq-budgets 3.36)
[[ " $* " == *" --cmpq-budgets "* ]] && budgets=()
timeout $(( $(left) - 10 )) python3 benchmarks/quality.py --model smollm2-135m --methods fp16 cmpq "${budgets[@]}" \
  --max-minutes $(( ($(left) - 20) / 60 )) --workers 1 --out-dir "$OUT" --core none --verbose "$@" 2>&1 \
  | grep --line-buffered -v "Converting\|Loading weights" > "$OUT/quality-log.txt"
echo "quality rc ${PIPESTATUS[0]} at $(( $(date +%s) - T0 ))s"; tail -4 "$OUT/quality-log.txt"
[[ ${CMPQ_CELL_TESTS:-1} == 1 ]] && (( $(left) > 40 )) && tests $(( $(left) - 5 ))
echo "done at $(( $(date +%s) - T0 ))s"
