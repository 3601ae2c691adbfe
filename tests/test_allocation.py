import pytest
import torch

from cmpq.algorithm.allocation import algorithm1, check_budget


@pytest.mark.parametrize("n", [97, 576, 1000])
def test_every_budget_hits_its_average_within_one_channel(n):
    a = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for i in range(21):
        b = 2 + i / 10
        c = algorithm1(a, b)
        assert set(c.unique().tolist()) <= {2, 3, 4}
        if b != 3:
            assert abs(c.sum().item() - b * n) <= 1.0 + 1e-9, (b, c.float().mean())


def test_thresholds_follow_activation_norms():
    a = torch.randperm(1000).float()
    c = algorithm1(a, 3.3)  # top 30% by norm -> 4 bits, rest 3
    assert (c == 4).sum() == 300 and (c == 2).sum() == 0
    assert a[c == 4].min() > a[c == 3].max()
    c = algorithm1(a, 2.25)  # bottom 75% -> 2 bits
    assert (c == 2).sum() == 750 and (c == 4).sum() == 0
    assert a[c == 2].max() < a[c == 3].min()


def test_three_bits_moves_one_percent_each_way():
    a = torch.randperm(1000).float()
    c = algorithm1(a, 3.0)
    assert (c == 2).sum() == 10 and (c == 4).sum() == 10
    assert a[c == 2].max() < a[c == 3].min() and a[c == 4].min() > a[c == 3].max()
    assert (algorithm1(a, 3.0, edge_frac=0.1) == 4).sum() == 100


def test_ties_do_not_break_the_budget():
    c = algorithm1(torch.ones(100), 3.5)
    assert c.sum().item() == 350


@pytest.mark.parametrize("bad", [1.9, 4.01, float("nan"), float("inf"), "three", None])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="bit budget"):
        check_budget(bad)
