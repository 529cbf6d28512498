"""Differentiable rank search building blocks (COMCAT's automatic rank selection).

A site (one head path or one MLP linear) factorized at full rank as U diag(s) V^T gets candidate
ranks r_1 < ... < r_K and logits alpha. A Gumbel-softmax sample m mixes the truncated SVDs:

    sum_i m_i U_{:r_i} S_{r_i} V_{:r_i}^T = U diag(s * c) V^T,   c_j = sum_{i : r_i > j} m_i,

so the whole mixture is one full-rank layer with a soft mask c on its rank index: one forward pass
of the largest candidate instead of one per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core import dist
from ..core.errors import ComcatError, is_int, is_positive, require
from ..core.loop import RunControl, epoch_batches, loader, seed_step, train_mode
from ..core.records import MAX_BATCH, MAX_EPOCHS, MAX_SEED, check_count
from . import families
from .convert import compress, truncate
from .cost import Budget, check_budget
from .distill import match_loss
from .lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention
from .models import has_classifier
from .rank_rules import full_ranks, site_gains, uniform_ranks
from .ranks import MATRICES, NEURONS, RankConfig, fixed_ranks, mlp_mode


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

    def chosen(self) -> int:
        return int(self.ranks[self.alpha.argmax()])


def budget_penalty(task_loss: torch.Tensor, cost: torch.Tensor, target: float, beta: float = 1.5) -> torch.Tensor:
    """loss * (cost / target)^beta when over the target, loss otherwise (COMCAT's budget term)."""
    ratio = cost / target
    return task_loss * torch.where(ratio > 1, ratio, torch.ones_like(ratio)) ** beta


def _sites(model: nn.Module):
    """(name, module, mask attribute, full rank) of every factorized site of a full-rank model."""
    for i, b in enumerate(families.blocks(model)):
        a = families.attention(b)
        if isinstance(a, HeadLowRankAttention):
            if "qk" not in fixed_ranks(b, "head"):  # a rotary / cosine layer's QK path stays dense
                yield f"{i}_qk", a, "rank_mask_qk", a.rank_qk
            yield f"{i}_vo", a, "rank_mask_vo", a.rank_vo
        elif isinstance(a, MatrixLowRankAttention):
            for key, attr in zip(MATRICES, ("q", "k", "v", "proj")):
                lin = getattr(a, attr)
                if isinstance(lin, LowRankLinear):
                    yield f"{i}_{key}", lin, "rank_mask", lin.rank
        else:
            raise ValueError("rank search needs a factorized model: compress(model, full ranks) first")
        for fc, lin in families.mlp(b).items():
            if isinstance(lin, LowRankLinear):
                yield f"{i}_{fc}", lin, "rank_mask", lin.rank
    head = families.classifiers(model).get("head")  # one choice for the classifier rank
    if isinstance(head, LowRankLinear):
        yield "classifier", head, "rank_mask", head.rank


class RankSearch(nn.Module):
    """Rank choices for every site of a full-rank factorized model, and their expected cost.

    `model` is compress() at full rank, head or matrix level. Sites: blocks.i.qk / .vo (head level,
    rank over head_dim) or blocks.i.q/k/v/o (matrix level), fc1 / fc2 when factored, and the
    classifier when factored. Cost is linear in every site's rank: cost = const + sum_s unit_s r_s,
    with const and unit_s read off the analytic `cost_fn(ranks: RankConfig)` (params or FLOPs).
    """

    def __init__(self, model: nn.Module, cost_fn, count: int = 8, init_ranks: RankConfig | None = None):
        super().__init__()
        blocks = families.blocks(model)
        self.method = "head" if isinstance(families.attention(blocks[0]), HeadLowRankAttention) else "matrix"
        self.depth = len(blocks)
        self.fixed = [fixed_ranks(b, self.method) for b in blocks]  # ranks no choice changes
        self.sites: list[tuple[nn.Module, str]] = []  # (module, name of its mask attribute), one per choice
        choices = {}
        for name, module, attr, full in _sites(model):
            self.sites.append((module, attr))
            choices[name] = RankChoice(candidate_ranks(full, count), full)
        self.choices = nn.ModuleDict(choices)
        base = cost_fn(self.config({name: 1 for name in choices}))
        units = [cost_fn(self.config({**{n: 1 for n in choices}, name: 2})) - base for name in choices]
        self.register_buffer("units", torch.tensor(units, dtype=torch.float64), persistent=False)
        self.const = float(base - sum(units))
        self.start_scale = {name: 1.0 for name in choices}  # see start_at
        if init_ranks is not None:
            self.start_at(init_ranks)

    @torch.no_grad()
    def start_at(self, ranks: RankConfig, confidence: float = 0.9) -> None:
        """A warm start at `ranks`: softmax(alpha) puts (1 - confidence) / K on every candidate and
        `confidence` on the two around r' = (r - (1 - confidence) mean(candidates)) / confidence, split
        so that E[r] = r, each site's rank in `ranks`. Where r' falls outside the candidates' range it
        is clipped, and expected_ranks() is scaled by r / E_start[r] for that site, so a search that
        learns nothing decodes to `ranks`."""
        for name, c in self.choices.items():
            cand = c.ranks.to(torch.float64)
            r = float(self._get(ranks, name))
            mid = min(max((r - (1 - confidence) * float(cand.mean())) / confidence, float(cand[0])), float(cand[-1]))
            hi = int(torch.searchsorted(cand, torch.tensor(mid, dtype=cand.dtype)))
            lo = max(0, hi - 1) if float(cand[hi]) > mid else hi
            t = 1.0 if hi == lo else (mid - float(cand[lo])) / float(cand[hi] - cand[lo])
            p = torch.full_like(cand, (1 - confidence) / len(cand))
            p[lo] += confidence * (1 - t)
            p[hi] += confidence * t
            c.alpha.copy_(p.log())
            self.start_scale[name] = r / float(p @ cand)

    def _get(self, ranks: RankConfig, name: str) -> int:
        if name == "classifier":
            return ranks.classifier
        i, key = name.split("_", 1)
        return ranks.blocks[int(i)][key]

    def config(self, ranks: dict[str, int]) -> RankConfig:
        blocks = [dict(f) for f in self.fixed]
        head = None
        for name, r in ranks.items():
            if name == "classifier":
                head = int(r)
                continue
            i, key = name.split("_", 1)
            blocks[int(i)][key] = int(r)
        return RankConfig(self.method, blocks, head)

    def sample(self, tau: float, sample: bool = True) -> torch.Tensor:
        """Draw soft masks for every site, install them, and return the expected cost (differentiable)."""
        cost = torch.tensor(self.const, dtype=torch.float64, device=self.units.device)
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

    @torch.no_grad()
    def expected_ranks(self) -> dict[str, float]:
        """Per site, the expected rank under the learned distribution, E[r] = sum_i softmax(alpha)_i r_i,
        times the site's start_scale (1 unless the warm start could not centre E[r] on its rank)."""
        return {
            name: self.start_scale[name] * float(c.alpha.softmax(-1) @ c.ranks.to(c.alpha.dtype))
            for name, c in self.choices.items()
        }

    def current(self, decode: str = "expected") -> RankConfig:
        """The ranks the logits point at now, before the budget fit: each site's rounded expected rank,
        or its argmax candidate (what progress reports show during a search)."""
        if decode == "argmax":
            return self.chosen()
        return self.config({n: max(1, round(e)) for n, e in self.expected_ranks().items()})

    def fit_expected(self, cost_fn, target: float) -> tuple[RankConfig, bool]:
        """Expected ranks scaled by one common factor to use the budget: r_s = clip(floor(f E[r_s]), 1, full_s)
        with the largest f that fits (bisection), then single ranks added where rounding cut most, while
        it still fits. Returns (ranks, whether the expected ranks had to be scaled down, f < 1)."""
        want = self.expected_ranks()
        full = {name: int(c.ranks.max()) for name, c in self.choices.items()}

        def scaled(f):
            return {n: max(1, min(full[n], int(f * e))) for n, e in want.items()}

        lo, hi = 0.0, max(full[n] / e for n, e in want.items()) + 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost_fn(self.config(scaled(mid))) <= target else (lo, mid)
        pick = scaled(lo)
        while True:
            order = sorted((pick[n] - lo * e, n) for n, e in want.items() if pick[n] < full[n])
            grow = next((n for _, n in order if cost_fn(self.config({**pick, n: pick[n] + 1})) <= target), None)
            if grow is None:
                break
            pick[grow] += 1
        return self.config(pick), lo < 1.0

    @torch.no_grad()
    def fit(self, cost_fn, target: float) -> tuple[RankConfig, bool]:
        """The argmax ranks made to fit the budget. Over it: lower ranks candidate by candidate where
        the logits lose least per unit of cost saved, min (a_i - a_{i-1}) / saved, until it fits.
        Under it: spend what is left, raising ranks where the logits lose least per unit of cost,
        while the next step still fits. Returns (ranks, whether the argmax had to be lowered)."""
        pick = {name: int(c.alpha.argmax()) for name, c in self.choices.items()}
        units = dict(zip(self.choices, self.units.tolist()))

        def ranks(p):
            return self.config({n: int(self.choices[n].ranks[i]) for n, i in p.items()})

        def price(n, i, j):  # logit lost per unit of cost when site n moves from candidate i to j
            c = self.choices[n]
            return (c.alpha[i] - c.alpha[j]).item() / abs(units[n] * int(c.ranks[i] - c.ranks[j]))

        reduced = False
        while cost_fn(ranks(pick)) > target:
            steps = [(price(n, i, i - 1), n) for n, i in pick.items() if i > 0]
            if not steps:
                break
            pick[min(steps)[1]] -= 1
            reduced = True
        if not reduced:
            while True:
                steps = sorted((price(n, i, i + 1), n) for n, i in pick.items() if i + 1 < len(self.choices[n].ranks))
                fits = [n for _, n in steps if cost_fn(ranks({**pick, n: pick[n] + 1})) <= target]
                if not fits:
                    break
                pick[fits[0]] += 1
        return ranks(pick), reduced


def fit_budget(dense: nn.Module, cfg, cost_fn, target: float):
    """Lower ranks one by one until cost_fn(cfg) <= target, each time where the lost normalized
    spectral energy per unit of cost saved is smallest. Returns (cfg, reduced: bool)."""
    mlp = any("fc1" in b for b in cfg.blocks)
    sites = {(i, key): (gain, unit) for i, key, gain, unit in site_gains(dense, cfg.method, mlp)}
    cfg = RankConfig(cfg.method, [dict(b) for b in cfg.blocks], cfg.classifier, dict(cfg.note))
    check_budget(cost_fn, target, RankConfig(cfg.method, [{k: 1 for k in b} for b in cfg.blocks], cfg.classifier), "")
    reduced = False
    while cost_fn(cfg) > target:
        i, key = min(
            ((i, k) for i, b in enumerate(cfg.blocks) for k, r in b.items() if r > 1 and (i, k) in sites),
            key=lambda s: sites[s][0][cfg.blocks[s[0]][s[1]] - 1] / sites[s][1],
        )
        cfg.blocks[i][key] -= 1
        reduced = True
    return cfg, reduced


@dataclass
class SearchConfig:
    """The Gumbel-softmax rank search: `epochs` of alpha steps at `lr_alpha` (and, with
    `lr_weights` > 0, weight steps), `candidates` ranks per site, tau annealed from tau[0] to tau[1],
    the budget penalty (cost/target)^beta, the final ranks by `decode` ("expected" or "argmax");
    `classifier`: search the classifier's rank too; `labels`: add the images' labels to the loss."""

    epochs: int = 2
    candidates: int = 8
    batch_size: int = 64
    lr_alpha: float = 0.05
    lr_weights: float = 1e-4
    tau: tuple = (5.0, 0.1)
    beta: float = 1.5
    decode: str = "expected"
    warm_start: bool = True
    classifier: bool = False
    labels: bool = False
    seed: int = 0

    def __post_init__(self):
        self.tau = tuple(self.tau)
        require(is_int(self.epochs, 1) and is_int(self.batch_size, 1), "search epochs and batch size must be >= 1")
        require(is_int(self.candidates, 2), f"the search needs at least 2 candidate ranks, got {self.candidates}")
        require(
            is_positive(self.lr_alpha) and (self.lr_weights == 0 or is_positive(self.lr_weights)),
            "the search's learning rates must be positive numbers (lr_weights 0: alpha steps only)",
        )
        require(
            len(self.tau) == 2 and all(is_positive(t) for t in self.tau) and is_positive(self.beta),
            "tau must be two positive temperatures and beta a positive number",
        )
        require(self.decode in ("expected", "argmax"), f"decode must be 'expected' or 'argmax', got {self.decode!r}")
        check_count(self.epochs, "search epochs", 1, MAX_EPOCHS)
        check_count(self.batch_size, "the batch size", 1, MAX_BATCH)
        check_count(self.candidates, "candidate ranks", 2, 256)
        check_count(self.seed, "the seed", 0, MAX_SEED)


def search_ranks(
    dense: nn.Module,
    train_data,
    search_data,
    budget: Budget,
    cfg: SearchConfig,
    *,
    calibration=None,
    init_ranks: RankConfig | None = None,
    device: str = "cpu",
    num_workers: int = 0,
    control: RunControl | None = None,
):
    """Differentiable rank search (head or matrix level) under `budget` (Budget.target).

    Each epoch is a search epoch (alpha steps on `search_data`, loss = task * (cost/target)^beta when
    over the target) followed, when cfg.lr_weights > 0, by a weight epoch (task loss on `train_data`
    with sampled masks). The task loss is KL(p_dense || p_searched) (for a model without a classifier
    distill.match_loss of the embeddings), plus with cfg.labels the cross-entropy with the images'
    labels. tau anneals exponentially over all steps. `calibration`
    (a calibrate.Calibration): the full-rank model is factorized in the whitened bases, so a rank
    mask truncates the calibrated factorization. The logits start tilted towards `init_ranks`, else
    (with cfg.warm_start) towards the uniform ranks of the budget.
    Final ranks: decode="expected" takes each site's expected rank under softmax(alpha), scaled by
    one factor to the budget (fit_expected); decode="argmax" the argmax candidates, lowered or raised
    by logit price (fit). `control` (core.loop.RunControl) reports every step, stops, checkpoints
    after every epoch and at a stop, and resumes (same result as an uninterrupted run). Under
    torchrun the weights train with DDP and the logits' gradients are averaged.

    Returns (RankConfig within budget, info): info["model"] is the searched model cut to those ranks
    (its trained weights, eval mode), plus history, logits, decoded (the ranks by either decoding),
    target, cost, reduced_to_fit, stopped, steps.
    """
    from .calibrate import build

    control = control or RunControl()
    if mlp_mode(budget.mlp) == NEURONS:
        raise ComcatError("the rank search does not choose MLP widths: drop --search, or use --mlp lowrank")
    budget = budget.on_sites(dense)
    cost_fn, target = budget.target(dense)
    # setup: the full-rank model, its rank choices, the optimizers, and where a resumed run was
    full = full_ranks(dense, budget.method, budget.mlp)
    full = replace(full, classifier=_classifier_rank(dense)) if cfg.classifier else full
    model = build(dense, full, calibration) if calibration is not None else compress(dense, full)
    train_mode(model.to(device))
    model.requires_grad_(cfg.lr_weights > 0)  # frozen weights: gradients for alpha only
    search = RankSearch(model, cost_fn, cfg.candidates).to(device)
    check_budget(cost_fn, target, search.config({name: 1 for name in search.choices}), budget.unit)
    if init_ranks is not None or cfg.warm_start:
        search.start_at(_start_ranks(dense, budget, cfg, init_ranks))
    teacher = dense.to(device).eval()
    net = DistributedDataParallel(model) if dist.world() > 1 and cfg.lr_weights > 0 else model
    embeddings = not has_classifier(dense)  # match pooled embeddings, not predictions
    opt_alpha = torch.optim.Adam(search.parameters(), lr=cfg.lr_alpha)
    opt_w = torch.optim.AdamW(model.parameters(), lr=cfg.lr_weights, weight_decay=0.0) if cfg.lr_weights > 0 else None
    phases = [("search", search_data, opt_alpha)] + ([("weights", train_data, opt_w)] if opt_w else [])
    if any(len(data) == 0 for _, data, _ in phases):
        raise ComcatError("the rank search got an empty data split: give it a folder with images")
    total = cfg.epochs * sum(len(epoch_batches(len(data), cfg.batch_size, 0, cfg.seed)) for _, data, _ in phases)
    step, history = 0, []
    if control.resume:
        step, history = _restore(control.resume, search, opt_alpha, model, opt_w)

    # loop: per epoch a search phase (alpha steps) and a weight phase; a resumed run skips what it did
    stopped, done = False, 0
    for epoch in range(cfg.epochs):
        for phase, data, opt in phases:
            batches = epoch_batches(len(data), cfg.batch_size, epoch * len(phases) + (phase == "weights"), cfg.seed)
            skip = min(len(batches), max(0, step - done))
            done += len(batches)
            for x, y in loader(data, batches[skip:], num_workers, cfg.seed, step):
                seed_step(cfg.seed, step)
                tau = temperature(step, total, *cfg.tau)
                cost = search.sample(tau)
                x = x.to(device)
                logits = net(x)
                with torch.no_grad():
                    teacher_out = teacher(x)
                task = match_loss(logits, teacher_out, embeddings)
                if cfg.labels and not embeddings:
                    task = task + F.cross_entropy(logits, torch.as_tensor(y).to(device))
                if not torch.isfinite(task):
                    search.clear()
                    raise ComcatError("the loss became NaN/inf during the rank search: lower the learning rates")
                loss = budget_penalty(task, cost, target, cfg.beta) if phase == "search" else task
                opt_alpha.zero_grad(set_to_none=True)
                if opt_w:
                    opt_w.zero_grad(set_to_none=True)
                loss.backward()
                if phase == "search":
                    dist.average_grads(search.parameters())
                opt.step()
                step += 1
                event = {
                    "kind": "search",
                    "epoch": epoch,
                    "phase": phase,
                    "step": step,
                    "total": total,
                    "tau": tau,
                    "loss": task.item(),
                    "cost": cost.item(),
                    "target": target,
                }
                history.append(event)
                control.emit({**event, "ranks": search.current(cfg.decode)})
                if control.stopping():
                    stopped = True
                    break
            if stopped:
                break
        if stopped or epoch < cfg.epochs - 1:
            control.save(_search_state(step, history, search, opt_alpha, model, opt_w))
        if stopped:
            break

    # finish: decode the ranks within the budget and cut the searched model to them
    search.clear()
    decoded = {"expected": search.fit_expected(cost_fn, target), "argmax": search.fit(cost_fn, target)}
    ranks, reduced = decoded[cfg.decode]
    if cost_fn(ranks) > target:  # even the smallest candidates are too big: go below them
        ranks, _ = fit_budget(dense, ranks, cost_fn, target)
        reduced = True
    ranks.note = {
        "rule": "search",
        "decode": cfg.decode,
        "ratio": budget.ratio,
        "budget": budget.unit,
        "reduced_to_fit": reduced,
        "stopped": stopped,
        "steps": step,
    }
    small = truncate(model, ranks).eval().requires_grad_(True)
    logits = {name: dict(zip(c.ranks.tolist(), c.alpha.detach().cpu().tolist())) for name, c in search.choices.items()}
    return ranks, {
        "history": history,
        "logits": logits,
        "decoded": {k: c for k, (c, _) in decoded.items()},
        "target": target,
        "cost": cost_fn(ranks),
        "reduced_to_fit": reduced,
        "stopped": stopped,
        "steps": step,
        "total": total,
        "model": small,
    }


def _classifier_rank(dense: nn.Module) -> int:
    """The full rank of the classifier(s)."""
    heads = families.classifiers(dense)
    if not heads:
        raise ComcatError("the model has no classifier to search a rank for: leave the classifier out")
    return min(min(h.weight.shape) for h in heads.values())


def _start_ranks(dense: nn.Module, budget: Budget, cfg: SearchConfig, init_ranks: RankConfig | None) -> RankConfig:
    """The ranks the logits start tilted towards: `init_ranks`, else the budget's uniform ranks
    (with the classifier at the same share of its parameters when it is searched)."""
    start = init_ranks or uniform_ranks(dense, budget.method, budget.ratio, mlp=budget.mlp)
    if cfg.classifier and start.classifier is None:
        out_f, in_f = families.classifiers(dense)["head"].weight.shape
        start = replace(start, classifier=max(1, round(budget.ratio * out_f * in_f / (out_f + in_f))))
    return start


def _search_state(step: int, history: list, search: RankSearch, opt_alpha, model: nn.Module, opt_w) -> dict:
    return {
        "step": step,
        "history": history,
        "alpha": search.state_dict(),
        "opt_alpha": opt_alpha.state_dict(),
        **({"weights": model.state_dict(), "opt_w": opt_w.state_dict()} if opt_w else {}),
    }


def _restore(state: dict, search: RankSearch, opt_alpha, model: nn.Module, opt_w) -> tuple[int, list]:
    """Load a _search_state into the search; returns (step, history)."""
    search.load_state_dict(state["alpha"])
    opt_alpha.load_state_dict(state["opt_alpha"])
    if opt_w is not None:
        model.load_state_dict(state["weights"])
        opt_w.load_state_dict(state["opt_w"])
    return state["step"], list(state["history"])
