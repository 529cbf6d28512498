"""What comcat needs to know about a timm ViT: its blocks and per-head attention weights.

Row-vector convention (as in timm): q = x W_Q + b_Q with W_Q = qkv.weight[:C].T, so for head h
W^Q_h = W_Q[:, h*d:(h+1)*d] is C x d, and W^O_h = proj.weight[:, h*d:(h+1)*d].T is d x C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Attention
from torch import nn

from ..core.errors import ComcatError


@dataclass
class HeadWeights:
    """Per-head weights of one attention layer (float64 copies).

    wq, wk, wv: (H, C, d); wo: (H, C, d) holding (W^O_h)^T; bq, bk, bv: (H, d) or None; bo: (C,) or None.
    """

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    scale: float

    @property
    def num_heads(self) -> int:
        return self.wq.shape[0]

    @property
    def head_dim(self) -> int:
        return self.wq.shape[2]


def check_attention(attn: nn.Module, where: str) -> None:
    """Raise ComcatError unless `attn` is a plain fused-qkv timm Attention comcat can factorize."""
    if not isinstance(attn, Attention):
        raise ComcatError(
            f"{where} is {type(attn).__name__}, not timm's fused-qkv Attention: use a vit_*, deit_* or deit3_* model"
        )
    plain = all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
    if not plain or getattr(attn, "gate", None) is not None or attn.proj.out_features != attn.qkv.in_features:
        raise ComcatError(
            f"{where} uses qk-norm, gating or a projected width, which head-level factorization "
            "does not support: use a plain vit_*, deit_* or deit3_* model"
        )


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a supported ViT, checked; raises ComcatError otherwise."""
    blocks = getattr(model, "blocks", None)
    name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0 or not hasattr(blocks[0], "attn"):
        raise ComcatError(
            f"{type(model).__name__} is not a ViT-family model, the family comcat supports today: timm vit_*, "
            "deit_*, deit3_* models (fused-qkv attention), e.g. deit_small_patch16_224"
        )
    for i, block in enumerate(blocks):
        if not hasattr(block, "mlp"):
            raise ComcatError(f"{name} block {i} has no MLP: use a vit_*, deit_* or deit3_* model")
    return list(blocks)


def head_weights(attn: Attention) -> HeadWeights:
    """Split a timm Attention into per-head float64 weights (see module docstring)."""
    H, d = attn.num_heads, attn.head_dim
    C = attn.qkv.in_features
    w = attn.qkv.weight.detach().double()  # (3*H*d, C)
    wq, wk, wv = (w[i * H * d : (i + 1) * H * d].reshape(H, d, C).transpose(1, 2) for i in range(3))
    wo = attn.proj.weight.detach().double().reshape(C, H, d).permute(1, 0, 2)  # (H, C, d)
    b = attn.qkv.bias.detach().double().reshape(3, H, d) if attn.qkv.bias is not None else None
    bo = attn.proj.bias.detach().double() if attn.proj.bias is not None else None
    return HeadWeights(
        wq.contiguous(),
        wk.contiguous(),
        wv.contiguous(),
        wo.contiguous(),
        *(b.unbind(0) if b is not None else (None, None, None)),
        bo,
        float(attn.scale),
    )


def matrix_weights(attn: Attention) -> dict[str, torch.Tensor]:
    """The four C x C matrices W^Q, W^K, W^V, W^O as float64 (out, in) weights."""
    C = attn.qkv.in_features
    w = attn.qkv.weight.detach().double()
    return {"q": w[:C], "k": w[C : 2 * C], "v": w[2 * C :], "o": attn.proj.weight.detach().double()}
