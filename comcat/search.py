"""Differentiable rank search building blocks (COMCAT's automatic rank selection).

A site (one head path or one MLP linear) factorized at full rank as U diag(s) V^T gets candidate
ranks r_1 < ... < r_K and logits alpha. A Gumbel-softmax sample m mixes the truncated SVDs:

    sum_i m_i U_{:r_i} S_{r_i} V_{:r_i}^T = U diag(s * c) V^T,   c_j = sum_{i : r_i > j} m_i,

so the whole mixture is one full-rank layer with a soft mask c on its rank index: one forward pass
of the largest candidate instead of one per candidate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .compress import compress
from .cost import layer_flops, layer_params, model_flops, model_params
from .errors import ComcatError
from .lowrank import HeadLowRankAttention, LowRankLinear
from .ranks import RankConfig, site_gains, uniform_ranks


def candidate_ranks(full: int, count: int = 8, smallest: int = 1) -> list[int]:
    """`count` distinct ranks spread evenly over [smallest, full], always including full."""
    step = full / count
    return sorted({max(smallest, min(full, int(round(step * (i + 1))))) for i in range(count)})


def temperature(step: int, total: int, start: float = 5.0, end: float = 0.1) -> float:
    """Exponential annealing tau_t = start * (end / start)^(t / T)."""
    return start * (end / start) ** (min(step, total) / max(1, total))


class RankChoice(nn.Module):
    """Logits over candidate ranks of one site and the soft rank mask they induce.

    candidates: K ranks <= n. forward(tau) -> (mask c (n,), weights m (K,)), c_j = sum_{i: r_i > j} m_i.
    """

    def __init__(self, candidates: list[int], n: int):
        super().__init__()
        if not candidates or min(candidates) < 1 or max(candidates) > n:
            raise ValueError(f"candidate ranks must lie in 1..{n}, got {candidates}")
        ranks = torch.tensor(sorted(candidates))
        self.register_buffer("ranks", ranks, persistent=False)
        self.register_buffer("keep", (torch.arange(n)[None, :] < ranks[:, None]).float(), persistent=False)  # (K, n)
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))

    def weights(self, tau: float, sample: bool = True) -> torch.Tensor:
        """(K,) Gumbel-softmax sample (training) or the one-hot argmax (sample=False)."""
        if sample:
            return F.gumbel_softmax(self.alpha, tau=tau)
        return F.one_hot(self.alpha.argmax(), len(self.alpha)).to(self.alpha.dtype)

    def forward(self, tau: float, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.weights(tau, sample)
        return m @ self.keep, m

    def expected(self, m: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        """Differentiable expected cost sum_i m_i cost(r_i)."""
        return (m * costs).sum()

    def chosen(self) -> int:
        return int(self.ranks[self.alpha.argmax()])


def budget_penalty(task_loss: torch.Tensor, cost: torch.Tensor, target: float, beta: float = 1.5) -> torch.Tensor:
    """loss * (cost / target)^beta when over the target, loss otherwise (COMCAT's budget term)."""
    ratio = cost / target
    return task_loss * torch.where(ratio > 1, ratio, torch.ones_like(ratio)) ** beta


def explicit_mixture(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, candidates: list[int],
                     m: torch.Tensor) -> torch.Tensor:
    """Reference: sum_i m_i U_{:r_i} diag(s_{:r_i}) V_{:r_i}^T, formed candidate by candidate."""
    return sum(m[i] * (u[:, :r] * s[:r]) @ v[:, :r].T for i, r in enumerate(candidates))


def masked_product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """U diag(s * c) V^T: the same mixture through one soft mask."""
    return (u * (s * mask)) @ v.T


class RankSearch(nn.Module):
    """Rank choices for every site of a full-rank head-level model, and their expected cost.

    `model` is the output of compress() at full rank (HeadLowRankAttention, optionally LowRankLinear
    MLPs). Sites: blocks.i.qk / blocks.i.vo (rank over head_dim) and blocks.i.fc1 / fc2 when factored.
    Cost is linear in every site's rank: cost(ranks) = const + sum_s unit_s * r_s, with const and
    unit_s read off the analytic `cost_fn(ranks: RankConfig)` (params or FLOPs of comcat.cost).
    """

    def __init__(self, model: nn.Module, cost_fn, count: int = 8):
        super().__init__()
        self.sites: list[tuple[nn.Module, str]] = []    # (module, name of its mask attribute), one per choice
        choices = {}
        for i, b in enumerate(model.blocks):
            if not isinstance(b.attn, HeadLowRankAttention):
                raise ValueError("rank search needs a head-level model: compress(model, full ranks) first")
            for key, full in (("qk", b.attn.rank_qk), ("vo", b.attn.rank_vo)):
                self.sites.append((b.attn, f"rank_mask_{key}"))
                choices[f"{i}_{key}"] = RankChoice(candidate_ranks(full, count), full)
            for fc in ("fc1", "fc2"):
                lin = getattr(b.mlp, fc)
                if isinstance(lin, LowRankLinear):
                    self.sites.append((lin, "rank_mask"))
                    choices[f"{i}_{fc}"] = RankChoice(candidate_ranks(lin.rank, count), lin.rank)
        self.choices = nn.ModuleDict(choices)
        self.depth = len(model.blocks)
        ones = self.config({name: 1 for name in choices})
        base = cost_fn(ones)
        units = []
        for name in choices:
            cfg = self.config({**{n: 1 for n in choices}, name: 2})
            units.append(cost_fn(cfg) - base)
        self.register_buffer("units", torch.tensor(units, dtype=torch.float64), persistent=False)
        self.const = float(base - sum(units))

    def config(self, ranks: dict[str, int]) -> RankConfig:
        blocks = [{} for _ in range(self.depth)]
        for name, r in ranks.items():
            i, key = name.split("_", 1)
            blocks[int(i)][key] = int(r)
        return RankConfig("head", blocks)

    def sample(self, tau: float, sample: bool = True) -> torch.Tensor:
        """Draw soft masks for every site, install them, and return the expected cost (differentiable)."""
        cost = torch.tensor(self.const, dtype=torch.float64)
        for (module, attr), unit, choice in zip(self.sites, self.units, self.choices.values()):
            mask, m = choice(tau, sample)
            setattr(module, attr, mask)
            cost = cost + unit * (m.double() * choice.ranks.double()).sum()
        return cost

    def clear(self) -> None:
        for module, attr in self.sites:
            setattr(module, attr, None)

    def chosen(self) -> RankConfig:
        """The argmax ranks as a RankConfig."""
        return self.config({name: c.chosen() for name, c in self.choices.items()})


def fit_budget(dense: nn.Module, cfg, cost_fn, target: float):
    """Lower ranks until cost_fn(cfg) <= target, each time where the lost normalized spectral
    energy per unit of cost saved is smallest. Returns (cfg, reduced: bool)."""
    mlp = any("fc1" in b for b in cfg.blocks)
    sites = {(i, key): (gain, unit) for i, key, gain, unit in site_gains(dense, cfg.method, mlp)}
    cfg = RankConfig(cfg.method, [dict(b) for b in cfg.blocks], cfg.head, dict(cfg.note))
    floor = RankConfig(cfg.method, [{k: 1 for k in b} for b in cfg.blocks], cfg.head)
    if cost_fn(floor) > target:
        raise ComcatError(f"the budget {target:,.0f} is below the smallest possible model "
                          f"({cost_fn(floor):,.0f} at rank 1 everywhere): raise the ratio")
    reduced = False
    while cost_fn(cfg) > target:
        i, key = min(((i, k) for i, b in enumerate(cfg.blocks) for k, r in b.items() if r > 1 and (i, k) in sites),
                     key=lambda s: sites[s][0][cfg.blocks[s[0]][s[1]] - 1] / sites[s][1])
        cfg.blocks[i][key] -= 1
        reduced = True
    return cfg, reduced


def search_ranks(dense: nn.Module, train_data, search_data, ratio: float = 0.5, budget: str = "params",
                 mlp: bool = True, epochs: int = 2, candidates: int = 8, batch_size: int = 64,
                 lr_alpha: float = 0.05, lr_weights: float = 1e-4, tau: tuple = (5.0, 0.1), beta: float = 1.5,
                 seed: int = 0, callback=None, should_stop=None):
    """Differentiable rank search at head level: the searched sites (attention, plus the MLPs when
    `mlp`) must cost at most `ratio` x their dense params (or FLOPs); the rest of the model is fixed.

    Each epoch is a search epoch (alpha steps on `search_data`, loss = CE * (cost/target)^beta when
    over the target) followed by a weight epoch (CE on `train_data` with sampled masks). tau anneals
    exponentially over all steps. Returns (RankConfig within budget, info dict). `callback(dict)` gets
    every step; `should_stop()` ends the search early (ranks so far are still returned).
    """
    if budget not in ("params", "flops"):
        raise ComcatError(f"budget must be 'params' or 'flops', got {budget!r}")
    cost_fn = (lambda cfg: model_params(dense, cfg)) if budget == "params" else (lambda cfg: model_flops(dense, cfg))
    layers = layer_params(dense) if budget == "params" else layer_flops(dense)
    sites_dense = sum(l["attn"] + (l["mlp"] if mlp else 0) for l in layers)
    target = cost_fn(None) - (1 - ratio) * sites_dense
    torch.manual_seed(seed)
    model = compress(dense, uniform_ranks(dense, "head", 1.0, mlp=mlp)).train()
    model.requires_grad_(lr_weights > 0)            # frozen weights: gradients for alpha only
    search = RankSearch(model, cost_fn, candidates)
    opt_alpha = torch.optim.Adam(search.parameters(), lr=lr_alpha)
    opt_w = torch.optim.AdamW(model.parameters(), lr=lr_weights, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    phases = [("search", search_data, opt_alpha)] + ([("weights", train_data, opt_w)] if lr_weights > 0 else [])
    phases = [(name, DataLoader(d, batch_size=batch_size, shuffle=True, generator=gen,
                                drop_last=len(d) > batch_size), opt) for name, d, opt in phases]
    total = epochs * sum(len(loader) for _, loader, _ in phases)

    def batches():
        for epoch in range(epochs):
            for phase, loader, opt in phases:
                for x, y in loader:
                    yield epoch, phase, opt, x, y

    step, stopped, history = 0, False, []
    for epoch, phase, opt, x, y in batches():
        t = temperature(step, total, *tau)
        cost = search.sample(t)
        task = F.cross_entropy(model(x), y)
        if not torch.isfinite(task):
            search.clear()
            raise ComcatError("the loss became NaN/inf during the rank search: lower the learning rates")
        loss = budget_penalty(task, cost, target, beta) if phase == "search" else task
        opt_alpha.zero_grad(set_to_none=True)
        opt_w.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        event = {"epoch": epoch, "phase": phase, "step": step, "total": total, "tau": t,
                 "loss": task.item(), "cost": cost.item(), "target": target}
        history.append(event)
        if callback:
            callback(event)
        step += 1
        if should_stop and should_stop():
            stopped = True
            break
    search.clear()
    ranks, reduced = fit_budget(dense, search.chosen(), cost_fn, target)
    ranks.note = {"rule": "search", "ratio": ratio, "budget": budget, "reduced_to_fit": reduced,
                  "stopped": stopped, "steps": step}
    return ranks, {"history": history, "target": target, "cost": cost_fn(ranks), "reduced_to_fit": reduced,
                   "stopped": stopped, "weights": model}
