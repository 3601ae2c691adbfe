"""``CMPQLinear``: a linear layer held in CMPQ's packed form (see docs/format.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

from cmpq.kernels import layout
from cmpq.nn import fuse, ops
from cmpq.storage import codebook
from cmpq.storage.codebook import id_dtype
from cmpq.storage.packing import packed_shape, unpack_channels

if TYPE_CHECKING:
    from cmpq.algorithm.layer import QuantizedParts
    from cmpq.kernels.layout import Runtime

BIT_WIDTHS = (2, 3, 4)
# Name of the empty marker every layer stores (docs/format.md, "The `weight` marker"): where a dense loader looks
# for this layer's weight, so one that does not know cmpq finds a shape it cannot use and refuses the
# file instead of initialising the weight at random.
MARKER = "weight"


def marker_tensor(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device)


class CMPQLinear(nn.Module):
    """Packed channel-wise mixed-precision linear layer.

    Buffers follow docs/format.md one to one, so ``state_dict`` is the on-disk form. ``forward`` is
    exactly ``x @ W_hat^T + bias``, computed by the operator ``torch.ops.cmpq.linear``
    (cmpq/nn/ops.py) from the layer's own tensors: a fused kernel on CUDA (fp16/bf16), else the
    weight is dequantized (pure PyTorch, any device). The kernels read the runtime layout
    (``prepare_runtime``): non-persistent buffers ``rt_*``, built once. The gradient of ``x`` is
    defined (adapters on a frozen model train); the stored tensors get none.

    ``weight`` is an empty ``uint8`` marker, not the weight (that is ``dequantize()``): stored under
    the name a dense loader expects, it makes plain transformers refuse a cmpq file (shape mismatch)
    rather than load it as random weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        counts: dict[int, int],
        n_outlier_channels: int,
        n_sparse: int,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        row_scale: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bit_widths = tuple(sorted(counts))
        if sum(counts.values()) + n_outlier_channels != in_features:
            raise ValueError(
                f"channel counts {counts} + {n_outlier_channels} outlier channels != in_features {in_features}"
            )
        kw = dict(device=device)
        ids = id_dtype(in_features)  # format v3: the smallest integer types that fit (docs/format.md)
        for b in self.bit_widths:
            n = counts[b]
            self.register_buffer(f"q{b}_channels", torch.empty(n, dtype=ids, **kw))
            self.register_buffer(f"q{b}_packed", torch.empty(packed_shape(n, out_features, b), dtype=torch.int32, **kw))
            self.register_buffer(f"q{b}_codebook", torch.empty(n, 2**b, dtype=torch.uint8, **kw))
            self.register_buffer(f"q{b}_codebook_bounds", torch.zeros(n, 2, dtype=torch.float16, **kw))
        self.register_buffer("outlier_channels", torch.empty(n_outlier_channels, dtype=ids, **kw))
        self.register_buffer("outlier_weight", torch.empty(out_features, n_outlier_channels, dtype=torch.float16, **kw))
        self.register_buffer("sparse_crow", torch.zeros(out_features + 1, dtype=id_dtype(n_sparse), **kw))
        self.register_buffer("sparse_col", torch.empty(n_sparse, dtype=ids, **kw))
        self.register_buffer("sparse_val", torch.empty(n_sparse, dtype=torch.float16, **kw))
        if row_scale:  # format v4: W = diag(row_scale) @ (codebooks, outlier columns, sparse values)
            self.register_buffer("row_scale", torch.ones(out_features, dtype=torch.float16, **kw))
        else:
            self.row_scale = None
        self.register_buffer(MARKER, marker_tensor(device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        self._dense_cache: torch.Tensor | None = None
        self.cache_dense = False  # keep the dequantized weight after first use (fast eval, more memory)
        self._group: tuple | None = None  # (SharedInputGroup, index) once fused (cmpq/nn/fuse.py)
        self._rt_names: tuple[str, ...] = ()  # buffers of the runtime layout, in kernel order
        self._rt_key: tuple | None = None  # layout.stamp of the stored buffers it was built from
        self._rt_mma = True

    # -- structure -------------------------------------------------------------------------------
    def counts(self) -> dict[int, int]:
        return {b: getattr(self, f"q{b}_channels").numel() for b in self.bit_widths}

    def group(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(channels int32, packed indices, codebook FP16 ``[n, 2**b]``) of the b-bit group: the stored
        narrow ids and 8-bit codes decoded, the form every kernel's load-time layout starts from."""
        return (getattr(self, f"q{b}_channels").to(torch.int32), getattr(self, f"q{b}_packed"),
                codebook.decode(getattr(self, f"q{b}_codebook"), getattr(self, f"q{b}_codebook_bounds")))

    def set_codebook(self, b: int, cb: torch.Tensor) -> None:
        """Store FP codebooks ``[n, 2**b]`` of the b-bit group (encoded to 8-bit codes + FP16 bounds)."""
        codes, bounds = codebook.encode(cb)
        setattr(self, f"q{b}_codebook", codes)
        setattr(self, f"q{b}_codebook_bounds", bounds)

    def group_indices(self, b: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Codebook indices ``[r1 - r0, n_b]`` (int64) of the b-bit group for output rows ``r0:r1``."""
        return unpack_channels(getattr(self, f"q{b}_packed"), b, self.out_features, r0, r1)

    def nominal_bits(self) -> float:
        c = self.counts()
        n = sum(c.values())
        return sum(b * k for b, k in c.items()) / n if n else 16.0

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of every stored tensor but the bias, by kind."""
        out: dict[str, int] = {"indices": 0, "codebooks": 0, "channel_ids": 0}
        nbytes = lambda name: (lambda x: x.numel() * x.element_size())(getattr(self, name))  # noqa: E731
        for b in self.bit_widths:
            out["indices"] += nbytes(f"q{b}_packed")
            out["codebooks"] += nbytes(f"q{b}_codebook") + nbytes(f"q{b}_codebook_bounds")
            out["channel_ids"] += nbytes(f"q{b}_channels")
        out["outlier_columns"] = sum(t.numel() * t.element_size() for t in (self.outlier_channels, self.outlier_weight))
        out["sparse_outliers"] = sum(
            t.numel() * t.element_size() for t in (self.sparse_crow, self.sparse_col, self.sparse_val)
        )
        out["row_scales"] = 0 if self.row_scale is None else nbytes("row_scale")
        return out

    def effective_bits(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / (self.in_features * self.out_features)

    # -- compute ---------------------------------------------------------------------------------
    def _stored(self) -> tuple:
        """The stored tensors in the order ``ops.dequantize`` and ``torch.ops.cmpq.linear`` take them:
        per bit width channel ids, packed indices, codebook codes, codebook bounds; then the outlier
        columns, the sparse outliers and the row scales (or None)."""
        bits = self.bit_widths
        return ([getattr(self, f"q{b}_channels") for b in bits], [getattr(self, f"q{b}_packed") for b in bits],
                [getattr(self, f"q{b}_codebook") for b in bits], [getattr(self, f"q{b}_codebook_bounds") for b in bits],
                self.outlier_channels, self.outlier_weight, self.sparse_crow, self.sparse_col, self.sparse_val,
                self.row_scale)

    def _op_args(self) -> tuple:
        """Everything ``torch.ops.cmpq.linear`` takes after ``x``: the layer's own tensors and ints."""
        return (*self._stored(), self.bias, self.runtime_tensors(), list(self.bit_widths), self.out_features)

    def _op_args_unscaled(self) -> tuple:
        """``_op_args`` for ``x @ (W_hat / s)^T + bias / s`` (``s`` the row scales): what the kernels
        compute (their layout's bias is ``bias / s``), with no multiply inside the operator."""
        stored = self._stored()[:-1]
        bias = None if self.bias is None else self.bias.float() / self.row_scale.float()
        return (*stored, None, bias, self.runtime_tensors(), list(self.bit_widths), self.out_features)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The dense ``W_hat`` ``[out, in]`` this layer stands for."""
        return ops.dequantize(*self._stored(), list(self.bit_widths), self.in_features, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            y = self._eager(x)
            if y is not None:
                return y
        elif self._dense_cache is not None and self._dense_cache.dtype == x.dtype:
            return F.linear(x, self._dense_cache, None if self.bias is None else self.bias.to(x.dtype))
        if self.row_scale is None:
            return torch.ops.cmpq.linear(x, *self._op_args())
        # The row scales are applied here, outside the operator: under torch.compile the multiply
        # then fuses into the kernel that reads the output (rotary, residual add, SiLU), where
        # inside the operator it was one more launch per layer and call.
        y = torch.ops.cmpq.linear(x, *self._op_args_unscaled())
        return y * self.row_scale.to(y.dtype)

    def _eager(self, x: torch.Tensor) -> torch.Tensor | None:
        """What only eager calls do: the shared-input fusion (cmpq/nn/fuse.py, Python state between
        calls), the dense cache, and rebuilding a runtime layout its stored buffers outdated. None:
        call the operator."""
        stamp = fuse.tick()
        if self._group is not None:
            y = self._group[0].call(self._group[1], x, stamp)
            if y is not None:
                return y
        if self.cache_dense and (self._dense_cache is None or self._dense_cache.dtype != x.dtype):
            self._dense_cache = self.dequantize(x.dtype)  # asked for: dequantized once, plain matmul from then on
        if self._dense_cache is not None and self._dense_cache.dtype == x.dtype:
            return F.linear(x, self._dense_cache, None if self.bias is None else self.bias.to(x.dtype))
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not self.runtime_current():
            self.prepare_runtime(self._rt_mma)
        return None

    # -- runtime layout ---------------------------------------------------------------------------
    def prepare_runtime(self, mma: bool = True) -> bool:
        """Build the kernels' runtime layout (cmpq/kernels/layout.py) from the stored buffers, on the
        layer's device, as non-persistent buffers ``rt_*``: ``state_dict`` and saved files do not
        change, ``.to()`` moves them, ``torch.compile`` and ``torch.export`` see plain tensors.

        ``cmpq.load`` and ``from_pretrained`` call this for layers on a GPU (on a CPU no kernel
        runs, so none is built there). A layer whose stored buffers changed since (replaced,
        edited in place) rebuilds it at its next eager call on CUDA. ``mma``: include the tensor-core
        kernel's copy of the indices (2..16 tokens; about the size of the packed indices again;
        without it those token counts run on v3b). Returns False, holding no layout, for bit widths
        the kernels do not take (the reference path serves those)."""
        self.release_runtime()
        self._rt_mma = mma
        self._rt_key = layout.stamp(self)
        if not layout.supported(self):
            return False
        built = layout.build(self, mma)
        for name, t in built.items():
            self.register_buffer(name, t, persistent=False)
        self._rt_names = tuple(built)
        return True

    def release_runtime(self) -> None:
        """Drop the runtime layout (its memory); ``runtime()`` or a CUDA call builds it again."""
        for name in self._rt_names:
            del self._buffers[name]
        self._rt_names, self._rt_key = (), None

    def runtime_tensors(self) -> list[torch.Tensor]:
        """The runtime layout's buffers in kernel order (empty when none is built)."""
        return [self._buffers[n] for n in self._rt_names]

    def runtime_current(self) -> bool:
        """Whether the runtime layout (or the finding that none applies) matches the stored buffers."""
        return self._rt_key is not None and self._rt_key == layout.stamp(self)

    def runtime(self) -> Runtime | None:
        """The runtime layout as the kernels take it, built or rebuilt first if the stored buffers
        changed since; None for widths the kernels do not take."""
        if not self.runtime_current():
            self.prepare_runtime(self._rt_mma)
        return self._fitting_runtime()

    def _fitting_runtime(self) -> Runtime | None:
        if not self._rt_names:
            return None
        c = self.counts()
        return layout.Runtime.from_tensors(self.runtime_tensors(), self.bit_widths, [c[b] for b in self.bit_widths],
                                           self.out_features, self.in_features, self.sparse_val)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()`` and friends: a layout moved along with its stored
        buffers stays current; one the conversion broke (a dtype the kernels do not read) is dropped."""
        current = self.runtime_current()
        super()._apply(fn, recurse)
        if self._rt_names or current:
            if current and (not self._rt_names or self._fitting_runtime() is not None):
                self._rt_key = layout.stamp(self)
            else:
                self.release_runtime()
        return self

    def release_cache(self) -> None:
        self._dense_cache = None
        self.cache_dense = False

    def extra_repr(self) -> str:
        c = ", ".join(f"{b}b:{n}" for b, n in self.counts().items())
        return (
            f"in={self.in_features}, out={self.out_features}, channels=[{c}], "
            f"outlier_channels={self.outlier_channels.numel()}, sparse={self.sparse_val.numel()}, "
            f"bits={self.nominal_bits():.2f} (effective {self.effective_bits():.2f})"
        )


def cache_dense_weights(model: nn.Module, on: bool = True) -> None:
    """Keep each layer's dequantized weight after first use: fast repeated evaluation at FP16
    memory cost. Off by default; fused kernels make it unnecessary on GPU. The runtime layouts go
    (the dense weights replace the kernels); turning it off lets them be built again."""
    for m in model.modules():
        if isinstance(m, CMPQLinear):
            if on:
                m.cache_dense = True
                m.release_runtime()
            else:
                m.release_cache()


def prepare_runtime(model: nn.Module, mma: bool = True, dtype: torch.dtype | None = None) -> int:
    """``prepare_runtime`` for every ``CMPQLinear`` on a CUDA device (``cmpq.load`` and
    ``from_pretrained`` call this once the model is in place); returns how many were built. Layers
    on other devices, or a model computing in ``dtype`` float32 (no kernel takes it), run the
    reference path and get none."""
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, CMPQLinear) and m.outlier_weight.device.type == "cuda" and not m.cache_dense:
            n += bool(m.prepare_runtime(mma))
    return n


def pack_linear(parts: "QuantizedParts", bias: torch.Tensor | None) -> CMPQLinear:
    """Build a ``CMPQLinear`` from the algorithm's unpacked result (packs the indices)."""
    from cmpq.storage.packing import pack_channels

    counts = {b: ch.numel() for b, (ch, _, _) in parts.groups.items()}
    dev = parts.outlier_weight.device
    layer = CMPQLinear(
        parts.in_features,
        parts.out_features,
        counts,
        parts.outlier_channels.numel(),
        parts.sparse_vals.numel(),
        bias is not None,
        dtype=torch.float16,
        device=dev,
        row_scale=parts.row_scale is not None,
    )
    ids = id_dtype(parts.in_features)
    for b, (ch, idx, cb) in parts.groups.items():
        setattr(layer, f"q{b}_channels", ch.to(ids))
        setattr(layer, f"q{b}_packed", pack_channels(idx, b))
        layer.set_codebook(b, cb)
    layer.outlier_channels = parts.outlier_channels.to(ids)
    layer.outlier_weight = parts.outlier_weight.half()
    crow = torch.zeros(parts.out_features + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.bincount(parts.sparse_rows, minlength=parts.out_features).cumsum(0)
    layer.sparse_crow = crow.to(id_dtype(parts.sparse_vals.numel()))
    layer.sparse_col = parts.sparse_cols.to(ids)
    layer.sparse_val = parts.sparse_vals.half()
    if parts.row_scale is not None:
        layer.row_scale = parts.row_scale.half()
    if bias is not None:
        layer.bias = bias.detach().half().clone()
    return layer
