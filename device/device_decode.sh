#!/usr/bin/env bash
# Call 2 of the model recipe (see device_quality.sh for call 1): carry [".carry/p2", "shared-data", ".whl"].
#   1. end-to-end decode, SmolLM2-135M and a Llama-2-7B-shaped model, FP16 vs CMPQ 3-bit, each with
#      the CUDA-graph loop and with torch.compile + graph (benchmarks/decode.py --compile both)
#   2. AWQ cells of the quality grid again, with the o_proj fix (the committed JSON minus its AWQ cells)
# JSON and logs land in $OUT. Usage: bash device/device_decode.sh   (CMPQ_DECODE_LIMIT_S, default 575)
set -uo pipefail
source device/device_model.sh
LIMIT=${CMPQ_DECODE_LIMIT_S:-575}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(el) )); }
export CMPQ_CACHE=${CMPQ_CACHE:-/tmp/cmpq-cache}

timeout 240 python3 benchmarks/decode.py --model smollm2-135m --skip-7b --out "$OUT/decode-smollm2-h200.json" \
  2>&1 | grep -v "Converting\|Loading weights" > "$OUT/decode-smollm2.log"
echo "[$(el)s] smollm2 decode rc=$?"; tail -n 8 "$OUT/decode-smollm2.log"

timeout $(( $(left) - 130 > 60 ? $(left) - 130 : 60 )) python3 benchmarks/decode.py --skip-model \
  --out "$OUT/decode-7b-h200.json" > "$OUT/decode-7b.log" 2>&1
echo "[$(el)s] 7b decode rc=$?"; tail -n 8 "$OUT/decode-7b.log"

if (( $(left) > 60 )); then
  python3 - "$OUT" <<'PY'
import json, sys
d = json.load(open("benchmarks/results/quality-smollm2-135m.json"))
d["cells"] = [c for c in d["cells"] if c["method"] != "awq"]
json.dump(d, open(f"{sys.argv[1]}/quality-smollm2-135m.json", "w"), indent=1)
PY
  timeout $(( $(left) - 5 )) python3 benchmarks/quality.py --model smollm2-135m --methods awq --bits 2 3 4 \
    --workers 3 --max-minutes $(( ($(left) - 20) / 60 )) --out-dir "$OUT" --core none 2>&1 \
    | grep --line-buffered -v "Converting\|Loading weights" > "$OUT/awq-log.txt"
  echo "[$(el)s] awq rc=$?"; grep -i "awq" "$OUT/awq-log.txt" | tail -n 6
fi
