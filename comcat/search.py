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

