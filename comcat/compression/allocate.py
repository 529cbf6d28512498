"""Rank allocation from calibrated errors, in one unit: the KL divergence to the dense model.

A site s (a layer's QK or VO path; W^Q, W^K, W^V, W^O at matrix level; an MLP linear) truncated
to rank r changes its output by delta_r = sum_{i>=r} (component i of its whitened factorization).
To second order, KL(p_dense || p) ~ 1/2 E_{y ~ p_dense}[(g_y . delta_r)^2] with g_y the gradient of
log p(y | x) at the site's output (the Fisher information). g_y . delta_r = sum_{i>=r} c_i, where
c_i is the inner product of g_y with component i alone, so one backward pass per sampled label
gives every site's predicted KL at every rank:

    F_s(r) = 1/2 mean_{images, y} (sum_{i >= r} c_i)^2.

One probe per site, the KL measured with only that site truncated at the budget's uniform rank,
rescales each curve (KL_s(r) ~ kappa_s F_s(r)), which corrects what the second-order prediction
misses. An MLP that keeps k of its neurons (neurons.py) has the curve of its greedy refit error e(k),
rescaled by its probe the same way, so head ranks and MLP widths are traded in the same unit. Ranks
then go where the predicted KL falls most per parameter (or FLOP), along each curve's
lower convex hull, until the budget is spent; leftover budget buys single rank steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import families
from .calibrate import Calibration, compressed_block, head_logits, qk_factors, vo_factors, whitened_linear
from .cost import Budget
from .families import head_weights, matrix_weights
from .families.base import logit_bias_mask
from .families.qk_maps import has_qk_map, map_qk
from .models import has_classifier
from .rank_rules import uniform_ranks
from .ranks import MATRICES, MLP_SITES, NEURONS, RankConfig, mlp_mode, pin, site_limits

PROBE_IMAGES = 64
FISHER_IMAGES = 128
FISHER_SAMPLES = 2


@dataclass
class Site:
    """One rank choice: its block, key, predicted KL curve (full + 1,) and cost of a rank step."""

    block: int
    key: str
    curve: np.ndarray
    unit: float = 0.0
    probe: int = 0
    kl: float = 0.0  # measured KL with this site alone at the probe rank


def kl_to(reference: torch.Tensor, logits: torch.Tensor, embeddings: bool = False) -> float:
    """mean over images of KL(softmax(reference) || softmax(logits)); for `embeddings` (a model
    without a classifier) the relative squared error sum ||e - e_ref||^2 / sum ||e_ref||^2."""
    if embeddings:
        return ((logits.float() - reference.float()).square().sum() / reference.float().square().sum()).item()
    return F.kl_div(
        logits.float().log_softmax(-1), reference.float().log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()


# ----------------------------------------------------------------------------- Fisher-predicted curves
def _factors(block: nn.Module, bs, method: str, mlp: bool) -> dict:
    """Full-rank whitened factors of a block's sites: key -> (left (.., in, n), right (.., out, n), input mean)."""
    out = {}
    st = bs.attn
    attn = families.attention(block)
    if method == "head":
        hw = head_weights(attn)
        p, r, _ = vo_factors(hw, st)
        out["vo"] = (p, r, st.mixed.mean)
        if not hw.dense_qk:
            a, b, _ = qk_factors(hw, st)
            out["qk"] = (a, b, None)
    else:
        ws = matrix_weights(attn)
        for m in MATRICES:
            stats = st.outputs if m == "o" else st.inputs
            down, up, _, _ = whitened_linear(ws[m], None, stats, min(ws[m].shape))
            out[m] = (down.T, up, stats.mean)
    if mlp:
        for fc, lin in families.mlp(block).items():
            down, up, _, _ = whitened_linear(lin.weight, lin.bias, bs.mlp[fc], min(lin.weight.shape))
            out[fc] = (down.T, up, bs.mlp[fc].mean)
    return {k: tuple(t.float() if t is not None else None for t in v) for k, v in out.items()}


class TappedAttention(nn.Module):
    """A dense canonical attention written out, keeping each site's input and (grad-retaining)
    output in `tape`: per-head logits (QK), the projection output (VO, or W^O), the fused qkv."""

    def __init__(self, attn: nn.Module, method: str, tape: dict):
        super().__init__()
        self.attn, self.method, self.tape = attn, method, tape

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        attn, tape = self.attn, self.tape
        B, N, C = x.shape
        qkv = attn.qkv(x)
        if self.method == "matrix":
            qkv.retain_grad()
            tape.update(q=(x, qkv, 0), k=(x, qkv, 1), v=(x, qkv, 2))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = map_qk(attn, q, k)
        logits = (q @ k.mT) * attn.scale  # the QK path's output, before any bias or mask
        logits.retain_grad()
        masked = logits
        attn_mask = logit_bias_mask(attn, attn_mask)
        if attn_mask is not None:
            bool_mask = attn_mask.dtype == torch.bool
            masked = logits.masked_fill(~attn_mask, float("-inf")) if bool_mask else logits + attn_mask
        probs = masked.softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(B, N, -1)
        out = attn.proj(o)
        out.retain_grad()
        if self.method == "head":
            tape["vo"] = (probs.detach() @ x.detach()[:, None], out, None)
            if not has_qk_map(attn):  # a rotary / cosine layer's QK path stays dense: no site
                tape["qk"] = (x, logits, attn.scale)
        else:
            tape["o"] = (o, out, None)
        return out


def _tapped_block(
    block: nn.Module, h: torch.Tensor, method: str, mlp: bool, tape: dict, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The block's forward with its attention tapped (TappedAttention) and, with `mlp`, the MLP
    linears' inputs and outputs kept in `tape` too."""
    attn = families.attention(block)

    def keep(fc):
        def hook(module, args, out):
            out.retain_grad()
            tape[fc] = (args[0], out, None)

        return hook

    hooks = [lin.register_forward_hook(keep(fc)) for fc, lin in families.mlp(block).items()] if mlp else []
    families.set_attention(block, TappedAttention(attn, method, tape))
    try:
        return families.run_block(block, h, valid)
    finally:
        families.set_attention(block, attn)
        for hk in hooks:
            hk.remove()


@torch.no_grad()
def _components(key: str, entry: tuple, factors: tuple, C: int) -> torch.Tensor:
    """c_i (B, ..., n) of one site from its tape entry (input, output with .grad, extra) and factors."""
    left, right, mean = factors
    inp, out, extra = entry
    if key == "qk":  # scale sum_jk g_jk (x~_j A_i)(x_k B_i)
        xa = torch.cat([inp, torch.ones_like(inp[..., :1])], -1) if left.shape[1] > C else inp
        qf = torch.einsum("bnc,hcd->bhnd", xa, left)
        kf = torch.einsum("bnc,hcd->bhnd", inp, right)
        return ((out.grad @ kf) * qf).sum(2) * extra
    if key == "vo":  # sum_t ((z_t - mu_h) P_i)(g_t R_i)
        zf = torch.einsum("bhnc,hcd->bhnd", inp - mean[None, :, None], left)
        gf = torch.einsum("bnc,hcd->bhnd", out.grad, right)
        return (zf * gf).sum(2)
    grad = out.grad if extra is None else out.grad.reshape(*out.shape[:2], 3, -1)[:, :, extra]
    return (((inp - mean) @ left) * (grad @ right)).sum(1)  # linear: sum_t ((u_t - mu) d_i)(g_t u_i)


def fisher_curves(
    model: nn.Module, cal: Calibration, method: str, mlp: bool, samples: int = FISHER_SAMPLES, seed: int = 0
) -> dict[tuple[int, str], np.ndarray]:
    """Per site (block, key): F_s(r) for r = 0..full (module docstring), on cal.first's images. For a
    model without a classifier the output is an embedding e, taken as the mean of a unit Gaussian:
    g_y = grad of u . e with u ~ N(0, I), so that F_s(r) = 1/2 E||delta_r e||^2."""
    blocks = families.blocks(model)
    factors = [_factors(b, bs, method, mlp) for b, bs in zip(blocks, cal.stats)]
    C = families.attention(blocks[0]).qkv.in_features
    comps: dict[tuple[int, str], list] = {}
    g = torch.Generator().manual_seed(seed)
    embeddings = not has_classifier(model)
    valid = cal.valid_of(len(cal.first))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(cal.first), 32):
            h = cal.first[start : start + 32]
            v = None if valid is None else valid[start : start + 32]
            tapes = []
            with torch.enable_grad():
                for block in blocks:
                    tapes.append({})
                    h = _tapped_block(block, h, method, mlp, tapes[-1], v)
                out = head_logits(model, h, v)
                logp = out if embeddings else out.log_softmax(-1)
                for n in range(samples):
                    for tape in tapes:
                        for _, t, _ in tape.values():
                            t.grad = None
                    if embeddings:
                        picked = logp * torch.randn(logp.shape, generator=g).to(logp.device)
                    else:
                        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=g)[:, 0].to(logp.device)
                        picked = logp.gather(1, y[:, None])
                    picked.sum().backward(retain_graph=n + 1 < samples)
                    for i, tape in enumerate(tapes):
                        for key, entry in tape.items():
                            comps.setdefault((i, key), []).append(_components(key, entry, factors[i][key], C))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    curves = {}
    for site, parts in comps.items():
        c = torch.cat(parts).double()
        c = c.reshape(c.shape[0], -1, c.shape[-1])  # (samples, heads or 1, n)
        tails = c.flip(-1).cumsum(-1).flip(-1).sum(1)  # sum over heads of sum_{i>=r} c_i
        curves[site] = np.concatenate([0.5 * (tails**2).mean(0).cpu().numpy(), [0.0]])
    return curves


# ----------------------------------------------------------------------------- probes and allocation
@torch.no_grad()
def probe_kl(model: nn.Module, cal: Calibration, block: int, ranks: dict, method: str) -> float:
    """KL to the dense model on the probe images with only block `block` changed to `ranks`."""
    blocks = families.blocks(model)
    valid = cal.valid_of(len(cal.inputs[block]))
    h = families.run_block(compressed_block(blocks[block], ranks, method, cal.stats[block]), cal.inputs[block], valid)
    for b in blocks[block + 1 :]:
        h = families.run_block(b, h, valid)
    return kl_to(cal.logits, head_logits(model, h, valid), embeddings=not has_classifier(model))


def _attention_full(block: nn.Module, method: str) -> dict:
    return {k: v for k, v in site_limits(block, method).items() if k not in MLP_SITES} if method == "head" else {}


def hull(curve: np.ndarray, lo: int = 1) -> list[tuple[int, int, float]]:
    """Lower convex hull of curve[r], r >= lo, as segments (r_from, r_to, slope), slopes increasing."""
    pts: list[tuple[int, float]] = []
    for r in range(lo, len(curve)):
        while len(pts) >= 2:
            (r1, p1), (r2, p2) = pts[-2], pts[-1]
            if (p2 - p1) * (r - r1) >= (curve[r] - p1) * (r2 - r1):
                pts.pop()
            else:
                break
        pts.append((r, float(curve[r])))
    return [(a, b, (pb - pa) / (b - a)) for (a, pa), (b, pb) in zip(pts, pts[1:])]


def spend(sites: list[Site], base: float, target: float) -> list[int]:
    """Ranks (one per site, from 1) minimizing sum of curves under base + sum unit (r - 1) <= target."""
    segments = sorted((slope / s.unit, n, a, b) for n, s in enumerate(sites) for a, b, slope in hull(s.curve))
    rank = [1] * len(sites)
    spent = base
    for _, n, a, b in segments:
        cost = (b - a) * sites[n].unit
        if rank[n] == a and spent + cost <= target:
            rank[n], spent = b, spent + cost
    while True:  # what is left buys single steps, best gain per cost first
        steps = [
            ((s.curve[rank[n]] - s.curve[rank[n] + 1]) / s.unit, n)
            for n, s in enumerate(sites)
            if rank[n] + 1 < len(s.curve) and spent + s.unit <= target
        ]
        if not steps or max(steps)[0] <= 0:
            return rank
        n = max(steps)[1]
        rank[n] += 1
        spent += sites[n].unit


@torch.no_grad()
def calibrated_ranks(
    model: nn.Module, cal: Calibration, budget: Budget, progress=None
) -> tuple[RankConfig, list[Site]]:
    """Ranks within `budget` (cost_fn(ranks) <= target, Budget.target) that minimize the summed
    predicted KL (module docstring); the probe rank of a site is the budget's uniform rank.
    `progress(i, n)` after every probe. Returns (ranks, sites)."""
    from ..core.errors import ComcatError

    budget = budget.on_sites(model)
    method, mlp, ratio = budget.method, budget.mlp, budget.ratio
    cost_fn, target = budget.target(model)
    blocks = families.blocks(model)
    neurons = mlp_mode(mlp) == NEURONS
    curves = fisher_curves(model, cal, method, False if neurons else mlp)
    if neurons:  # the refit error of the greedy path, in the MLP output's squared units (the probe rescales it)
        for i, (b, bs) in enumerate(zip(blocks, cal.stats)):
            curves[(i, NEURONS)] = bs.neuron_path(families.mlp(b)["fc2"])[1].numpy()
    probe_at = uniform_ranks(model, method, ratio, mlp=mlp)
    sites = [Site(i, key, curve) for (i, key), curve in sorted(curves.items())]
    keys = [s.key for s in sites if s.block == 0]
    ones = pin(RankConfig(method, [{k: 1 for k in keys} for _ in blocks]), model)
    base = cost_fn(ones)
    if base > target:
        raise ComcatError(
            f"the budget is below the smallest possible model ({base:,.0f} at rank 1 everywhere): raise the ratio"
        )
    for n, s in enumerate(sites):
        if progress:
            progress(n, len(sites))
        s.probe = probe_at.blocks[s.block][s.key]
        ranks = {**_attention_full(blocks[s.block], method), s.key: s.probe}
        s.kl = probe_kl(model, cal, s.block, ranks, method)
        predicted = float(s.curve[s.probe])
        if predicted > 0 and s.kl > 0:
            s.curve = s.curve * (s.kl / predicted)
        two = RankConfig(method, [dict(b) for b in ones.blocks])
        two.blocks[s.block][s.key] = 2
        s.unit = cost_fn(two) - base
    cfg = RankConfig(method, [dict(b) for b in ones.blocks], note={"rule": "calibrated", "ratio": ratio})
    for s, r in zip(sites, spend(sites, base, target)):
        cfg.blocks[s.block][s.key] = r
    return cfg, sites
