#!/usr/bin/env bash
# ONE device call (1 GPU, no carry, under 10 minutes): the kernel questions still open after
# 2026-12-07 (benchmarks/notes-kernels.md), each under its own timeout. Results land as flat files
# in $OUT (the device tool returns a limited number of files; nested folders were left behind):
#   1. rlut's tile groupings at 5-8 tokens: its GPU tests, then rlut_bench.py --groups on the 7B and
#      70B shapes at 4, 5 and 8 tokens, 3 and 2 bits -> rlut_bench.json (groups_us per point: keep the
#      faster grouping in kernel_rlut.GROUPS, delete the other)
#   2. ncu of mma at 8 and 16 tokens since its x pre-kernel -> ncu-decode.txt
#   3. the 7B-shaped decode, compiled, at batch 1 and 8, its layers now with row scales like the
#      default's, whose multiply moved out of the operator (2026-12-07) -> decode-7b-b{1,8}.json
#      (nsys is not on the GPU machine; studies/decode_step_split.py splits a step by difference)
# Usage: bash device/device_kernel_diagnosis.sh   (CMPQ_DIAG_STEPS="rlut decode" runs a subset)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/diag}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
STEPS=" ${CMPQ_DIAG_STEPS:-rlut ncu decode} "
wants() { [[ $STEPS == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. rlut tile groupings (rlut_bench.sh builds its libraries, runs its GPU tests, then the bench)
D=$(mktemp -d)
if wants rlut; then
  OUT="$D" timeout 150 bash device/rlut_bench.sh --groups --tokens 4,5,8 --bits 3,2 > "$OUT/rlut.log" 2>&1
  echo "[$(el)s] rlut rc=$?"; cp "$D"/rlut_bench.json "$D"/rlut_bench.md "$D"/bench.log "$OUT/" 2>/dev/null
  grep -E "passed|failed|groups" "$OUT/rlut.log" "$OUT/bench.log" | tail -30
fi

# 2. mma at 8 and 16 tokens under ncu
if wants ncu; then
  OUT="$D" timeout 150 bash device/device_ncu.sh mma8,mma16 > "$OUT/ncu.log" 2>&1
  echo "[$(el)s] ncu rc=$?"; cp "$D"/ncu-decode.txt "$OUT/" 2>/dev/null; tail -30 "$OUT/ncu.log"
fi

# 3. end-to-end decode with row-scaled layers, compiled, batch 1 and 8 (FP16 in the same run)
for b in 1 8; do
  wants decode || break
  (( 570 - $(el) > 150 )) || break
  timeout 200 python3 benchmarks/decode.py --skip-model --batch $b --compile on --new-tokens 128 \
    --out "$OUT/decode-7b-b$b.json" > "$OUT/decode-b$b.log" 2>&1
  echo "[$(el)s] decode batch $b rc=$?"; grep "tok/s" "$OUT/decode-b$b.log" | tail -2
done
echo "done at $(el)s"
