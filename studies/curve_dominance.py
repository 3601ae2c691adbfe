"""Does the default's curve lie below every other method's cell? (issue 10: "lowest perplexity of all
methods at every effective bit rate in [2.3, 4.6], on both data sets").

Reads ``benchmarks/results/quality-smollm2-135m.json`` (the current cells, as ``quality.py`` tables
them), interpolates the default ("CMPQ", main table) in log perplexity over effective bits, and lists
every baseline or CMPQ-paper cell in the range that beats it. Prints the count checked.

    python studies/curve_dominance.py [--json PATH] [--lo 2.3] [--hi 4.6]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import current_cells  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/results/quality-smollm2-135m.json")
    ap.add_argument("--lo", type=float, default=2.3)
    ap.add_argument("--hi", type=float, default=4.6)
    a = ap.parse_args()
    cells = current_cells(json.loads(Path(a.json).read_text())["cells"])
    curve = sorted((c for c in cells if c["series"] == "CMPQ" and c.get("table", "main") == "main"),
                   key=lambda c: c["effective_bits"])
    others = [c for c in cells if c["method"] != "fp16" and c.get("ppl") and a.lo <= c["effective_bits"] <= a.hi
              and (c["series"].startswith("CMPQ-paper") or not c["series"].startswith("CMPQ"))]
    xs = [c["effective_bits"] for c in curve]
    beat = []
    for c in others:
        for ds, v in c["ppl"].items():
            ref = float(np.exp(np.interp(c["effective_bits"], xs, [np.log(x["ppl"][ds]) for x in curve])))
            if v < ref:
                beat.append((c["series"], round(c["effective_bits"], 3), ds, round(v, 2), round(ref, 2)))
    print(f"{len(others)} cells checked in [{a.lo}, {a.hi}] bits against {len(curve)} default cells; "
          f"{len(beat)} below the default's curve" + "".join(f"\n  {b}" for b in beat))


if __name__ == "__main__":
    main()
