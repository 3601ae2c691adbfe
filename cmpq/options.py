"""``RunOptions``: how a CMPQ run is carried out, as opposed to what it computes (``CMPQConfig``).

Why two dataclasses: a ``CMPQConfig`` describes the quantized model (widths, outliers, allocator,
fine-tuning) and is saved with it in full; run options say where the calibration text comes from,
where the work happens (device, processes, memory cap), how it survives a crash (checkpoint folder,
resume) and what the user sees (log lines, progress bars). Keeping them apart means the same
algorithm settings can be run on a laptop or a GPU host without touching the config, and the saved
``quantization_config`` holds no local paths or device names.

Calibration settings (source, windows, seed, batch size) are run options, yet they do change the
result: the saved model records them as a description (:meth:`RunOptions.calibration_record`, no
absolute paths), and a run checkpoint refuses to resume under different ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from cmpq.data.datasets import CALIB_DATASETS, describe_path
from cmpq.data.tokens import Windows


@dataclass
class RunOptions:
    """Everything about a ``cmpq.quantize`` run that is not the algorithm.

    ``calib``: a data set name (``c4``, ``wikitext2``, ``offline``), a ``.txt``/``.jsonl`` file, a
    ``Windows``, or token ids ``[nsamples, seqlen]`` (then their shape overrides ``nsamples`` and
    ``seqlen``, and ``seed`` is unused). ``calib_batch_size`` windows go through each forward pass;
    it changes the float summation order of the calibration statistics, hence possibly the result.

    ``checkpoint_dir`` gets every finished block; ``resume`` continues from it (an existing one is
    refused without ``resume``). ``offload_activations`` keeps calibration activations on the CPU.
    ``max_gpu_memory`` (bytes or e.g. ``"8GiB"``, stored as bytes) caps the accelerator memory:
    activations are offloaded and k-means chunks shrink as needed, or the run is refused before any
    work. ``dist`` (``cmpq.model.distributed.Dist``) runs this process as one of several that
    quantize the model together; it computes on ``dist.device``.

    ``log`` receives progress lines (None: silent, progress bars too); ``progress`` shows tqdm bars
    with an ETA on stderr when it is a terminal.
    """

    calib: str | os.PathLike | Windows | torch.Tensor | None = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib_batch_size: int = 8
    device: torch.device | str | None = None
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = False
    offload_activations: bool = False
    max_gpu_memory: int | str | None = None
    dist: Any = None
    log: Callable[[str], None] | None = print
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_calib()
        for name, minimum in (("nsamples", 1), ("seqlen", 2), ("calib_batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                why = " (a window needs a token to predict)" if name == "seqlen" else ""
                raise ValueError(f"{name} must be an integer >= {minimum}{why}, got {v!r}")
        for name in ("resume", "offload_activations", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_device()
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir):
                raise ValueError(f"checkpoint_dir must be a folder path, got {self.checkpoint_dir!r}")
            self.checkpoint_dir = Path(self.checkpoint_dir)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True continues a run from its checkpoint folder; pass checkpoint_dir too")
        self._check_memory_cap()
        if self.log is not None and not callable(self.log):
            raise ValueError(f"log must be a function taking a string (e.g. print), or None; got {self.log!r}")
        if self.dist is not None and not all(hasattr(self.dist, a) for a in ("rank", "world_size", "device")):
            raise ValueError(f"dist must be the Dist that cmpq.model.distributed.init() returns, got {self.dist!r}")

    def _check_calib(self) -> None:
        c = self.calib
        if c is None:
            self.calib = "c4"
        elif isinstance(c, Windows):
            pass
        elif isinstance(c, torch.Tensor):
            if c.dim() != 2 or c.is_floating_point() or c.is_complex():
                raise ValueError(f"calibration tokens must be integer ids [nsamples, seqlen], got a {c.dtype} "
                                 f"tensor of shape {tuple(c.shape)}")
        elif isinstance(c, (str, os.PathLike)):
            if str(c) not in CALIB_DATASETS and not Path(c).expanduser().is_file():
                raise FileNotFoundError(f"calib {str(c)!r} is neither a data set ({', '.join(CALIB_DATASETS)}) "
                                        f"nor an existing .txt/.jsonl file")
            self.calib = str(c) if str(c) in CALIB_DATASETS else Path(c).expanduser()
        else:
            raise ValueError(f"calib must be a data set name, a file path, Windows or a token tensor; "
                             f"got {type(c).__name__}")

    def _check_device(self) -> None:
        if self.device is None:
            return
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {self.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this machine has no CUDA device; use 'cpu'")
        if self.dist is not None and dev != torch.device(self.dist.device):
            raise ValueError(f"device {dev} differs from dist.device {self.dist.device}: each process computes "
                             f"on its dist.device; leave device unset")
        self.device = dev

    def _check_memory_cap(self) -> None:
        cap = self.max_gpu_memory
        if cap is None:
            return
        if isinstance(cap, str):
            from cmpq.model.memory import parse_bytes

            self.max_gpu_memory = parse_bytes(cap)  # its error names the string and the accepted units
        elif not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
            raise ValueError(f"max_gpu_memory must be a positive number of bytes or a size like '8GiB', got {cap!r}")

    # -- what a run records ---------------------------------------------------------------------
    def compute_device(self) -> torch.device:
        """Where the run computes: ``dist.device``, else ``device``, else CUDA when there is one."""
        if self.dist is not None:
            return torch.device(self.dist.device)
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def calibration_record(self, windows: Windows) -> dict:
        """The calibration settings that shape the result, for the saved ``quantization_config`` and
        the checkpoint identity: source (a data set name, or a file named without its folder, see
        ``describe_path``), window count and length as drawn, seed, and batch size."""
        drawn = isinstance(self.calib, (str, Path))
        if isinstance(self.calib, Path):
            source = describe_path(self.calib)
        elif drawn:
            source = self.calib
        else:
            source = "user tokens"
        return {"source": source, "nsamples": int(windows.ids.shape[0]), "seqlen": int(windows.ids.shape[1]),
                "seed": self.seed if drawn else None, "batch_size": self.calib_batch_size}


RUN_OPTION_NAMES = tuple(f.name for f in fields(RunOptions))


def merge_options(options: RunOptions | None, keywords: dict[str, Any], where: str = "cmpq.quantize()") -> RunOptions:
    """``options`` with ``keywords`` (run options given one by one) applied; each field may come from
    one of the two only, so a value is never silently overridden."""
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"{where}: options must be a cmpq.RunOptions, got {type(options).__name__}")
    unknown = [k for k in keywords if k not in RUN_OPTION_NAMES]
    if unknown:
        from cmpq.config import CMPQConfig

        algo = [k for k in unknown if k in CMPQConfig.__dataclass_fields__]
        if algo:
            raise TypeError(f"{where} got {', '.join(algo)}: an algorithm setting, which goes in "
                            f"CMPQConfig({algo[0]}=...)")
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}; run options are "
                        f"{', '.join(RUN_OPTION_NAMES)}")
    if options is None:
        return RunOptions(**keywords)
    if keywords:
        given = ", ".join(f"{k}=" for k in sorted(keywords))
        raise TypeError(f"{where}: run options go either in options=RunOptions(...) or as keywords, not both "
                        f"(got options= and {given}); options already holds a value for each of them")
    return options
