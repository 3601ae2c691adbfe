"""ATen calls and host syncs of codebook fine-tuning (``cmpq.model.distill.finetune``) per linear and
step: on a GPU each call is about one kernel launch and each ``_local_scalar_dense``/``equal`` a
host sync, so these counts, not FLOPs, set the time of the pass for a small model (SmolLM2-135M
on an H100, 2026-12-06: 223 s of a 402 s quantization, ~0.8 s per 2048-token step).

Tiny Llamas of 2 and 6 blocks (7 linears each), quantized without fine-tuning on CPU, then one
epoch on 8 windows of 64 tokens; the difference between the two is 28 linears' share.

    python studies/finetune_calls.py [--out X.json]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = ("aten._local_scalar_dense", "aten.equal")


class Calls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(blocks: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import cmpq
    from cmpq.model import distill

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    model = cmpq.quantize(model, None, cmpq.CMPQConfig(bits=4.3, finetune_epochs=0), calib=ids, log=None,
                          progress=False)
    teacher = distill.teacher_states(model, ids, torch.device("cpu"))
    calls = Calls()
    with calls:
        distill.finetune(model, ids, teacher, torch.device("cpu"), epochs=1)
    return {"blocks": blocks, "linears": 7 * blocks, "calls": sum(calls.by_op.values()),
            "syncs": sum(calls.by_op[s] for s in SYNCS)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    small, big = count(2), count(6)
    forwards = 7 + 2  # 7 training windows (one held out) + the held-out KL before and after the epoch
    per = {k: (big[k] - small[k]) / (big["linears"] - small["linears"]) / forwards for k in ("calls", "syncs")}
    res = {"device": f"cpu, {torch.get_num_threads()} threads", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "runs": [small, big],
           "per_linear_per_forward": {k: round(v, 1) for k, v in per.items()}}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
