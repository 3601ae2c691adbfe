"""`make demo`: quantize the default model to 2.5, 3 and 4 bits and print bits vs perplexity.

On a GPU: the full protocol (128 x 2048 calibration tokens, full WikiText-2 and C4). On a CPU the
same code on a reduced budget (16 x 512 calibration tokens, the first 16 windows of 512 tokens),
said in the output. Without a data folder (CMPQ_DATA_DIR) or the hub, it runs on the offline
corpus bundled with Python and labels every figure as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import core_sweep  # this folder is on sys.path when run as a script


def main() -> None:
    data_dir = os.environ.get("CMPQ_DATA_DIR")
    have_data = bool(data_dir) and Path(data_dir, "wikitext-2-raw", "wiki.test.raw").is_file()
    args = ["--model", "smollm2-135m", "--bits", "2.5", "3", "4",
            "--out", "out/demo-smollm2-135m.json"]
    if have_data:
        args += ["--datasets", "wikitext2", "c4", "--calib", "c4"]
    else:
        print("NOTE: no data folder (set CMPQ_DATA_DIR) and no hub: using the OFFLINE corpus "
              "(Python's pydoc topics), not WikiText-2/C4. Figures are not comparable to papers.")
        args += ["--datasets", "offline", "--calib", "offline"]
    if not torch.cuda.is_available():
        print("NOTE: no GPU: reduced run (calibration 16 x 512 tokens, first 16 windows of 512 tokens).")
        args += ["--nsamples", "16", "--seqlen", "512", "--max-windows", "16"]
    Path("out").mkdir(exist_ok=True)
    core_sweep.main(args)


if __name__ == "__main__":
    main()
