"""Codebook fine-tuning (cmpq.model.distill): exact open/close of a layer, and a pass that lowers
the KL to the full-precision model without touching indices or format."""

import copy

import pytest
import torch

import cmpq
from cmpq.config import CMPQConfig
from cmpq.model.distill import TunableLinear, _Weight, _kl, finetune, project, teacher_states
from cmpq.nn.linear import CMPQLinear

from tiny_models import one_thread  # noqa: F401


def _quantized(tiny_llama, calib_ids, **kw):
    kw.setdefault("bits", 3.0 if kw.get("algorithm") == "paper" else 4.0)  # tiny layers: >= 3.4 effective
    kw.setdefault("finetune_epochs", 0)
    cfg = CMPQConfig(kmeans_iters=10, alloc_kmeans_iters=5, **kw)
    return cmpq.quantize(tiny_llama, calib=calib_ids, config=cfg, device="cpu", log=None)


def test_tunable_linear_is_the_layer_and_writes_back_exactly(tiny_llama, calib_ids):
    model = _quantized(tiny_llama, calib_ids, algorithm="paper")
    layer = next(m for m in model.modules() if isinstance(m, CMPQLinear))
    w0 = layer.dequantize(torch.float32)
    t = TunableLinear(layer)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(t(x), torch.nn.functional.linear(x, w0, None if layer.bias is None else layer.bias.float()))
    # permute one codebook's entries: write_back must re-sort and remap indices, same weights
    b = layer.bit_widths[0]
    lo, hi = t.slices[f"q{b}_codebook"]
    with torch.no_grad():
        t.values[lo:hi] += torch.linspace(0, 1e-3, hi - lo)
    w_seen = t.stored()[t.where].detach()  # what the loss saw
    y_seen = t(x).detach()
    out = t.write_back()
    # what is saved is exactly what training saw (8-bit codebook grids, FP16 columns), so a wrong
    # remap of the re-sorted entries (a whole entry spacing) or a rounding at write-back both fail
    assert torch.equal(out.dequantize(torch.float32), w_seen)
    torch.testing.assert_close(out(x), y_seen, rtol=1e-5, atol=1e-6)
    # (the raw values were off the grid, so this checked the rounding, not a no-op)
    assert not torch.equal(w_seen, t.values[t.where].detach()), "the perturbation must need rounding"
    cb = out.group(b)[2].float()
    assert (cb[:, 1:] >= cb[:, :-1]).all(), "codebooks must stay ascending"


def test_weight_gradient_equals_indexing_and_the_layer_uses_it(tiny_llama, calib_ids):
    """The scatter-add backward (no sort on CUDA) gives autograd's gradient of
    ``(values[where] * row_scale).to(dtype)``: repeated indices summed, untouched values zero, int32
    and int64 indices, with and without row scales, float32 and bfloat16 weights."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, generator=g, requires_grad=True)
    for dtype in (torch.int32, torch.int64):
        for scale in (None, torch.rand(7, generator=g) + 0.5):
            for wd in (torch.float32, torch.bfloat16):
                where = torch.randint(0, 40, (7, 9), generator=g).to(dtype)  # 40..49 never read
                grad = torch.randn(7, 9, generator=g).to(wd)
                plain = v[where] if scale is None else v[where] * scale[:, None]
                (ref,) = torch.autograd.grad(plain.to(wd), v, grad)
                w = _Weight.apply(v, where, scale, wd)
                assert w.dtype == wd and torch.equal(w, plain.detach().to(wd))
                (got,) = torch.autograd.grad(w, v, grad)
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
                assert got[40:].abs().max() == 0 and ref.abs().max() > 0
    model = _quantized(tiny_llama, calib_ids)
    t = TunableLinear(next(m for m in model.modules() if isinstance(m, CMPQLinear)))
    t(torch.randn(2, t.layer.in_features)).pow(2).sum().backward()
    assert t.values.grad is not None and t.values.grad.abs().max() > 0
    nodes, seen = [t(torch.randn(2, t.layer.in_features)).grad_fn], set()
    while nodes:  # the layer's graph goes through _Weight, not plain indexing
        n = nodes.pop()
        seen.add(type(n).__name__)
        try:
            nodes += [f for f, _ in n.next_functions if f is not None]
        except RuntimeError:  # torch 2.11 (GPU machine) refuses next_functions on some custom-Function nodes
            pass
    assert "_WeightBackward" in seen and "IndexBackward0" not in seen, seen


def test_projection_of_all_layers_at_once_equals_layer_by_layer(tiny_llama, calib_ids):
    """Fine-tuning rounds every layer's codebooks of one width onto their 8-bit grids in one call
    (``project``); it must give each layer exactly what rounding it alone gives."""
    model = _quantized(tiny_llama, calib_ids)
    tunables = [TunableLinear(m) for m in model.modules() if isinstance(m, CMPQLinear)]
    assert len({b for t in tunables for b in t.layer.bit_widths}) > 1, "needs several widths to mean anything"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in tunables:  # off the grid, and by different amounts per layer
            t.values += torch.randn(t.values.shape, generator=g) * 1e-3 * t.values.abs().mean()
    project(tunables)
    together = [t.target for t in tunables]
    for t, target in zip(tunables, together):
        t.target = None
        project([t])
        assert torch.equal(t.target, target)
        assert not torch.equal(target, t.values.detach())  # the rounding did something
        # a forward uses the projected values once, then computes them afresh
        t.target = None
        w = t.stored().detach()
        assert torch.equal(w, target) and t.target is None


def test_finetune_lowers_kl_and_keeps_indices(tiny_llama, calib_ids):
    teacher_model = copy.deepcopy(tiny_llama)
    states = teacher_states(tiny_llama, calib_ids, torch.device("cpu"))
    model = _quantized(tiny_llama, calib_ids, bits=3.5)  # enough error for the epochs' KL to fall clearly
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CMPQLinear)}
    channels = {n: [m.group(b)[0].clone() for b in m.bit_widths] for n, m in layers.items()}
    bytes_before = {n: m.storage_bytes() for n, m in layers.items()}

    def kl() -> float:
        with torch.no_grad():
            return _kl(model(calib_ids).logits, teacher_model(calib_ids).logits).item()

    before = kl()
    hist = finetune(model, calib_ids, states, torch.device("cpu"), epochs=3, lr=5e-3)
    after = kl()
    assert after < before * 0.95, (before, after)
    assert hist["kl_last_epoch"] < hist["kl_first_epoch"]
    assert hist["kept_epoch"] >= 1 and hist["held_out_kl"][hist["kept_epoch"]] < hist["held_out_kl"][0]
    for n, m in model.named_modules():
        if isinstance(m, CMPQLinear):
            assert m.storage_bytes() == bytes_before[n]
            for got, want in zip([m.group(b)[0] for b in m.bit_widths], channels[n]):
                assert torch.equal(got, want)
    assert all(p.requires_grad for p in model.parameters())


def test_quantize_with_finetune_records_it(tiny_llama, calib_ids):
    model = _quantized(tiny_llama, calib_ids, finetune_epochs=1)
    ft = model.config.quantization_config["finetune"]
    assert ft["kl_first_epoch"] > 0
    assert model.config.quantization_config["time_split_seconds"]["finetune"] >= 0


def test_finetune_logs_its_pace_within_an_epoch(tiny_llama, calib_ids):
    """A quarter-epoch line, so a pass cut off by a time limit still shows how fast it went."""
    ids = torch.cat([calib_ids, calib_ids.flip(0)])  # 8 windows: 7 train, 1 held out
    states = teacher_states(tiny_llama, ids, torch.device("cpu"))
    model = _quantized(tiny_llama, calib_ids)
    lines: list[str] = []
    finetune(model, ids, states, torch.device("cpu"), epochs=2, lr=1e-3, log=lines.append, progress=False)
    pace = [ln for ln in lines if "windows, mean KL so far" in ln]
    # 7 training windows: a line after windows 1..6 each (the 7th ends the epoch and gets its own line)
    assert [ln.split(":")[1].split()[0] for ln in pace] == [f"{k}/7" for k in range(1, 7)] * 2, lines
    assert sum("KL to full precision" in ln for ln in lines) == 2


def test_finetune_keeps_the_model_when_no_epoch_helps(tiny_llama, calib_ids):
    """A step far too large makes every epoch worse on the held-out windows: the pass must hand
    back the quantized model exactly as it came, and say so."""
    states = teacher_states(tiny_llama, calib_ids, torch.device("cpu"))
    model = _quantized(tiny_llama, calib_ids)
    before = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, CMPQLinear)}
    hist = finetune(model, calib_ids, states, torch.device("cpu"), epochs=2, lr=50.0)
    assert hist["kept_epoch"] == 0, hist
    assert min(hist["held_out_kl"][1:]) >= hist["held_out_kl"][0]
    assert hist["lr_backoffs"] == 1  # epoch 1 overshot: undone, epoch 2 ran with a quarter of the step
    for n, m in model.named_modules():
        if isinstance(m, CMPQLinear):
            assert torch.equal(m.dequantize(torch.float32), before[n]), n


def test_held_out_split():
    from cmpq.model.distill import held_out_split

    train, held = held_out_split(16)
    assert held.numel() == 2 and train.numel() == 14
    assert sorted(torch.cat([train, held]).tolist()) == list(range(16))
    train, held = held_out_split(7)  # nothing to spare: every window is both
    assert train.tolist() == held.tolist() == list(range(7))


def test_tunable_linear_applies_row_scales_and_keeps_them(tiny_llama, calib_ids):
    """Row scales (format v4) take part in the forward pass, are not trained, and the values trained
    under them write back exactly."""
    model = _quantized(tiny_llama, calib_ids)  # compensated: row scales on
    layer = next(m for m in model.modules() if isinstance(m, CMPQLinear))
    assert layer.row_scale is not None
    s0 = layer.row_scale.clone()
    x = torch.randn(3, layer.in_features)
    t = TunableLinear(layer)
    assert all(p is not t.row_scale for p in t.parameters())
    torch.testing.assert_close(t(x), layer(x), rtol=1e-5, atol=1e-6)
    lo, hi = t.slices[f"q{layer.bit_widths[-1]}_codebook"]
    with torch.no_grad():
        t.values[lo:hi] += 1e-3
    y_seen = t(x).detach()
    out = t.write_back()
    torch.testing.assert_close(out(x), y_seen, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.row_scale, s0)


def test_a_diverged_step_raises_and_the_model_is_left_as_it_came(tiny_llama, calib_ids, monkeypatch):
    """The loss is read from the device only where it is shown (no sync a step), so a step whose loss
    is not finite is caught at the next read, and its NaN values never reach the saved model."""
    import cmpq.model.distill as distill

    states = teacher_states(tiny_llama, calib_ids, torch.device("cpu"))
    model = _quantized(tiny_llama, calib_ids)
    before = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, CMPQLinear)}
    real, calls = distill._kl, [0]

    def nan_on_the_second_training_step(s, t, reduction="mean"):
        out = real(s, t, reduction)
        if reduction == "sum":  # training steps (the held-out KL is taken with "sum" too, but under no_grad)
            calls[0] += out.requires_grad
            if out.requires_grad and calls[0] == 2:
                return out * float("nan")
        return out

    monkeypatch.setattr(distill, "_kl", nan_on_the_second_training_step)
    with pytest.raises(FloatingPointError, match="diverged"):
        finetune(model, calib_ids, states, torch.device("cpu"), epochs=2, lr=1e-3)
    for n, m in model.named_modules():
        if isinstance(m, CMPQLinear):
            assert torch.equal(m.dequantize(torch.float32), before[n]), n
            assert not any(isinstance(c, distill.TunableLinear) for c in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_backoff_restarts_from_the_best_values(tiny_llama, calib_ids, monkeypatch):
    """After an epoch that raises the held-out KL, the next epoch starts from the best values (not
    the overshot ones) with a smaller step: with three epochs at a step that overshoots once and
    then helps, the last epoch must beat the first."""
    import cmpq.model.distill as distill

    monkeypatch.setattr(distill, "BACKOFF", 1000.0)
    states = teacher_states(tiny_llama, calib_ids, torch.device("cpu"))
    model = _quantized(tiny_llama, calib_ids)
    hist = finetune(model, calib_ids, states, torch.device("cpu"), epochs=3, lr=5.0)
    kl = hist["held_out_kl"]
    assert hist["lr_backoffs"] >= 1 and kl[1] > kl[0]
    assert min(kl[2:]) < kl[1]  # from the restored values with 1/1000 of the step, not further from epoch 1's


def test_finetune_that_runs_out_of_device_memory_leaves_the_model_as_it_was(tiny_llama, calib_ids, monkeypatch):
    """Layers open up on the device after the model moved there; memory running out half-way through
    them gives the clear error, every layer back as it was and the parameters trainable again."""
    import cmpq.model.distill as distill

    model = _quantized(tiny_llama, calib_ids, algorithm="paper")
    teacher = teacher_states(model, calib_ids, torch.device("cpu"))  # any states of the right shape
    layers = [m for m in model.modules() if isinstance(m, CMPQLinear)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opened = []
    real_init = TunableLinear.__init__

    def init(self, layer):
        if len(opened) == 3:
            raise torch.OutOfMemoryError("simulated")
        real_init(self, layer)
        opened.append(layer)

    monkeypatch.setattr(distill.TunableLinear, "__init__", init)
    with pytest.raises(RuntimeError, match="does not fit.*finetune_epochs=0"):
        finetune(model, calib_ids, teacher, torch.device("cpu"), epochs=1)
    assert len(opened) == 3
    assert [m for m in model.modules() if isinstance(m, CMPQLinear)] == layers
    assert not any(isinstance(m, TunableLinear) for m in model.modules())
    assert all(p.requires_grad for p in trainable) and trainable


def test_student_and_teacher_logits_are_taken_at_the_same_point(calib_ids):
    """Gemma-2 soft-caps its logits after ``lm_head``; the teacher's logits are ``lm_head`` of the
    stored states, so the student's must be ``lm_head``'s output too: a model compared with its own
    states is then at zero KL (with the capped logits it was not)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from cmpq.model.distill import _mean_kl

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       final_logit_softcapping=0.05)  # the tiny model's logits are ~0.3
    model = _quantized(Gemma2ForCausalLM(cfg).eval(), calib_ids, algorithm="paper")
    states = teacher_states(model, calib_ids, torch.device("cpu"))
    head = model.get_output_embeddings()
    every = torch.arange(calib_ids.shape[0])
    fixed = _mean_kl(model, calib_ids, states, head, torch.device("cpu"), every, [])
    capped = model(calib_ids[:1], use_cache=False).logits[0]
    before = _kl(capped, head(states[0].float())).item()  # what the pass compared before
    assert fixed < 1e-6 and before > 1e-4, (fixed, before)


def test_tunable_layer_books_describe_its_index(tiny_llama, calib_ids):
    """``TunableLinear``'s ``book_base``/``book_size`` say where each column's codebook sits in
    ``values``: every weight of a codebook column indexes inside it except the sparse outliers, FP16
    columns have none; and the per-slot scatter given them (Triton's interpreter here) sums exactly
    what the PyTorch form does."""
    pytest.importorskip("triton")
    from cmpq.kernels import gather_weight as gw

    model = _quantized(tiny_llama, calib_ids)
    layer = next(m for m in model.modules() if isinstance(m, CMPQLinear) and m.sparse_val.numel())
    t = TunableLinear(layer)
    base, size, where = t.book_base.long(), t.book_size.long(), t.where.long()
    fp = layer.outlier_channels.long()
    assert (base[fp] == -1).all() and (size[fp] == 0).all()
    books = (base >= 0).nonzero().squeeze(1)
    inside = (where[:, books] >= base[books]) & (where[:, books] < base[books] + size[books])
    assert int((~inside).sum()) == layer.sparse_val.numel()  # the sparse outliers, and only they
    assert t.largest_book == int(size.max())
    grad = torch.randn(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(5)).half()
    n = t.values.numel()
    ref = gw.scatter_grad_reference(grad, t.where, t.row_scale, n)
    got = gw.scatter_grad(grad, t.where, t.row_scale, n, (t.book_base, t.book_size, t.largest_book))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
