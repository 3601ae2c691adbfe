#!/usr/bin/env bash
# ONE device call (1 GPU, under 10 minutes, no carry): issue 10's 7B-shaped time and issue 11's
# batch-8 decode with the shared-input fusion.
# Results land as flat files in $OUT:
#   1. the 7B-shaped default (quantize_speed.py build + row; profiles of 2 sensitivity windows,
#      block 20 and 4 fine-tuning steps)
#      -> q7b.jsonl, q7b.log (every phase with its elapsed seconds)
#   2. GPU tests of the walk's half-precision Hessians and the fine-tuning's tile-summed scatter
#      -> pytest-speed.txt
#   3. if 180 s are left: the 7B-shaped decode compiled at batch 8, FP16 / CMPQ / CMPQ fused
#      -> decode-7b-b8-fused.json
# Usage: bash device/device_speed.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/speed}
mkdir -p "$OUT"
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 benchmarks/quantize_speed.py build --shape 7b --workdir /tmp/w > "$OUT/q7b-build.log" 2>&1
echo "[$(el)s] build rc=$?"
timeout $(( 570 - $(el) )) python3 benchmarks/quantize_speed.py row --shape 7b --workdir /tmp/w --nproc 1 \
  --profile-finetune 4 --profile-block 20 --profile-sensitivity 2 --append "$OUT/q7b.jsonl" > "$OUT/q7b.log" 2>&1
echo "[$(el)s] 7B default rc=$?"; grep -E "quantize_s|allocation:|fine-tune epoch 2" "$OUT/q7b.log" | cut -c1-400 | tail -4
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_calibration_stats.py tests/test_gather_weight.py \
  > "$OUT/pytest-speed.txt" 2>&1
echo "[$(el)s] tests rc=$?"; tail -3 "$OUT/pytest-speed.txt"
if (( 570 - $(el) > 180 )); then
  timeout $(( 570 - $(el) )) python3 benchmarks/decode.py --skip-model --batch 8 --compile on --fuse --new-tokens 64 \
    --out "$OUT/decode-7b-b8-fused.json" > "$OUT/decode-b8.log" 2>&1
  echo "[$(el)s] decode batch 8 rc=$?"; grep "tok/s" "$OUT/decode-b8.log" | tail -4
fi
echo "done at $(el)s"
