"""Turn a dense timm ViT into a low-rank one, by SVD, for a given RankConfig."""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import product_svd
from .lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention
from .ranks import MATRICES, MLP_SITES, RankConfig
from .vit import check_attention, head_weights, matrix_weights, vit_blocks


def _to_rows(f: torch.Tensor) -> torch.Tensor:
    """(H, C, r) per-head columns -> (H*r, C) nn.Linear weight, row h*r+i = f[h, :, i]."""
    return f.transpose(1, 2).reshape(-1, f.shape[1])


@torch.no_grad()
def head_lowrank_attention(attn: nn.Module, rank_qk: int, rank_vo: int) -> HeadLowRankAttention:
    """COMCAT head-level factorization of a timm Attention, by exact thin SVD of each head's
    W^QK_h and W^VO_h truncated to r; biases folded exactly (see HeadLowRankAttention)."""
    hw = head_weights(attn)
    H, C = hw.num_heads, hw.wq.shape[1]
    ref = attn.qkv.weight
    new = HeadLowRankAttention(C, H, rank_qk, rank_vo, hw.scale, key_bias=hw.bq is not None,
                               attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p).to(ref.device, ref.dtype)
    u, s, v = product_svd(hw.wq, hw.wk)
    root = s[:, None, :rank_qk].sqrt()
    a, b = u[..., :rank_qk] * root, v[..., :rank_qk] * root          # (H, C, r): W^QK_h ~ A_h B_h^T
    u, s, v = product_svd(hw.wv, hw.wo)
    root = s[:, None, :rank_vo].sqrt()
    p, r = u[..., :rank_vo] * root, v[..., :rank_vo] * root          # (H, C, r): W^VO_h ~ P_h R_h^T
    new.q.weight.copy_(_to_rows(a))
    new.k.weight.copy_(_to_rows(b))
    new.v.weight.copy_(_to_rows(p))
    new.proj.weight.copy_(r.permute(1, 0, 2).reshape(C, H * rank_vo))
    b_out = hw.bo.clone() if hw.bo is not None else torch.zeros(C, dtype=torch.float64)
    if hw.bv is not None:
        b_out += torch.einsum("hcd,hd->c", hw.wo, hw.bv)                  # sum_h b^V_h W^O_h
    new.proj.bias.copy_(b_out)
    if hw.bq is not None:
        new.key_bias.weight.copy_(hw.scale * torch.einsum("hcd,hd->hc", hw.wk, hw.bq))  # u_h
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
    return MatrixLowRankAttention(q, k, v, proj, attn.num_heads, float(attn.scale),
                                  attn.attn_drop.p, attn.proj_drop.p)


def compress(model: nn.Module, ranks: RankConfig, inplace: bool = False) -> nn.Module:
    """Replace every block's attention (and the MLP layers / classifier that have a rank) by
    its low-rank version. Returns the compressed model; the input is untouched unless inplace."""
    blocks = vit_blocks(model)
    for i, b in enumerate(blocks):
        check_attention(b.attn, f"block {i} attention")
    ranks.validate(model)
    model = model if inplace else copy.deepcopy(model)
    blocks = vit_blocks(model)
    for b, r in tqdm(zip(blocks, ranks.blocks), total=len(blocks), desc=f"compress ({ranks.method} level)",
                     disable=None, leave=False):   # disable=None: a bar only on a terminal
        if ranks.method == "head":
            b.attn = head_lowrank_attention(b.attn, r["qk"], r["vo"])
        else:
            b.attn = matrix_lowrank_attention(b.attn, {m: r.get(m) for m in MATRICES})
        for fc in MLP_SITES:
            if r.get(fc) is not None:
                setattr(b.mlp, fc, LowRankLinear.from_linear(getattr(b.mlp, fc), r[fc]))
    if ranks.head is not None:
        for name in ("head", "head_dist"):
            if isinstance(getattr(model, name, None), nn.Linear):
                setattr(model, name, LowRankLinear.from_linear(getattr(model, name), ranks.head))
    model.comcat_ranks = ranks
    return model
