#!/usr/bin/env bash
# ONE device call (1 GPU; carry the gemlite wheel, e.g. in .carry/whl, installed with
# `pip install --no-deps --target /root/site`): issue 11's peer beside ours and the prefill path
# since the 4-rows-per-thread dequantizer (2026-12-02; the prefill table is from 2026-11-30).
#   0. the GPU tests of both dequantizers and prefill (since 2026-12-06 they write each channel at its own
#      row and prefill no longer gathers x) -> tests-dequant.log
#   1. prefill (dequantize + cuBLAS), 3 bits, 7B and 70B shapes, 64/512/2048 tokens -> kernels-prefill-3bit-h200.json
#   2. the shipped dispatch at 1/4/16 tokens, 3 bits, with gemlite 4-bit and 2-bit g128 timed beside it in the
#      same run and the same way (kernel_bench.py --peer gemlite) -> kernels-peer-h200.json
# JSON lands in $OUT. Usage: bash device/device_peer_prefill.sh   (CMPQ_PEER_LIMIT_S, default 330)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/root/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/device-peer}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT=${CMPQ_PEER_LIMIT_S:-330}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
for k in cuda_decode kernel_v4 kernel_mma; do
  $PY -c "from cmpq.kernels import $k as k; assert k.library(), k.library_error()" >/tmp/build_$k.log 2>&1 &
done
wait
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "dequantize or prefill" -rf --tb=line \
  >"$OUT/tests-dequant.log" 2>&1; echo "dequant tests rc=$?"; tail -n 3 "$OUT/tests-dequant.log"
timeout $(( $(left) / 3 )) $PY benchmarks/kernel_bench.py --impl prefill --models 7B,70B --bits 3 \
  --batches 64,512,2048 --out "$OUT/kernels-prefill-3bit-h200.json" 2>&1 | grep -E "^\||x[0-9]" | tail -8
echo "prefill done at $(( $(date +%s) - T0 ))s"
timeout $(( $(left) - 10 )) $PY benchmarks/kernel_bench.py --models 7B,70B --bits 3 --batches 1,4,16 \
  --peer gemlite --max-minutes 3 --out "$OUT/kernels-peer-h200.json" 2>&1 | grep -E "^peer|T=|Error|error" | tail -40
echo "peer done at $(( $(date +%s) - T0 ))s"
