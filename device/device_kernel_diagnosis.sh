#!/usr/bin/env bash
# ONE device call (1 GPU, no carry, under 10 minutes): the kernel questions left open on 2026-12-07
# (benchmarks/notes-kernels.md), most valuable first, each under its own timeout:
#   1. mma with x put in fragment order by a pre-kernel (xprep) against x gathered by every block:
#      the mma GPU tests (both forms, CUDA graphs), then kernel_bench.py --impl mma --sweep on the 7B,
#      13B and 70B shapes at 2-16 tokens, default and one-wave splits -> mma/mma-xprep.json
#      (keep the faster form in kernel_mma.XPREP, delete the other)
#   2. why mma's time doubles from 8 to 16 tokens: ncu of mma8, mma16 and mmax16 -> ncu/ncu-decode.txt
#   3. rlut's tile groupings at 5-8 tokens: its GPU tests, then rlut_bench.py --groups
#      -> rlut/rlut_bench.json (keep the faster grouping, delete the other)
#   4. prefill at 512 and 2048 tokens on the 7B shapes, 3 bits, with FP16 cuBLAS in prefill's weight
#      layout beside it (fp16_transposed_us) -> kernels-prefill-diag.json
# Usage: bash device/device_kernel_diagnosis.sh   (OUT: where results land; default benchmarks/results/diag)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/diag}
mkdir -p "$OUT/mma"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. mma: tests of both x forms, then both timed
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "mma" > "$OUT/mma/tests.txt" 2>&1
rc=$?; echo "[$(el)s] mma tests rc=$rc"; tail -3 "$OUT/mma/tests.txt"
if (( rc == 0 )); then
  timeout 180 python3 benchmarks/kernel_bench.py --impl mma --sweep --out "$OUT/mma/mma-xprep.json" > "$OUT/mma/sweep.log" 2>&1
  echo "[$(el)s] mma sweep rc=$?"; grep -E "T=(8|16) .*default|sum over" "$OUT/mma/sweep.log" | tail -30
fi

# 2. mma at 8 and 16 tokens under ncu (and 16 with the pre-kernel, if its tests passed)
V="mma8,mma16"; (( rc == 0 )) && V="$V,mmax16"
OUT="$OUT/ncu" timeout 150 bash device/device_ncu.sh "$V" > "$OUT/ncu.log" 2>&1
echo "[$(el)s] ncu rc=$?"; tail -45 "$OUT/ncu.log"

# 3. rlut tile groupings (rlut_bench.sh builds its libraries, runs its GPU tests, then the bench)
if (( 570 - $(el) > 200 )); then
  OUT="$OUT/rlut" timeout 150 bash device/rlut_bench.sh --groups --tokens 4,5,8 --bits 3,2 > "$OUT/rlut.log" 2>&1
  echo "[$(el)s] rlut rc=$?"; grep -E "passed|failed|groups" "$OUT/rlut.log" | tail -30
fi

# 4. prefill, with the GEMM in prefill's layout timed beside it
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
