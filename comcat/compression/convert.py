"""Turn a dense transformer into a low-rank one, by SVD, for a given RankConfig."""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.linalg import product_svd
from . import families
from .families import head_weights, matrix_weights
from .lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention
from .neurons import prune_mlp
from .ranks import ATTN_SITES, MATRICES, MLP_SITES, NEURONS, RankConfig


def _to_rows(f: torch.Tensor) -> torch.Tensor:
    """(H, C, r) per-head columns -> (H*r, C) nn.Linear weight, row h*r+i = f[h, :, i]."""
    return f.transpose(1, 2).reshape(-1, f.shape[1])


@torch.no_grad()
def head_lowrank_attention(attn: nn.Module, rank_qk: int, rank_vo: int) -> HeadLowRankAttention:
    """COMCAT head-level factorization of a canonical attention (families/base.py), by exact thin SVD of each head's
    [W^Q_h; b^Q_h] W^K_h^T (W^QK_h with the query bias as an extra input row) and W^VO_h, truncated
    to r; the other biases folded exactly (see HeadLowRankAttention)."""
    hw = head_weights(attn)
    wq = hw.wq if hw.bq is None else torch.cat([hw.wq, hw.bq[:, None]], 1)  # (H, C (+1), d)
    if hw.dense_qk:
        a, b = dense_qk_factors(wq, hw.wk, rank_qk)
    else:
        u, s, v = product_svd(wq, hw.wk)
        root = s[:, None, :rank_qk].sqrt()
        a, b = u[..., :rank_qk] * root, v[..., :rank_qk] * root  # (H, C (+1), r): [A_h; a_h] B_h^T
    u, s, v = product_svd(hw.wv, hw.wo)
    root = s[:, None, :rank_vo].sqrt()
    p, r = u[..., :rank_vo] * root, v[..., :rank_vo] * root  # (H, C, r): W^VO_h ~ P_h R_h^T
    return head_module(attn, hw, a, b, p, r)


def dense_qk_factors(wq: torch.Tensor, wk: torch.Tensor, rank_qk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The QK factors of a rotary or cosine attention, [W^Q_h; b^Q_h] and W^K_h (H, C (+1), d) as they are:
    its map of q and k acts on exactly these d channels, so the QK path stays dense (families/qk_maps.py)."""
    if rank_qk != wk.shape[-1]:
        raise ValueError(f"a rotary / cosine attention keeps W^Q, W^K dense: QK rank {wk.shape[-1]}, not {rank_qk}")
    return wq, wk


def head_module(attn: nn.Module, hw, a, b, p, r) -> HeadLowRankAttention:
    """The HeadLowRankAttention replacing `attn` with per-head factors a, b (H, C (+1), r_qk) and
    p, r (H, C, r_vo); value bias folded into the output bias: b_O + sum_h b^V_h W^O_h."""
    H, C, rank_qk, rank_vo = hw.num_heads, hw.wq.shape[1], a.shape[-1], p.shape[-1]
    ref = attn.qkv.weight
    new = HeadLowRankAttention(
        C,
        H,
        rank_qk,
        rank_vo,
        hw.scale,
        query_bias=hw.bq is not None,
        attn_drop=attn.attn_drop.p,
        proj_drop=attn.proj_drop.p,
    ).to(ref.device, ref.dtype)
    new.q.weight.copy_(_to_rows(a[:, :C]))
    if hw.bq is not None:
        new.q.bias.copy_(a[:, C].reshape(-1))  # a_h, in the rows' order h r + i
    new.k.weight.copy_(_to_rows(b))
    new.v.weight.copy_(_to_rows(p))
    new.proj.weight.copy_(r.permute(1, 0, 2).reshape(C, H * rank_vo))
    b_out = hw.bo.clone() if hw.bo is not None else torch.zeros(C, dtype=torch.float64)
    if hw.bv is not None:
        b_out += torch.einsum("hcd,hd->c", hw.wo, hw.bv)  # sum_h b^V_h W^O_h
    new.proj.bias.copy_(b_out)
    return keep_positions(new, attn)


def keep_positions(new: nn.Module, attn: nn.Module) -> nn.Module:
    """Give the low-rank attention `new` copies of the dense attention's position terms (its logit
    bias, its map of q and k), where it has them."""
    for name in ("logit_bias", "qk_map"):
        if getattr(attn, name, None) is not None:
            setattr(new, name, copy.deepcopy(getattr(attn, name)))
    return new


def _linear(w: torch.Tensor, b: torch.Tensor | None, rank: int | None, like: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin if rank is None else LowRankLinear.from_linear(lin, rank)


@torch.no_grad()
def matrix_lowrank_attention(attn: nn.Module, ranks: dict) -> MatrixLowRankAttention:
    """Baseline: factorize W^Q, W^K, W^V, W^O separately by truncated SVD (None keeps one dense)."""
    ws = matrix_weights(attn)
    C = attn.qkv.in_features
    bias = attn.qkv.bias.detach().double().reshape(3, C) if attn.qkv.bias is not None else [None] * 3
    pb = attn.proj.bias.detach().double() if attn.proj.bias is not None else None
    like = attn.qkv.weight
    q, k, v = (_linear(ws[m], bias[i], ranks.get(m), like) for i, m in enumerate("qkv"))
    proj = _linear(ws["o"], pb, ranks.get("o"), like)
    new = MatrixLowRankAttention(q, k, v, proj, attn.num_heads, float(attn.scale), attn.attn_drop.p, attn.proj_drop.p)
    return keep_positions(new, attn)


def compress(model: nn.Module, ranks: RankConfig, inplace: bool = False) -> nn.Module:
    """Replace every block's attention (and the MLP layers / classifier that have a rank) by
    its low-rank version. Returns the compressed model; the input is untouched unless inplace."""
    families.check(model)
    model = families.prepare(model if inplace else copy.deepcopy(model))
    ranks.validate(model)
    blocks = families.blocks(model)
    for b, r in tqdm(
        zip(blocks, ranks.blocks), total=len(blocks), desc=f"compress ({ranks.method} level)", disable=None, leave=False
    ):  # disable=None: a bar only on a terminal
        attn = families.attention(b)
        if ranks.method == "head":
            families.set_attention(b, head_lowrank_attention(attn, r["qk"], r["vo"]))
        else:
            families.set_attention(b, matrix_lowrank_attention(attn, {m: r.get(m) for m in MATRICES}))
        for fc, lin in families.mlp(b).items():
            if r.get(fc) is not None:
                families.set_mlp(b, fc, LowRankLinear.from_linear(lin, r[fc]))
        if r.get(NEURONS) is not None:  # without statistics: by weight norms, fc2 as it is (calibrate.py refits)
            set_neurons(b, prune_mlp(*families.mlp(b).values(), None, r[NEURONS]))
    compress_classifiers(model, ranks)
    model.comcat_ranks = ranks
    return model


def set_neurons(block: nn.Module, pair: tuple[nn.Module, nn.Module]) -> None:
    """Put a narrowed (fc1, fc2) into the block's MLP."""
    for fc, lin in zip(MLP_SITES, pair):
        families.set_mlp(block, fc, lin)


@torch.no_grad()
def _keep_rows(lin: nn.Linear, groups: int, old: int, new: int) -> None:
    """Keep the first `new` of every `old` output rows (grouped per head) of a linear, and their bias."""
    w = lin.weight.reshape(groups, old, -1)[:, :new].reshape(groups * new, -1)
    lin.weight = nn.Parameter(w.clone())
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.reshape(groups, old)[:, :new].reshape(-1).clone())
    lin.out_features = groups * new


@torch.no_grad()
def _keep_cols(lin: nn.Linear, groups: int, old: int, new: int) -> None:
    w = lin.weight.reshape(lin.out_features, groups, old)[:, :, :new].reshape(lin.out_features, groups * new)
    lin.weight = nn.Parameter(w.clone())
    lin.in_features = groups * new


def _truncate_linear(lin: LowRankLinear, rank: int | None) -> None:
    if rank is None or rank == lin.rank:
        return
    if rank > lin.rank:
        raise ValueError(f"cannot raise a rank by truncation ({lin.rank} -> {rank})")
    _keep_rows(lin.down, 1, lin.rank, rank)
    _keep_cols(lin.up, 1, lin.rank, rank)
    lin.rank = rank


def compress_classifiers(model: nn.Module, ranks: RankConfig) -> None:
    """Factorize the dense classifier linears at ranks.classifier (when set), in place."""
    if ranks.classifier is not None:
        for name, lin in families.classifiers(model).items():
            if isinstance(lin, nn.Linear):
                families.set_classifier(model, name, LowRankLinear.from_linear(lin, ranks.classifier))


def truncate(model: nn.Module, ranks: RankConfig, inplace: bool = False) -> nn.Module:
    """Keep the leading `ranks` factor columns of an already factorized model (e.g. the full-rank
    model a rank search trained): the hard version of the search's rank mask c = [1]*r + [0]*(n-r).
    Sites that are dense in `model` must be None in `ranks`."""
    model = model if inplace else copy.deepcopy(model)
    sites = ATTN_SITES[ranks.method] + MLP_SITES
    for b, r in zip(families.blocks(model), ranks.blocks):
        a = families.attention(b)
        if isinstance(a, HeadLowRankAttention):
            if r["qk"] != a.rank_qk:
                _keep_rows(a.q, a.num_heads, a.rank_qk, r["qk"])
                _keep_rows(a.k, a.num_heads, a.rank_qk, r["qk"])
                a.rank_qk = r["qk"]
            if r["vo"] != a.rank_vo:
                _keep_rows(a.v, a.num_heads, a.rank_vo, r["vo"])
                _keep_cols(a.proj, a.num_heads, a.rank_vo, r["vo"])
                a.rank_vo = r["vo"]
        linears = families.mlp(b)
        for site in sites:
            lin = linears.get(site) if site in MLP_SITES else getattr(a, "proj" if site == "o" else site, None)
            if isinstance(lin, LowRankLinear):
                _truncate_linear(lin, r.get(site))
    if ranks.classifier is not None:
        for lin in families.classifiers(model).values():
            if isinstance(lin, LowRankLinear):
                _truncate_linear(lin, ranks.classifier)
    model.comcat_ranks = ranks
    return model
