"""Save and load quantized models (format in docs/format.md): atomic writes, checked reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from cmpq.model.blocks import find_blocks, set_module
from cmpq.nn.linear import CMPQLinear

FORMAT_VERSION = 2  # 2: indices packed channel by channel (1: along the channels; re-quantize)
WEIGHTS = "model.safetensors"
MANIFEST = "cmpq_manifest.json"


class CorruptModelError(ValueError):
    """A saved model is incomplete, inconsistent or damaged."""


# -- saving ---------------------------------------------------------------------------------------


def _storage_dtype(model: nn.Module) -> torch.dtype:
    dt = getattr(model.config, "dtype", None)  # `torch_dtype` is deprecated (a warning on every read)
    return torch.bfloat16 if str(dt).endswith("bfloat16") else torch.float16


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with 32-bit floats cast to 16-bit and tied tensors stored once."""
    dtype = _storage_dtype(model)
    out, seen, tied = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        if t.dtype == torch.float32:
            t = t.to(dtype)
        out[name] = t.detach().cpu().contiguous()
    return out, tied


def layer_summary(layer: CMPQLinear) -> dict:
    by_kind = layer.storage_bytes()
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "channels": {str(b): n for b, n in layer.counts().items()},
        "outlier_channels": layer.outlier_channels.numel(),
        "sparse_outliers": layer.sparse_val.numel(),
        "nominal_bits": layer.nominal_bits(),
        "effective_bits": layer.effective_bits(),
        "bytes": by_kind,
    }


def bits_summary(layers) -> dict:
    """Model-level bit figures from per-layer summaries (``layer_summary`` or the manifest's).

    Nominal bits (the paper's "Avg. Bit") average over quantized channels' weights; effective bits
    count every stored byte of the quantized linears over all their weights.
    """
    layers = list(layers)
    n = sum(l["in_features"] * l["out_features"] for l in layers)
    nq = [(l["in_features"] - l["outlier_channels"]) * l["out_features"] for l in layers]
    nbytes = sum(sum(l["bytes"].values()) for l in layers)
    return {
        "nominal_bits": sum(l["nominal_bits"] * k for l, k in zip(layers, nq)) / max(sum(nq), 1),
        "effective_bits": 8 * nbytes / max(n, 1),
        "quantized_weights": n,
        "quantized_bytes": nbytes,
        "fp16_bytes": 2 * n,
    }


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def recover_debris(out: Path) -> list[str]:
    """Clean up after a save that was killed: remove its temp folders, and when ``out`` is gone but a
    replaced copy survives (a kill between the two renames), put that copy back. Returns what was done."""
    done = []
    if not out.parent.is_dir():
        return done
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if (old / "x").is_dir() and not out.exists():
            os.replace(old / "x", out)
            done.append(f"restored {out} from an interrupted replace ({old.name})")
        shutil.rmtree(old, ignore_errors=True)
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed {tmp.name}, left by an interrupted save")
    return done


def check_replaceable(out: Path) -> None:
    """Only a previous cmpq output may be replaced: never a plain file, a user folder or a model."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a cmpq output folder; refusing to replace it")
    if not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} exists and is not a cmpq output (no {MANIFEST}); refusing to replace it. "
                              f"Choose another output path")


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized by cmpq) to ``out_dir`` atomically: temp folder, then rename.

    An existing ``out_dir`` is refused unless ``overwrite``, and even then only a previous cmpq
    output is replaced (atomically: a loadable model is at ``out_dir`` or beside it at every
    instant, and the next save puts it back). Debris of killed saves is cleaned first.
    The run's checkpoint folder (``cmpq.quantize(checkpoint_dir=...)``) is deleted once the folder
    is in place: only then is the work it holds safe elsewhere.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser().resolve()
    qc = getattr(model.config, "quantization_config", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CMPQLinear)}
    if not layers or not isinstance(qc, dict) or qc.get("quant_method") != "cmpq":
        raise ValueError("model holds no CMPQ layers; quantize it with cmpq.quantize first")
    for line in recover_debris(out):
        warnings.warn(line, stacklevel=2)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace a previous cmpq output")
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors, tied = _tensors_to_save(model)
        # One metadata key: safetensors writes its metadata map in hash order, so two keys would make
        # the bytes of identical models differ from run to run.
        save_file(tensors, str(tmp / WEIGHTS), metadata={"cmpq_format_version": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        tok = tokenizer if tokenizer is not None else getattr(model, "cmpq_tokenizer", None)
        if tok is not None:
            tok.save_pretrained(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "tied": tied,
            "layers": {n: layer_summary(m) for n, m in layers.items()},
            "sha256": {n: tensor_sha256(t) for n, t in sorted(tensors.items())},  # checked on load
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks completeness
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt = getattr(model, "cmpq_checkpoint_dir", None)
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
        model.cmpq_checkpoint_dir = None
    return out


# -- loading --------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CorruptModelError(f"{path.parent}: missing {path.name} ({what}); not a complete cmpq model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptModelError(f"{path}: not valid JSON ({e})") from None


def _check_layer(name: str, t: dict[str, torch.Tensor], info: dict) -> None:
    """Consistency of one packed layer; raises naming the offending tensor."""
    out_f, in_f = info["out_features"], info["in_features"]
    seen = torch.zeros(in_f, dtype=torch.int64)
    groups = [(int(b), t[f"{name}.q{b}_channels"]) for b in info["channels"]]
    groups.append((0, t[f"{name}.outlier_channels"]))
    for b, ch in groups:
        label = f"{name}.q{b}_channels" if b else f"{name}.outlier_channels"
        if ch.numel() and (ch.min() < 0 or ch.max() >= in_f):
            raise CorruptModelError(f"{label}: channel id out of range [0, {in_f})")
        seen += torch.bincount(ch.long(), minlength=in_f)[:in_f] if ch.numel() else 0
        if b:
            cb = t[f"{name}.q{b}_codebook"]
            if not torch.isfinite(cb).all():
                raise CorruptModelError(f"{name}.q{b}_codebook: holds NaN or Inf")
    if not torch.equal(seen, torch.ones_like(seen)):
        raise CorruptModelError(f"{name}: channel ids do not cover 0..{in_f - 1} exactly once")
    crow, col, val = t[f"{name}.sparse_crow"], t[f"{name}.sparse_col"], t[f"{name}.sparse_val"]
    if crow[0] != 0 or (crow[1:] < crow[:-1]).any() or crow[-1] != col.numel():
        raise CorruptModelError(f"{name}.sparse_crow: row pointers not monotone from 0 to nnz={col.numel()}")
    if col.numel() and (col.min() < 0 or col.max() >= in_f):
        raise CorruptModelError(f"{name}.sparse_col: column out of range [0, {in_f})")
    for k in ("outlier_weight", "sparse_val"):
        if not torch.isfinite(t[f"{name}.{k}"]).all():
            raise CorruptModelError(f"{name}.{k}: holds NaN or Inf")


def _empty_model(path: Path, config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on meta, real buffers (rotary tables)
        return AutoModelForCausalLM.from_config(config)


def tensor_sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes (dtype and shape are checked separately)."""
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def load(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         device_map: str | dict | None = None, max_memory: str | dict | None = None,
         verify: bool = True) -> nn.Module:
    """Load a folder written by :func:`save` into a model holding ``CMPQLinear`` layers.

    ``dtype`` is the compute dtype of the unquantized parts (default: float16 on GPU, float32 on CPU).
    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module: device}``; with
    ``max_memory`` such as ``{0: "20GiB", 1: "20GiB"}``) spreads the model over several devices with
    accelerate instead of moving it to ``device`` (see ``cmpq.model.device_map``). ``verify``
    checks every tensor against the SHA-256 in the manifest (1.9 s per GiB on one core of the 2-core
    dev machine, measured 2026-12-02).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no such model folder: {path}")
    manifest = _read_json(path / MANIFEST, "the cmpq manifest")
    cfg_json = _read_json(path / "config.json", "the model config")
    qc = cfg_json.get("quantization_config") or {}
    if qc.get("quant_method") != "cmpq":
        raise CorruptModelError(f"{path}/config.json: quantization_config.quant_method is not 'cmpq'")
    for where, v in (("config.json", qc.get("format_version")), (MANIFEST, manifest.get("format_version"))):
        if v != FORMAT_VERSION:
            hint = " (written by cmpq 0.1, which packed indices along the channels: quantize the model again)" if v == 1 else ""
            raise CorruptModelError(f"{path}/{where}: format_version {v!r} unsupported (this cmpq reads {FORMAT_VERSION}){hint}")

    config = AutoConfig.from_pretrained(path)
    qcfg = config.quantization_config
    del config.quantization_config  # keep transformers' own quantizers out of the way
    model = _empty_model(path, config)
    from cmpq.model.experts import expand_fused_experts

    expand_fused_experts(model)  # expert matrices are stored as linears (cmpq.model.experts)
    model.config.quantization_config = qcfg
    for name, info in manifest["layers"].items():
        counts = {int(b): n for b, n in info["channels"].items()}
        # on the meta device: a manifest that lies about shapes costs nothing before the check
        # against the file below
        layer = CMPQLinear(info["in_features"], info["out_features"], counts, info["outlier_channels"],
                           info["sparse_outliers"], info["bias"], device="meta")
        set_module(model, name, layer)

    expected = model.state_dict()
    tied = manifest.get("tied", {})
    f = path / WEIGHTS
    if not f.is_file():
        raise CorruptModelError(f"{path}: missing {WEIGHTS}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("cmpq_format_version") != str(FORMAT_VERSION):
                raise CorruptModelError(f"{f}: cmpq_format_version {meta.get('cmpq_format_version')!r} unsupported")
            names = set(st.keys())
            for name in names:
                ref = expected.get(name)
                shape = tuple(st.get_slice(name).get_shape())
                if ref is not None and shape != tuple(ref.shape):
                    raise CorruptModelError(f"{f}: tensor {name} has shape {shape}, expected {tuple(ref.shape)} "
                                            f"(the manifest and the weights disagree)")
            for name in names:
                tensors[name] = st.get_tensor(name)
    except CorruptModelError:
        raise
    except Exception as e:
        raise CorruptModelError(f"{f}: unreadable or truncated safetensors file ({type(e).__name__}: {e})") from None
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CorruptModelError(f"{f}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CorruptModelError(f"{f}: unexpected tensor {unexpected[0]}")
    for name, t in tensors.items():
        ref = expected[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CorruptModelError(f"{f}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if ref.dtype in (torch.int32, torch.float16) and t.dtype != ref.dtype and name.rsplit(".", 1)[0] in manifest["layers"]:
            raise CorruptModelError(f"{f}: tensor {name} has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptModelError(f"{f}: tensor {name} holds NaN or Inf")
    for name, info in manifest["layers"].items():
        _check_layer(name, tensors, info)
    sums = manifest.get("sha256")
    if verify and sums is not None:
        for name, t in tensors.items():
            if sums.get(name) != tensor_sha256(t):
                raise CorruptModelError(f"{f}: tensor {name} does not match its checksum in {MANIFEST}: the file "
                                        f"is damaged (load with verify=False to read it anyway)")
    elif verify:
        warnings.warn(f"{path}: written without checksums (cmpq before 2026-12-02); its data is not verified",
                      stacklevel=2)

    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
        for name, src in tied.items():  # tie_weights only knows the usual pairs; make sure of all
            mod, _, attr = name.rpartition(".")
            smod, _, sattr = src.rpartition(".")
            if getattr(model.get_submodule(mod), attr).is_meta:
                setattr(model.get_submodule(mod), attr, getattr(model.get_submodule(smod), sattr))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CorruptModelError(f"{f}: no data for {still_meta[0]}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    set_compute_dtype(model, dtype)
    if device_map is not None:
        from cmpq.model.device_map import dispatch

        return dispatch(model.eval(), device_map, max_memory)
    model.to(device)
    model.eval()
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the unquantized parameters (embeddings, norms, lm_head); packed CMPQ buffers and
    other buffers (e.g. rotary tables) keep their dtype."""
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                m._parameters[k] = nn.Parameter(p.data.to(dtype), p.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
