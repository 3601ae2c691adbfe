#!/usr/bin/env bash
# ONE device call on nvidia-h200-x2 (2 H200s, issue 5 "Scale"), no carry needed:
#     bash device/device_scale.sh
# Llama-2-7B-shaped random model, CMPQ 3 bits, calibration 128 x 2048 (random tokens), no checkpoint:
#   1. build the model once (safetensors on local disk, char tokenizer)
#   2. quantize on 1 GPU                      -> row kind=quantize processes=1
#   3. quantize on 2 GPUs (torchrun, NCCL)    -> row kind=quantize processes=2 (same weights_sha256 expected)
#      (2 and 3 run the paper's algorithm, the one whose N-process result is byte-identical)
#   3b. the default (compensated, 2 epochs of fine-tuning) on 1 GPU (issue 10's 3-minute 7B target), then on 2
#   4. `cmpq eval --device-map auto` over GPUs 0,1, then over GPU 0 alone (8 windows x 2048, same ppl expected)
#   5. while time remains: 13B under --max-gpu-memory 8GiB (1 GPU), RTN and GPTQ 7B rows (1 GPU)
# Every part appends its JSON line to $OUT/device_scale.jsonl as soon as it ends (skips and timeouts too);
# full log in $OUT/device_scale.log. Each part runs under `timeout`, so the script ends within
# $CMPQ_SCALE_LIMIT_S seconds (default 555 s, under 9.5 minutes).
# CMPQ_SCALE_PARTS="build-7b gptq-7b build-13b cmpq-13b-8gib" runs only the named parts (default: all).
set -uo pipefail
T0=$(date +%s)
LIMIT=${CMPQ_SCALE_LIMIT_S:-555}
OUT=${OUT:-$PWD/out-scale}
WORK=${CMPQ_SCALE_WORKDIR:-/tmp/cmpq-scale}
mkdir -p "$OUT" "$WORK"
RES=$OUT/device_scale.jsonl
LOG=$OUT/device_scale.log
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # same CPU threads per process for 1 and 2 GPUs (torchrun would set 1)
# NVLink multicast stays off on this host (KINDS.md); keep whatever the machine set, else set it.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} \
       NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
# CPU smoke test of this script: CMPQ_SCALE_SHAPE=tiny CMPQ_SCALE_BIG=tiny CMPQ_SCALE_ARGS="--cpu --nsamples 4 --seqlen 64 --batch 2"
S=${CMPQ_SCALE_SHAPE:-7b}
BIG=${CMPQ_SCALE_BIG:-13b}
B=(python3 benchmarks/quantize_speed.py)
read -r -a X <<< "${CMPQ_SCALE_ARGS:-}"
C=(--workdir "$WORK" "${X[@]}")

left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
note() {  # note PART STATUS: one JSON line in the results
  python3 -c 'import json,sys; print(json.dumps({"kind": "note", "part": sys.argv[1], "status": sys.argv[2], "elapsed_s": int(sys.argv[3])}))' \
    "$1" "$2" "$(( $(date +%s) - T0 ))" >> "$RES"
}
part() {  # part NAME NEED_S MAX_S CMD...: if NEED_S seconds remain, run CMD for at most MAX_S (and the time left)
  local name=$1 need=$2 most=$3; shift 3
  if [[ -n "${CMPQ_SCALE_PARTS:-}" && " $CMPQ_SCALE_PARTS " != *" $name "* ]]; then return 0; fi
  local l; l=$(left)
  if (( l < need )); then
    echo "== skip $name: ${l}s left, needs ${need}s" | tee -a "$LOG"; note "$name" "skipped: ${l}s left, needs ${need}s"
    return 0
  fi
  local t=$(( l - 15 < most ? l - 15 : most ))
  echo "== $name: start at $(( $(date +%s) - T0 ))s, ${l}s left, timeout ${t}s" | tee -a "$LOG"
  timeout -k 15 "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  if (( rc != 0 )); then
    local why="exit $rc"; (( rc == 124 || rc == 137 )) && why="timed out (exit $rc)"
    note "$name" "$why"
  fi
  echo "== $name: rc $rc at $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "cuda", torch.cuda.device_count(), "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
  df -h "$WORK" | tail -1; nproc; } 2>&1 | tee -a "$LOG"

# caps keep the 2-GPU row and the evaluation alive if the 1-GPU row runs long (expected: ~40 s, ~200 s, ~120 s)
part "build-$S"        60 150 "${B[@]}" build --shape "$S" "${C[@]}"
part "cmpq-$S-1gpu"   150 300 "${B[@]}" row --shape "$S" "${C[@]}" --algorithm paper --nproc 1 --append "$RES"
part "cmpq-$S-2gpu"   100 240 "${B[@]}" row --shape "$S" "${C[@]}" --algorithm paper --nproc 2 --append "$RES"
part "default-$S"     200 420 "${B[@]}" row --shape "$S" "${C[@]}" --nproc 1 --append "$RES"
part "default-$S-2gpu" 200 420 "${B[@]}" row --shape "$S" "${C[@]}" --nproc 2 --append "$RES"
part "eval-$S-2gpu"    45 100 "${B[@]}" eval --shape "$S" "${C[@]}" --gpus 0,1 --windows 8 --append "$RES"
part "eval-$S-1gpu"    45 100 "${B[@]}" eval --shape "$S" "${C[@]}" --gpus 0 --windows 8 --append "$RES"
part "build-$BIG"     360 120 "${B[@]}" build --shape "$BIG" "${C[@]}"
[[ -f "$WORK/$BIG/tokenizer.json" ]] &&  # written last by build
part "cmpq-$BIG-8gib" 240 600 "${B[@]}" row --shape "$BIG" "${C[@]}" --algorithm paper --cap 8GiB --append "$RES"
part "rtn-$S"          60 600 "${B[@]}" row --shape "$S" "${C[@]}" --method rtn --append "$RES"
part "gptq-$S"        100 600 "${B[@]}" row --shape "$S" "${C[@]}" --method gptq --append "$RES"

echo "== done at $(( $(date +%s) - T0 ))s; results:"
cat "$RES"
echo "== log tail:"
grep -v "Loading weights\|Writing model\|it/s\]" "$LOG" | tail -n 40
