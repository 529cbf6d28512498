"""A per-head adapter as LoRA factors on to_q, to_k, to_v and to_out.0, fitted in closed form.

For head h of an attention with Q_h = W^Q_h^T (Cq, d), K_h = W^K_h^T (Cc, d), V_h = W^V_h^T (Cc, d),
O_h (d, Co) the head's rows of W^O^T, the adapter at strength alpha makes
    W^QK_h' = Q_h K_h^T + alpha A_h B_h^T,        W^VO_h' = V_h O_h + alpha P_h R_h.
A LoRA keeps the head dimension d, so it can only reach products (Q_h + dQ_h)(K_h + dK_h)^T, of
rank <= d, while W^QK_h' may have rank d + r. Three closed-form candidates per pair (likewise V, O):
    two steps, Q first:  dQ_h = alpha A_h B_h^T K_h (K_h^T K_h)^-1   (the update seen through K's span),
                         dK_h = E^T Q'_h (Q'_h^T Q'_h)^-1, E = W^QK_h' - Q'_h K_h^T  (the rest);
    two steps, K first:  the same with the sides swapped;                 (rank <= r per head each)
    rank d:              the best rank-d product U S V^T of W^QK_h' (Eckart-Young), factored with
                         Q'_h = U U^T Q_h, the nearest to Q_h             (rank up to d per head).
Each projection's update is stacked over heads and truncated to the LoRA rank by its SVD; the
candidate whose truncated products are closest to the adapter's is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RIDGE = 1e-8  # relative to the Gram matrix's mean diagonal: keeps a rank-deficient projection solvable


def _solve_right(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """X minimizing ||X k^T - t||_F: t k (k^T k)^-1, for t (m, n), k (n, d) -> (m, d)."""
    g = k.T @ k
    g = g + RIDGE * g.diagonal().mean().clamp_min(1e-30) * torch.eye(len(g), dtype=g.dtype)
    return torch.linalg.solve(g, (t @ k).T).T


def _two_steps(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dX, dY with (x + dX)(y + dY)^T ~ x y^T + t: dX first through y's span, then dY from the rest."""
    dx = _solve_right(t, y)
    x1 = x + dx
    rest = x @ y.T + t - x1 @ y.T
    dy = _solve_right(rest.T, x1)
    return dx, dy


def best_rank_d(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) making (x + dX)(y + dY)^T the best rank-d approximation U S V^T of x y^T + t
    (Eckart-Young), factored as X = U U^T x (the nearest to x), Y = V S (U^T x)^-T."""
    d = x.shape[1]
    u, s, vh = torch.linalg.svd(x @ y.T + t, full_matrices=False)
    u, s, v = u[:, :d], s[:d], vh[:d].T
    g = u.T @ x  # (d, d)
    x1 = u @ g
    y1 = torch.linalg.lstsq(g, (v * s).T).solution.T  # V S G^-T
    return x1 - x, y1 - y


def fit_pair(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Candidate (dX, dY) for (x + dX)(y + dY)^T ~ x y^T + t, x (m, d), y (n, d), t (m, n), float64:
    'x first' and 'y first' (rank <= r each), 'rank d' (the best product, updates of rank up to d)."""
    dy2, dx2 = _two_steps(y, x, t.T)
    return {"x first": _two_steps(x, y, t), "y first": (dx2, dy2), "rank d": best_rank_d(x, y, t)}


def low_rank(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (out, in) ~ up @ down with up (out, R), down (R, in): its truncated SVD, R = rank or the
    numerical rank of delta; the singular values are split evenly between the two factors."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 1
    keep = max(1, min(keep, rank) if rank else keep)
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep]


@dataclass
class SiteFit:
    """The fitted LoRA of one attention: `factors[proj] = (up (out, R), down (R, in))` for proj in
    to_q, to_k, to_v, to_out.0 (float32); the relative errors of the per-head products,
    err_qk = sqrt(sum_h ||W^QK_h(lora) - W^QK_h'||^2 / sum_h ||alpha A_h B_h^T||^2) (err_vo alike),
    and which candidate of `fit_pair` each pair kept."""

    factors: dict = field(default_factory=dict)
    err_qk: float = 0.0
    err_vo: float = 0.0
    method_qk: str = ""
    method_vo: str = ""


def _heads(w: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """A projection's weight (H d, C) -> per head (C, d)."""
    return [b.T for b in w.reshape(heads, -1, w.shape[1])]


def _fit_products(xs, ys, ts, rank):
    """Per-head products x_h y_h^T + t_h, as rank-`rank` updates of the stacked x (H d, m) and
    y (H d, n) weights: the candidate with the smallest relative error after truncation.
    Returns (method, error, (up, down) of x, (up, down) of y)."""
    cands = [fit_pair(x, y, t) for x, y, t in zip(xs, ys, ts)]
    den = sum(float(torch.linalg.matrix_norm(t)) ** 2 for t in ts)
    best = None
    for method in cands[0]:
        fx = low_rank(torch.cat([c[method][0].T for c in cands]), rank)
        fy = low_rank(torch.cat([c[method][1].T for c in cands]), rank)
        dx, dy = _heads(fx[0] @ fx[1], len(xs)), _heads(fy[0] @ fy[1], len(xs))
        num = sum(
            float(torch.linalg.matrix_norm((x + a) @ (y + b).T - x @ y.T - t)) ** 2
            for x, y, t, a, b in zip(xs, ys, ts, dx, dy)
        )
        err = (num / den) ** 0.5 if den > 0 else 0.0
        if best is None or err < best[1]:
            best = (method, err, fx, fy)
    return best


def fit_site(attn, layer, scale: float, rank: int | None = None) -> SiteFit:
    """Fit the LoRA of one diffusers `Attention` carrying the HeadLowRank `layer` at strength `scale`;
    `rank`: the LoRA rank of each projection (None: H r, what the two-step fits need)."""
    f64 = torch.float64
    heads, r = layer.heads, layer.rank
    rank = rank or heads * r
    q, k, v = (_heads(lin.weight.detach().to(f64), heads) for lin in (attn.to_q, attn.to_k, attn.to_v))
    o = _heads(attn.to_out[0].weight.detach().to(f64).T.contiguous(), heads)  # per head (Co, d) = O_h^T
    A, B, P, R = (t.detach().to(f64) for t in (layer.A, layer.B, layer.P, layer.R))
    cols = [slice(h * r, (h + 1) * r) for h in range(heads)]
    t_qk = [scale * A[:, c] @ B[:, c].T for c in cols]  # (Cq, Cc)
    t_vo = [scale * P[:, c] @ R[c] for c in cols]  # (Cc, Co)
    out = SiteFit()
    out.method_qk, out.err_qk, out.factors["to_q"], out.factors["to_k"] = _fit_products(q, k, t_qk, rank)
    out.method_vo, out.err_vo, out.factors["to_v"], fo = _fit_products(v, o, t_vo, rank)
    # to_out's weight (Co, H d) is the transpose of the stacked O_h^T: swap and transpose the factors
    out.factors["to_out.0"] = (fo[1].T, fo[0].T)
    out.factors = {k: (up.float().contiguous(), down.float().contiguous()) for k, (up, down) in out.factors.items()}
    return out
