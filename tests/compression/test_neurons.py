"""MLP neurons: selection and the closed-form refit of fc2 (comcat/compression/neurons.py)."""

import pytest
import torch
from timm.layers import Mlp

from comcat.compression.calibrate import Moments
from comcat.compression.neurons import neuron_path, prune_mlp, refit, refit_error, select_neurons
from comcat.core.errors import ComcatError


def _mlp_and_stats(seed=0, c=16, f=48, n=2000):
    g = torch.Generator().manual_seed(seed)
    mlp = Mlp(c, f).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64)
    h = mlp.act(mlp.fc1(x))
    m = Moments(f)
    m.add(h)
    return mlp, x, h, m.second()


def test_keeping_every_neuron_reproduces_the_dense_mlp_exactly():
    mlp, x, _, g = _mlp_and_stats()
    before = mlp(x)
    fc1, fc2 = prune_mlp(mlp.fc1, mlp.fc2, g, 48)
    assert torch.equal(fc2(mlp.act(fc1(x))), before)
    order, errors = neuron_path(g, mlp.fc2)
    assert sorted(order.tolist()) == list(range(48)) and errors[-1] < 1e-9 * errors[0]
    w2, b2 = refit(g, mlp.fc2, torch.arange(48), ridge=0.0)  # the refit itself is exact on every neuron
    torch.testing.assert_close(w2, mlp.fc2.weight, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b2, mlp.fc2.bias, rtol=1e-8, atol=1e-8)


def test_the_refit_is_the_least_squares_solution_on_the_calibration_tokens():
    mlp, x, h, g = _mlp_and_stats(1)
    keep = torch.tensor([0, 3, 5, 8, 13, 21, 34])
    w2, b2 = refit(g, mlp.fc2, keep, ridge=0.0)
    design = torch.cat([h[:, keep], torch.ones(len(h), 1, dtype=h.dtype)], 1)
    direct = torch.linalg.lstsq(design, mlp.fc2(h)).solution.T  # (out, k + 1)
    torch.testing.assert_close(w2, direct[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b2, direct[:, -1], rtol=1e-6, atol=1e-8)
    y = h[:, keep] @ w2.T + b2
    mse = ((y - mlp.fc2(h)) ** 2).sum(1).mean().detach()
    assert float(mse) == pytest.approx(refit_error(g, torch.cat([mlp.fc2.weight, mlp.fc2.bias[:, None]], 1), keep))


def test_greedy_selection_leaves_less_error_than_the_magnitude_score():
    mlp, _, _, g = _mlp_and_stats(2)
    w = torch.cat([mlp.fc2.weight, mlp.fc2.bias[:, None]], 1)
    for k in (8, 16, 24):
        greedy, magnitude = (select_neurons(g, mlp.fc2, k, rule) for rule in ("greedy", "magnitude"))
        assert len(greedy) == k and len(set(greedy.tolist())) == k
        assert refit_error(g, w, greedy) < refit_error(g, w, magnitude)


def test_the_greedy_path_is_nested_and_its_errors_are_the_refit_errors():
    mlp, _, _, g = _mlp_and_stats(4)
    w = torch.cat([mlp.fc2.weight, mlp.fc2.bias[:, None]], 1)
    order, errors = neuron_path(g, mlp.fc2, 20)
    assert len(order) == 20 and len(errors) == 21 and (errors[1:] <= errors[:-1] + 1e-9).all()
    for k in (1, 7, 20):
        assert torch.equal(select_neurons(g, mlp.fc2, k), order[:k].sort().values)
        assert float(errors[k]) == pytest.approx(refit_error(g, w, order[:k]), rel=1e-6)


def test_pruned_mlp_is_narrower_and_bad_counts_are_one_line():
    mlp, x, _, g = _mlp_and_stats(3)
    fc1, fc2 = prune_mlp(mlp.fc1, mlp.fc2, g, 12)
    assert fc1.out_features == 12 and fc2.in_features == 12 and fc2(mlp.act(fc1(x))).shape == (2000, 16)
    with pytest.raises(ComcatError, match="keeps 1..12 of them, not 0"):
        select_neurons(g[:13, :13], fc2, 0)
    with pytest.raises(ComcatError, match="neuron selection must be one of"):
        select_neurons(g[:13, :13], fc2, 3, "random")
