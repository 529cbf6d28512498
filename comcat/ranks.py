"""Per-layer rank configurations and how to choose them.

A RankConfig holds, per block, the ranks of the low-rank sites of one method:
  head:   {"qk": r, "vo": r, "fc1": r|None, "fc2": r|None}   (r <= head_dim for qk/vo)
  matrix: {"q": r, "k": r, "v": r, "o": r, "fc1": ..., "fc2": ...}  (r <= C; None keeps dense)
plus an optional rank for the classifier head. None always means "keep dense".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .analysis import MATRICES, analyze, rank_for_energy
from .errors import ComcatError
from .vit import vit_blocks

METHODS = ("head", "matrix")
ATTN_SITES = {"head": ("qk", "vo"), "matrix": MATRICES}
MLP_SITES = ("fc1", "fc2")


@dataclass
class RankConfig:
    method: str
    blocks: list[dict]
    head: int | None = None
    note: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "blocks": self.blocks, "head": self.head, **({"note": self.note} if self.note else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "RankConfig":
        if not isinstance(d, dict) or "blocks" not in d:
            raise ComcatError('a rank config is JSON like {"method": "head", "blocks": [{"qk": 16, "vo": 16}, ...]}')
        method = d.get("method", "head")
        if method not in METHODS:
            raise ComcatError(f"rank config method must be one of {METHODS}, got {method!r}")
        blocks, head = d["blocks"], d.get("head")
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise ComcatError('a rank config\'s "blocks" is a list with one {"qk": r, "vo": r} object per block')
        if head is not None and not _is_rank(head):
            raise ComcatError(f"classifier rank {head!r} is not a positive integer: use an integer or null")
        note = d.get("note", {})
        return cls(method, [dict(b) for b in blocks], head, note if isinstance(note, dict) else {})

    @classmethod
    def load(cls, path: str | Path) -> "RankConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ComcatError(f"rank file {path} does not exist: pass a JSON file written by 'comcat compress' or by hand")
        except json.JSONDecodeError as e:
            raise ComcatError(f"rank file {path} is not valid JSON ({e.msg} at line {e.lineno}): fix or regenerate it")

    def validate(self, model: nn.Module) -> "RankConfig":
        """Check every rank against the model's shapes; raises ComcatError with what to change."""
        blocks = vit_blocks(model)
        if len(self.blocks) != len(blocks):
            raise ComcatError(f"rank config has {len(self.blocks)} blocks but the model has {len(blocks)}: "
                              "write one entry per block")
        sites = ATTN_SITES[self.method] + MLP_SITES
        for i, (b, ranks) in enumerate(zip(blocks, self.blocks)):
            unknown = set(ranks) - set(sites)
            if unknown:
                raise ComcatError(f"block {i}: unknown rank keys {sorted(unknown)} for method "
                                  f"{self.method!r}; allowed: {list(sites)}")
            limits = site_limits(b, self.method)
            for site in sites:
                r = ranks.get(site)
                if site in ATTN_SITES[self.method] and r is None and self.method == "head":
                    raise ComcatError(f"block {i}: head-level method needs a rank for {site!r} (1..{limits[site]})")
                if r is not None and (not _is_rank(r) or not 1 <= r <= limits[site]):
                    raise ComcatError(f"block {i}: rank {site}={r!r} is out of range: use an integer in 1..{limits[site]}")
        if self.head is not None:
            lim = min(model.head.in_features, model.head.out_features)
            if not 1 <= self.head <= lim:
                raise ComcatError(f"classifier rank {self.head} is out of range: use 1..{lim} or null")
        return self


def _is_rank(r) -> bool:
    """An integer (JSON true/false are not ranks)."""
    return isinstance(r, (int, np.integer)) and not isinstance(r, (bool, np.bool_))


def site_limits(block: nn.Module, method: str) -> dict[str, int]:
    """Largest meaningful rank of each site of one block."""
    attn, mlp = block.attn, block.mlp
    C = attn.qkv.in_features
    lim = {"qk": attn.head_dim, "vo": attn.head_dim} if method == "head" else {m: C for m in MATRICES}
    for fc in MLP_SITES:
        lin = getattr(mlp, fc)
        lim[fc] = min(lin.in_features, lin.out_features)
    return lim


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
    for b in vit_blocks(model):
        d, C = b.attn.head_dim, b.attn.qkv.in_features
        if method == "head":
            r = int(max(1, min(d, round(ratio * d))))
            ranks = {"qk": r, "vo": r}
        else:
            r = int(max(1, min(C, round(ratio * C / 2))))
            ranks = {m: r for m in MATRICES}
        if mlp:
            ranks.update({fc: _mlp_rank_for_ratio(getattr(b.mlp, fc), ratio) for fc in MLP_SITES})
        blocks.append(ranks)
    return RankConfig(method, blocks, note={"rule": "uniform", "ratio": ratio})


def full_ranks(model: nn.Module, method: str, mlp: bool = False) -> RankConfig:
    """Every site at its full rank (head_dim, or C for matrices): the factorized model is exact."""
    blocks = []
    for b in vit_blocks(model):
        lim = site_limits(b, method)
        blocks.append({k: r for k, r in lim.items() if k not in MLP_SITES or mlp})
    return RankConfig(method, blocks, note={"rule": "full"})


@torch.no_grad()
def mlp_spectra(model: nn.Module) -> list[dict[str, np.ndarray]]:
    return [{fc: torch.linalg.svdvals(getattr(b.mlp, fc).weight.detach().double()).numpy() for fc in MLP_SITES}
            for b in vit_blocks(model)]


def energy_ranks(model: nn.Module, method: str, energy: float, mlp: bool = False,
                 spectra=None, mlp_sv=None) -> RankConfig:
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
    return RankConfig(method, blocks, note={"rule": "energy", "energy": energy})


def site_gains(model: nn.Module, method: str, mlp: bool):
    """Per site: (block, key, normalized energy gain of each rank step (n,), params per rank step)."""
    spectra = analyze(model)
    mlp_sv = mlp_spectra(model) if mlp else None
    for i, b in enumerate(vit_blocks(model)):
        C, H = b.attn.qkv.in_features, b.attn.num_heads
        if method == "head":
            sites = [(p, np.sqrt((spectra.head[p][i] ** 2).sum(0)), 2 * C * H) for p in ("qk", "vo")]
        else:
            sites = [(m, spectra.matrix[m][i], 2 * C) for m in MATRICES]
        if mlp:
            sites += [(fc, mlp_sv[i][fc], getattr(b.mlp, fc).in_features + getattr(b.mlp, fc).out_features)
                      for fc in MLP_SITES]
        for key, s, unit in sites:
            e = np.asarray(s, np.float64) ** 2
            yield i, key, e / max(e.sum(), np.finfo(np.float64).tiny), unit


def greedy_energy_ranks(model: nn.Module, method: str, ratio: float, mlp: bool = False) -> RankConfig:
    """Energy-based allocation under a parameter budget, by marginal gain: every site starts at
    rank 1, then rank steps are taken in order of normalized energy gained per parameter
    (s_j^2 / sum s^2 / params per step) while the compressed sites fit in `ratio` of their dense
    params. Each site's energy curve is concave, so this maximizes the summed retained energy."""
    from .cost import site_params  # local: cost imports ranks

    if not 0 < ratio <= 1:
        raise ComcatError(f"parameter ratio must be in (0, 1], got {ratio}")
    depth = len(vit_blocks(model))
    blocks = [{} for _ in range(depth)]
    steps = []
    for i, key, gain, unit in site_gains(model, method, mlp):
        blocks[i][key] = 1
        steps += [(g / unit, i, key) for g in gain[1:]]
    steps.sort(key=lambda t: -t[0])
    cfg = RankConfig(method, blocks)
    dense = site_params(model, None, method, mlp)
    if site_params(model, cfg, method, mlp) > ratio * dense:
        raise ComcatError(f"even rank 1 everywhere exceeds {ratio:.0%} of the parameters: use a larger --params-ratio")
    lo, hi = 0, len(steps)          # largest prefix of steps that fits the budget (monotone in the prefix)

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
    from .cost import site_params  # local: cost imports ranks

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
        raise ComcatError(f"no rank allocation fits {ratio:.0%} of the parameters: use a larger --params-ratio")
    best.note = {"rule": "energy-budget", "ratio": ratio, "energy": round(lo, 6)}
    return best
