"""``CMPQLinear``: a linear layer held in CMPQ's packed form (see docs/format.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

from cmpq.nn import fuse, opaque
from cmpq.storage import codebook
from cmpq.storage.codebook import id_dtype
from cmpq.storage.packing import packed_shape, unpack_channels

if TYPE_CHECKING:
    from cmpq.algorithm.layer import QuantizedParts

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
    exactly ``x @ W_hat^T + bias``; a fused kernel is used when one is registered for the input's
    device and shape, else the weight is dequantized (pure PyTorch, any device).

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
        self.register_buffer(MARKER, marker_tensor(device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        self._dense_cache: torch.Tensor | None = None
        self.cache_dense = False  # keep the dequantized weight after first use (fast eval, more memory)
        self._handle = opaque.register(self)  # torch.compile sees this layer as one op (cmpq/nn/opaque.py)
        self._group: tuple | None = None  # (SharedInputGroup, index) once fused (cmpq/nn/fuse.py)

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
        return out

    def effective_bits(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / (self.in_features * self.out_features)

    # -- compute ---------------------------------------------------------------------------------
    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The dense ``W_hat`` ``[out, in]`` this layer stands for."""
        dev = self.outlier_weight.device
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=dev)
        for b in self.bit_widths:
            ch, pk, cb = self.group(b)
            n = ch.numel()
            if n == 0:
                continue
            idx = self.group_indices(b)  # [out, n]
            flat = idx + (torch.arange(n, device=dev) * (2**b)).unsqueeze(0)
            w[:, ch.long()] = cb.reshape(-1)[flat].to(dtype)
        if self.outlier_channels.numel():
            w[:, self.outlier_channels.long()] = self.outlier_weight.to(dtype)
        if self.sparse_col.numel():
            rows = torch.repeat_interleave(
                torch.arange(self.out_features, device=dev), (self.sparse_crow[1:] - self.sparse_crow[:-1]).long()
            )
            w[rows, self.sparse_col.long()] = self.sparse_val.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.cmpq.linear(x, self._handle, self.out_features)
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        from cmpq.kernels import dispatch  # local: kernels are optional

        stamp = fuse.tick()
        if self._group is not None:
            y = self._group[0].call(self._group[1], x, stamp)
            if y is not None:
                return y

        if self._dense_cache is not None and self._dense_cache.dtype == x.dtype:
            w = self._dense_cache  # asked for (cache_dense): dequantized once, plain matmul from then on
        else:
            fused = None if self.cache_dense else dispatch(self, x)
            if fused is not None:
                return fused
            w = self.dequantize(x.dtype)
            if self.cache_dense:
                self._dense_cache = w
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

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
    memory cost. Off by default; fused kernels make it unnecessary on GPU."""
    for m in model.modules():
        if isinstance(m, CMPQLinear):
            if on:
                m.cache_dense = True
            else:
                m.release_cache()


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
    if bias is not None:
        layer.bias = bias.detach().half().clone()
    return layer
