"""lm-evaluation-harness on a loaded model (cmpq or plain), offline-aware.

The model goes to lm-eval's ``HFLM`` as an object, not as ``pretrained=<folder>``: cmpq loads the
folder itself (packed layers, dense cache on CPU, device map), so lm-eval runs exactly the model
that ``cmpq eval`` measures. ``lm_eval`` is an optional extra (``pip install 'cmpq[lm-eval]'``).

Tasks whose data live on the Hugging Face hub cannot run offline: ``datasets`` raises a
``ConnectionError`` when lm-eval builds the task, before any model call. That becomes a message
naming the data set and saying how to run a local task instead (``include_path``: a folder of task
YAML files whose ``dataset_path`` is a local loader such as ``json`` with ``data_files``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXTRA = "pip install 'cmpq[lm-eval]'"


def _lm_eval():
    try:
        from lm_eval import evaluator, tasks
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise RuntimeError(f"lm-eval is not installed ({e}); {EXTRA}") from None
    return evaluator, tasks, HFLM


def resolve_tasks(names: list[str], include_path: str | None = None) -> tuple[Any, list[str]]:
    """(task manager, task names), refusing unknown names with the closest known ones."""
    _, tasks, _ = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such folder of task YAML files")
    tm = tasks.TaskManager(include_path=include_path)
    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(n, sorted(known), n=3)
            raise ValueError(f"unknown lm-eval task {n!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
    return tm, names


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], *, include_path: str | None = None,
              limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 1,
              max_length: int | None = None, seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` on ``model``; returns its result dict (``results``, ``versions``, ...)."""
    evaluator, _, HFLM = _lm_eval()
    tm, names = resolve_tasks(tasks, include_path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(device))
    try:
        out = evaluator.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                                        log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                        torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as e:
        raise RuntimeError(f"lm-eval could not fetch a task's data: {e}. Offline, run tasks whose data are local: "
                           "--include-path DIR with task YAML files whose dataset_path is e.g. 'json' with "
                           "data_files") from None
    if out is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")
    return out


def table(result: dict) -> str:
    """lm-eval's own Markdown table of a result dict."""
    from lm_eval.utils import make_table

    return make_table(result)
