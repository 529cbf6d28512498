import pytest
import torch

from comcat.compression.cost import Budget
from comcat.compression.search import RankChoice, SearchConfig, budget_penalty, candidate_ranks, temperature
from comcat.core.loop import RunControl
from conftest import shapes_data


def explicit_mixture(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, candidates: list[int], m: torch.Tensor
) -> torch.Tensor:
    """Reference: sum_i m_i U_{:r_i} diag(s_{:r_i}) V_{:r_i}^T, formed candidate by candidate."""
    return sum(m[i] * (u[:, :r] * s[:r]) @ v[:, :r].T for i, r in enumerate(candidates))


def masked_product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """U diag(s * c) V^T: the same mixture through one soft mask."""
    return (u * (s * mask)) @ v.T


def test_soft_mask_equals_explicit_mixture():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    cands = [2, 5, 9, 17, 24]
    choice = RankChoice(cands, 24).double()
    torch.manual_seed(1)
    mask, m = choice(tau=1.3)
    assert m.sum().item() == pytest.approx(1.0)
    assert torch.allclose(masked_product(u, s, vh.T, mask), explicit_mixture(u, s, vh.T, cands, m), atol=1e-12)
    # the mask is differentiable in alpha
    masked_product(u, s, vh.T, mask).sum().backward()
    assert choice.alpha.grad is not None and choice.alpha.grad.abs().sum() > 0


def test_argmax_choice_is_a_hard_truncation():
    choice = RankChoice([4, 8, 16], 16)
    with torch.no_grad():
        choice.alpha.copy_(torch.tensor([0.0, 3.0, 1.0]))
    mask, m = choice(tau=0.1, sample=False)
    assert choice.chosen() == 8
    assert mask.tolist() == [1.0] * 8 + [0.0] * 8 and m.tolist() == [0.0, 1.0, 0.0]


def test_schedule_candidates_and_penalty():
    assert temperature(0, 100) == pytest.approx(5.0) and temperature(100, 100) == pytest.approx(0.1)
    assert temperature(50, 100) == pytest.approx((5.0 * 0.1) ** 0.5)
    assert candidate_ranks(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert candidate_ranks(5, 8)[-1] == 5 and candidate_ranks(5, 8)[0] == 1
    loss = torch.tensor(2.0)
    assert budget_penalty(loss, torch.tensor(50.0), 100.0).item() == pytest.approx(2.0)
    assert budget_penalty(loss, torch.tensor(200.0), 100.0).item() == pytest.approx(2.0 * 2**1.5)
    with pytest.raises(ValueError):
        RankChoice([0, 4], 8)


def test_rank_search_cost_and_hard_choice_match_compress(embedded):
    from comcat.compression.convert import compress
    from comcat.compression.cost import model_params
    from comcat.compression.rank_rules import uniform_ranks
    from comcat.compression.ranks import RankConfig
    from comcat.compression.search import RankSearch, fit_budget

    dense = embedded.model
    full = compress(dense, uniform_ranks(dense, "head", 1.0, mlp=True))
    search = RankSearch(full, lambda cfg: model_params(dense, cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for c in search.choices.values():
            c.alpha.copy_(torch.randn(len(c.alpha), generator=g))
    cost = search.sample(tau=1.0, sample=False)
    chosen = search.chosen()
    assert cost.item() == pytest.approx(model_params(dense, chosen))
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        masked = full(x)
        search.clear()
        unmasked = full(x)
        truncated = compress(dense, chosen)(x)
    assert torch.allclose(masked, truncated, atol=1e-4)
    assert not torch.allclose(unmasked, truncated, atol=1e-3)
    # a soft sample gives a differentiable expected cost
    cost = search.sample(tau=2.0)
    cost.backward()
    assert all(c.alpha.grad is not None for c in search.choices.values())
    search.clear()
    # over budget: ranks come down where the least energy is lost, until the budget holds
    target = 0.5 * model_params(dense)
    fitted, reduced = fit_budget(
        dense, uniform_ranks(dense, "head", 1.0, mlp=True), lambda c: model_params(dense, c), target
    )
    assert reduced and model_params(dense, fitted) <= target
    from comcat.core.errors import ComcatError

    with pytest.raises(ComcatError, match="below the smallest possible model"):
        fit_budget(dense, fitted, lambda c: model_params(dense, c), 1000)
    assert isinstance(fitted, RankConfig)


def test_short_search_meets_budget_and_learns(embedded):

    from comcat.compression.cost import model_params, site_params
    from comcat.compression.search import search_ranks

    events = []
    ranks, info = search_ranks(
        embedded.model,
        shapes_data(128, 10),
        shapes_data(128, 11),
        Budget(0.5, mlp=True),
        SearchConfig(epochs=2, batch_size=32, labels=True),
        control=RunControl(callback=events.append),
    )
    dense = embedded.model
    assert site_params(dense, ranks, "head", True) <= 0.5 * site_params(dense, None, "head", True)
    assert info["cost"] == model_params(embedded.model, ranks)
    assert [e["phase"] for e in events[:5]] == ["search"] * 4 + ["weights"]
    assert events[0]["tau"] == pytest.approx(5.0) and events[-1]["tau"] < 0.2
    # the budget term pulls the sampled cost down from the first search epoch to the last
    search_costs = [e["cost"] for e in events if e["phase"] == "search"]
    assert sum(search_costs[-4:]) < sum(search_costs[:4])
    ranks.validate(embedded.model)

    stop_after = iter(range(3))
    ranks, info = search_ranks(
        embedded.model,
        shapes_data(64, 10),
        shapes_data(64, 11),
        Budget(0.6, mlp=True),
        SearchConfig(epochs=3, batch_size=32),
        control=RunControl(should_stop=lambda: next(stop_after, None) is None),
    )
    assert info["stopped"] and len(info["history"]) == 4
    assert site_params(dense, ranks, "head", True) <= 0.6 * site_params(dense, None, "head", True)
    # attention only, weights frozen: only search steps, and the MLPs stay dense
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    ranks, info = search_ranks(
        dense, shapes_data(64, 10), shapes_data(64, 11), Budget(0.6), SearchConfig(epochs=1, lr_weights=0)
    )
    assert {e["phase"] for e in info["history"]} == {"search"} and "fc1" not in ranks.blocks[0]
    assert site_params(dense, ranks, "head", False) <= 0.6 * site_params(dense, None, "head", False)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())


def test_augmented_batches_depend_only_on_seed_step_and_image(embedded, tmp_path):
    """timm's training crops draw from python's `random`, which nothing else seeds: the loader seeds
    every image by (seed, step, index), so two runs (and a resume from a later step) see the same
    augmented views whatever the random state before, and other seeds or steps see other views."""
    import random

    from comcat.compression.images import image_folder
    from comcat.core.loop import epoch_batches, loader
    from conftest import png_folder

    ds = image_folder(png_folder(tmp_path / "img", 8, 3), embedded.model, training=True)
    batches = epoch_batches(len(ds), 4, 0, 0)

    def views(seed=0, first=0, todo=batches):
        random.seed(torch.seed())  # a different python and torch state before every call
        return [x for x, _ in loader(ds, todo, 0, seed, first)]

    a, b = views(), views()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(views(first=1, todo=batches[1:])[0], a[1])  # a resume from step 1
    assert not torch.equal(views(seed=1)[0], a[0]) and not torch.equal(views(first=1)[0], a[0])


def test_training_leaves_the_models_own_dropout_and_drop_path_off():
    """A Swin's default stochastic depth (0.1) and a dropout would blur the dense model's target:
    train_mode trains with them off, so two training-mode passes agree (model.train() would not)."""
    import timm

    from comcat.core.loop import train_mode

    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
        num_heads=(1, 2), num_classes=3, drop_path_rate=0.5, proj_drop_rate=0.3,
    )  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    assert train_mode(model).training and torch.equal(model(x), model(x))
