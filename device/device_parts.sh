#!/usr/bin/env bash
# ONE short device call (1 GPU, ~2 minutes, no carry), for a session with too little device time for
# device_speed.sh: what this session's quantization-time changes are worth, timed alone, and their GPU
# tests. Results land as flat files in $OUT:
#   1. studies/quantize_parts_speed.py: the walk's Hessian sum (TF32 vs add_half_gram) and the
#      fine-tuning scatter (per weight vs tile-summed) at 7B shapes -> quantize-parts-speed.json
#   2. GPU tests of both -> pytest-parts.txt
# Usage: bash device/device_parts.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-studies/results/parts}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 100 python3 studies/quantize_parts_speed.py --out "$OUT/quantize-parts-speed.json" 2>&1 | grep -v Warn
echo "[$(el)s] parts rc=${PIPESTATUS[0]}"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_calibration_stats.py tests/test_gather_weight.py \
  > "$OUT/pytest-parts.txt" 2>&1
echo "[$(el)s] tests rc=$?"; tail -3 "$OUT/pytest-parts.txt"
