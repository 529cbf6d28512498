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


def _times(t, k: torch.Tensor) -> torch.Tensor:
    """t @ k for t a matrix, or t = (a, b) standing for a b^T (then never formed)."""
    return t[0] @ (t[1].T @ k) if isinstance(t, tuple) else t @ k


def _transposed(t):
    return (t[1], t[0]) if isinstance(t, tuple) else t.T


def _sq_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """||u v^T||_F^2 = trace((u^T u)(v^T v)), without forming u v^T."""
    return float(((u.T @ u) * (v.T @ v)).sum())


def _solve_right(t, k: torch.Tensor) -> torch.Tensor:
    """X minimizing ||X k^T - t||_F: t k (k^T k)^-1, for t (m, n) (or its factors), k (n, d) -> (m, d)."""
    g = k.T @ k
    g = g + RIDGE * g.diagonal().mean().clamp_min(1e-30) * torch.eye(len(g), dtype=g.dtype)
    return torch.linalg.solve(g, _times(t, k).T).T


def _two_steps(x: torch.Tensor, y: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """dX, dY with (x + dX)(y + dY)^T ~ x y^T + t: dX first through y's span, then dY from the rest
    t - dX y^T (kept factored when t is)."""
    dx = _solve_right(t, y)
    rest = (torch.cat([t[0], -dx], 1), torch.cat([t[1], y], 1)) if isinstance(t, tuple) else t - dx @ y.T
    dy = _solve_right(_transposed(rest), x + dx)
    return dx, dy


def best_rank_d(x: torch.Tensor, y: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) making (x + dX)(y + dY)^T the best rank-d approximation U S V^T of x y^T + t
    (Eckart-Young), factored as X = U U^T x (the nearest to x), Y = V S (U^T x)^-T. For t = (a, b),
    x y^T + a b^T = [x, a][y, b]^T = Q1 (R1 R2^T) Q2^T by two QRs: only the (d + r)-square core is
    decomposed, never an m x n matrix."""
    d = x.shape[1]
    if isinstance(t, tuple):
        q1, r1 = torch.linalg.qr(torch.cat([x, t[0]], 1))
        q2, r2 = torch.linalg.qr(torch.cat([y, t[1]], 1))
        uc, s, vch = torch.linalg.svd(r1 @ r2.T)
        u, v = q1 @ uc, q2 @ vch.T
    else:
        u, s, vh = torch.linalg.svd(x @ y.T + t, full_matrices=False)
        v = vh.T
    u, s, v = u[:, :d], s[:d], v[:, :d]
    g = u.T @ x  # (d, d)
    x1 = u @ g
    y1 = torch.linalg.lstsq(g, (v * s).T).solution.T  # V S G^-T
    return x1 - x, y1 - y


def fit_pair(x: torch.Tensor, y: torch.Tensor, t) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Candidate (dX, dY) for (x + dX)(y + dY)^T ~ x y^T + t, x (m, d), y (n, d), t (m, n) or its
    factors (a (m, r), b (n, r)) with t = a b^T, float64: 'x first' and 'y first' (rank <= r each),
    'rank d' (the best product, updates of rank up to d)."""
    dy2, dx2 = _two_steps(y, x, _transposed(t))
    return {"x first": _two_steps(x, y, t), "y first": (dx2, dy2), "rank d": best_rank_d(x, y, t)}


def residual_sq(x: torch.Tensor, y: torch.Tensor, t, dx: torch.Tensor, dy: torch.Tensor) -> float:
    """||(x + dX)(y + dY)^T - x y^T - t||_F^2 = ||(x + dX) dY^T + dX y^T - t||^2 (factored when t is)."""
    if isinstance(t, tuple):
        return _sq_norm(torch.cat([x + dx, dx, -t[0]], 1), torch.cat([dy, y, t[1]], 1))
    return float(torch.linalg.matrix_norm((x + dx) @ dy.T + dx @ y.T - t)) ** 2


def low_rank(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (out, in) ~ up @ down with up (out, R), down (R, in): its truncated SVD, R = rank or the
    numerical rank of delta; the singular values are split evenly between the two factors."""
    if rank and 4 * (rank + 8) < min(delta.shape):  # a few columns of a large update: a randomized SVD
        u, s, v = torch.svd_lowrank(delta, q=rank + 8, niter=6)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 1
    keep = max(1, min(keep, rank) if rank else keep)
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep]


@dataclass
class SiteFit:
    """The fitted LoRA of one attention: `factors[module] = (up (out, R), down (R, in))`, keyed by
    the path of each projection in the denoiser (float32); the relative errors of the per-head
    products, err_qk = sqrt(sum_h ||W^QK_h(lora) - W^QK_h'||^2 / sum_h ||alpha A_h B_h^T||^2)
    (err_vo alike), and which candidate of `fit_pair` each pair kept."""

    factors: dict = field(default_factory=dict)
    err_qk: float = 0.0
    err_vo: float = 0.0
    method_qk: str = ""
    method_vo: str = ""
    err_out: float | None = None  # q/k-normed attention: the output error on held-out inputs (lora_normed.py)
    err_out_closed_form: float | None = None  # ... of the closed-form start
    err_fit: float | None = None  # ... on the inputs it was fitted on


def _heads(w: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """A projection's weight (H d, C) -> per head (C, d)."""
    return [b.T for b in w.reshape(heads, -1, w.shape[1])]


def _fit_products(xs, ys, ts, rank, fixed: int = 0):
    """Per-head products x_h y_h^T + t_h (t_h a matrix or its factors), as rank-`rank` updates of
    the stacked x (H d, m) and y (H d, n) weights: the candidate with the smallest relative error
    after truncation. The last `fixed` rows of each x_h (biases) stay as they are, and count in the
    error. Returns (method, error, (up, down) of x, (up, down) of y)."""
    cands = [fit_pair(x, y, t) for x, y, t in zip(xs, ys, ts)]
    for c in cands if fixed else ():
        for method, (dx, dy) in c.items():
            c[method] = (torch.cat([dx[:-fixed], torch.zeros_like(dx[-fixed:])]), dy)
    den = sum(_sq_norm(*t) if isinstance(t, tuple) else float(torch.linalg.matrix_norm(t)) ** 2 for t in ts)
    best = None
    for method in cands[0]:
        fx = low_rank(torch.cat([c[method][0].T for c in cands]), rank)
        fy = low_rank(torch.cat([c[method][1].T for c in cands]), rank)
        dx, dy = _heads(fx[0] @ fx[1], len(xs)), _heads(fy[0] @ fy[1], len(xs))
        num = sum(residual_sq(x, y, t, a, b) for x, y, t, a, b in zip(xs, ys, ts, dx, dy))
        err = (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
        if best is None or err < best[1]:
            best = (method, err, fx, fy)
    return best


@dataclass
class HeadMaps:
    """What one attention's LoRA is fitted to: the weights W^Q (H d, Cq), W^K (H d, Cc),
    W^V (H d, Cc), W^O (Co, H d), and the targets alpha A_h B_h^T (Cq, Cc), alpha P_h R_h (Cc, Co)
    per head, each as its factors (a, b) with target a b^T, all float64."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    t_qk: list
    t_vo: list
    fixed_q: int = 0  # the last columns of q (and v) are biases: a LoRA leaves them, they count in the error
    fixed_v: int = 0


def head_factors(layer, scale: float) -> tuple[list, list]:
    """Per head of a HeadLowRank, the factors of its updates (float64): (alpha A_h, B_h), whose
    product a b^T is alpha A_h B_h^T, and (alpha P_h, R_h^T) for alpha P_h R_h."""
    f64, r = torch.float64, layer.rank
    A, B, P, R = (t.detach().to(f64) for t in (layer.A, layer.B, layer.P, layer.R))
    cols = [slice(h * r, (h + 1) * r) for h in range(layer.heads)]
    return [(scale * A[:, c], B[:, c]) for c in cols], [(scale * P[:, c], R[c].T) for c in cols]


def fit_maps(maps: HeadMaps, heads: int, rank: int) -> SiteFit:
    """LoRA factors on W^Q, W^K, W^V, W^O reproducing the per-head targets (module docstring),
    keyed 'q', 'k', 'v', 'o'; `rank`: the LoRA rank of each."""
    heads_of = lambda w: _heads(w, heads)  # noqa: E731
    out = SiteFit()
    out.method_qk, out.err_qk, out.factors["q"], out.factors["k"] = _fit_products(
        heads_of(maps.q), heads_of(maps.k), maps.t_qk, rank, maps.fixed_q
    )
    out.method_vo, out.err_vo, out.factors["v"], fo = _fit_products(
        heads_of(maps.v), heads_of(maps.o.T.contiguous()), maps.t_vo, rank, maps.fixed_v
    )
    out.factors["o"] = (fo[1].T, fo[0].T)  # W^O (Co, H d) is the transpose of the stacked O_h^T
    out.factors = {k: (up.float().contiguous(), down.float().contiguous()) for k, (up, down) in out.factors.items()}
    return out


BLOCKS = {  # part -> (query block, key block), (value block, output block); 0: image stream, 1: context
    "self": ((0, 0), (0, 0)),
    "cross": ((0, 1), (1, 0)),
    "context": ((1, 0), (0, 1)),
}


def projections(attn, site: str, out: tuple) -> tuple[list, list, list, list]:
    """The attention's query, key, value and output projections as lists of (path, weight) by
    stream: [image] or [image, context]. A joint attention (SD3, Flux double-stream) is one
    attention over the two streams' inputs side by side: W^Q = [W^Q_x | W^Q_c] (H d, Cx + Cc), W^K
    and W^V alike, W^O = [W^O_x; W^O_c] stacked over the outputs. Context queries and outputs only
    where the context output is kept (not in SD3's last block). `out`: (path, weight) of the
    image stream's output projection (model.output_projection)."""
    w = lambda name: (f"{site}.{name}".lstrip("."), getattr(attn, name).weight.detach().double())  # noqa: E731
    joint = getattr(attn, "add_k_proj", None) is not None
    ctx_out = joint and getattr(attn, "to_add_out", None) is not None
    qs = [w("to_q")] + ([w("add_q_proj")] if ctx_out else [])
    ks = [w("to_k")] + ([w("add_k_proj")] if joint else [])
    vs = [w("to_v")] + ([w("add_v_proj")] if joint else [])
    os_ = [(out[0].lstrip("."), out[1].detach().double())]
    return qs, ks, vs, os_ + ([w("to_add_out")] if ctx_out else [])


def fit_site(attn, layer, scale: float, out: tuple, rank: int | None = None, site: str = "") -> SiteFit:
    """Fit the LoRA of one attention at path `site` carrying the adapter `layer` (a HeadLowRank, or
    a JointHeadLowRank's parts) at strength `scale`, over its `projections` (`out` as there):
    each part's per-head targets go in its block of the joint W^QK_h and W^VO_h (BLOCKS), the
    combined projections are fitted at once, and each factor's down (q, k, v) or up (o) is split
    back by stream. The query and value biases join as fixed columns: the bias b_q meets the change
    of W^K in every logit, b_v the change of W^O in every output, and a LoRA cannot move them (the
    key's bias only shifts a query's logits alike, which softmax ignores). `rank`: the LoRA rank of
    each projection (None: H times the summed part ranks)."""
    qs, ks, vs, os_ = projections(attn, site, out)
    bias = lambda ps: [("", getattr(attn, p.rpartition(".")[2]).bias) for p, _ in ps]  # noqa: E731
    biases = [[("", b.detach().double()[:, None]) for _, b in bias(ps) if b is not None] for ps in (qs, vs)]
    qs, vs = qs + biases[0], vs + biases[1]
    parts = {"self": layer} if hasattr(layer, "A") else dict(layer.named_children())
    heads = next(iter(parts.values())).heads
    width = lambda ps, dim: [p[1].shape[dim] for p in ps]  # noqa: E731
    cq, ck, cv, co = width(qs, 1), width(ks, 1), width(vs, 1), width(os_, 0)
    at = lambda sizes, i: slice(sum(sizes[:i]), sum(sizes[: i + 1]))  # noqa: E731

    def placed(f, sizes, i):  # a part's factor (rows of one stream, r) in the joint rows, zero elsewhere
        out = torch.zeros(sum(sizes), f.shape[1], dtype=torch.float64)
        out[at(sizes, i)] = f
        return out

    ab_qk, ab_vo = [[[], []] for _ in range(heads)], [[[], []] for _ in range(heads)]
    for name, part in parts.items():  # every part's factors side by side: t = sum_parts a b^T = [a..][b..]^T
        (qi, kj), (vi, oj) = BLOCKS[name]
        qk, vo = head_factors(part, scale)
        for h in range(heads):
            ab_qk[h][0].append(placed(qk[h][0], cq, qi))
            ab_qk[h][1].append(placed(qk[h][1], ck, kj))
            ab_vo[h][0].append(placed(vo[h][0], cv, vi))
            ab_vo[h][1].append(placed(vo[h][1], co, oj))
    t_qk = [(torch.cat(a, 1), torch.cat(b, 1)) for a, b in ab_qk]
    t_vo = [(torch.cat(a, 1), torch.cat(b, 1)) for a, b in ab_vo]
    joined = lambda ps, dim: torch.cat([p[1] for p in ps], dim)  # noqa: E731
    maps = HeadMaps(joined(qs, 1), joined(ks, 1), joined(vs, 1), joined(os_, 0), t_qk, t_vo, *map(len, biases))
    fit = fit_maps(maps, heads, rank or heads * sum(p.rank for p in parts.values()))
    factors = {}
    for key, ps, sizes in (("q", qs, cq), ("k", ks, ck), ("v", vs, cv)):
        up, down = fit.factors[key]
        factors |= {path: (up.clone(), down[:, at(sizes, i)].contiguous()) for i, (path, _) in enumerate(ps) if path}
    up, down = fit.factors["o"]
    factors |= {path: (up[at(co, i)].contiguous(), down.clone()) for i, (path, _) in enumerate(os_)}
    fit.factors = factors
    return fit
