"""CMPQ on one matrix: outliers, allocation in place, packing into CMPQLinear."""

import pytest
import torch

from cmpq.algorithm.layer import quantize_weight, quantize_weights
from cmpq.config import CMPQConfig
from cmpq.nn.linear import CMPQLinear, pack_linear
from cmpq.storage.codebook import storable
from cmpq.storage.packing import pack_indices, packed_shape, unpack_indices


def PaperConfig(**kw) -> CMPQConfig:
    """These tests are about the paper's layer step (``quantize_weight``)."""
    return CMPQConfig(algorithm="paper", **kw)


def weight_and_norms(out_f=150, in_f=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g), torch.rand(in_f, generator=g) * 10


def test_activation_outliers_are_the_top_norm_channels_kept_exactly():
    w, a = weight_and_norms()
    a[[7, 123, 399]] = 1e6  # 0.45% of 400 channels rounds to 2: the two largest after this would tie
    p = quantize_weight(w, a, PaperConfig(bits=3, act_outlier_frac=0.0075))
    assert p.outlier_channels.tolist() == [7, 123, 399]
    assert torch.equal(p.outlier_weight, w[:, [7, 123, 399]].half())
    deq = p.dequantize()
    assert torch.equal(deq[:, [7, 123, 399]], w[:, [7, 123, 399]].half().float())


def test_weight_outliers_are_the_largest_first_pass_errors_and_exact():
    w, a = weight_and_norms()
    cfg = PaperConfig(bits=2.5, weight_outlier_frac=0.002)
    p = quantize_weight(w, a, cfg)
    n = round(0.002 * w.numel())
    assert p.sparse_vals.numel() == n
    # first pass = the same quantization with no weight outliers taken out
    first = quantize_weight(w, a, PaperConfig(bits=2.5, weight_outlier_frac=0))
    err = (w - first.dequantize()).abs()
    err[:, first.outlier_channels] = -1
    top = set(torch.topk(err.reshape(-1), n).indices.tolist())
    got = set((p.sparse_rows * w.shape[1] + p.sparse_cols).tolist())
    assert got == top
    deq = p.dequantize()
    assert torch.equal(deq[p.sparse_rows, p.sparse_cols], w[p.sparse_rows, p.sparse_cols].half().float())
    # the final codebooks are fitted without the outliers, warm-started from the first pass: a channel's
    # codebook equals that fit of its other values, and differs from the first pass's codebook
    from cmpq.algorithm.kmeans import kmeans_1d

    col = int(p.sparse_cols[0])
    (b, (ch, _, cb)), = [(b, g) for b, g in p.groups.items() if (g[0] == col).any()]
    fch, _, fcb = first.groups[b]
    first_cb = fcb[(fch == col).nonzero()[0, 0]].float()
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[p.sparse_rows[p.sparse_cols == col]] = False
    refit = storable(kmeans_1d(w[:, col][keep][None], 2**b, init=first_cb[None]))[0].half()
    assert torch.equal(cb[(ch == col).nonzero()[0, 0]], refit)
    assert not torch.equal(refit, first_cb.half())
    key = p.sparse_rows * w.shape[1] + p.sparse_cols
    assert (key[1:] > key[:-1]).all()


def test_budget_met_on_quantized_channels():
    w, a = weight_and_norms(in_f=1000)
    for bits in (2.0, 2.2, 2.5, 3.0, 3.5, 3.7, 4.0):
        p = quantize_weight(w, a, PaperConfig(bits=bits))
        n = {b: g[0].numel() for b, g in p.groups.items()}
        avg = sum(b * k for b, k in n.items()) / sum(n.values())
        assert abs(avg - bits) <= 1 / sum(n.values()) + 1e-9


def test_error_falls_with_bits_and_uniform_is_worse_than_kmeans():
    w, a = weight_and_norms()
    errs = [(quantize_weight(w, a, PaperConfig(bits=b)).dequantize() - w).norm() for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2]
    uni = (quantize_weight(w, a, PaperConfig(bits=3, quantizer="uniform")).dequantize() - w).norm()
    assert uni > errs[1]


def test_batched_equals_one_by_one():
    layers = [weight_and_norms(o, i, s) for s, (o, i) in enumerate([(64, 96), (200, 96), (64, 150)])]
    cfg = PaperConfig(bits=3.3)
    together = quantize_weights([w for w, _ in layers], [a for _, a in layers], cfg)
    for (w, a), p in zip(layers, together):
        assert torch.equal(p.dequantize(), quantize_weight(w, a, cfg).dequantize())


def test_bad_inputs_are_refused():
    w, a = weight_and_norms()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(w, a, PaperConfig())
    w, a = weight_and_norms()
    with pytest.raises(ValueError, match="shape"):
        quantize_weight(w, a[:-1], PaperConfig())
    with pytest.raises(ValueError, match="fraction"):
        PaperConfig(act_outlier_frac=-0.1)
    with pytest.raises(ValueError, match="quantizer"):
        PaperConfig(quantizer="lloyd")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [0, 1, 31, 32, 33, 100])
def test_pack_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    idx = torch.randint(0, 2**bits, (7, cols), generator=g)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == packed_shape(7, cols, bits)
    assert packed.numel() * 32 == 7 * -(-cols // 32) * 32 * bits  # exactly `bits` bits per index
    assert torch.equal(unpack_indices(packed, bits, cols), idx)


def test_pack_refuses_out_of_range():
    with pytest.raises(ValueError):
        pack_indices(torch.tensor([[4]]), 2)


@pytest.mark.parametrize("bias", [False, True])
def test_cmpq_linear_equals_dense_matmul(bias):
    w, a = weight_and_norms(67, 300)
    p = quantize_weight(w, a, PaperConfig(bits=2.7))
    b = torch.randn(67) if bias else None
    layer = pack_linear(p, b)
    assert isinstance(layer, CMPQLinear)
    w_hat = layer.dequantize(torch.float32)
    assert torch.equal(w_hat, p.dequantize())
    x = torch.randn(3, 5, 300)
    ref = x @ w_hat.T + (b.half().float() if bias else 0)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert abs(layer.nominal_bits() - 2.7) <= 1 / 299 and layer.effective_bits() > layer.nominal_bits()


def test_dense_cache_dequantizes_once():
    w, a = weight_and_norms(67, 300)
    layer = pack_linear(quantize_weight(w, a, PaperConfig(bits=3)), None)
    layer.cache_dense = True
    x = torch.randn(2, 300)
    first = layer(x)
    layer.dequantize = None  # a second dequantization would fail here
    assert torch.equal(layer(x), first)
    layer.release_cache()
    assert layer._dense_cache is None and not layer.cache_dense


def test_channel_packing_roundtrip_row_ranges_and_no_channel_padding():
    from cmpq.storage.packing import pack_channels, unpack_channels

    g = torch.Generator().manual_seed(5)
    for bits, out, n in ((2, 576, 6), (3, 200, 37), (4, 64, 1), (3, 96, 0)):
        idx = torch.randint(0, 2**bits, (out, n), generator=g)
        pk = pack_channels(idx, bits)
        assert pk.shape == (n, -(-out // 32) * bits)  # a group of 6 channels costs 6 channels, not 32
        assert torch.equal(unpack_channels(pk, bits, out), idx)
        if out > 64:
            assert torch.equal(unpack_channels(pk, bits, out, 32, out - 5), idx[32 : out - 5])
    with pytest.raises(ValueError, match="multiple of 32"):
        unpack_channels(pk, 3, 96, 5, 10)
    with pytest.raises(ValueError, match="words per channel"):
        unpack_channels(pack_channels(torch.zeros(64, 3, dtype=torch.long), 2), 2, 100)


@pytest.mark.parametrize("bad", [{"compensate": "no"}, {"kmeans_iters": 0},
                                 {"bits": 17}, {"bits": 1.0}, {"bits": float("nan")}, {"widths": (0, 2)},
                                 {"token_weighting": "fisher"}, {"damp": 0}, {"finetune_epochs": -1},
                                 {"finetune_lr": 0}, {"algorithm": "magic"}, {"kmeans_swaps": -1},
                                 {"alloc_kmeans_swaps": -1}, {"alloc_kmeans_swaps": True}])
def test_config_refuses_bad_fields(bad):
    with pytest.raises(ValueError):
        CMPQConfig(**bad)
