#!/usr/bin/env bash
# ONE device call (~2 minutes, no carry): Nsight Compute profile of the shipped decode kernels on the
# 4096x11008 3-bit layer: v4s and v3b (1 token) and mma (4 tokens), with the stall reasons per issued
# instruction (what each warp waits on), the scheduler and instruction statistics and the memory
# workload. -> $OUT/ncu-decode.txt. Usage: bash device/device_ncu.sh [variants]
# variants (benchmarks/kernel_ncu.py's names), default v4s,v3b,mma4; "rlut1,rlut4,v4s" profiles the
# register-lookup kernel's ~20 us fixed cost per launch beside the shipped one-token kernel; "mma8,mma16"
# the tensor-core kernel at 8 and 16 tokens, whose time doubles between them (mmaN / rlutN: N tokens)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}
OUT=${OUT:-benchmarks/results/ncu}
mkdir -p "$OUT"
VARIANTS=${1:-v4s,v3b,mma4}
for k in cuda_decode kernel_v4 kernel_mma kernel_rlut; do
  python3 -c "from cmpq.kernels import $k as k; assert k.library(), k.library_error()" &
done
wait
command -v ncu >/dev/null || { echo "ncu not found"; exit 1; }
N=$(( 2 * $(tr ',' '\n' <<< "$VARIANTS" | wc -l) ))  # two calls per variant
timeout 400 ncu --clock-control none -k regex:"v4_kernel|lut_kernel|mma_kernel|rlut_kernel" -c $N \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  python3 benchmarks/kernel_ncu.py "$VARIANTS" > "$OUT/ncu-decode.txt" 2>&1
echo "ncu rc=$?"
grep -E "^  [a-z_]+_kernel|Duration|Warp Cycles Per Issued|Issued Warp Per Scheduler|No Eligible|Achieved Occupancy|Memory Throughput|issue_stalled" \
  "$OUT/ncu-decode.txt" | awk '$NF+0 > 0.05 || !/issue_stalled/' | head -90
