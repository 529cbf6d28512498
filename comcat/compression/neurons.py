"""MLP compression by neuron selection and a closed-form refit of fc2.

For an MLP y = W2 h + b2, h = act(W1 x + b1) in R^F, and the augmented second moment of its hidden
units on the calibration tokens, G = E[h~ h~^T] with h~ = [h; 1], keeping the neurons S and refitting

    [W2' b2'] = argmin E || W~ h~ - [W2' b2'] h~_S ||^2 = W~ G[:, S] (G[S, S] + eps I)^-1,   W~ = [W2 b2]

(S always holds the bias row) leaves the error

    e(S) = tr( W~ (G - G[:, S] G[S, S]^-1 G[S, :]) W~^T ).

`select_neurons` chooses S by the largest drop of e(S) at every step ("greedy": the refit error itself,
forward selection on the Schur complement of G), or by the score E[h_j^2] ||W2[:, j]||^2 ("magnitude").
Only G ((F+1) x (F+1)) is needed: memory does not grow with the number of tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ComcatError

RULES = ("greedy", "magnitude")
RIDGE = 1e-6  # of the mean diagonal of G[S, S]


def _augmented(fc2: nn.Linear) -> torch.Tensor:
    """W~ = [W2 b2]: (out, F + 1) in float64."""
    b = fc2.bias if fc2.bias is not None else torch.zeros(fc2.out_features, device=fc2.weight.device)
    return torch.cat([fc2.weight.double(), b.double()[:, None]], 1)


def refit_error(g: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> float:
    """e(S) of the module docstring for S = keep + the bias row; g (F+1, F+1), w (out, F+1)."""
    s = torch.cat([keep, torch.tensor([g.shape[0] - 1], device=keep.device)])
    schur = g - g[:, s] @ torch.linalg.pinv(g[s][:, s], hermitian=True) @ g[s, :]
    return float(torch.einsum("oi,ij,oj->", w, schur, w))


@torch.no_grad()
def select_neurons(g: torch.Tensor, fc2: nn.Linear, k: int, rule: str = "greedy") -> torch.Tensor:
    """The k neurons to keep, sorted: (k,) long. g: the augmented second moment (F+1, F+1) of fc2's input."""
    f = fc2.in_features
    if rule not in RULES:
        raise ComcatError(f"neuron selection must be one of {RULES}, got {rule!r}")
    if not 1 <= k <= f:
        raise ComcatError(f"an MLP of {f} neurons keeps 1..{f} of them, not {k}")
    if k == f:
        return torch.arange(f, device=g.device)
    g = g.double()
    w = _augmented(fc2)
    if rule == "magnitude":
        score = g.diagonal()[:f] * (w[:, :f] ** 2).sum(0)
        return score.topk(k).indices.sort().values
    r, wr = g.clone(), w @ g  # the Schur complement of G on what is kept, and W~ times it
    tiny = 1e-12 * float(g.diagonal().max())
    chosen = torch.zeros(f + 1, dtype=torch.bool, device=g.device)

    def take(j: int) -> None:
        col, piv = r[:, j].clone(), float(r[j, j])
        if piv > tiny:
            wr.sub_(torch.outer(wr[:, j], col) / piv)
            r.sub_(torch.outer(col, col) / piv)
        chosen[j] = True

    take(f)  # the bias row is always there
    for _ in range(k):
        d = r.diagonal()
        gain = (wr**2).sum(0) / d.clamp_min(tiny)
        gain[chosen | (d <= tiny)] = -1.0
        take(int(gain.argmax()))
    return chosen[:f].nonzero().squeeze(1)


@torch.no_grad()
def refit(g: torch.Tensor, fc2: nn.Linear, keep: torch.Tensor, ridge: float = RIDGE):
    """(W2' (out, k), b2' (out,)) minimizing E||W~ h~ - [W2' b2'] h~_S||^2 on the statistics g."""
    f = fc2.in_features
    g, w = g.double(), _augmented(fc2)
    s = torch.cat([keep, torch.tensor([f], device=keep.device)])
    gss = g[s][:, s]
    eps = ridge * float(gss.diagonal().mean())
    rhs = (w @ g[:, s]).T  # (k+1, out)
    sol = torch.linalg.solve(gss + eps * torch.eye(len(s), dtype=g.dtype, device=g.device), rhs).T
    return sol[:, :-1], sol[:, -1]


@torch.no_grad()
def prune_mlp(mlp: nn.Module, g: torch.Tensor, k: int, rule: str = "greedy", ridge: float = RIDGE) -> nn.Module:
    """`mlp` (with fc1, act, fc2 Linears) narrowed to k neurons in place: fc1's rows kept, fc2 refit.
    Keeping every neuron leaves it exactly as it was."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or not isinstance(
        getattr(mlp, "norm", nn.Identity()), nn.Identity
    ):
        raise ComcatError(f"neuron selection takes an MLP of two Linears, not {type(mlp).__name__}")
    if k == fc2.in_features:
        return mlp
    keep = select_neurons(g, fc2, k, rule)
    w2, b2 = refit(g, fc2, keep, ridge)
    new1 = nn.Linear(fc1.in_features, k, bias=fc1.bias is not None, device=fc1.weight.device, dtype=fc1.weight.dtype)
    new1.weight.copy_(fc1.weight[keep])
    if fc1.bias is not None:
        new1.bias.copy_(fc1.bias[keep])
    new2 = nn.Linear(k, fc2.out_features, device=fc2.weight.device, dtype=fc2.weight.dtype)
    new2.weight.copy_(w2.to(fc2.weight.dtype))
    new2.bias.copy_(b2.to(fc2.weight.dtype))
    mlp.fc1, mlp.fc2 = new1, new2
    return mlp
