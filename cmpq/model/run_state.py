"""What ``cmpq.quantize`` hands to ``cmpq.save`` beside the model: its tokenizer and the checkpoint
folder to remove once the output is safely written.

Kept here, keyed weakly by the model object, instead of attributes patched onto a transformers
model: the model stays a plain Hugging Face model, and the entry goes away with it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass
class RunState:
    tokenizer: object | None = None
    checkpoint_dir: Path | None = None


_STATE: "weakref.WeakKeyDictionary[nn.Module, RunState]" = weakref.WeakKeyDictionary()


def remember(model: nn.Module, tokenizer=None, checkpoint_dir: Path | None = None) -> None:
    _STATE[model] = RunState(tokenizer, checkpoint_dir)


def state(model: nn.Module) -> RunState:
    """The model's entry, or an empty one for a model cmpq did not quantize in this process."""
    return _STATE.get(model) or RunState()


def forget_checkpoint(model: nn.Module) -> None:
    if model in _STATE:
        _STATE[model].checkpoint_dir = None
