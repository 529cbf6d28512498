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


def _extra(part: str, m: HeadLowRank, x, c, s: float, context_first: bool):
    """The part's (q', k', v') over the joint sequence ([X; C], or [C; X] when `context_first`),
    each (B, H, N + M, r): zero on the tokens of the stream they do not come from."""
    if part == "self":
        q, k, v = m.qkv(x, x)
        image = (True, True, True)  # which stream each of q', k', v' lives on: the image's
    elif part == "cross":
        q, k, v = m.qkv(x, c)
        image = (True, False, False)
    else:
        q, k, v = m.qkv(c, x)
        image = (False, True, True)
    n, mc = x.shape[1], c.shape[1]

    def place(t, on_image):
        zeros = t.new_zeros(*t.shape[:2], mc if on_image else n, t.shape[-1])
        parts = [t, zeros] if on_image else [zeros, t]
        return torch.cat(parts[::-1] if context_first else parts, 2)

    return place(s * q, image[0]), place(k, image[1]), place(v, image[2])


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
    x, c = x.to(dt), c.to(dt)
    extras = [_extra(name, part, x, c, s, context_first) for name, part, s in parts]
    return (cat_aligned([t] + [e[i] for e in extras], align) for i, t in enumerate((q, k, v)))


def extra_outputs(o: torch.Tensor, parts, head_dim: int, image: slice, context: slice):
    """(part name, alpha o'_h R_h summed over heads) for each part, from the attention output o
    (B, H, N + M, d + R + pad) on the rows of the stream the part writes to: the image tokens'
    (B, N, D) for 'self' and 'cross', the context tokens' (B, M, D) for 'context'."""
    start = head_dim
    for name, part, s in parts:
        rows = context if name == "context" else image
        yield name, s * part.output_heads(o[:, :, rows, start : start + part.rank])
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
        for name, extra in extra_outputs(o, parts, head_dim, slice(0, n), slice(n, None)):
            if name == "context":
                ctx = ctx + extra
            else:
                img = img + extra
        img = attn.to_out[1](img)
        return img if encoder_hidden_states is None else (img, ctx)
