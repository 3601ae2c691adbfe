#!/usr/bin/env bash
# Call 2 of the device recipe (see ../shared/tools/split-for-device.sh and device_core.sh): assemble
# the GGUF, install the carried wheels (.whl: hqq, built pure-Python from its sdist, and termcolor),
# then run the quality grid. JSON/MD/PNG land in $OUT. Resumable: the committed
# benchmarks/results/quality-smollm2-135m.json is copied in first, so a second call continues the
# grid (the lead copies $OUT back into benchmarks/results between calls).
#   carry: [".carry/p2", "shared-data", ".whl"]    command: bash device/device_quality.sh [extra args]
set -euo pipefail
source device/device_model.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
fi
python3 -c "import hqq; print('hqq', hqq.__version__)" || echo "hqq unavailable: HQQ cells will be recorded as not run"
cp benchmarks/results/quality-smollm2-135m.json "$OUT/" 2>/dev/null || true
set -o pipefail
# --workers 6: six processes share the GPU (cells are launch-bound); "$@" comes last, so it overrides
# (e.g. --workers 1 for the serial, comparable timings; --max-minutes 7).
python3 benchmarks/quality.py --model smollm2-135m --ablations --max-minutes 8 --workers 6 --out-dir "$OUT" \
  --core none "$@" 2>&1 \
  | grep --line-buffered -v "Converting\|Loading weights" | tee "$OUT/quality-log.txt"
