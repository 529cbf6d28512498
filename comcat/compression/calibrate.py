"""Data-aware low-rank factorization: every factor is fitted to the inputs its layer really sees.

A linear map y = x W + b (row vectors) applied to inputs with mean mu and covariance
Sigma = L L^T has, among rank-r maps plus a free bias,

    W_r = L^-T [L^T W]_r,   b_r = b + mu (W - W_r),   E||y - y_r||^2 = sum_{i>r} s_i(L^T W)^2

([.]_r: truncated SVD; Eckart-Young in the data's norm). comcat applies it to

  * W^VO_h = W^V_h W^O_h, with the statistics of z_h = softmax(logits_h) X, the attention-mixed
    tokens that W^VO_h really multiplies (the value bias passes through, rows of softmax sum to 1);
  * W^QK_h on both sides: logits_h = x~_i [W^Q_h; b^Q_h] W^K_h^T x_j^T with x~ = [x, 1]; the query
    side is whitened with the second moment of x~ (the query bias becomes a bias of the rank-r query
    projection), the key side with the covariance of x_j about its image's token mean (a change that
    is constant over the keys of one image cancels in the softmax), so the truncation minimizes
    sum_{i,j} (x~_i dW x_j^T)^2 over token pairs;
  * the MLP's fc1 / fc2 and, for the matrix-level baseline, W^Q, W^K, W^V, W^O one at a time.

calibrate() collects every block's statistics in one pass of the dense model; build() then fits
any ranks from them without touching the images again (what the rank allocation needs).
calibrate_sequential() instead fits each block on the tokens that the compressed blocks before it
produce (`--calibration sequential`). The statistics are running moments in float64; the only
activations kept are one block's input tokens for the calibration images (n x N x C floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ComcatError
from ..core.linalg import product_svd
from . import families
from .convert import compress_classifiers, dense_qk_factors, head_module, keep_positions, set_neurons
from .families import head_weights, matrix_weights
from .families.base import logit_bias_mask
from .families.qk_maps import map_qk
from .lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention
from .neurons import neuron_path, prune_mlp
from .ranks import MATRICES, MLP_SITES, NEURONS, RankConfig

MIN_IMAGES = 8
RIDGE = 1e-6  # of the mean diagonal, added before the Cholesky factorization


class Moments:
    """Running sums of row vectors x (..., C): count, sum x and sum x^T x, in float64.

    batch: leading shape of independent moments (e.g. (H,) for one per head)."""

    def __init__(self, dim: int, batch: tuple = (), device="cpu"):
        self.n = 0
        self.sum = torch.zeros(*batch, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(*batch, dim, dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """x: (*batch, T, C) rows to add (T tokens); valid (T,) bool: only those rows (not padding)."""
        x = x.detach()
        if valid is not None:
            x = x[..., valid.reshape(-1), :]
        self.n += x.shape[-2]
        self.sum += x.sum(-2).double()
        self.outer += (x.mT @ x).double()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    def covariance(self) -> torch.Tensor:
        """E[(x - mu)^T (x - mu)]."""
        mu = self.mean
        return self.outer / max(self.n, 1) - mu[..., :, None] * mu[..., None, :]

    def second(self) -> torch.Tensor:
        """E[x~^T x~] of the augmented rows x~ = [x, 1]: (..., C + 1, C + 1)."""
        mu = self.mean
        top = torch.cat([self.outer / max(self.n, 1), mu[..., :, None]], -1)
        bottom = torch.cat([mu, torch.ones_like(mu[..., :1])], -1)[..., None, :]
        return torch.cat([top, bottom], -2)


def whitener(m: torch.Tensor, ridge: float = RIDGE, what: str = "an input") -> torch.Tensor:
    """Lower-triangular L with m + eps I = L L^T (Cholesky; eps = ridge x mean diagonal); when that
    fails, the eigenvalues are clamped at eps first. m: (..., C, C) symmetric PSD -> L (..., C, C)."""
    m = (m + m.mT) / 2
    if not torch.isfinite(m).all():
        raise ComcatError(
            f"the statistics of {what} are not finite: the model gives NaN/inf on these images; "
            "check the images and the checkpoint"
        )
    scale = m.diagonal(dim1=-2, dim2=-1).mean(-1)
    if (scale <= 0).any():
        raise ComcatError(
            f"{what} is zero on every calibration image: calibrate on real images, or pass --calibration none"
        )
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    eps = (ridge * scale)[..., None, None]
    chol, info = torch.linalg.cholesky_ex(m + eps * eye)
    if not bool((info != 0).any()):
        return chol
    w, q = torch.linalg.eigh(m)  # not positive definite in floating point: clamp
    return torch.linalg.cholesky((q * w.clamp_min(eps[..., 0])[..., None, :]) @ q.mT + eps * eye)


def _solve_t(lw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """L^-T U for a lower-triangular L."""
    return torch.linalg.solve_triangular(lw.mT.contiguous(), u.contiguous(), upper=True)


def whitened_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: Moments,
    rank: int,
    ridge: float = RIDGE,
    what: str = "a linear layer's input",
):
    """Rank-r factors of nn.Linear (weight (out, in), bias) fitted on inputs with `stats`:
    returns down (r, in), up (out, r), the corrected bias (out,) and the whitened singular values (min,)."""
    w = weight.double()
    lw = whitener(stats.covariance(), ridge, what)
    u, s, vh = torch.linalg.svd(lw.mT @ w.T, full_matrices=False)  # L^T W^T  (in, out)
    root = s[:rank].sqrt()
    down = (_solve_t(lw, u[:, :rank]) * root).T  # (r, in)
    up = vh[:rank].T * root  # (out, r)
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    b = b + (w - up @ down) @ stats.mean
    return down, up, b, s


def low_rank_linear(
    linear: nn.Linear, stats: Moments | None, rank: int, ridge: float = RIDGE, what: str = "a linear layer's input"
) -> LowRankLinear:
    """A LowRankLinear fitted on `stats` (plain truncated SVD when stats is None)."""
    if stats is None:
        return LowRankLinear.from_linear(linear, rank)
    down, up, b, _ = whitened_linear(linear.weight, linear.bias, stats, rank, ridge, what)
    new = LowRankLinear(linear.in_features, linear.out_features, rank, bias=True)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
        new.up.bias.copy_(b)
    return new


# ----------------------------------------------------------------------------- attention statistics
@dataclass
class AttentionStats:
    """Statistics of one attention layer on the calibration tokens.

    inputs: moments of x (the queries; W^Q, W^K, W^V at matrix level).
    keys: (H, C, C) sum over queries j of the key covariance under the attention weights,
        sum_k P_jk (x_k - z_j)^T (x_k - z_j): a logit error at key k moves the output in proportion
        to P_jk, and a change common to all keys of a query cancels in the softmax.
    mixed: per-head moments of z_h = P_h X, the tokens that W^VO_h multiplies.
    outputs: moments of the attention output before W^O (matrix level only)."""

    inputs: Moments
    keys: torch.Tensor
    mixed: Moments
    outputs: Moments | None = None

    def key_covariance(self) -> torch.Tensor:
        return self.keys / max(self.inputs.n, 1)


@dataclass
class BlockStats:
    attn: AttentionStats
    mlp: dict = field(default_factory=dict)  # fc1 / fc2 -> Moments of their inputs
    path: tuple | None = None  # the greedy neuron order and its refit errors (neuron_path), once computed

    def neuron_path(self, fc2: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        if self.path is None:
            self.path = neuron_path(self.mlp["fc2"].second(), fc2)
        return self.path


def pruned_mlp(block: nn.Module, k: int, stats: Moments | None, order=None, ridge: float = RIDGE):
    """(fc1, fc2) of the block's MLP kept at k neurons, fc2 refit on its input statistics (neurons.py)."""
    lins = families.mlp(block)
    g = stats.second() if stats is not None else None
    return prune_mlp(lins["fc1"], lins["fc2"], g, k, ridge=ridge, order=order)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.reshape(B, N, heads, -1).transpose(1, 2)


def attention_probs(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(logits_h + mask) (B, H, N, N) of a canonical attention or a factorized one."""
    if isinstance(attn, (HeadLowRankAttention, MatrixLowRankAttention)):
        q, k = _split_heads(attn.q(x), attn.num_heads), _split_heads(attn.k(x), attn.num_heads)
    else:
        H, d = attn.num_heads, attn.head_dim
        qkv = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, H, d).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
    q, k = map_qk(attn, q, k)
    logits = (q @ k.mT) * attn.scale
    bias = logit_bias_mask(attn, mask)
    if bias is not None and bias.dtype == torch.bool:
        return torch.softmax(logits.masked_fill(~bias, float("-inf")), dim=-1)
    return torch.softmax(logits if bias is None else logits + bias, dim=-1)


def add_attention_stats(
    st: AttentionStats | None,
    mixer: nn.Module,
    x: torch.Tensor,
    outputs_of: nn.Module | None = None,
    mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> AttentionStats:
    """Add a batch of attention inputs x (B, N, C) to st, under the attention weights of `mixer`
    with the attention mask the block gave it; `outputs_of`: also the moments of that attention's
    output before W^O. `valid` (B, N): the queries that count (a text encoder's unpadded tokens;
    the mask keeps padded keys out of the weights)."""
    B, N, C = x.shape
    probs = attention_probs(mixer, x, mask)  # (B, H, N, N)
    if valid is not None:
        probs = probs * valid[:, None, :, None]  # a padded query adds nothing
    H = probs.shape[1]
    if st is None:
        st = AttentionStats(
            Moments(C, device=x.device),
            torch.zeros(H, C, C, dtype=torch.float64, device=x.device),
            Moments(C, (H,), device=x.device),
        )
    st.inputs.add(x.reshape(-1, C), valid)
    z = (probs @ x[:, None]).transpose(0, 1).reshape(H, -1, C)  # (H, B N, C)
    weighted = (x[:, None] * probs.sum(-2)[..., None]).transpose(0, 1).reshape(H, -1, C)
    flat = x.reshape(1, -1, C)
    st.keys += (weighted.mT @ flat - z.mT @ z).double()
    st.mixed.add(z, valid)
    if outputs_of is not None:
        captured = []
        hook = outputs_of.proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        try:
            outputs_of(x, attn_mask=mask)
        finally:
            hook.remove()
        st.outputs = st.outputs or Moments(captured[0].shape[-1], device=x.device)
        st.outputs.add(captured[0].reshape(-1, captured[0].shape[-1]), valid)
    return st


# ----------------------------------------------------------------------------- attention factorization
def qk_factors(hw, st: AttentionStats | None, ridge: float = RIDGE):
    """(A (H, C+1, d) with the query-bias row last (or (H, C, d) without a query bias), B (H, C, d), s (H, d))."""
    wq = hw.wq if hw.bq is None else torch.cat([hw.wq, hw.bq[:, None]], 1)
    if hw.dense_qk:  # kept as they are (families/qk_maps.py); no spectrum
        return *dense_qk_factors(wq, hw.wk, hw.head_dim), None
    if st is None:
        u, s, v = product_svd(wq, hw.wk)
        root = s[:, None].sqrt()
        return u * root, v * root, s
    lq = whitener(
        st.inputs.second() if hw.bq is not None else st.inputs.outer / st.inputs.n, ridge, "an attention input"
    )
    lk = whitener(st.key_covariance(), ridge, "an attention's keys")
    u, s, v = product_svd(lq.mT @ wq, lk.mT @ hw.wk)
    root = s[:, None].sqrt()
    return _solve_t(lq, u) * root, _solve_t(lk, v) * root, s


def vo_factors(hw, st: AttentionStats | None, ridge: float = RIDGE):
    """(P (H, C, d), R (H, C, d), s (H, d)) with W^VO_h = W^V_h W^O_h ~ P_h R_h^T."""
    if st is None:
        u, s, v = product_svd(hw.wv, hw.wo)
        root = s[:, None].sqrt()
        return u * root, v * root, s
    lz = whitener(st.mixed.covariance(), ridge, "an attention's mixed tokens")
    u, s, v = product_svd(lz.mT @ hw.wv, hw.wo)
    root = s[:, None].sqrt()
    return _solve_t(lz, u) * root, v * root, s


@torch.no_grad()
def head_attention(
    attn: nn.Module,
    rank_qk: int,
    rank_vo: int,
    st: AttentionStats | None = None,
    ridge: float = RIDGE,
    qk=None,
    vo=None,
) -> HeadLowRankAttention:
    """HeadLowRankAttention of a canonical attention at ranks (r_qk, r_vo): whitened by `st` (plain SVD
    when None). qk / vo: precomputed qk_factors / vo_factors to reuse."""
    hw = head_weights(attn)
    a, b, _ = qk if qk is not None else qk_factors(hw, st, ridge)
    p, r, _ = vo if vo is not None else vo_factors(hw, st, ridge)
    a, b, p, r = a[..., :rank_qk], b[..., :rank_qk], p[..., :rank_vo], r[..., :rank_vo]
    new = head_module(attn, hw, a, b, p, r)
    if st is not None:  # + sum_h mu_h (W^VO_h - P_h R_h^T)
        mu = st.mixed.mean
        shift = torch.einsum("hc,hcd,hed->e", mu, hw.wv, hw.wo) - torch.einsum("hc,hcr,her->e", mu, p, r)
        new.proj.bias.add_(shift.to(new.proj.bias.dtype))
    return new


def _linear(w: torch.Tensor, b: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


@torch.no_grad()
def matrix_attention(
    attn: nn.Module, ranks: dict, st: AttentionStats | None = None, x_batches=(), ridge: float = RIDGE
) -> MatrixLowRankAttention:
    """MatrixLowRankAttention: W^Q, W^K, W^V fitted on the attention inputs (st.inputs), W^O on the
    attention outputs: those of the factorized q, k, v on x_batches ((x, mask[, valid])) when given,
    else st.outputs (the dense attention's). None keeps a matrix dense; st None: plain SVD."""
    ws = matrix_weights(attn)
    C = attn.qkv.in_features
    bias = attn.qkv.bias.detach().double().reshape(3, C) if attn.qkv.bias is not None else [None] * 3
    like = attn.qkv.weight
    x_stats = None if st is None else st.inputs

    def fit(w, b, rank, stats):
        lin = _linear(w, b, like)
        return lin if rank is None else low_rank_linear(lin, stats, rank, ridge, "an attention input")

    q, k, v = (fit(ws[m], bias[i], ranks.get(m), x_stats) for i, m in enumerate("qkv"))
    proj = _linear(ws["o"], attn.proj.bias.detach().double() if attn.proj.bias is not None else None, like)
    new = MatrixLowRankAttention(q, k, v, proj, attn.num_heads, float(attn.scale), attn.attn_drop.p, attn.proj_drop.p)
    keep_positions(new, attn)
    if ranks.get("o") is not None:
        out_stats = None if st is None else st.outputs
        if st is not None and x_batches:
            part = None
            for x, mask, *valid in x_batches:  # (x, mask[, valid]) of each batch
                part = add_attention_stats(part, new, x, outputs_of=new, mask=mask, valid=valid[0] if valid else None)
            out_stats = part.outputs
        new.proj = low_rank_linear(proj, out_stats, ranks["o"], ridge, "an attention output")
    return new


# ----------------------------------------------------------------------------- the walk over the blocks
@torch.no_grad()
def block_inputs(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first block's input tokens (n, N, C) for every input of `loader` ((x, y) batches), and
    which of them are not padding ((n, N) bool; None for images)."""
    first = families.blocks(model)[0]
    out, valid = [], []

    def grab(module, args):
        out.append(args[0].detach())
        raise families.StopPass

    hook = first.register_forward_pre_hook(grab)
    try:
        for x, _ in loader:
            x = x.to(next(model.parameters()).device)
            valid.append(families.token_mask(model, x))
            try:
                model(x)
            except families.StopPass:
                pass
    finally:
        hook.remove()
    return torch.cat(out), (torch.cat(valid) if valid and valid[0] is not None else None)


def head_logits(model: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The model's output (logits, or the pooled embedding) from the last block's output tokens."""
    return families.output(model, h, valid)


def _batches(h: torch.Tensor, valid: torch.Tensor | None, size: int):
    """Consecutive slices of `size` rows of h and of valid (None stays None): (x, v) pairs."""
    for i in range(0, len(h), size):
        yield h[i : i + size], (None if valid is None else valid[i : i + size])


@torch.no_grad()
def run_blocks(blocks, h: torch.Tensor, valid: torch.Tensor | None = None, size: int = 32) -> torch.Tensor:
    """The tokens h (n, N, C) passed through `blocks` in turn, `size` rows at a time."""
    for b in blocks:
        h = torch.cat([families.run_block(b, x, v) for x, v in _batches(h, valid, size)])
    return h


def attention_inputs(
    block: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens the block's attention sees (after its norm) for block inputs h, and its mask."""
    kept = families.run_capturing(block, h, {"x": families.attention(block)}, stop=True, valid=valid)[0]
    return kept["x"], kept.get("x.mask")


def _mlp_inputs(block: nn.Module, h: torch.Tensor, fc: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The input of the block's MLP linear `fc` (fc1: the normed residual stream; fc2: after the activation)."""
    return families.run_capturing(block, h, {fc: families.mlp(block)[fc]}, stop=True, valid=valid)[0][fc]


@dataclass
class Calibration:
    """Per block statistics of the dense model on the calibration images; for rank allocation also
    the first block's input tokens of a few images (Fisher pass), and per block the input tokens and
    the dense logits of fewer (probes)."""

    stats: list[BlockStats]
    images: int
    first: torch.Tensor | None = None  # (fisher, N, C)
    inputs: list[torch.Tensor] = field(default_factory=list)  # per block: (probe, N, C)
    logits: torch.Tensor | None = None  # (probe, classes)
    valid: torch.Tensor | None = None  # (max(fisher, probe), N): the unpadded tokens of a text encoder's

    def valid_of(self, n: int) -> torch.Tensor | None:
        return None if self.valid is None else self.valid[:n]


def _site_stats(run: nn.Module, h: torch.Tensor, fc: str, batch_size: int, valid=None) -> Moments:
    m = None
    for x, v in _batches(h, valid, batch_size):
        inp = _mlp_inputs(run, x, fc, v)
        m = m or Moments(inp.shape[-1], device=inp.device)
        m.add(inp.reshape(-1, inp.shape[-1]), v)
    return m


def _check(model: nn.Module) -> list[nn.Module]:
    families.check(model)
    return families.blocks(model)


def _first_inputs(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor | None]:
    h, valid = block_inputs(model, loader)
    if len(h) < MIN_IMAGES:
        raise ComcatError(
            f"calibration needs at least {MIN_IMAGES} images, got {len(h)}: add images, or pass --calibration none"
        )
    return h, valid


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader,
    mlp: bool = False,
    matrix: bool = False,
    batch_size: int = 32,
    probe: int = 0,
    fisher: int = 0,
    progress=None,
) -> Calibration:
    """One pass of the dense model over the images of `loader` ((x, y) batches), collecting every
    block's attention statistics (and the MLP inputs' with `mlp`, the attention outputs' with
    `matrix`). Keeps the first block's inputs of `fisher` images, and every block's inputs and the
    logits of `probe` images."""
    blocks = _check(model)
    h, valid = _first_inputs(model, loader)
    cal = Calibration([], len(h), first=h[:fisher].clone() if fisher else None)
    cal.valid = None if valid is None or not max(fisher, probe) else valid[: max(fisher, probe)].clone()
    for i, block in enumerate(blocks):
        if progress:
            progress(i, len(blocks))
        if probe:
            cal.inputs.append(h[:probe].clone())
        attn = families.attention(block)
        sites = {"x": attn}
        if mlp:
            sites.update(families.mlp(block))
        st, outs, bs = None, [], BlockStats(None)
        for x, v in _batches(h, valid, batch_size):  # one pass per batch: the output and the sites' inputs
            kept, out = families.run_capturing(block, x, sites, valid=v)
            outs.append(out)
            st = add_attention_stats(st, attn, kept["x"], attn if matrix else None, kept.get("x.mask"), v)
            for fc in MLP_SITES if mlp else ():
                u = kept[fc].reshape(-1, kept[fc].shape[-1])
                bs.mlp.setdefault(fc, Moments(u.shape[-1], device=x.device)).add(u, v)
        bs.attn = st
        cal.stats.append(bs)
        h = torch.cat(outs)
    if probe:
        cal.logits = head_logits(model, h[:probe], cal.valid_of(probe))
    return cal


def compressed_block(
    block: nn.Module, r: dict, method: str, bs: BlockStats | None, ridge: float = RIDGE, where: str = ""
) -> nn.Module:
    """A copy of one block with its sites at ranks `r`, fitted on `bs` (plain SVD when None)."""
    import copy

    new = copy.deepcopy(block)
    st = bs.attn if bs is not None else None
    attn = families.attention(block)
    if method == "head":
        if "qk" in r:
            families.set_attention(new, head_attention(attn, r["qk"], r["vo"], st, ridge))
    elif any(r.get(m) is not None for m in MATRICES):
        families.set_attention(new, matrix_attention(attn, {m: r.get(m) for m in MATRICES}, st, ridge=ridge))
    for fc, lin in families.mlp(block).items():
        if r.get(fc) is not None:
            m = bs.mlp.get(fc) if bs is not None else None
            families.set_mlp(new, fc, low_rank_linear(lin, m, r[fc], ridge, f"{where} {fc} input"))
    if r.get(NEURONS) is not None:
        stats = bs.mlp.get("fc2") if bs is not None else None
        order = bs.neuron_path(families.mlp(block)["fc2"])[0] if stats is not None else None
        set_neurons(new, pruned_mlp(block, r[NEURONS], stats, order, ridge))
    return new


def build(model: nn.Module, ranks: RankConfig, cal: Calibration | None, ridge: float = RIDGE) -> nn.Module:
    """The compressed model at `ranks`, every site fitted on the statistics of `cal` (the dense
    model's tokens; plain SVD when cal is None). No pass over the images."""
    import copy

    ranks.validate(model)
    small = copy.deepcopy(model).eval()
    for i, (block, r) in enumerate(zip(families.blocks(small), ranks.blocks)):
        fitted = compressed_block(block, r, ranks.method, cal.stats[i] if cal else None, ridge, f"block {i}")
        families.set_attention(block, families.attention(fitted))
        for fc, lin in families.mlp(fitted).items():
            families.set_mlp(block, fc, lin)
    compress_classifiers(small, ranks)
    small.comcat_ranks = ranks
    return small


@torch.no_grad()
def calibrate_sequential(
    model: nn.Module, loader, ranks: RankConfig, batch_size: int = 32, ridge: float = RIDGE, progress=None
) -> nn.Module:
    """The compressed model at `ranks`, each block fitted on the tokens that the compressed blocks
    before it produce, and inside a block the VO path on the attention of the factorized QK path,
    W^O (matrix level) on the factorized q, k, v, and fc2 on the factorized fc1."""
    import copy

    blocks = _check(model)
    ranks.validate(model)
    small = copy.deepcopy(model).eval()
    h, valid = _first_inputs(model, loader)
    vs = [v for _, v in _batches(h, valid, batch_size)]
    for i, (block, r) in enumerate(zip(blocks, ranks.blocks)):
        if progress:
            progress(i, len(blocks))
        xs = [attention_inputs(block, x, v) for x, v in _batches(h, valid, batch_size)]
        run, attn = families.blocks(small)[i], families.attention(block)
        st = None
        for (x, mask), v in zip(xs, vs):
            st = add_attention_stats(st, attn, x, mask=mask, valid=v)
        if ranks.method == "head":  # the VO path on the mixing of the factorized QK path
            hw = head_weights(attn)
            qk = qk_factors(hw, st, ridge)
            mixer = head_attention(attn, r["qk"], 1, None, ridge, qk=qk)
            st.mixed = Moments(st.mixed.sum.shape[-1], tuple(st.mixed.sum.shape[:-1]), device=h.device)
            for (x, mask), v in zip(xs, vs):
                probs = attention_probs(mixer, x, mask)
                st.mixed.add((probs @ x[:, None]).transpose(0, 1).reshape(hw.num_heads, -1, x.shape[-1]), v)
            families.set_attention(run, head_attention(attn, r["qk"], r["vo"], st, ridge, qk=qk))
        else:
            batches = [(x, mask, v) for (x, mask), v in zip(xs, vs)]
            families.set_attention(run, matrix_attention(attn, {m: r.get(m) for m in MATRICES}, st, batches, ridge))
        for fc, lin in families.mlp(block).items():  # fc1 after the new attention, fc2 after the new fc1
            if r.get(fc) is not None:
                stats = _site_stats(run, h, fc, batch_size, valid)
                fitted = low_rank_linear(lin, stats, r[fc], ridge, f"block {i} {fc} input")
                families.set_mlp(run, fc, fitted)
        if r.get(NEURONS) is not None:  # the hidden units after the new attention
            set_neurons(run, pruned_mlp(block, r[NEURONS], _site_stats(run, h, "fc2", batch_size, valid), ridge=ridge))
        h = run_blocks([run], h, valid, batch_size)
    compress_classifiers(small, ranks)
    small.comcat_ranks = ranks
    return small
