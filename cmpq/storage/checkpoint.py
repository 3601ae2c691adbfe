"""Resumable runs: ``<output>.partial/`` holds every finished block and the hidden states feeding the next.

Layout (every file written to a temp name, fsynced, renamed; ``state.json`` last, so it never
points at a file that is not complete):

- ``state.json``: cmpq format version, the run's identity (:func:`run_identity`: everything that
  changes the result) and ``blocks_done``;
- ``block_00007.safetensors``: the ``CMPQLinear`` buffers of block 7 (names relative to the block);
- ``hidden_00007.safetensors``: the hidden states leaving block 7, one tensor per calibration batch.
  Only the newest is kept. The keyword arguments blocks receive (masks, rotary tables) are not
  stored: resuming re-runs the cheap catch step to rebuild them.

A resumed run restores the finished blocks bit for bit and continues from the next one with the
same inputs, so its result is byte-identical to an uninterrupted run on the same machine.

Test hook: ``CMPQ_TEST_DIE_AFTER_BLOCK=i`` SIGKILLs the process right after block ``i`` (0-based)
is checkpointed, to simulate a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch
from torch import nn

from cmpq.model.blocks import find_linears, set_module
from cmpq.nn.linear import MARKER, CMPQLinear, marker_tensor

STATE = "state.json"


class CheckpointMismatch(ValueError):
    """A ``.partial`` folder exists that this run cannot (or was not asked to) continue."""


def partial_dir(output: str | Path) -> Path:
    out = Path(output).expanduser().resolve()
    return out.with_name(out.name + ".partial")


def tokens_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def model_sha256(model: nn.Module) -> str:
    """Hash of the model's config, minus what differs between loads of the same weights."""
    d = model.config.to_dict()
    for k in ("_name_or_path", "quantization_config", "use_cache", "torch_dtype", "dtype", "transformers_version"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes): a resumed run must continue the
    same weights, not merely the same architecture. Hashes what is in memory, so any source format
    (safetensors, GGUF, hub) counts the same; 1.9 s per GiB on one core of the 2-core dev machine
    (measured 2026-12-02)."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type != "meta":
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(model: nn.Module, cfg, calibration: dict, windows, device: torch.device) -> dict:
    """What a run's result depends on, so a checkpoint is continued only by the same run: the
    algorithm (``CMPQConfig``), the calibration settings (``RunOptions.calibration_record``: source,
    window count and length, seed, batch size, which sets the float summation order of the
    statistics) and a SHA-256 of the token ids actually drawn, the model's config and weights, the
    compute dtype and the device type. Options that only place the work (offloading, memory cap,
    process count, checkpoint folder) are left out: they leave the result as it is."""
    from cmpq import __version__

    return {
        "cmpq_version": __version__,
        "config": cfg.to_dict(),
        "calibration": windows.description,
        "calibration_settings": calibration,
        "calibration_shape": list(windows.ids.shape),
        "calibration_sha256": tokens_sha256(windows.ids),
        "model_config_sha256": model_sha256(model),
        "model_weights_sha256": weights_sha256(model),  # the run must continue the same weights
        "compute_dtype": str(next(model.parameters()).dtype),
        "device_type": device.type,
    }


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temporary name; a failed write (disk full) leaves the checkpoint as it
    was, and says so: every finished block in it is still good for --resume."""
    from cmpq.storage.io import as_os_error

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        os_err = as_os_error(e)
        if os_err is None:
            raise
        raise OSError(os_err.errno, f"cannot write the run checkpoint {path}: {os_err.strerror or os_err} (the "
                                    f"blocks finished before are kept: free some space and run the same command "
                                    f"with --resume)") from e


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda p: save_file(cpu, str(p), metadata=meta))


def _layer_from_tensors(t: dict[str, torch.Tensor]) -> CMPQLinear:
    """A ``CMPQLinear`` holding ``t`` (its state dict); shapes are read off the tensors."""
    counts = {int(k[1:].split("_")[0]): v.numel() for k, v in t.items() if k.startswith("q") and k.endswith("_channels")}
    n_out = t["outlier_channels"].numel()
    layer = CMPQLinear(sum(counts.values()) + n_out, t["sparse_crow"].numel() - 1, counts, n_out,
                       t["sparse_val"].numel(), "bias" in t)
    t.setdefault(MARKER, marker_tensor())  # blocks saved before the marker existed
    layer.load_state_dict(t)
    return layer


class BlockCheckpoint:
    """One run's ``.partial`` folder. ``identity`` must match on resume; ``blocks_done`` says where to go on."""

    def __init__(self, path: str | Path, identity: dict, resume: bool) -> None:
        from cmpq.storage.io import FORMAT_VERSION

        self.path = Path(path)
        self.identity = {"cmpq_format_version": FORMAT_VERSION, **identity}
        self.blocks_done = 0
        state_file = self.path / STATE
        if self.path.exists() and not resume:
            raise CheckpointMismatch(f"{self.path} holds an unfinished run; pass --resume (resume=True) to continue "
                                     f"it, or delete the folder to start over")
        if resume and state_file.is_file():
            state = json.loads(state_file.read_text())
            saved = state.get("identity", {})
            diff = sorted(k for k in self.identity.keys() | saved.keys() if saved.get(k) != self.identity.get(k))
            if diff:
                detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {self.identity.get(k)!r}" for k in diff)
                raise CheckpointMismatch(f"{self.path} was made by a different run ({detail}); run with the same "
                                         f"settings and calibration, or delete the folder to start over")
            self.blocks_done = int(state["blocks_done"])
            missing = [f.name for f in self._files(self.blocks_done) if not f.is_file()]
            if missing:
                raise CheckpointMismatch(f"{self.path}: {missing[0]} is missing; delete the folder to start over")
        self.path.mkdir(parents=True, exist_ok=True)
        if not state_file.is_file():
            self._write_state()

    def _files(self, done: int) -> list[Path]:
        if not done:
            return []
        return [self.path / f"block_{i:05d}.safetensors" for i in range(done)] + [self._hidden_file(done - 1)]

    def _hidden_file(self, i: int) -> Path:
        return self.path / f"hidden_{i:05d}.safetensors"

    def _write_state(self) -> None:
        text = json.dumps({"identity": self.identity, "blocks_done": self.blocks_done}, indent=1)
        _atomic(self.path / STATE, lambda p: p.write_text(text))

    # -- the walk's side ------------------------------------------------------------------------
    def restore(self, i: int, block: nn.Module) -> None:
        """Put finished block ``i`` back: its linears become the saved ``CMPQLinear``s."""
        from safetensors.torch import load_file

        t = load_file(str(self.path / f"block_{i:05d}.safetensors"))
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in t.items():
            name, _, buf = k.rpartition(".")
            by_layer.setdefault(name, {})[buf] = v
        linears = find_linears(block)
        if set(by_layer) != set(linears):
            raise CheckpointMismatch(f"{self.path}: block {i} holds layers {sorted(by_layer)}, the model {sorted(linears)}")
        dev = next(iter(linears.values())).weight.device
        for name, tensors in by_layer.items():
            set_module(block, name, _layer_from_tensors(tensors).to(dev))

    def load_hidden(self) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        t = load_file(str(self._hidden_file(self.blocks_done - 1)))
        return [t[f"batch_{j:05d}"] for j in range(len(t))]

    def save(self, i: int, block: nn.Module, hidden: list[torch.Tensor]) -> None:
        """Block ``i`` is done and ``hidden`` leaves it: write both, then advance ``state.json``."""
        tensors = {f"{n}.{k}": v for n, m in block.named_modules() if isinstance(m, CMPQLinear)
                   for k, v in m.state_dict().items()}
        _save_tensors(tensors, self.path / f"block_{i:05d}.safetensors", {"block": str(i)})
        _save_tensors({f"batch_{j:05d}": h for j, h in enumerate(hidden)}, self._hidden_file(i), {"after_block": str(i)})
        self.blocks_done = i + 1
        self._write_state()
        if i:
            self._hidden_file(i - 1).unlink(missing_ok=True)
        if os.environ.get("CMPQ_TEST_DIE_AFTER_BLOCK") == str(i):
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
