"""Token windows for calibration and perplexity, drawn the way GPTQ-style scripts draw them."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cmpq.data.datasets import C4_NEW_DOCS, TextSource, load_text


@dataclass
class Windows:
    """``ids`` ``[n, seqlen]`` plus a description that goes into every report."""

    ids: torch.Tensor
    description: str


def _encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def calibration_windows(
    tokenizer, dataset: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0, path: str | None = None
) -> Windows:
    """``nsamples`` random windows of ``seqlen`` tokens.

    From a corpus with enough long documents (the full C4 shard) GPTQ's rule is used: pick a random
    document longer than ``seqlen``, then a random window in it. From short-document excerpts (the
    local C4 excerpt, the offline corpus, plain files) windows are drawn from the documents joined
    with "\\n\\n", as SOURCES.md advises. Either way ``random.seed(seed)`` fixes the draw.
    """
    src = load_text(dataset, "train", path)
    rng = random.Random(seed)
    docs = src.documents
    if docs is not None and len(docs) > 10000:  # a full shard: GPTQ's per-document sampling
        out = []
        for _ in range(nsamples):
            for _attempt in range(1000):
                ids = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
                if ids.numel() > seqlen:
                    break
            else:
                raise ValueError(f"{src.source}: found no document longer than {seqlen} tokens")
            i = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[i : i + seqlen])
        how = "GPTQ per-document windows"
    else:
        ids = _encode(tokenizer, src.joined("\n\n"))
        if ids.numel() <= seqlen:
            raise ValueError(f"{src.source}: only {ids.numel()} tokens, need more than seqlen={seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        out = [ids[i : i + seqlen] for i in starts]
        how = "windows from documents joined with \\n\\n"
    desc = f"{dataset}: {nsamples} x {seqlen} tokens, seed {seed}, {how}, from {src.source}"
    return Windows(torch.stack(out), desc)


def eval_windows(tokenizer, dataset: str, seqlen: int = 2048, path: str | None = None, nsamples: int | None = None) -> Windows:
    """Non-overlapping ``seqlen`` windows of the evaluation stream (GPTQ protocol).

    - wikitext2: test rows joined with "\\n\\n", every full window.
    - c4 ("c4-new"): the first 1,100 validation documents (fewer if the source has fewer) joined
      with a space, the first 256 windows.
    - c4-random (GPTQ's older "c4"): 256 random windows, one per random document of at least
      ``seqlen`` tokens, ``random.seed(0)``.
    - offline: the held-out half of the offline corpus, joined with "\\n\\n".
    ``nsamples`` caps the number of windows (quick runs).
    """
    if dataset == "c4-random":
        src = load_text("c4", "validation", path)
        docs = src.documents or [src.joined("\n\n")]
        rng = random.Random(0)
        encoded = [None] * len(docs)
        out = []
        n = nsamples or 256
        for _ in range(n):
            for _attempt in range(10000):
                j = rng.randint(0, len(docs) - 1)
                if encoded[j] is None:
                    encoded[j] = _encode(tokenizer, docs[j])
                if encoded[j].numel() >= seqlen:
                    break
            else:
                raise ValueError(f"{src.source}: no document has {seqlen} tokens; use 'c4' instead")
            i = rng.randint(0, encoded[j].numel() - seqlen)
            out.append(encoded[j][i : i + seqlen])
        return Windows(torch.stack(out), f"c4-random: {n} random windows of {seqlen}, seed 0, {src.source}")

    split = {"wikitext2": "test", "c4": "validation", "offline": "test"}.get(dataset)
    if split is None and path is None:
        raise ValueError(f"unknown evaluation data set {dataset!r}")
    src: TextSource = load_text(dataset, split or "test", path)
    if dataset == "c4":
        docs = (src.documents or [src.text or ""])[:C4_NEW_DOCS]
        ids = _encode(tokenizer, " ".join(docs))
        limit = 256
        desc = f"c4 (c4-new protocol): first {len(docs)} documents joined with a space, first 256 windows"
    else:
        ids = _encode(tokenizer, src.joined("\n\n"))
        limit = None
        desc = f"{dataset}: rows joined with \\n\\n, all non-overlapping windows"
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if nsamples is not None:
        n = min(n, nsamples)
    if n == 0:
        raise ValueError(f"{src.source}: {ids.numel()} tokens is less than one window of {seqlen}")
    return Windows(ids[: n * seqlen].view(n, seqlen), f"{desc}; {n} x {seqlen} tokens from {src.source}")
