"""``torch.ops.cmpq.linear`` (cmpq/nn/ops.py) as PyTorch sees it, on CPU: torch.compile without
graph breaks, torch.export, ``opcheck``, and the gradient of the input."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import tiny_models

import cmpq
from cmpq.kernels.testing import random_layer
from cmpq.model.blocks import set_module
from cmpq.nn.linear import CMPQLinear

OP = torch.ops.cmpq.linear.default
one_thread = tiny_models.one_thread  # autouse fixture: one thread for tiny tensors


@pytest.fixture(scope="module")
def quantized():
    """A tiny Llama quantized to ~3 bits (2-4-bit groups, FP16 outlier columns, sparse outliers)."""
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (4, 48), generator=g)
    cfg = cmpq.CMPQConfig(bits=3, algorithm="paper")
    return cmpq.quantize(tiny_models.tiny(), None, cfg, calib=calib, device="cpu", log=None)


def _layer(bias: bool = True, seed: int = 0) -> CMPQLinear:
    """Every part of the format: three widths, FP16 outlier columns, sparse outliers, bias."""
    return random_layer(67, 300, {2: 90, 3: 101, 4: 102}, 7, 23, bias=bias,
                        generator=torch.Generator().manual_seed(seed))


def _dense(model):
    """The same model with every CMPQLinear replaced by the nn.Linear of its weight."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, CMPQLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            set_module(dense, name, lin.requires_grad_(False))
    return dense


def _count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (OP, torch.ops.cmpq.linear))


def test_compiled_model_is_one_graph_and_matches_eager(quantized):
    layers = [m for m in quantized.modules() if isinstance(m, CMPQLinear)]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    graphs = []

    def backend(gm, example_inputs):  # note what dynamo hands over, then run it through AOTAutograd
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(quantized, fullgraph=True, backend=backend)  # fullgraph: a break raises
    with torch.no_grad():
        eager = quantized(ids, use_cache=False).logits
        got = compiled(ids, use_cache=False).logits
    assert len(graphs) == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert _count(graphs[0]) == len(layers) == 14  # every layer is one node of the one graph
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_compiled_layer_uses_the_dense_cache_when_asked():
    layer = _layer()
    layer.cache_dense = True
    x = torch.randn(3, 300)
    eager = layer(x)  # fills the cache
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(got, eager)
    assert _count(graphs[0]) == 0  # a plain matmul with the cached weight


@pytest.mark.parametrize("prepared", [False, True])
def test_export_of_one_layer_runs_and_round_trips(prepared):
    layer = _layer()
    if prepared:  # the runtime layout travels as buffers of the program (the CPU path ignores it)
        assert layer.prepare_runtime()
    x = torch.randn(5, 300)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: batch}})
    assert _count(ep.graph_module) == 1
    assert not any("handle" in str(n.args) for n in ep.graph.nodes)
    x2 = torch.randn(2, 300)
    torch.testing.assert_close(ep.module()(x2), layer(x2), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    again = torch.export.load(buf)
    torch.testing.assert_close(again.module()(x2), layer(x2), rtol=0, atol=0)


def _args(layer: CMPQLinear, x: torch.Tensor) -> tuple:
    return (x, *layer._op_args())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(bias, grad):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch with dynamic
    shapes, as torch.library checks them."""
    layer = _layer(bias=bias)
    layer.prepare_runtime()
    x = torch.randn(2, 3, 300, requires_grad=grad)
    torch.library.opcheck(OP, _args(layer, x))


def test_fake_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = _layer()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(4, 7, 300, dtype=torch.bfloat16))
        y = torch.ops.cmpq.linear(x, *layer._op_args())
    assert y.shape == (4, 7, 67) and y.dtype == torch.bfloat16


def test_input_gradient_equals_the_dense_layer():
    layer = _layer()
    w = layer.dequantize(torch.float32)
    x = torch.randn(2, 4, 300, dtype=torch.float64).float().requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 4, 67)
    (layer(x) * g).sum().backward()
    (F.linear(xd, w, layer.bias.float()) * g).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())  # the packed tensors: no gradient


def test_model_trains_an_adapter_through_cmpq_layers(quantized):
    """LoRA-style: a frozen cmpq model, a trainable adapter before it; the adapter's gradient equals
    the one through the dense model the cmpq layers stand for, eager and compiled."""
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    dense = _dense(quantized)

    def adapter_grad(model, compile: bool):
        emb = model.get_input_embeddings()
        delta = torch.zeros(emb.weight.shape[1], requires_grad=True)
        h = emb(ids) + delta  # the trainable part feeds every CMPQLinear's input
        f = torch.compile(model, fullgraph=True, backend="aot_eager") if compile else model
        logits = f(inputs_embeds=h, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        return delta.grad

    ref = adapter_grad(dense, False)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(adapter_grad(quantized, False), ref, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
    torch.testing.assert_close(adapter_grad(quantized, True), ref, rtol=1e-4, atol=1e-6)


def _row_scaled(bias: bool = True) -> CMPQLinear:
    """A format-v4 layer: ``W = diag(s) @ (the parts)``, ``s`` random and positive."""
    layer = CMPQLinear(300, 67, {2: 90, 3: 101, 4: 102}, n_outlier_channels=7, n_sparse=23, bias=bias, row_scale=True)
    src = _layer(bias=bias)
    layer.load_state_dict({**src.state_dict(), "row_scale": (torch.rand(67) + 0.5).half()})
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_row_scaled_layer_scales_outside_the_operator(bias):
    """The operator computes ``x @ (W / s)^T + bias / s`` and the layer multiplies by ``s`` after it,
    so torch.compile can fuse the multiply into what reads the output (one launch fewer per layer
    and call on a GPU). Eager, compiled and the input gradient all equal the dense layer."""
    layer = _row_scaled(bias)
    w = layer.dequantize(torch.float32)
    b = layer.bias.float() if bias else None
    x = torch.randn(2, 5, 300)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    (node,) = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target in (OP, torch.ops.cmpq.linear)]
    assert node.args[10] is None, "the row scales went into the operator"
    assert any(n.op == "call_function" and "mul" in str(n.target) and node in n.args for n in graphs[0].graph.nodes)
    xg = x.clone().requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    g = torch.randn(2, 5, 67)
    (layer(xg) * g).sum().backward()
    (F.linear(xd, w, b) * g).sum().backward()
    torch.testing.assert_close(xg.grad, xd.grad, rtol=1e-5, atol=1e-5)


# -- cmpq::linear_group and the graph pass that makes it (cmpq/nn/fuse.py) -------------------------
GROUP = torch.ops.cmpq.linear_group.default


def _grouping(graphs: list):
    """A backend that runs the shared-input pass, notes the graph and the group count, then aot_eager."""
    from cmpq.nn.fuse import group_shared_inputs

    def backend(gm, example_inputs):
        graphs.append((gm, group_shared_inputs(gm)))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def test_group_pass_merges_q_k_v_and_gate_up_and_matches_eager(quantized):
    """Every block's q/k/v and gate/up become one group node each; o_proj and down_proj stay single
    (their inputs are their own); the compiled model equals the eager one."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        eager = quantized(ids, use_cache=False).logits
        got = torch.compile(quantized, fullgraph=True, backend=_grouping(graphs))(ids, use_cache=False).logits
    gm, n = graphs[0]
    blocks = len(quantized.model.layers)
    assert n == 2 * blocks
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count(GROUP) == 2 * blocks
    assert sum(t in (OP, torch.ops.cmpq.linear) for t in targets) == 2 * blocks  # o_proj, down_proj
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


class _Shared(torch.nn.Module):
    """Two row-scaled layers on one input (their ``bias / s`` is computed in the graph, between the
    calls: the pass must move it up), and a third reading the first one's output (cannot join)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _row_scaled(True), _row_scaled(True)
        with torch.no_grad():
            self.b.row_scale.mul_(2)
        self.c = _layer(seed=3)
        self.c_in = torch.nn.Linear(67, 300, bias=False)

    def forward(self, x):
        ya = self.a(x)
        yb = self.b(x)
        return ya + yb, self.c(self.c_in(ya)), self.c(x)


def _eager_and_grouped(f, x) -> tuple:
    """``f(x)`` eager and compiled through ``_grouping``, and the (graph, group count) it noted."""
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        eager = f(x)
        got = torch.compile(f, fullgraph=True, backend=_grouping(graphs))(x)
    return eager, got, graphs[0]


def test_group_pass_hoists_computed_arguments_and_leaves_dependent_calls():
    eager, got, (gm, n) = _eager_and_grouped(_Shared(), torch.randn(3, 300))
    assert n == 1  # a, b and c(x) read x; c(c_in(ya)) does not
    (grp,) = [node for node in gm.graph.nodes if node.target == GROUP]
    assert len(grp.args[2]) == 3 * 3 + 3 * 3  # three members: g, r, out + three widths each
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_group_operator_opcheck_and_layout_round_trip():
    from cmpq.nn import ops

    layers = [_layer(bias=True), _row_scaled(False)]
    for layer in layers:
        layer.prepare_runtime()
    members = [layer._op_args() for layer in layers]
    tensors, meta = ops.flatten_members(members)
    back = ops.split_members(tensors, meta)
    for a, b in zip(back, members):
        assert len(a) == len(b) and a[12] == list(b[12]) and a[13] == b[13]
        assert all((u is None and v is None) or u is v for u, v in zip(a[4:11], b[4:11]))
    x = torch.randn(2, 3, 300)
    torch.library.opcheck(GROUP, (x, tensors, meta), test_utils=("test_schema", "test_faketensor"))
    outs = GROUP(x, tensors, meta)
    for y, layer in zip(outs, layers):
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="linear_group"):
        ops.split_members(tensors + [None], meta)


def test_group_pass_leaves_a_call_that_reads_another_ones_output():
    """Two calls on one input, the second's bias computed from the first's output: they cannot be
    one launch (the pass's dependency check), and the compiled result equals the eager one."""
    a, b = _layer(seed=5), _layer(seed=6)
    args_a, args_b = a._op_args(), list(b._op_args())

    def f(x):
        ya = torch.ops.cmpq.linear(x, *args_a)
        args_b[10] = ya[0] * 0.5  # the bias
        return ya, torch.ops.cmpq.linear(x, *args_b)

    eager, got, (_, n) = _eager_and_grouped(f, torch.randn(3, 300))
    assert n == 0
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
