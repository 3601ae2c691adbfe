"""``cmpq.model.sensitivity.measure`` against the same numbers taken by hand with autograd."""

import torch
import tiny_models

from cmpq.model import sensitivity

one_thread = tiny_models.one_thread


def test_measure_equals_autograd_by_hand():
    """For every linear: token weights ``||dL/dy_t||^2``, the weighted Hessian diagonal
    ``sum_t w_t x_tj^2`` and the row energies ``sum_t g_tr^2``, summed over windows, as one
    forward and backward per window with the outputs' gradients read directly."""
    model = tiny_models.tiny(3)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(4))
    got = sensitivity.measure(model, ids, "cpu", rows=True)
    lin = model.model.layers[1].mlp.down_proj
    hdiag = torch.zeros(lin.in_features, dtype=torch.float64)
    rows = torch.zeros(lin.out_features, dtype=torch.float64)
    weights = []
    for i in range(ids.shape[0]):
        seen = {}
        h = lin.register_forward_hook(lambda m, a, y: seen.update(x=a[0].detach(), y=y.retain_grad() or y))
        try:
            with torch.enable_grad():
                model.zero_grad(set_to_none=True)
                logits = model(ids[i : i + 1], use_cache=False).logits.float()
                torch.nn.functional.cross_entropy(logits[0, :-1], ids[i, 1:], reduction="sum").backward()
        finally:
            h.remove()
        g = seen["y"].grad.double()[0]  # [T, out]
        x = seen["x"].double()[0]  # [T, in]
        w = g.pow(2).sum(-1)
        weights.append(w)
        hdiag += (w[:, None] * x.pow(2)).sum(0)
        rows += g.pow(2).sum(0)
    s = got[(1, "mlp.down_proj")]
    torch.testing.assert_close(s.token_weight.double(), torch.cat(weights), rtol=1e-5, atol=0)
    torch.testing.assert_close(s.hdiag, hdiag, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.row_weight, rows, rtol=1e-5, atol=0)
