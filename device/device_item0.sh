#!/usr/bin/env bash
# README item 0 in ONE device call (nvidia-h200 or nvidia-h100-x1), which is also call 1 of
# ../shared/tools/split-for-device.sh's recipe, so call 2 (the quality cell) can follow back to back:
#   carry: [".carry/p1", ".carry/whl"]     command: bash device/device_item0.sh
# (CMPQ_ITEM0_LIMIT_S=240 bash device/device_item0.sh when device time is short: the tests, then the
#  7B parts only if 120 s are left)
# Parts, each under `timeout`, results under $OUT as they end:
#   1. GPU tests of the CPU-built paths: the column-loop kernel, fine-tuning, the compensated pass,
#      k-means (pytest.txt), and the default end to end on a tiny Llama (smoke.txt)
#   1b. (CMPQ_ITEM0_GROUPS=1) one 7B-shaped block's compensated pass and allocation, layer by layer vs same-shape layers
#      grouped (studies/kmeans_launch_time.py --groups 7b; groups-7b.json), before the 7B parts
#   2. issue 10's 7B target, with 120 s or more left: build the 7B-shaped model, then the default
#      (compensated, 2 epochs of fine-tuning) on one GPU for as long as the call allows
#      (device_scale.jsonl if it finishes; default-7b.log has every phase with its elapsed seconds)
#   (the PyTorch-vs-Triton column-loop study that used to end this call was measured on 2026-12-06)
set -uo pipefail
T0=$(date +%s)
LIMIT=${CMPQ_ITEM0_LIMIT_S:-585}
mkdir -p /root/m && cp .carry/p1/* /root/m/ \
  && python3 -m pip install -q --no-index --no-deps --target /root/site .carry/whl/*.whl
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_feedback_kernel.py tests/test_distill.py tests/test_gather_weight.py tests/test_lloyd_kernel.py \
  tests/test_compensated.py tests/test_kmeans.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc $? at $(( $(date +%s) - T0 ))s"; tail -3 "$OUT/pytest.txt"
timeout 90 python3 device/smoke_gpu.py cuda > "$OUT/smoke.txt" 2>&1
echo "smoke rc $? at $(( $(date +%s) - T0 ))s"; tail -3 "$OUT/smoke.txt"
# one 7B-shaped block's compensated pass and allocation, layer by layer vs grouped by shape (~1-2 min;
# measured on 2026-12-07, studies/results/groups-7b-h100.json: opt in with CMPQ_ITEM0_GROUPS=1)
if [[ ${CMPQ_ITEM0_GROUPS:-0} == 1 ]]; then
  timeout 150 python3 studies/kmeans_launch_time.py --groups 7b --device cuda --out "$OUT/groups-7b.json" \
    > "$OUT/groups-7b.txt" 2>&1
  echo "groups-7b rc $? at $(( $(date +%s) - T0 ))s"; tail -5 "$OUT/groups-7b.txt"
fi
L=$(( $(left) ))
if (( L >= 120 )); then  # the build takes ~40-60 s; the default then runs as far as the time allows
  echo "7B parts get ${L}s"
  W=/tmp/cmpq-scale
  timeout $(( L - 20 )) python3 benchmarks/quantize_speed.py build --shape 7b --workdir "$W" > "$OUT/build-7b.log" 2>&1
  echo "build-7b rc $? at $(( $(date +%s) - T0 ))s"
  L=$(( $(left) - 10 ))
  # stamped phase lines on stderr: a run cut off by the limit still shows how far it got
  (( L > 30 )) && timeout "$L" python3 benchmarks/quantize_speed.py row --shape 7b --workdir "$W" --nproc 1 \
    --append "$OUT/device_scale.jsonl" > "$OUT/default-7b.log" 2>&1
  echo "default-7b rc $? at $(( $(date +%s) - T0 ))s"; grep -v "it/s\]" "$OUT/default-7b.log" | tail -8
else
  echo "7B parts skipped: ${L}s left (run them on their own: CMPQ_SCALE_PARTS=\"build-7b default-7b\" bash device/device_scale.sh)"
fi
echo "done at $(( $(date +%s) - T0 ))s"
