"""Rotary position embeddings (RoPE) on comcat's attentions.

A rotary attention rotates each head's query and key channel pairs by angles set by the token's
position, after the projections: q_t -> R(p_t) q_t, k_s -> R(p_s) k_s, so

    logits_h[t, s] = scale (x_t W^Q_h) R(p_s - p_t) (x_s W^K_h)^T,

a bilinear form that changes with the distance p_s - p_t: there is no single W^QK_h to factorize.
comcat keeps such a layer's W^Q and W^K dense (its QK rank is pinned at head_dim, where the
head-level attention holds W^Q_h and W^K_h unrotated) and factorizes W^VO_h per head, which the
rotation does not touch. At matrix level the rotation follows the low-rank W^Q and W^K as it
followed the dense ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import nn

from .base import logit_bias_mask


class Rotary(nn.Module):
    """The rotation of q and k (B, H, N, d) for one image size: tokens after the first `prefix`
    (class / register tokens, not rotated) get embed's angles; embed (N - prefix, 2 d) is [sin | cos]
    as timm makes it, kept as a non-persistent buffer (recomputed from the model on loading)."""

    def __init__(self, embed: torch.Tensor, prefix: int, half: bool = False):
        super().__init__()
        self.register_buffer("embed", embed.detach().clone(), persistent=False)
        self.prefix, self.half = prefix, half

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.prefix
        return tuple(
            torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], self.embed, half=self.half)], 2).type_as(t)
            for t in (q, k)
        )


def rotate(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k rotated by the module's `rotary` submodule, if it has one; as they are otherwise."""
    rotary = getattr(module, "rotary", None)
    return (q, k) if rotary is None else rotary(q, k)


def is_rotary(attn: nn.Module) -> bool:
    return getattr(attn, "rotary", None) is not None


class RotaryAttention(Attention):
    """timm's Attention with q and k rotated by `rotary` (module docstring):
    out = sum_h softmax(scale R(q_h) R(k_h)^T + mask) v_h W^O_h + b^O."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, rotary: Rotary):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rotary(q, k)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=logit_bias_mask(self, attn_mask),
            is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=self.scale,
        )
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))
