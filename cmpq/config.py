"""``CMPQConfig``: the algorithm of a CMPQ run, validated up front so bad input fails before work.

Only what decides the quantized model lives here, and all of it is saved with the model. How a run
is carried out (calibration data, devices, checkpoints, memory cap, logging) is ``RunOptions``
(``cmpq.options``); passing one of those here raises a ``TypeError`` that says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cmpq.algorithm.allocation import ALLOCATOR_NAMES, check_budget

QUANTIZERS = ("kmeans", "uniform")
ALGORITHMS = ("compensated", "paper")
TOKEN_WEIGHTINGS = ("gradient", "none")
MAX_WIDTH = 8


@dataclass
class CMPQConfig:
    """Settings of Channel-wise Mixed-Precision Quantization.

    ``algorithm="compensated"`` (the default) quantizes each layer's channels in GPTQ order with
    error feedback through a loss-weighted Hessian, after a whole-model allocation of widths
    (``widths`` plus FP16 columns) by measured distortion; ``bits`` is then the **effective** bits
    per weight of the quantized linears, every stored byte counted, met to within one channel.
    ``algorithm="paper"`` is the paper's method (Algorithm 1, fixed O_act, k-means without
    compensation); there ``bits`` is the nominal 2..4-bit average of the quantized channels.
    ``act_outlier_frac``, ``quantizer`` and ``edge_frac`` belong to the paper's method (and to the
    ``allocator="algorithm1"`` ablation of the compensated one).
    """

    bits: float = 3.0
    algorithm: str = "compensated"
    act_outlier_frac: float = 0.0045  # O_act: fraction of input channels kept whole in FP16
    weight_outlier_frac: float = 0.0005  # O_q: fraction of all weights kept in FP16 (sparse)
    quantizer: str = "kmeans"  # "kmeans" (non-uniform, the paper's) or "uniform" (min-max RTN, App. A.2)
    allocator: str = "auto"  # "distortion" (compensated) or "algorithm1" (paper); "auto" picks by algorithm
    edge_frac: float = 0.01  # at exactly 3 bits: fraction of channels moved to 2 bits and to 4 bits
    kmeans_iters: int = 100
    # compensated algorithm: merge-and-split moves after Lloyd's k-means (cmpq.algorithm.kmeans), in
    # the allocation's distortion and the initial codebooks; 0: plain Lloyd (two starts). None: 15 for
    # the compensated algorithm (five batched Lloyd runs of 3 moves; 9 sequential moves gave, on CPU,
    # SmolLM2, no fine-tuning: 3.36 bits 34.21 -> 33.73, 4.3 bits 27.49 -> 27.37), 0 for the paper's method
    kmeans_swaps: int | None = None
    # the moves in the allocation's distortion estimates; None: as kmeans_swaps. They are most of the
    # allocation's GPU time (H100, one SmolLM2 block: 2.45 s with 15 moves, 0.33 s without); 0 there (and
    # 16 moves, 8 per run, in the pass) measured 31.43 vs 31.02 WikiText-2 at 3.36 bits (CPU, 4 windows;
    # held-out KL 0.171 vs 0.173): not clearly worse, not adopted without the GPU grid
    alloc_kmeans_swaps: int | None = None
    # compensated algorithm
    # candidate widths per channel, FP16 columns too if fp16_columns. 1 is allowed; the GPU
    # kernels take 2..4 (a layer with 1-bit channels runs through dequantization)
    widths: tuple = (2, 3, 4)
    fp16_columns: bool = True
    token_weighting: str = "gradient"  # "gradient": ||dL/dy_t||^2 per token (cmpq.model.sensitivity); "none"
    row_weighting: str = "none"  # "gradient": k-means weights per output row, sum_t g_tr^2 (SqueezeLLM-style)
    compensate: bool = True  # GPTQ-style error feedback (False: ablation)
    damp: float = 0.01  # Hessian dampening, relative to its mean diagonal
    block_size: int = 128  # lazy-update block; codebooks are fitted per block
    alloc_kmeans_iters: int = 25  # k-means iterations when measuring each width's distortion
    # either algorithm: distil the stored values (codebooks, FP16 parts, biases) from the
    # full-precision model on the calibration windows, indices fixed (cmpq.model.distill); 0: off
    # None: 2 for the compensated algorithm (SmolLM2 CPU study: 37.98 -> 35.04 WikiText-2 at 3.36 bits),
    # 0 for the paper's method, so its rows stay the paper's
    finetune_epochs: int | None = None
    # compensated algorithm: one FP16 scale per output row, codebooks fitted to the scaled rows
    # (cmpq.algorithm.compensated.row_scales); 16 bits per row, charged to the budget. None: on for
    # the compensated algorithm, off for the paper's (which has none)
    row_scale: bool | None = None
    # Adam step relative to each layer's RMS value (cmpq.model.distill.finetune says how it was chosen)
    finetune_lr: float = 1e-3
    # block linears to leave dense, as fnmatch patterns over qualified names ("*.mlp.down_proj")
    skip_modules: tuple = ()
    extra: dict = field(default_factory=dict)

    def __new__(cls, *args, **kwargs):
        # Runs before the generated __init__, so a run option gets a pointer to where it went
        # instead of Python's bare "unexpected keyword argument".
        from cmpq.options import RUN_OPTION_NAMES

        moved = [k for k in kwargs if k in RUN_OPTION_NAMES]
        if moved:
            raise TypeError(f"CMPQConfig got {', '.join(moved)}: a run option, not an algorithm setting; pass it "
                            f"as cmpq.RunOptions({moved[0]}=...) (options= of cmpq.quantize) or as a keyword of "
                            f"cmpq.quantize")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.allocator == "auto":
            self.allocator = "distortion" if self.algorithm == "compensated" else "algorithm1"
        if self.allocator == "distortion" and self.algorithm != "compensated":
            raise ValueError("allocator 'distortion' needs algorithm 'compensated'")
        if self.allocator == "distortion":
            try:
                b = float(self.bits)
            except (TypeError, ValueError):
                raise ValueError(f"bit budget must be a number, got {self.bits!r}") from None
            if not math.isfinite(b) or not 1 < b <= 16:
                raise ValueError(f"bit budget (effective bits per weight, all storage counted) must be in "
                                 f"(1, 16], got {self.bits!r}")
            self.bits = b
        else:
            self.bits = check_budget(self.bits)
        if isinstance(self.skip_modules, str) or not all(isinstance(p, str) for p in self.skip_modules):
            raise ValueError(f"skip_modules must be a list of name patterns, got {self.skip_modules!r}")
        self.skip_modules = tuple(self.skip_modules)
        self.widths = tuple(sorted(set(int(w) for w in self.widths)))
        if not self.widths or any(not 1 <= w <= MAX_WIDTH for w in self.widths):
            raise ValueError(f"widths must be integers in 1..{MAX_WIDTH}, got {self.widths!r}")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token_weighting must be one of {TOKEN_WEIGHTINGS}, got {self.token_weighting!r}")
        if self.row_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"row_weighting must be one of {TOKEN_WEIGHTINGS}, got {self.row_weighting!r}")
        if not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp) or not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp!r}")
        if self.finetune_epochs is None:
            self.finetune_epochs = 2 if self.algorithm == "compensated" else 0
        if self.row_scale is None:
            self.row_scale = self.algorithm == "compensated"
        if not isinstance(self.row_scale, bool):
            raise ValueError(f"row_scale must be True or False, got {self.row_scale!r}")
        if self.row_scale and self.algorithm != "compensated":
            raise ValueError("row_scale needs algorithm 'compensated' (the paper's method has no row scales)")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be a non-negative integer, got {self.finetune_epochs!r}")
        if not isinstance(self.finetune_lr, (int, float)) or not math.isfinite(self.finetune_lr) \
                or not 0 < self.finetune_lr < 1:
            raise ValueError(f"finetune_lr must be in (0, 1), got {self.finetune_lr!r}")
        if self.kmeans_swaps is None:
            self.kmeans_swaps = 15 if self.algorithm == "compensated" else 0
        if self.alloc_kmeans_swaps is None:
            self.alloc_kmeans_swaps = self.kmeans_swaps
        for name in ("kmeans_swaps", "alloc_kmeans_swaps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("block_size", "alloc_kmeans_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("act_outlier_frac", "weight_outlier_frac", "edge_frac"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 0.5:
                raise ValueError(f"{name} must be a fraction in [0, 0.5), got {v!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.allocator not in ALLOCATOR_NAMES:
            raise ValueError(f"unknown allocator {self.allocator!r}; choose from {ALLOCATOR_NAMES}")
        for name in ("compensate", "fp16_columns"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be a positive integer, got {self.kmeans_iters!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(d["widths"])  # as it reads back from JSON
        d["skip_modules"] = list(d["skip_modules"])
        return d
