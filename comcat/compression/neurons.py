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
    return float(torch.einsum("oi,ij,oj->", w.detach(), schur, w.detach()))


@torch.no_grad()
def neuron_path(g: torch.Tensor, fc2: nn.Linear, upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy forward selection on the refit error: (order (upto,) long, errors (upto + 1,) float64) with
    errors[k] = e(order[:k]). The sets are nested, so one pass gives every width's choice and error.

    With R = G - L L^T the Schur complement of G on what is kept (L: the pivoted Cholesky columns so
    far), adding neuron j lowers e by ||W~ R[:, j]||^2 / R[j, j]; only diag(R) and W~ R are kept up to date."""
    f = fc2.in_features
    upto = f if upto is None else upto
    g = g.double()
    w = _augmented(fc2)
    wr, d = w @ g, g.diagonal().clone()  # W~ R and diag(R), R = G before anything is kept
    chol = torch.zeros(f + 1, upto + 1, dtype=g.dtype, device=g.device)
    tiny = 1e-12 * float(d.max())
    free = torch.ones(f + 1, dtype=torch.bool, device=g.device)
    order, errors = [], []
    err = float((wr * w).sum())  # tr(W~ G W~^T)

    def take(j: int, t: int) -> float:
        col = g[:, j] - chol[:, :t] @ chol[j, :t]
        piv = float(col[j])
        free[j] = False
        if piv <= tiny:  # dependent on what is kept: adds nothing
            return 0.0
        gain = float(wr[:, j].square().sum()) / piv
        chol[:, t] = col / piv**0.5
        wr.sub_(torch.outer(wr[:, j] / piv, col))
        d.sub_(chol[:, t].square())
        return gain

    err -= take(f, 0)  # the bias row is always there
    errors.append(max(err, 0.0))
    for t in range(1, upto + 1):
        gain = wr.square().sum(0) / d.clamp_min(tiny)
        gain[~free | (d <= tiny)] = -1.0
        j = int(gain.argmax()) if bool(free[:f].any() and gain.max() >= 0) else int(free[:f].nonzero()[0])
        err -= take(j, t)
        order.append(j)
        errors.append(max(err, 0.0))
    return torch.tensor(order, dtype=torch.long, device=g.device), torch.tensor(errors, dtype=torch.float64)


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
    if rule == "magnitude":
        w = _augmented(fc2)
        score = g.double().diagonal()[:f] * (w[:, :f] ** 2).sum(0)
        return score.topk(k).indices.sort().values
    return neuron_path(g, fc2, k)[0].sort().values


def weight_order(fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """Without data: neurons by ||W1[j]|| ||W2[:, j]||, largest first (F,) long."""
    score = fc1.weight.detach().double().norm(dim=1) * fc2.weight.detach().double().norm(dim=0)
    return score.argsort(descending=True)


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


def _check_pair(fc1, fc2) -> None:
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or fc1.out_features != fc2.in_features:
        raise ComcatError(
            f"neuron selection takes an MLP of two Linears, not {type(fc1).__name__}, {type(fc2).__name__}"
        )


@torch.no_grad()
def narrowed(fc1: nn.Linear, fc2: nn.Linear, keep: torch.Tensor, w2=None, b2=None) -> tuple[nn.Linear, nn.Linear]:
    """(fc1 with the rows `keep`, fc2 with the columns `keep`, or with weight w2 and bias b2 when given)."""
    _check_pair(fc1, fc2)
    k, like = len(keep), fc1.weight
    new1 = nn.Linear(fc1.in_features, k, bias=fc1.bias is not None, device=like.device, dtype=like.dtype)
    new1.weight.copy_(fc1.weight[keep])
    if fc1.bias is not None:
        new1.bias.copy_(fc1.bias[keep])
    new2 = nn.Linear(
        k, fc2.out_features, bias=fc2.bias is not None or b2 is not None, device=like.device, dtype=like.dtype
    )
    new2.weight.copy_(fc2.weight[:, keep] if w2 is None else w2.to(like.dtype))
    if new2.bias is not None:
        new2.bias.copy_(fc2.bias if b2 is None else b2.to(like.dtype))
    return new1, new2


@torch.no_grad()
def prune_mlp(
    fc1: nn.Linear,
    fc2: nn.Linear,
    g: torch.Tensor | None,
    k: int,
    rule: str = "greedy",
    ridge: float = RIDGE,
    order=None,
) -> tuple[nn.Linear, nn.Linear]:
    """(fc1, fc2) narrowed to k neurons: fc1's rows kept, fc2 refit on the statistics g (module docstring).
    g None: the neurons by weight_order, fc2's columns kept as they are. order: a neuron_path order to
    reuse. Keeping every neuron returns the two linears as they are."""
    _check_pair(fc1, fc2)
    if k == fc2.in_features:
        return fc1, fc2
    if g is None:
        return narrowed(fc1, fc2, weight_order(fc1, fc2)[:k].sort().values)
    keep = order[:k].sort().values if order is not None else select_neurons(g, fc2, k, rule)
    w2, b2 = refit(g, fc2, keep, ridge)
    return narrowed(fc1, fc2, keep, w2, b2)
