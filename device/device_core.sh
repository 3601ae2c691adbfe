#!/usr/bin/env bash
# Call 2 of the device recipe (see ../shared/tools/split-for-device.sh): assemble the GGUF, install
# cmpq's missing dependency (gguf), then run the core sweep. Results land in $OUT.
set -euo pipefail
source device/device_model.sh
python3 benchmarks/kmeans_speed.py --out $OUT/kmeans-speed.json
python3 -m cmpq.cli eval smollm2-135m --datasets wikitext2 c4 --json $OUT/fp16-eval.json 2>&1 | grep -v "Converting\|Loading weights"
python3 benchmarks/core_sweep.py --model smollm2-135m --out $OUT/core-smollm2-135m.json "$@" 2>&1 | grep -v "Converting\|Loading weights\|windows, ppl"
