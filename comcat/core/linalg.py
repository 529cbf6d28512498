"""Low-rank linear algebra shared by both sides: SVDs of per-head products, energies."""

from __future__ import annotations

import numpy as np
import torch


def product_svd(x: torch.Tensor, y: torch.Tensor):
    """Thin SVD of M = X Y^T for X, Y of shape (..., C, d), d <= C.

    Returns U (..., C, d), S (..., d) descending, V (..., C, d) with M = U diag(S) V^T.
    """
    qx, rx = torch.linalg.qr(x)
    qy, ry = torch.linalg.qr(y)
    u, s, vh = torch.linalg.svd(rx @ ry.transpose(-1, -2))
    return qx @ u, s, qy @ vh.transpose(-1, -2)


def product_svdvals(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Singular values of X Y^T, (..., C, d) x2 -> (..., d): those of the core R_x R_y^T alone,
    since the Q factors are orthonormal (QR in 'r' mode, no U, V)."""
    rx, ry = torch.linalg.qr(x, mode="r")[1], torch.linalg.qr(y, mode="r")[1]
    return torch.linalg.svdvals(rx @ ry.transpose(-1, -2))


def split_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """(H k, n) rows of a projection weight -> (H, n, k) per-head factors, float64."""
    return w.detach().double().reshape(heads, -1, w.shape[-1]).transpose(1, 2)


def cumulative_energy(s: torch.Tensor | np.ndarray) -> np.ndarray:
    """E_r = sum_{i<=r} s_i^2 / sum_i s_i^2 along the last axis, (..., n) -> (..., n)."""
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2, axis=-1)
    return e / np.maximum(e[..., -1:], np.finfo(np.float64).tiny)


def rank_for_energy(s, energy: float) -> np.ndarray:
    """Smallest r >= 1 with E_r >= energy, along the last axis: (..., n) -> (...) ints."""
    e = cumulative_energy(s)
    return np.minimum((e < energy - 1e-12).sum(-1) + 1, e.shape[-1])
