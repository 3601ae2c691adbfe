"""``CMPQConfig``: every setting of a CMPQ run, validated up front so bad input fails before work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cmpq.algorithm.allocation import ALLOCATORS, check_budget

QUANTIZERS = ("kmeans", "uniform")


@dataclass
class CMPQConfig:
    """Settings of Channel-wise Mixed-Precision Quantization (defaults follow the paper)."""

    bits: float = 3.0
    act_outlier_frac: float = 0.0045  # O_act: fraction of input channels kept whole in FP16
    weight_outlier_frac: float = 0.0005  # O_q: fraction of all weights kept in FP16 (sparse)
    quantizer: str = "kmeans"  # "kmeans" (non-uniform, the paper's) or "uniform" (min-max RTN, App. A.2)
    allocator: str = "algorithm1"
    edge_frac: float = 0.01  # at exactly 3 bits: fraction of channels moved to 2 bits and to 4 bits
    kmeans_iters: int = 100
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib_batch_size: int = 8  # calibration windows per forward pass
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bits = check_budget(self.bits)
        for name in ("act_outlier_frac", "weight_outlier_frac", "edge_frac"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 0.5:
                raise ValueError(f"{name} must be a fraction in [0, 0.5), got {v!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; choose from {sorted(ALLOCATORS)}")
        for name in ("kmeans_iters", "nsamples", "seqlen", "calib_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)
