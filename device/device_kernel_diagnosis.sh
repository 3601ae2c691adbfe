#!/usr/bin/env bash
# ONE device call (1 GPU, no carry, under 10 minutes): the three kernel questions left open on
# 2026-12-07 (benchmarks/notes-kernels.md), cheapest first, each under its own timeout:
#   1. rlut's tile groupings at 5-8 tokens: its GPU tests (every grouping against the reference), then
#      rlut_bench.py --groups on the 7B and 70B shapes at 4, 5 and 8 tokens, 3 and 2 bits
#      -> rlut/rlut_bench.json (groups_us per point: keep the faster grouping, delete the other)
#   2. why mma's time doubles from 8 to 16 tokens with the same grid: ncu of mma8 and mma16
#      -> ncu/ncu-decode.txt (stall reasons, occupancy, memory workload)
#   3. prefill at 512 and 2048 tokens on the 7B shapes, 3 bits, with FP16 cuBLAS in prefill's weight
#      layout beside it (fp16_transposed_us) -> kernels-prefill-diag.json
# Usage: bash device/device_kernel_diagnosis.sh   (OUT: where results land; default benchmarks/results/diag)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/diag}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. rlut tile groupings (rlut_bench.sh builds its libraries, runs its GPU tests, then the bench)
OUT="$OUT/rlut" timeout 200 bash device/rlut_bench.sh --groups --tokens 4,5,8 --bits 3,2 > "$OUT/rlut.log" 2>&1
echo "[$(el)s] rlut rc=$?"; grep -E "passed|failed|groups" "$OUT/rlut.log" | tail -30

# 2. mma at 8 and 16 tokens under ncu
OUT="$OUT/ncu" timeout 200 bash device/device_ncu.sh mma8,mma16 > "$OUT/ncu.log" 2>&1
echo "[$(el)s] ncu rc=$?"; tail -40 "$OUT/ncu.log"

# 3. prefill, with the GEMM in prefill's layout timed beside it
LEFT=$(( 570 - $(el) ))
if (( LEFT > 60 )); then
  timeout $(( LEFT - 10 )) python3 benchmarks/kernel_bench.py --impl prefill --models 7B --bits 3 --batches 512,2048 \
    --out "$OUT/kernels-prefill-diag.json" > "$OUT/prefill.log" 2>&1
  echo "[$(el)s] prefill rc=$?"
  python3 - "$OUT/kernels-prefill-diag.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"{r['out']}x{r['inp']} T={r['tokens']}: cmpq {r['cmpq_us']:.1f} us, fp16 {r['fp16_us']:.1f}, "
          f"fp16 in prefill's layout {r.get('fp16_transposed_us', float('nan')):.1f}")
PY
else
  echo "prefill skipped: ${LEFT}s left"
fi
echo "done at $(el)s"
