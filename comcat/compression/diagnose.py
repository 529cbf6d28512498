"""Per-layer spectral diagnosis of a model's attention, after WeightWatcher's layer table, and the
ranks comcat would choose at a budget (`recommend`).

For the singular values s_1 >= ... >= s_n of a matrix (W^Q, W^K, W^V, W^O: one value per layer), or
of each head's product W^QK_h, W^VO_h (then the mean over the layer's heads, so every figure is per
head and at most the head dim), with eigenvalues lambda_i = s_i^2:

  stable rank       sum_i s_i^2 / s_1^2
  effective rank    exp(H(p)),  p_i = s_i / sum_j s_j   (Roy & Vetterli, 2007)
  r90, r95, r99     the smallest rank keeping 90 / 95 / 99% of sum_i s_i^2
  alpha             the Hill estimate of the power-law tail exponent of the eigenvalues,
                    1 + k / sum_{i<=k} ln(lambda_i / lambda_k), k = n / 2 (heavier tail: smaller alpha)

and the same effective rank for a randomized copy of the weights (their entries shuffled, which
keeps the scale and destroys learned structure). `structure` = 1 - effective rank / randomized
effective rank: near 0, the layer looks like noise; the larger, the more low-rank structure it has
learned, and the more it compresses; below 0, its spectrum is flatter than noise's (nothing to gain).
"""

from __future__ import annotations

import csv
import io

import numpy as np
import torch
from torch import nn

from ..core.linalg import product_svdvals, rank_for_energy, split_heads
from . import families
from .analysis import MATRICES, PRODUCTS, head_factors
from .families import matrix_weights

COLUMNS = (
    "layer",
    "site",
    "stable_rank",
    "effective_rank",
    "r90",
    "r95",
    "r99",
    "alpha",
    "random_effective_rank",
    "structure",
)


def stable_rank(s: np.ndarray) -> float:
    return float((s**2).sum() / max(s[0] ** 2, np.finfo(float).tiny))


def effective_rank(s: np.ndarray) -> float:
    p = s / max(s.sum(), np.finfo(float).tiny)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def hill_alpha(s: np.ndarray) -> float:
    """1 + k / sum_{i<=k} ln(lambda_i / lambda_k) over the top half of lambda = s^2."""
    lam = np.sort(s**2)[::-1]
    k = max(2, len(lam) // 2)
    logs = np.log(lam[:k] / max(lam[k - 1], np.finfo(float).tiny))
    return float(1 + k / max(logs.sum(), np.finfo(float).tiny))


def _shuffled(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return w.flatten()[torch.randperm(w.numel(), generator=g)].view_as(w)


@torch.no_grad()
def _site_spectra(block: nn.Module, g: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """Singular values per site of one block: q, k, v, o (C,) and qk, vo (H, d); with `g`, of the
    weights with their entries shuffled (each head's factors within the head)."""
    attn = families.attention(block)
    mats = matrix_weights(attn)
    out = {m: torch.linalg.svdvals((_shuffled(mats[m], g) if g else mats[m]).double()).numpy() for m in MATRICES}
    for p, (x, y) in head_factors(attn).items():
        if g is not None:
            x, y = torch.stack([_shuffled(h, g) for h in x]), torch.stack([_shuffled(h, g) for h in y])
        out[p] = product_svdvals(x.double(), y.double()).numpy()
    return out


COLUMN_HELP = {
    "layer": "the block",
    "site": "q, k, v, o: the whole matrix; qk, vo: every figure is the mean over the layer's heads of "
    "that head's W^QK_h or W^VO_h (so at most the head dim)",
    "stable_rank": "sum of s_i^2 / s_1^2: how many directions carry the energy",
    "effective_rank": "exp of the entropy of s_i / sum s_j (Roy & Vetterli)",
    "r90": "the smallest rank keeping 90% of the energy (sum of s_i^2)",
    "r95": "the same for 95%",
    "r99": "the same for 99%",
    "alpha": "tail exponent of the eigenvalues s_i^2 (Hill): smaller, heavier tail, more learned",
    "random_effective_rank": "effective rank of the same weights with their entries shuffled",
    "structure": "1 - effective rank / shuffled effective rank: 0 looks like noise, larger compresses "
    "better, below 0 flatter than noise",
}


def _metrics(s: np.ndarray, r: np.ndarray) -> dict:
    """The row's figures of one spectrum `s` (and of its shuffled copy `r`), 1-D."""
    eff, eff_r = effective_rank(s), effective_rank(r)
    return {
        "stable_rank": stable_rank(s),
        "effective_rank": eff,
        **{f"r{int(e * 100)}": float(rank_for_energy(s, e)) for e in (0.9, 0.95, 0.99)},
        "alpha": hill_alpha(s),
        "random_effective_rank": eff_r,
        "structure": 1 - eff / eff_r,
    }


def layer_table(model: nn.Module, seed: int = 0) -> list[dict]:
    """One row per block and site (q, k, v, o, qk, vo) with the metrics of the module docstring:
    of the matrix for q, k, v, o, and the mean over heads of the per-head figures for qk, vo."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, block in enumerate(families.blocks(model)):
        real, rand = _site_spectra(block), _site_spectra(block, g)
        for site in MATRICES + PRODUCTS:
            s, r = real[site], rand[site]
            per = [_metrics(a, b) for a, b in zip(s, r)] if s.ndim == 2 else [_metrics(s, r)]
            rows.append({"layer": i, "site": site, **{k: float(np.mean([m[k] for m in per])) for k in per[0]}})
    return rows


def table_summary(rows: list[dict]) -> str:
    """Which sites carry the most and the least learned structure (one line each)."""
    ranked = sorted(rows, key=lambda r: r["structure"], reverse=True)
    name = lambda r: f"layer {r['layer']} {r['site'].upper()} ({r['structure']:.0%})"  # noqa: E731
    return (
        f"Most learned low-rank structure: {', '.join(name(r) for r in ranked[:3])}; least (closest to "
        f"noise, compress least): {', '.join(name(r) for r in ranked[-3:])}."
    )


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def recommend(model: nn.Module, ratio: float, spectra=None, cal=None, progress=None) -> dict:
    """The head-level ranks comcat gives at `ratio` of the attention parameters, with the model's
    predicted params and FLOPs, and per layer the share of the energy of its W^QK_h and W^VO_h those
    ranks keep, pooled over heads and per head. Without `cal` the plain rule
    (ranks.energy_ranks_for_budget); with a calibration.Calibration of the user's images, the
    calibrated allocation (allocate.calibrated_ranks, what Compress starts from on those images),
    plus the predicted KL to the dense model of both allocations, sum_s KL_s(r_s) over sites."""
    from ..core.linalg import cumulative_energy
    from .analysis import analyze
    from .cost import model_flops, model_params
    from .rank_rules import energy_ranks_for_budget

    plain = energy_ranks_for_budget(model, "head", ratio)
    cfg, predicted = plain, None
    if cal is not None:
        from .allocate import calibrated_ranks
        from .cost import Budget

        cfg, sites = calibrated_ranks(model, cal, Budget(ratio), progress=progress)
        predicted = {
            name: sum(float(s.curve[min(c.blocks[s.block][s.key], len(s.curve) - 1)]) for s in sites)
            for name, c in (("plain", plain), ("calibrated", cfg))
        }
    spectra = spectra if spectra is not None else analyze(model)
    layers = []
    for i, ranks in enumerate(cfg.blocks):
        kept = {p: float(spectra.layer_head_energy(p)[i, ranks[p] - 1]) for p in PRODUCTS}
        heads = {p: cumulative_energy(spectra.head_spectra(p, i))[:, ranks[p] - 1].tolist() for p in PRODUCTS}
        layers.append(
            {
                "layer": i,
                "qk": ranks["qk"],
                "vo": ranks["vo"],
                "kept_qk": kept["qk"],
                "kept_vo": kept["vo"],
                "heads_qk": heads["qk"],
                "heads_vo": heads["vo"],
            }
        )
    return {
        "ratio": ratio,
        "rule": "calibrated" if cal is not None else "plain",
        "ranks": cfg.to_dict(),
        "plain_ranks": plain.to_dict(),
        "layers": layers,
        "images": getattr(cal, "images", None),
        "predicted_kl": predicted,
        "params": [model_params(model), model_params(model, cfg)],
        "flops": [model_flops(model), model_flops(model, cfg)],
    }


def calibrate_on(model: nn.Module, data, images: int = 512, seed: int = 0, progress=None):
    """The calibration (calibrate.Calibration, with the allocation's probes) of `model` on the fit
    images of `data` (a folder, or None for the embedded shapes; a text encoder's file of sentences):
    the split and the subset a compress run with the same data, seed and calibration images uses."""
    from torch.utils.data import DataLoader

    from .allocate import FISHER_IMAGES, PROBE_IMAGES
    from .calibrate import calibrate
    from .splits import embedded_splits, subset
    from .texts import data_splits

    embedded = data in (None, "", "embedded")
    fit = embedded_splits(train=0, val=0, evaluate=0).fit if embedded else data_splits(data, model, seed).fit
    return calibrate(
        model,
        DataLoader(subset(fit, images, seed), batch_size=32),
        probe=PROBE_IMAGES,
        fisher=FISHER_IMAGES,
        progress=progress,
    )


def recommendation_text(rec: dict) -> str:
    """Markdown: what the recommendation saves and where it loses most."""
    (dp, sp), (df, sf) = rec["params"], rec["flops"]
    worst = min(rec["layers"], key=lambda l: min(l["kept_qk"], l["kept_vo"]))
    heads = sorted(
        (kept, l["layer"], h, p.upper())
        for l in rec["layers"]
        for p in PRODUCTS
        for h, kept in enumerate(l[f"heads_{p}"])
    )[:3]
    calibrated = rec.get("rule") == "calibrated"
    text = (
        f"At **{rec['ratio']:.0%}** of the attention parameters, {'calibrated ' if calibrated else ''}"
        "head-level ranks (QK / VO per layer: "
        + ", ".join(f"{l['qk']}/{l['vo']}" for l in rec["layers"])
        + f") give **{sp:,}** parameters ({sp / dp:.2f}× dense) and **{sf / 1e6:,.0f}M** FLOPs "
        f"({sf / df:.2f}×). The layer keeping least energy, pooled over its heads: layer {worst['layer']} "
        f"(QK {worst['kept_qk']:.1%}, VO {worst['kept_vo']:.1%}); single heads keeping least: "
        + ", ".join(f"layer {i} head {h} {p} ({kept:.1%} kept)" for kept, i, h, p in heads)
        + ". "
    )
    if not calibrated:
        return text + (
            "These are plain-SVD ranks; calibrate them on your images below, or Compress with your "
            "images, which allocates them by the measured error instead."
        )
    plain = ", ".join(f"{b['qk']}/{b['vo']}" for b in rec["plain_ranks"]["blocks"])
    kl = rec["predicted_kl"]
    return text + (
        f"Allocated by the error measured on **{rec['images']}** of your images (the ranks a Compress "
        f"run on them starts from; plain-SVD ranks: {plain}). Predicted KL to the dense model before "
        f"distillation (sum of per-site estimates): **{kl['calibrated']:.3g}** calibrated against "
        f"{kl['plain']:.3g} plain."
    )


@torch.no_grad()
def head_errors(dense: nn.Module, small: nn.Module) -> list[dict]:
    """Per block and head of a head-level compressed model: the relative weight-space error of its
    products against the dense ones, ||W^QK_h - A_h B_h^T||_F / ||W^QK_h||_F (query bias rows left
    out) and ||W^VO_h - P_h R_h^T||_F / ||W^VO_h||_F. Sorted, largest first. (A calibrated model is
    fitted in the norm of its inputs, so a large weight error need not cost accuracy.)"""
    from .lowrank import HeadLowRankAttention

    rows = []
    for i, (bd, bs) in enumerate(zip(families.blocks(dense), families.blocks(small))):
        a = families.attention(bs)
        if not isinstance(a, HeadLowRankAttention):
            continue
        f = head_factors(families.attention(bd))
        H = a.num_heads
        per = {
            "qk": (split_heads(a.q.weight, H), split_heads(a.k.weight, H)),
            "vo": (split_heads(a.v.weight, H), split_heads(a.proj.weight.t(), H)),
        }
        for p in PRODUCTS:
            x, y = f[p]
            full = x @ y.transpose(-1, -2)
            approx = per[p][0] @ per[p][1].transpose(-1, -2)
            err = torch.linalg.matrix_norm(full - approx) / torch.linalg.matrix_norm(full).clamp_min(1e-30)
            rows += [{"layer": i, "head": h, "product": p, "error": float(e)} for h, e in enumerate(err)]
    return sorted(rows, key=lambda r: r["error"], reverse=True)


def error_grid(rows: list[dict]) -> dict[str, np.ndarray]:
    """head_errors rows -> product -> (layers, heads) array of errors (NaN where a layer is dense)."""
    depth = 1 + max((r["layer"] for r in rows), default=-1)
    heads = 1 + max((r["head"] for r in rows), default=-1)
    grid = {p: np.full((depth, heads), np.nan) for p in PRODUCTS}
    for r in rows:
        grid[r["product"]][r["layer"], r["head"]] = r["error"]
    return grid


def comparison_text(rows: list[dict], ranks: dict | None = None) -> str:
    """Markdown: the heads a compressed model lost most of, and the mean error per product."""
    if not rows:
        return "No attention of this model is head-level compressed: nothing to compare per head."
    mean = {p: np.mean([r["error"] for r in rows if r["product"] == p]) for p in PRODUCTS}
    text = (
        "Against its dense source, relative weight error ‖W_h − W′_h‖ / ‖W_h‖ of the per-head products: "
        f"mean QK {mean['qk']:.1%}, VO {mean['vo']:.1%}; heads that lost most: "
        + ", ".join(f"layer {r['layer']} head {r['head']} {r['product'].upper()} ({r['error']:.1%})" for r in rows[:5])
        + "."
    )
    if ranks and ranks.get("blocks"):
        text += (
            " Ranks (QK / VO per layer): "
            + ", ".join(f"{b.get('qk', '-')}/{b.get('vo', '-')}" for b in ranks["blocks"])
            + "."
        )
    return text + (
        " A calibrated model is fitted to your images' inputs, so a large weight error need not cost "
        "accuracy: its report gives the measured figures."
    )
