"""The COMCAT attention processor.

For each head h with queries q_h = X W^Q_h, keys k_h = C W^K_h, values v_h = C W^V_h:
    logits_h = (q_h k_h^T + alpha q'_h k'_h^T) * scale
    out      = sum_h softmax(logits_h) (v_h W^O_h + alpha v'_h R_h) + b_O
with q' = X A, k' = C B, v' = C P (r columns per head), so W^QK_h gains the rank-r term
A_h B_h^T and W^VO_h gains P_h R_h. It is computed by one fused `scaled_dot_product_attention`
on [q, alpha q'], [k, k'], [v, v'] concatenated along the head dimension, with the scale given
explicitly (exact: the extra dimensions add alpha q' k'^T to every logit). B and R start at zero,
so a new adapter leaves the model unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HeadLowRank(nn.Module):
    """Factors of one adapter in one attention: A (Dq, H r), B (Dc, H r), P (Dc, H r), R (H r, Do)."""

    def __init__(self, query_dim: int, context_dim: int, out_dim: int, heads: int, rank: int):
        super().__init__()
        self.heads, self.rank = heads, rank
        self.A = nn.Parameter(torch.randn(query_dim, heads * rank) / math.sqrt(query_dim))
        self.B = nn.Parameter(torch.zeros(context_dim, heads * rank))
        self.P = nn.Parameter(torch.randn(context_dim, heads * rank) / math.sqrt(context_dim))
        self.R = nn.Parameter(torch.zeros(heads * rank, out_dim))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H d) -> (B, H, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dimension up to a multiple of `multiple` (exact for q, k and v of SDPA)."""
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


class ComcatAttnProcessor(nn.Module):
    """A diffusers attention processor holding named adapters, each with its strength alpha.

    `align`: the widened head dimension d + sum r is zero-padded to a multiple of it (None: 8 on CUDA,
    where the flash and memory-efficient SDPA kernels want it, 1 elsewhere).
    """

    def __init__(self, align: int | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.align = align

    def add(self, name: str, adapter: HeadLowRank, scale: float) -> None:
        self.adapters[name] = adapter
        self.scales[name] = float(scale)

    def remove(self, name: str) -> None:
        del self.adapters[name]
        del self.scales[name]

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_input = hidden_states.ndim == 4
        if image_input:
            b, c, hgt, wid = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hgt * wid).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)

        heads = attn.heads
        q = split_heads(attn.to_q(hidden_states), heads)
        k = split_heads(attn.to_k(context), heads)
        v = split_heads(attn.to_v(context), heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        head_dim = q.shape[-1]

        active = [(m, s) for name, m in self.adapters.items() if (s := self.scales[name]) != 0.0]
        if active:
            dt = q.dtype
            q = torch.cat([q] + [s * split_heads(hidden_states @ m.A.to(dt), heads) for m, s in active], -1)
            k = torch.cat([k] + [split_heads(context @ m.B.to(dt), heads) for m, s in active], -1)
            v = torch.cat([v] + [split_heads(context @ m.P.to(dt), heads) for m, s in active], -1)
            align = self.align or (8 if q.is_cuda else 1)
            q, k, v = (pad_last(t, align) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)

        out = attn.to_out[0](merge_heads(o[..., :head_dim]))
        start = head_dim
        for m, s in active:
            out = out + s * (merge_heads(o[..., start:start + m.rank]) @ m.R.to(out.dtype))
            start += m.rank
        out = attn.to_out[1](out)

        if image_input:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
