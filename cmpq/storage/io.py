"""Save and load quantized models (format in docs/format.md): atomic writes, checked reads."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable
from pathlib import Path

import torch
from torch import nn

from cmpq.model import run_state
from cmpq.nn.linear import MARKER, CMPQLinear, marker_tensor, prepare_runtime
from cmpq.storage.layout import LayoutError, check_layout, install, layer_layout, model_layout, same_layout

# 4: optional FP16 row scales per layer; 3: 8-bit codebooks, narrow ids; 2: FP16 codebooks, int32 ids;
# 1: indices along the channels. v4 is written; v3 is read as well (a v3 layer is a v4 layer without
# row scales; a v3 reader refuses v4 by its version, so no reader ignores the scales silently)
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained, above max_shard_size
MANIFEST = "cmpq_manifest.json"


class CorruptModelError(ValueError):
    """A saved model is incomplete, inconsistent or damaged."""


# -- saving ---------------------------------------------------------------------------------------


def quant_config(config) -> dict | None:
    """``config.quantization_config`` as a plain dict: after ``cmpq.quantize`` it is a dict, after
    ``from_pretrained`` the registered config object (``cmpq.integrations.transformers``)."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict) and hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    return qc if isinstance(qc, dict) else None


def _update_quant_config(config, **fields) -> None:
    qc = config.quantization_config
    for k, v in fields.items():
        if isinstance(qc, dict):
            qc[k] = v
        else:
            setattr(qc, k, v)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """16-bit type of the unquantized tensors on disk: the one recorded at save time, else the
    model's (a model loaded in float32 still saves the tensors it was given, bit for bit)."""
    qc = quant_config(model.config) or {}
    dt = qc.get("storage_dtype") or getattr(model.config, "dtype", None)  # `torch_dtype` is deprecated
    return torch.bfloat16 if str(dt).endswith("bfloat16") else torch.float16


def tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, tied): the state dict with 32-bit floats cast to the storage dtype, a tied
    tensor under its first name only; ``tied`` maps each dropped name to the name kept."""
    dtype = storage_dtype(model)
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
    """The layer's layout plus its bit and byte figures (works on the meta device too)."""
    return {**layer_layout(layer), "nominal_bits": layer.nominal_bits(), "effective_bits": layer.effective_bits(),
            "bytes": layer.storage_bytes()}


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


_OS_ERROR = re.compile(r"\(os error (\d+)\)")
SPACE_MARGIN = 16 << 20  # bytes beyond the tensors: config, manifest, tokenizer files, the header


def as_os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: safetensors (Rust) reports ENOSPC as a ``SafetensorError``
    whose text ends in "(os error 28)"; Python's own writes raise ``OSError`` directly."""
    if isinstance(e, OSError):
        return e
    m = _OS_ERROR.search(str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse up front when the file system holding ``folder`` (or its nearest existing parent)
    has less than ``need`` bytes free, so a long run does not end in a half-written folder."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OSError(errno.ENOSPC, f"not enough space for {what}: needs about {need / 2**20:,.0f} MiB, "
                                    f"{free / 2**20:,.0f} MiB free under {probe}")


def write_folder(out: Path, write: Callable[[Path], None], what: str = "save") -> None:
    """``write(tmp)`` into a temp folder beside ``out``, then swap it in, so a loadable folder is at
    ``out`` (or, between the two renames, beside it, where ``recover_debris`` finds it) at every
    instant; a failure leaves the previous ``out`` as it was and nothing partial. An ``OSError``
    (a full disk) is re-raised saying so. Callers check first that ``out`` may be replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:  # replacing: put the previous output back if it was moved aside
            if not out.exists() and (old / "x").is_dir():
                os.replace(old / "x", out)
            if not (old / "x").exists():
                shutil.rmtree(old, ignore_errors=True)
        os_err = as_os_error(e)
        if os_err is None or isinstance(e, FileExistsError):
            raise
        before = f"the previous {out.name} is intact" if out.exists() else f"{out.name} was not created"
        raise OSError(os_err.errno, f"cannot {what} {out}: {os_err.strerror or os_err} ({before}, nothing "
                                    f"partial left)") from e


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
    qc = quant_config(model.config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CMPQLinear)}
    if not layers or qc is None or qc.get("quant_method") != "cmpq":
        raise ValueError("model holds no CMPQ layers; quantize it with cmpq.quantize first")
    for line in recover_debris(out):
        warnings.warn(line, stacklevel=2)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace a previous cmpq output")
    check_replaceable(out)
    tensors, tied = tensors_to_save(model)
    check_free_space(out.parent, sum(t.numel() * t.element_size() for t in tensors.values()) + SPACE_MARGIN,
                     f"saving {out}")

    def write(tmp: Path) -> None:
        # One metadata key: safetensors writes its metadata map in hash order, so two keys would make
        # the bytes of identical models differ from run to run.
        save_file(tensors, str(tmp / WEIGHTS), metadata={"cmpq_format_version": str(FORMAT_VERSION)})
        # the layout goes in config.json, so the config and the weights alone make a loadable folder
        _update_quant_config(model.config, layers=model_layout(model),
                             storage_dtype=str(storage_dtype(model)).removeprefix("torch."))
        model.config.save_pretrained(tmp)
        tok = tokenizer if tokenizer is not None else run_state.state(model).tokenizer
        if tok is not None:
            tok.save_pretrained(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "tied": tied,
            "layers": {n: layer_summary(m) for n, m in layers.items()},
            "sha256": {n: tensor_sha256(t) for n, t in sorted(tensors.items())},  # checked on load
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks completeness

    write_folder(out, write, "save")
    ckpt = run_state.state(model).checkpoint_dir
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
        run_state.forget_checkpoint(model)
    return out


# -- loading --------------------------------------------------------------------------------------

def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; anything else (missing, not UTF-8, not JSON, a list) is refused."""
    if not path.is_file():
        raise CorruptModelError(f"{path.parent}: missing {path.name} ({what}); not a complete cmpq model folder")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptModelError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path}: holds a JSON {type(data).__name__}, expected an object ({what})")
    return data


def _check_summary(name: str, info: dict, where: Path) -> None:
    """The manifest's per-layer summary fields, which `cmpq info` reads (the layout fields are
    ``check_layout``'s)."""
    what = f"{where}: layer {name!r}"
    for k in ("nominal_bits", "effective_bits"):
        v = info.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise CorruptModelError(f"{what}: {k} must be a non-negative number, got {v!r}")
    b = info.get("bytes")
    if not isinstance(b, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                          and 0 <= v < 2**62 for k, v in b.items()):
        raise CorruptModelError(f"{what}: bytes must map kinds to byte counts, got {b!r}")


def check_manifest(manifest: dict, where: Path) -> None:
    """Refuse a manifest whose structure is not what :func:`save` writes, naming the field."""
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CorruptModelError(f"{where}: 'layers' is missing or not a non-empty object")
    for key in ("tied", "sha256"):
        v = manifest.get(key, {})
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise CorruptModelError(f"{where}: '{key}' must map tensor names to strings, got {type(v).__name__}")
    try:
        check_layout(layers, str(where))
    except LayoutError as e:
        raise CorruptModelError(str(e)) from None
    for name, info in layers.items():
        _check_summary(name, info, where)


def _check_layer(name: str, t: dict[str, torch.Tensor], info: dict) -> None:
    """Consistency of one packed layer; raises naming the offending tensor."""
    in_f = info["in_features"]
    seen = torch.zeros(in_f, dtype=torch.int64, device=t[f"{name}.outlier_channels"].device)
    groups = [(int(b), t[f"{name}.q{b}_channels"]) for b in info["channels"]]
    groups.append((0, t[f"{name}.outlier_channels"]))
    for b, ch in groups:
        label = f"{name}.q{b}_channels" if b else f"{name}.outlier_channels"
        if ch.numel() and (ch.min() < 0 or ch.max() >= in_f):
            raise CorruptModelError(f"{label}: channel id out of range [0, {in_f})")
        seen += torch.bincount(ch.long(), minlength=in_f)[:in_f] if ch.numel() else 0
        if b:
            bnd = t[f"{name}.q{b}_codebook_bounds"]
            if not torch.isfinite(bnd).all() or (bnd[:, 1] < bnd[:, 0]).any():
                raise CorruptModelError(f"{name}.q{b}_codebook_bounds: holds NaN or Inf, or a max below its min")
    if not torch.equal(seen, torch.ones_like(seen)):
        raise CorruptModelError(f"{name}: channel ids do not cover 0..{in_f - 1} exactly once")
    crow, col = t[f"{name}.sparse_crow"], t[f"{name}.sparse_col"]
    if crow[0] != 0 or (crow[1:] < crow[:-1]).any() or crow[-1] != col.numel():
        raise CorruptModelError(f"{name}.sparse_crow: row pointers not monotone from 0 to nnz={col.numel()}")
    if col.numel() and (col.min() < 0 or col.max() >= in_f):
        raise CorruptModelError(f"{name}.sparse_col: column out of range [0, {in_f})")
    for k in ("outlier_weight", "sparse_val"):
        if not torch.isfinite(t[f"{name}.{k}"]).all():
            raise CorruptModelError(f"{name}.{k}: holds NaN or Inf")
    s = t.get(f"{name}.row_scale")
    if s is not None and (not torch.isfinite(s).all() or (s <= 0).any()):
        raise CorruptModelError(f"{name}.row_scale: holds NaN, Inf or a scale that is not positive")


def _empty_model(path: Path, config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on meta, real buffers (rotary tables)
        return AutoModelForCausalLM.from_config(config)


def _skeleton(path: Path) -> nn.Module:
    """The config's architecture on the meta device, experts expanded, ``quantization_config`` kept.

    transformers raises many types (ValueError, KeyError, TypeError, AttributeError...) for a config it
    cannot build; each becomes a :class:`CorruptModelError` naming config.json and the cause."""
    import transformers
    from transformers import AutoConfig

    from cmpq.model.experts import expand_fused_experts

    try:
        config = AutoConfig.from_pretrained(path)
        qcfg = config.quantization_config
        del config.quantization_config  # keep transformers' own quantizers out of the way
        model = _empty_model(path, config)
    except Exception as e:  # noqa: BLE001 - see the docstring
        first = (str(e).splitlines() or [""])[0][:300]
        raise CorruptModelError(f"{path}/config.json: transformers {transformers.__version__} cannot build the "
                                f"model it describes ({type(e).__name__}: {first})") from None
    expand_fused_experts(model)  # expert matrices are stored as linears (cmpq.model.experts)
    model.config.quantization_config = qcfg
    return model


def _read_tensors(f: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``f``, header shapes checked against ``expected`` before
    any data is read (so a manifest or header that lies costs nothing)."""
    from safetensors import safe_open

    if not f.is_file():
        raise CorruptModelError(f"{f.parent}: missing {f.name}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("cmpq_format_version") not in {str(v) for v in READABLE_VERSIONS}:
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
    except Exception as e:  # noqa: BLE001 - safetensors raises its own and several builtin types
        raise CorruptModelError(f"{f}: unreadable or truncated safetensors file ({type(e).__name__}: {e})") from None
    return tensors


def _check_names(f: Path, tensors: dict, expected: dict, tied: dict, markers: set[str]) -> None:
    """The file holds exactly the tensors the architecture expects, less the tied ones (and the
    ``weight`` markers, absent from folders written before they existed), and each tied entry points
    at a stored tensor of the right shape."""
    missing = [k for k in expected if k not in tensors and k not in tied and k not in markers]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CorruptModelError(f"{f}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CorruptModelError(f"{f}: unexpected tensor {unexpected[0]}")
    for name, src in tied.items():
        if name not in expected or name in tensors or src not in tensors or tensors[src].shape != expected[name].shape:
            raise CorruptModelError(f"{f.parent / MANIFEST}: tied entry {name} -> {src} does not name a stored "
                                    f"tensor of {name}'s shape")


def _check_dtypes(f: Path, tensors: dict, expected: dict, layers: dict) -> None:
    """Dtypes, which the SHA-256 (over bytes) does not cover: a header edit from F16 to BF16 changes
    every value without touching a byte of data. Packed layers' tensors and non-float tensors have
    one possible dtype each; the other floating tensors were all written in one 16-bit dtype
    (``tensors_to_save``), so one that differs from the rest is refused."""
    loose: dict[torch.dtype, str] = {}
    for name, t in tensors.items():
        ref = expected[name]
        if name.rpartition(".")[0] in layers or not ref.is_floating_point():
            if t.dtype != ref.dtype:
                raise CorruptModelError(f"{f}: tensor {name} has dtype {t.dtype}, expected {ref.dtype}")
        elif t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise CorruptModelError(f"{f}: tensor {name} has dtype {t.dtype}, expected a floating dtype")
        else:
            loose.setdefault(t.dtype, name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptModelError(f"{f}: tensor {name} holds NaN or Inf")
    if len(loose) > 1:
        raise CorruptModelError(f"{f}: unquantized tensors in several dtypes ("
                                + ", ".join(f"{n}: {d}" for d, n in loose.items()) + "); cmpq writes them in one")


def _check_sum(f: Path, name: str, t: torch.Tensor, sums: dict) -> None:
    if sums.get(name) != tensor_sha256(t):
        raise CorruptModelError(f"{f}: tensor {name} does not match its checksum in {MANIFEST}: the file "
                                f"is damaged (cmpq.load with verify=False, or --no-verify, reads it anyway)")


def _verify_sums(f: Path, tensors: dict, sums: dict | None, verify: bool, has_manifest: bool) -> None:
    if verify and sums is not None:
        for name, t in tensors.items():
            _check_sum(f, name, t, sums)
    elif verify:
        why = "written without checksums (cmpq before 2026-12-02)" if has_manifest else \
            f"no {MANIFEST} (save_pretrained writes none), so no checksums"
        warnings.warn(f"{f.parent}: {why}; its data is not verified", stacklevel=3)


def verify_files(files: list[str | Path]) -> bool:
    """Check the safetensors ``files`` against the SHA-256 in the ``cmpq_manifest.json`` beside
    them, when there is one: the transformers loading path's counterpart of ``cmpq.load``'s check,
    so a damaged ``cmpq.save`` folder fails the same way whichever way it is loaded. Reads one
    tensor at a time (no second copy of the model in memory). Returns whether there were checksums
    to check; a folder without a manifest (``save_pretrained`` writes none, a hub repo may hold
    config and weights only) has none, and the structural checks are all it gets."""
    from safetensors import safe_open

    folder = Path(files[0]).parent
    if not (folder / MANIFEST).is_file():
        return False
    manifest = read_json(folder / MANIFEST, "the cmpq manifest")
    check_format_version(f"{folder}/{MANIFEST}", manifest.get("format_version"))
    check_manifest(manifest, folder / MANIFEST)
    sums = manifest.get("sha256")
    if sums is None:
        warnings.warn(f"{folder}: written without checksums (cmpq before 2026-12-02); its data is not verified",
                      stacklevel=2)
        return False
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                _check_sum(Path(f), name, st.get_tensor(name), sums)
    return True


def tensor_sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes (dtype and shape are checked separately)."""
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _tie(model: nn.Module, tied: dict) -> None:
    model.tie_weights()
    for name, src in tied.items():  # tie_weights only knows the usual pairs; make sure of all
        mod, _, attr = name.rpartition(".")
        smod, _, sattr = src.rpartition(".")
        if getattr(model.get_submodule(mod), attr).is_meta:
            setattr(model.get_submodule(mod), attr, getattr(model.get_submodule(smod), sattr))


def read_layout(path: Path, qc: dict, manifest: dict | None) -> dict:
    """The layer layout of a folder: ``quantization_config["layers"]`` (current folders) or the
    manifest's (older ones); both present must agree. A manifest must have passed
    ``check_manifest`` (which checks its layout) first."""
    layers = qc.get("layers")
    if layers is None:
        if manifest is None:
            raise CorruptModelError(f"{path}: missing {MANIFEST} and no 'layers' in config.json's "
                                    f"quantization_config; not a complete cmpq model folder")
        return manifest["layers"]
    try:
        check_layout(layers, f"{path}/config.json")
    except LayoutError as e:
        raise CorruptModelError(str(e)) from None
    if manifest is not None and not same_layout(layers, manifest["layers"]):
        raise CorruptModelError(f"{path}: config.json's quantization_config.layers and {MANIFEST} disagree "
                                f"on the quantized layers")
    return layers


def check_format_version(where: str, v: object) -> None:
    if v not in READABLE_VERSIONS:
        hint = {1: " (written by cmpq 0.1, which packed indices along the channels: quantize the model again)",
                2: " (FP16 codebooks and int32 ids, written before format v3: quantize the model again with "
                   "this cmpq, or load it with the cmpq that wrote it)"}.get(v, "")
        raise CorruptModelError(f"{where}: format_version {v!r} unsupported (this cmpq reads "
                                f"{' and '.join(map(str, READABLE_VERSIONS))}){hint}")


def weight_files(path: Path) -> list[Path]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` lists (``save_pretrained``
    shards above ``max_shard_size``)."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    index = path / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(read_json(index, "the shard index").get("weight_map", {}).values()))
        if not shards or any(Path(s).name != s for s in shards):
            raise CorruptModelError(f"{index}: weight_map must name shard files in this folder")
        for s in shards:
            if not (path / s).is_file():
                raise CorruptModelError(f"{path}: missing {s} (listed in {WEIGHTS_INDEX})")
        return [path / s for s in shards]
    raise CorruptModelError(f"{path}: missing {WEIGHTS}")


def is_cmpq_folder(path: str | Path) -> bool:
    """A folder ``cmpq.save`` wrote (it has the manifest) or ``save_pretrained`` wrote (no manifest,
    ``quant_method: "cmpq"`` in config.json); for a hub repo id, its config.json (cache or hub) says."""
    from cmpq.model.loading import could_be_hub_id

    name, path = str(path), Path(path).expanduser()
    if not path.exists() and could_be_hub_id(name):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "config.json")).parent
        except Exception:  # noqa: BLE001 - unreachable or not a repo: not a cmpq folder we can read
            return False
    if (path / MANIFEST).is_file():
        return True
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "cmpq"


def folder_summary(path: str | Path) -> tuple[dict, dict, int]:
    """(quantization_config, per-layer summaries as ``layer_summary`` gives them, bytes of the weight
    files) of a folder: the manifest's summaries, or computed from the layout (``save_pretrained``
    folders have no manifest; the shapes fix every byte count)."""
    from cmpq.storage.layout import build_layer

    path = Path(path).expanduser()
    qc = read_json(path / "config.json", "the model config").get("quantization_config") or {}
    manifest = read_json(path / MANIFEST, "the cmpq manifest") if (path / MANIFEST).is_file() else None
    if manifest is not None:
        check_manifest(manifest, path / MANIFEST)  # the summaries below read its fields
    layers = read_layout(path, qc, manifest)
    if manifest is not None:
        summaries = manifest["layers"]
    else:
        summaries = {n: layer_summary(build_layer(info)) for n, info in layers.items()}  # meta: nothing allocated
    return qc, summaries, sum(f.stat().st_size for f in weight_files(path))


def local_folder(path: str | Path) -> Path:
    """``path`` itself, or, for a hub repo id that is not a local folder, its snapshot in the
    Hugging Face cache (downloaded when the hub is reachable; offline, the cached copy)."""
    from cmpq.model.loading import could_be_hub_id

    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not could_be_hub_id(str(path)):
        raise FileNotFoundError(f"no such model folder: {p}")
    from huggingface_hub import snapshot_download

    try:  # config, weights, tokenizer: what a cmpq folder holds
        got = snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - the hub client raises many types (offline, 404, auth, network)
        raise FileNotFoundError(f"no such local folder {p}, and as a hub id: {type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:200]}") from None
    return Path(got)


def load(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         device_map: str | dict | None = None, max_memory: str | dict | None = None,
         verify: bool = True) -> nn.Module:
    """Load a cmpq folder (written by :func:`save` or by ``save_pretrained`` of a model
    ``from_pretrained`` loaded) into a model holding ``CMPQLinear`` layers.

    ``dtype`` is the compute dtype of the unquantized parts (default: float16 on GPU, float32 on CPU).
    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module: device}``; with
    ``max_memory`` such as ``{0: "20GiB", 1: "20GiB"}``) spreads the model over several devices with
    accelerate instead of moving it to ``device`` (see ``cmpq.model.device_map``). ``verify``
    checks every tensor against the SHA-256 in the manifest (1.9 s per GiB on one core of the 2-core
    dev machine, measured 2026-12-02); a folder without a manifest (``save_pretrained`` writes none)
    has no checksums, which ``verify`` reports with a warning. Every other check of docs/format.md
    ("Loading checks") runs either way; a damaged folder raises :class:`CorruptModelError` naming
    the file and the part.
    """
    path = local_folder(path)
    cfg_json = read_json(path / "config.json", "the model config")
    qc = cfg_json.get("quantization_config") or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != "cmpq":
        raise CorruptModelError(f"{path}/config.json: quantization_config.quant_method is not 'cmpq'")
    check_format_version(f"{path}/config.json", qc.get("format_version"))
    manifest = read_json(path / MANIFEST, "the cmpq manifest") if (path / MANIFEST).is_file() else None
    if manifest is not None:
        check_format_version(f"{path}/{MANIFEST}", manifest.get("format_version"))
        check_manifest(manifest, path / MANIFEST)
    layers = read_layout(path, qc, manifest)

    model = _skeleton(path)
    try:
        install(model, layers, str(path / ("config.json" if qc.get("layers") is not None else MANIFEST)))
    except LayoutError as e:
        raise CorruptModelError(str(e)) from None
    expected = model.state_dict()
    markers = {f"{n}.{MARKER}" for n in layers}  # absent from folders written before it existed
    if manifest is not None:
        tied = manifest.get("tied", {})
    else:  # the model's own tying (save_pretrained stores a tied tensor once, as save does)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    files = weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for wf in files:
        tensors.update(_read_tensors(wf, expected))
    f = files[0] if len(files) == 1 else path / WEIGHTS_INDEX
    _check_names(f, tensors, expected, tied, markers)
    _check_dtypes(f, tensors, expected, layers)
    for name, info in layers.items():
        _check_layer(name, tensors, info)
    _verify_sums(f, tensors, manifest.get("sha256") if manifest is not None else None, verify, manifest is not None)
    for name in markers - tensors.keys():
        tensors[name] = marker_tensor()
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        _tie(model, tied)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CorruptModelError(f"{f}: no data for {still_meta[0]}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    set_compute_dtype(model, dtype)
    if device_map is not None:
        from cmpq.model.device_map import dispatch

        model = dispatch(model.eval(), device_map, max_memory)
    else:
        model.to(device)
        model.eval()
    prepare_runtime(model, dtype=dtype)  # the kernels' layout of every layer on a GPU, once, now
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
