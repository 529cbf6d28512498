"""Per-head adapters in joint attention (SD3 / SD3.5 MMDiT): one attention over the image tokens X
and the context tokens C, each stream with its own projections.

Head h attends over the joint sequence [X; C] with q = [X W^Q_h; C W^Qc_h], k and v alike. An
adapter adds extra per-head dimensions that are zero outside the tokens they belong to:
    image (self):    q' = [X A; 0], k' = [X B; 0], v' = [X P; 0]   W^QK_h, W^VO_h of image -> image
    image (cross):   q' = [X A; 0], k' = [0; C B], v' = [0; C P]   image queries -> context keys/values
    context:         q' = [0; C A], k' = [X B; 0], v' = [X P; 0]   context queries -> image keys/values
and out_X += alpha o'_X R (out_C += alpha o'_C R for the context part). The image stream is the
default: a concept has to change the image tokens, and SD3's last block discards the context
stream, so the context part only acts through the blocks before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import ComcatAttnProcessor, HeadLowRank, cat_aligned, idle, low_rank_layer, merge_heads, split_heads

PARTS = ("self", "cross", "context")  # which extra dimensions each part of a JointHeadLowRank adds


class JointHeadLowRank(nn.Module):
    """The factors of one adapter in one joint attention: a HeadLowRank (SharedHeadLowRank when
    `shared`) per part in `parts` ('self', 'cross': image stream; 'context': the context stream)."""

    def __init__(self, image_dim: int, context_dim: int, heads: int, rank: int, parts: tuple, shared: bool = False):
        super().__init__()
        dims = {"self": (image_dim, image_dim, image_dim), "cross": (image_dim, context_dim, image_dim)}
        dims["context"] = (context_dim, image_dim, context_dim)
        for part in parts:
            self.add_module(part, low_rank_layer(*dims[part], heads, rank, shared))


def _extra(part: str, m: HeadLowRank, x, c, heads: int, s: float, context_first: bool):
    """The part's (q', k', v') over the joint sequence ([X; C], or [C; X] when `context_first`),
    each (B, H, N + M, r)."""
    width = m.heads * m.rank
    zx, zc = x.new_zeros(*x.shape[:2], width), c.new_zeros(*c.shape[:2], width)
    if part == "self":
        qkv = ((m.queries(x), zc), (m.keys(x), zc), (m.values(x), zc))
    elif part == "cross":
        qkv = ((m.queries(x), zc), (zx, m.keys(c)), (zx, m.values(c)))
    else:
        qkv = ((zx, m.queries(c)), (m.keys(x), zc), (m.values(x), zc))
    q, k, v = (torch.cat(t[::-1] if context_first else t, 1) for t in qkv)
    return split_heads(s * q, heads), split_heads(k, heads), split_heads(v, heads)


def active_parts(proc: ComcatAttnProcessor, has_context: bool) -> list[tuple]:
    """(part name, HeadLowRank, alpha) of every adapter at nonzero strength that is not idle;
    without a context stream only the 'self' parts act."""
    return [
        (name, part, s)
        for adapter, s in ((m, proc.scales[n]) for n, m in proc.adapters.items())
        if s != 0.0
        for name, part in adapter.named_children()
        if (has_context or name == "self") and not idle(part)
    ]


def widen(q, k, v, parts, x, c, heads: int, align: int, context_first: bool = False):
    """q, k, v (B, H, N + M, d) with every part's extra dimensions appended, zero-padded to `align`."""
    if not parts:
        return q, k, v
    dt = q.dtype
    extras = [_extra(name, part, x.to(dt), c.to(dt), heads, s, context_first) for name, part, s in parts]
    return (cat_aligned([t] + [e[i] for e in extras], align) for i, t in enumerate((q, k, v)))


def extra_outputs(o: torch.Tensor, parts, head_dim: int):
    """(part name, alpha o'_h R_h summed over heads (B, N + M, D)) for each part, from the attention
    output o (B, H, N + M, d + R + pad)."""
    start = head_dim
    for name, part, s in parts:
        yield name, s * part.output(merge_heads(o[..., start : start + part.rank]))
        start += part.rank


class ComcatJointAttnProcessor(ComcatAttnProcessor):
    """diffusers' JointAttnProcessor2_0 with named JointHeadLowRank adapters: returns (image, context)
    when there is a context stream, the image tokens alone otherwise (as diffusers expects)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        x, c, heads = hidden_states, encoder_hidden_states, attn.heads
        q, k, v = (split_heads(lin(x), heads) for lin in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if c is not None:
            cq, ck, cv = (split_heads(lin(c), heads) for lin in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        else:
            c = x[:, :0]
        head_dim = q.shape[-1]
        parts = active_parts(self, c.shape[1] > 0)
        q, k, v = widen(q, k, v, parts, x, c, heads, self.align)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        n = x.shape[1]
        out = merge_heads(o[..., :head_dim])
        img, ctx = out[:, :n], out[:, n:]
        img = attn.to_out[0](img)
        if encoder_hidden_states is not None and not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        for name, extra in extra_outputs(o, parts, head_dim):
            if name == "context":
                ctx = ctx + extra[:, n:]
            else:
                img = img + extra[:, :n]
        img = attn.to_out[1](img)
        return img if encoder_hidden_states is None else (img, ctx)
