"""Rules that choose a RankConfig without images: uniform, energy threshold, energy or greedy
allocation under a parameter budget, and `choose_ranks`, the one entry point of a compress run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..core.errors import ComcatError
from ..core.linalg import rank_for_energy
from . import families
from .analysis import MATRICES, analyze
from .models import Loaded
from .ranks import METHODS, MLP_SITES, NEURONS, RankConfig, fixed_ranks, hidden_width, mlp_mode, pin, site_limits


def _mlp_rank_for_ratio(lin: nn.Linear, ratio: float) -> int:
    """r (m + n) ~ ratio m n, rounded down to a multiple of 8 from 16 up (BLAS runs those faster)."""
    m, n = lin.out_features, lin.in_features
    r = int(max(1, min(min(m, n), round(ratio * m * n / (m + n)))))
    return r - r % 8 if r >= 16 else r


def uniform_ranks(model: nn.Module, method: str, ratio: float, mlp: bool = False) -> RankConfig:
    """Same rank everywhere so that each compressed site keeps ~`ratio` of its weights.

    head: r = ratio * d (a head's QK or VO path costs 2Cd dense, 2Cr factored);
    matrix: r = ratio * C / 2 (a C x C matrix costs C^2 dense, 2Cr factored).
    """
    if not 0 < ratio <= 1:
        raise ComcatError(f"parameter ratio must be in (0, 1], got {ratio}")
    blocks = []
    for b in families.blocks(model):
        attn = families.attention(b)
        d, C = attn.head_dim, attn.qkv.in_features
        if method == "head":
            r = int(max(1, min(d, round(ratio * d))))
            ranks = {"qk": r, "vo": r}
        else:
            r = int(max(1, min(C, round(ratio * C / 2))))
            ranks = {m: r for m in MATRICES}
        if mlp_mode(mlp) == NEURONS:  # a neuron costs the same everywhere in a block: k = ratio F
            width = _neuron_width(b, i=len(blocks))
            ranks[NEURONS] = int(max(1, min(width, round(ratio * width))))
        elif mlp:
            ranks.update({fc: _mlp_rank_for_ratio(lin, ratio) for fc, lin in families.mlp(b).items()})
        blocks.append(ranks)
    return pin(RankConfig(method, blocks, note={"rule": "uniform", "ratio": ratio}), model)


def _neuron_width(block: nn.Module, i: int) -> int:
    width = hidden_width(block)
    if width is None:
        raise ComcatError(f"block {i}'s MLP is gated or normed inside, so it cannot drop neurons: use --mlp lowrank")
    return width


def full_ranks(model: nn.Module, method: str, mlp: bool = False) -> RankConfig:
    """Every site at its full rank (head_dim, or C for matrices): the factorized model is exact."""
    blocks = []
    for b in families.blocks(model):
        lim = site_limits(b, method)
        blocks.append({k: r for k, r in lim.items() if k not in MLP_SITES or mlp})
    return RankConfig(method, blocks, note={"rule": "full"})


@torch.no_grad()
def mlp_spectra(model: nn.Module) -> list[dict[str, np.ndarray]]:
    return [
        {fc: torch.linalg.svdvals(lin.weight.detach().double()).numpy() for fc, lin in families.mlp(b).items()}
        for b in families.blocks(model)
    ]


def energy_ranks(
    model: nn.Module, method: str, energy: float, mlp: bool = False, spectra=None, mlp_sv=None
) -> RankConfig:
    """Smallest ranks that keep `energy` of each site's squared singular values.

    head: per layer, pooled over the layer's heads (all heads of a layer share r_qk and r_vo);
    matrix: per matrix.
    """
    if not 0 < energy <= 1:
        raise ComcatError(f"energy threshold must be in (0, 1], got {energy}")
    spectra = spectra if spectra is not None else analyze(model)
    if mlp and mlp_sv is None:
        mlp_sv = mlp_spectra(model)
    blocks = []
    for i in range(spectra.depth):
        if method == "head":
            ranks = {p: int(rank_for_energy(np.sqrt((spectra.head[p][i] ** 2).sum(0)), energy)) for p in ("qk", "vo")}
        else:
            ranks = {m: int(rank_for_energy(spectra.matrix[m][i], energy)) for m in MATRICES}
        if mlp:
            ranks.update({fc: int(rank_for_energy(mlp_sv[i][fc], energy)) for fc in MLP_SITES})
        blocks.append(ranks)
    return pin(RankConfig(method, blocks, note={"rule": "energy", "energy": energy}), model)


def site_gains(model: nn.Module, method: str, mlp: bool):
    """Per site: (block, key, normalized energy gain of each rank step (n,), params per rank step)."""
    spectra = analyze(model)
    mlp_sv = mlp_spectra(model) if mlp else None
    for i, b in enumerate(families.blocks(model)):
        attn = families.attention(b)
        C, H = attn.qkv.in_features, attn.num_heads
        if method == "head":
            sites = [(p, np.sqrt((spectra.head[p][i] ** 2).sum(0)), 2 * C * H) for p in ("qk", "vo")]
        else:
            sites = [(m, spectra.matrix[m][i], 2 * C) for m in MATRICES]
        if mlp:
            sites += [(fc, mlp_sv[i][fc], lin.in_features + lin.out_features) for fc, lin in families.mlp(b).items()]
        fixed = fixed_ranks(b, method)
        for key, s, unit in sites:
            if key in fixed:
                continue
            e = np.asarray(s, np.float64) ** 2
            yield i, key, e / max(e.sum(), np.finfo(np.float64).tiny), unit


def below_floor(model: nn.Module, method: str, ratio: float, mlp: bool) -> ComcatError:
    """The one-line refusal of a parameter ratio below rank 1 everywhere, with that floor."""
    from .cost import site_params

    ones = uniform_ranks(model, method, 1e-9, mlp)  # rank 1 everywhere (fixed ranks pinned)
    floor = site_params(model, ones, method, mlp) / site_params(model, None, method, mlp)
    dense_qk = any(fixed_ranks(b, method) for b in families.blocks(model))
    return ComcatError(
        f"{ratio:.0%} of the parameters is below the smallest model: rank 1 everywhere keeps {floor:.0%}"
        + (" (W^Q and W^K of the rotary / cosine-attention layers stay dense)" if dense_qk else "")
        + f": use a --params-ratio above {floor:.2f}"
        + ("" if mlp else " or compress the MLPs too (--mlp)")
    )


def greedy_energy_ranks(model: nn.Module, method: str, ratio: float, mlp: bool = False) -> RankConfig:
    """Energy-based allocation under a parameter budget, by marginal gain: every site starts at
    rank 1, then rank steps are taken in order of normalized energy gained per parameter
    (s_j^2 / sum s^2 / params per step) while the compressed sites fit in `ratio` of their dense
    params. Each site's energy curve is concave, so this maximizes the summed retained energy."""
    from .cost import site_params

    if not 0 < ratio <= 1:
        raise ComcatError(f"parameter ratio must be in (0, 1], got {ratio}")
    depth = len(families.blocks(model))
    blocks = [{} for _ in range(depth)]
    steps = []
    for i, key, gain, unit in site_gains(model, method, mlp):
        blocks[i][key] = 1
        steps += [(g / unit, i, key) for g in gain[1:]]
    steps.sort(key=lambda t: -t[0])
    cfg = pin(RankConfig(method, blocks), model)
    dense = site_params(model, None, method, mlp)
    if site_params(model, cfg, method, mlp) > ratio * dense:
        raise below_floor(model, method, ratio, mlp)
    lo, hi = 0, len(steps)  # largest prefix of steps that fits the budget (monotone in the prefix)

    def take(n: int) -> RankConfig:
        out = [dict(b) for b in blocks]
        for _, i, key in steps[:n]:
            out[i][key] += 1
        return RankConfig(method, out)

    while lo < hi:
        mid = (lo + hi + 1) // 2
        if site_params(model, take(mid), method, mlp) <= ratio * dense:
            lo = mid
        else:
            hi = mid - 1
    cfg = take(lo)
    cfg.note = {"rule": "energy-greedy", "ratio": ratio}
    return cfg


def energy_ranks_for_budget(model: nn.Module, method: str, ratio: float, mlp: bool = False) -> RankConfig:
    """Energy-based allocation under a parameter budget: the largest common energy threshold
    whose ranks keep the compressed sites within `ratio` of their dense parameters (bisection)."""
    from .cost import site_params

    if not 0 < ratio <= 1:
        raise ComcatError(f"parameter ratio must be in (0, 1], got {ratio}")
    spectra, mlp_sv = analyze(model), (mlp_spectra(model) if mlp else None)
    dense = site_params(model, None, method, mlp)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(40):
        mid = (lo + hi) / 2
        cfg = energy_ranks(model, method, mid, mlp, spectra, mlp_sv)
        if site_params(model, cfg, method, mlp) <= ratio * dense:
            lo, best = mid, cfg
        else:
            hi = mid
    if best is None:
        raise below_floor(model, method, ratio, mlp)
    best.note = {"rule": "energy-budget", "ratio": ratio, "energy": round(lo, 6)}
    return best


ALLOCATIONS = ("uniform", "energy", "greedy")  # without data; with it also "calibrated" (comcat/allocate.py)


def choose_ranks(
    loaded: Loaded,
    method: str,
    ranks: str | None = None,
    energy: float | None = None,
    params_ratio: float | None = None,
    allocate: str = "uniform",
    mlp: bool = False,
    classifier_rank: int | None = None,
) -> RankConfig:
    """Exactly one rule: a rank file, an energy threshold, or a parameter ratio (uniform or energy-allocated)."""
    if method not in METHODS:
        raise ComcatError(f"method must be one of {METHODS}, got {method!r}")
    if sum(x is not None for x in (ranks, energy, params_ratio)) != 1:
        raise ComcatError("give exactly one of --ranks FILE, --energy E or --params-ratio R")
    if loaded.compressed:
        raise ComcatError(f"{loaded.source} is already compressed: compress the dense model instead")
    model = loaded.model
    if mlp_mode(mlp) == NEURONS and (energy is not None or allocate in ("energy", "greedy")):
        raise ComcatError(
            "MLP neurons are shared out by the calibrated allocation or uniformly: use --allocate calibrated "
            "or uniform, or --mlp lowrank"
        )
    if ranks is not None:
        cfg = RankConfig.load(ranks)
        if cfg.method != method:
            raise ComcatError(f"rank file is for method {cfg.method!r} but --method is {method!r}: make them agree")
    elif energy is not None:
        cfg = energy_ranks(model, method, energy, mlp=mlp)
    elif allocate == "energy":
        cfg = energy_ranks_for_budget(model, method, params_ratio, mlp=mlp)
    elif allocate == "greedy":
        cfg = greedy_energy_ranks(model, method, params_ratio, mlp=mlp)
    elif allocate == "uniform":
        cfg = uniform_ranks(model, method, params_ratio, mlp=mlp)
    else:
        raise ComcatError(f"allocation must be one of {ALLOCATIONS}, got {allocate!r}")
    if classifier_rank is not None:
        cfg = replace(cfg, classifier=classifier_rank)
    return cfg.validate(model)
