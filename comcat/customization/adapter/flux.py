"""Per-head adapters in Flux's attention (FluxAttention): double-stream blocks (joint attention
over [C; X], each stream with its own projections) and single-stream blocks (one set of
projections over the concatenated [C; X], no output projection: the block's proj_out takes it).

Double-stream blocks take a JointHeadLowRank as SD3 does (joint.py), with the context tokens first.
Single-stream blocks take a HeadLowRank over the whole sequence: their W^Q, W^K, W^V are shared by
the two streams, so the update of W^QK_h and W^VO_h is too; alpha o' R is added to the attention's
output, ahead of proj_out.

Rotary embeddings: Flux rotates the base q_h, k_h (after their RMS norms) by each token's position.
The adapter's extra dimensions are position-free: neither normed nor rotated, so its logit term
alpha q'_h k'_h^T depends on the tokens' content alone, the same at every relative position. The
base dimensions keep Flux's positional pattern exactly, and a zero adapter is exactly the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from .joint import active_parts, extra_outputs, widen
from .layer import ComcatAttnProcessor, merge_heads, split_heads


def is_flux(attn) -> bool:
    return type(attn).__name__ == "FluxAttention"


class ComcatFluxAttnProcessor(ComcatAttnProcessor):
    """diffusers' FluxAttnProcessor with named adapters (module docstring): returns (image, context)
    in a double-stream block, the attention output over [C; X] in a single-stream block."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        x, heads = hidden_states, attn.heads
        q, k, v = (split_heads(lin(x), heads) for lin in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            c = encoder_hidden_states
            cq, ck, cv = (split_heads(lin(c), heads) for lin in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        else:
            c = x[:, :0]
        if image_rotary_emb is not None:  # the base dimensions only: the adapter's are position-free
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        head_dim = q.shape[-1]
        parts = active_parts(self, joint)
        q, k, v = widen(q, k, v, parts, x, c, heads, self.align, context_first=True)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=head_dim**-0.5)
        out = merge_heads(o[..., :head_dim]).to(x.dtype)
        m = c.shape[1]
        ctx, img = out[:, :m], out[:, m:]
        if joint:
            img, ctx = attn.to_out[0](img), attn.to_add_out(ctx)
        for name, extra in extra_outputs(o, parts, head_dim, slice(m, None), slice(0, m)):
            if name == "context":
                ctx = ctx + extra.to(ctx.dtype)
            else:
                img = img + extra.to(img.dtype)
        if joint:
            return attn.to_out[1](img), ctx
        return img
