"""Random ``CMPQLinear`` layers filled per docs/format.md, for kernel tests and benchmarks."""

from __future__ import annotations

import torch

from cmpq.nn.linear import CMPQLinear
from cmpq.storage.packing import BLOCK, pack_channels


def mix_counts(n_in: int, bits: float, outlier_frac: float = 0.0045) -> tuple[dict[int, int], int]:
    """Channel counts per width averaging ``bits`` (the paper's Algorithm 1 split) + outlier count."""
    n_act = round(outlier_frac * n_in)
    n = n_in - n_act
    if bits > 3:
        n4 = round((bits - 3) * n); c = {2: 0, 3: n - n4, 4: n4}
    elif bits < 3:
        n2 = round((3 - bits) * n); c = {2: n2, 3: n - n2, 4: 0}
    else:
        k = round(0.01 * n); c = {2: k, 3: n - 2 * k, 4: k}
    return c, n_act


@torch.no_grad()
def random_layer(
    out_features: int,
    in_features: int,
    counts: dict[int, int],
    n_outlier_channels: int = 0,
    n_sparse: int = 0,
    bias: bool = False,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    pack: bool = True,
) -> CMPQLinear:
    """A valid random layer. ``pack=False`` draws the packed words directly (same distribution as
    packing uniform random indices, far cheaper for big benchmark shapes)."""
    dev = torch.device(device)
    gen = generator or torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    layer = CMPQLinear(in_features, out_features, counts, n_outlier_channels, n_sparse, bias, device=dev)
    perm = torch.randperm(in_features, generator=gen)
    start = 0
    for b in layer.bit_widths:
        n = counts[b]
        ch, pk = getattr(layer, f"q{b}_channels"), getattr(layer, f"q{b}_packed")
        ch.copy_(perm[start:start + n].to(ch.dtype))
        start += n
        scale = 0.02 * (1 + torch.rand(n, 1, generator=gen))
        layer.set_codebook(b, (torch.sort(torch.randn(n, 2**b, generator=gen), dim=1).values * scale).to(dev))
        if n == 0:
            continue
        if pack:
            pk.copy_(pack_channels(torch.randint(0, 2**b, (out_features, n), generator=gen), b).to(dev))
        else:
            words = torch.randint(-2**31, 2**31, pk.shape, dtype=torch.int64, device=dev).to(torch.int32)
            tail = out_features % BLOCK
            if tail:  # zero the padding lanes of the last block, as pack_channels does
                words[:, -b:] &= (1 << tail) - 1
            pk.copy_(words)
    layer.outlier_channels.copy_(perm[start:].to(layer.outlier_channels.dtype))
    layer.outlier_weight.copy_((0.2 * rand(out_features, n_outlier_channels)).half())
    if n_sparse:
        quantized = perm[:start]  # sparse outliers never fall in outlier columns
        flat = torch.empty(0, dtype=torch.long)
        while flat.numel() < n_sparse:  # unique positions without a randperm of out*in
            draw = torch.randint(0, out_features * start, (2 * n_sparse,), generator=gen)
            flat = torch.cat([flat, draw]).unique()
        flat = flat[torch.randperm(flat.numel(), generator=gen)[:n_sparse]]
        rows, cols = flat // start, quantized[flat % start]
        order = torch.argsort(rows * in_features + cols)
        rows, cols = rows[order], cols[order]
        layer.sparse_crow.copy_(torch.cat([torch.zeros(1, dtype=torch.long),
                                           torch.bincount(rows, minlength=out_features).cumsum(0)]).to(layer.sparse_crow.dtype))
        layer.sparse_col.copy_(cols.to(layer.sparse_col.dtype))
        layer.sparse_val.copy_((0.5 * torch.randn(n_sparse, generator=gen)).half())
    if bias:
        layer.bias.copy_((0.1 * rand(out_features)).half())
    return layer
