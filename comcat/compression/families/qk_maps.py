"""Maps of q and k after the projections: rotary position embeddings (RoPE; EVA-02, rotary ViTs) and
cosine attention (Swin V2).

A rotary attention rotates each head's query and key channel pairs by angles set by the token's
position: q_t -> R(p_t) q_t, k_s -> R(p_s) k_s, so

    logits_h[t, s] = scale (x_t W^Q_h) R(p_s - p_t) (x_s W^K_h)^T,

a bilinear form that changes with the distance p_s - p_t. A cosine attention normalizes them,
logits_h[t, s] = tau_h cos(x_t W^Q_h, x_s W^K_h), which is no bilinear form at all. Either way there
is no single W^QK_h to factorize. comcat keeps such a layer's W^Q and W^K dense (its QK rank is
pinned at head_dim, where the head-level attention holds W^Q_h and W^K_h as they are, then maps q
and k as the model did) and factorizes W^VO_h per head, which the map does not touch. At matrix
level the map follows the low-rank W^Q and W^K as it followed the dense ones.

An attention with such a map holds it as its `qk_map` submodule: qk_map(q, k) -> (q', k') on
(B, H, N, d) heads, and logits = scale q' k'^T (+ logit bias + mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import nn

from .base import logit_bias_mask


class Rotary(nn.Module):
    """The rotation of q and k for one image size: tokens after the first `prefix` (class / register
    tokens, not rotated) get embed's angles; embed (N - prefix, 2 d) is [sin | cos] as timm makes it,
    kept as a non-persistent buffer (recomputed from the model on loading)."""

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


class CosineQK(nn.Module):
    """Swin V2's cosine attention: q' = tau_h q / |q|, k' = k / |k| with tau_h = exp(min(logit_scale_h,
    log 100)), so that scale-1 logits q' k'^T = tau_h cos(q, k)."""

    def __init__(self, logit_scale: torch.Tensor):
        super().__init__()
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().reshape(-1, 1, 1))  # (H, 1, 1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) * tau.to(q.dtype), F.normalize(k, dim=-1)


def map_qk(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k mapped by the module's `qk_map` submodule, if it has one; as they are otherwise."""
    qk_map = getattr(module, "qk_map", None)
    return (q, k) if qk_map is None else qk_map(q, k)


def has_qk_map(attn: nn.Module) -> bool:
    return getattr(attn, "qk_map", None) is not None


class QKMapAttention(Attention):
    """timm's Attention with q and k mapped by `qk_map` (module docstring) and an optional additive
    `logit_bias`: out = sum_h softmax(scale q'_h k'_h^T + B_h + mask) v_h W^O_h + b^O."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        proj_bias: bool,
        qk_map: nn.Module,
        logit_bias: nn.Module | None = None,
    ):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.qk_map = qk_map
        self.logit_bias = logit_bias

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.qk_map(q, k)
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


@torch.no_grad()
def with_qk_map(dense: Attention, qk_map: nn.Module, logit_bias: nn.Module | None = None) -> QKMapAttention:
    """A QKMapAttention holding a canonical attention's weights and scale, with `qk_map` (and a logit bias)."""
    out = QKMapAttention(
        dense.qkv.in_features,
        dense.num_heads,
        qkv_bias=dense.qkv.bias is not None,
        proj_bias=dense.proj.bias is not None,
        qk_map=qk_map,
        logit_bias=logit_bias,
    ).to(dense.qkv.weight)
    out.qkv.load_state_dict(dense.qkv.state_dict())
    out.proj.load_state_dict(dense.proj.state_dict())
    out.scale = dense.scale
    return out.eval()
