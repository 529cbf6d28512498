"""The COMCAT attention processor.

For each head h with queries q_h = X W^Q_h, keys k_h = C W^K_h, values v_h = C W^V_h:
    logits_h = (q_h k_h^T + alpha q'_h k'_h^T) * scale
    out      = sum_h softmax(logits_h) (v_h W^O_h + alpha v'_h R_h) + b_O
with q' = X A, k' = C B, v' = C P (r columns per head), so W^QK_h gains the rank-r term
A_h B_h^T and W^VO_h gains P_h R_h. It is computed by one fused `scaled_dot_product_attention`
on [q, alpha q'], [k, k'], [v, v'] concatenated along the head dimension, with the scale given
explicitly (exact: the extra dimensions add alpha q' k'^T to every logit). B and R start at zero,
so a new adapter leaves the model unchanged.

When the base projections are frozen `nn.Linear`s (training an adapter, or inference), the widened
q, k, v come straight out of one matmul each with a per-head interleaved weight [W^Q_h; alpha A_h^T]
(and the output from [W^O_h, alpha R_h]): no extra matmuls or concatenated activations, and the
backward pass forms weight gradients for the adapter's rows/columns only (`WidenedLinear`).
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

    def qkv(self, x: torch.Tensor, c: torch.Tensor) -> tuple:
        """q' = X A, k' = C B, v' = C P, each (B, H, N, r), from x (B, Nq, Dq) and c (B, Nc, Dc); one
        matmul when c is x."""
        if c is x:
            parts = (x @ torch.cat([self.A, self.B, self.P], 1).to(x.dtype)).chunk(3, -1)
        else:
            parts = (x @ self.A.to(x.dtype), c @ self.B.to(c.dtype), c @ self.P.to(c.dtype))
        return tuple(split_heads(t, self.heads) for t in parts)

    def output_heads(self, o: torch.Tensor) -> torch.Tensor:
        """o' (B, H, N, r) -> sum_h o'_h R_h (B, N, Do)."""
        return merge_heads(o) @ self.R.to(o.dtype)


class SharedHeadLowRank(nn.Module):
    """A HeadLowRank whose heads share one r-wide basis per side, each head with its own r x r cores:
        A_h = U M_h,  B_h = V,  P_h = S,  R_h = K_h T^T
    so W^QK_h gains alpha U M_h V^T and W^VO_h gains alpha S K_h T^T: rank r per head, different in
    every head. (Dq + 2 Dc + Do) r + 2 H r^2 parameters instead of (Dq + 2 Dc + Do) H r: the size
    stays that of a rank-r LoRA on many-headed models. The processors call qkv and output_heads,
    as for a HeadLowRank; A, B, P, R (shapes as HeadLowRank's) are materialized only when read (the
    LoRA fit, the adapter table). V and T start at zero."""

    def __init__(self, query_dim: int, context_dim: int, out_dim: int, heads: int, rank: int):
        super().__init__()
        self.heads, self.rank = heads, rank
        eye = torch.eye(rank).repeat(heads, 1, 1)
        self.U = nn.Parameter(torch.randn(query_dim, rank) / math.sqrt(query_dim))
        self.M = nn.Parameter(eye.clone())
        self.V = nn.Parameter(torch.zeros(context_dim, rank))
        self.S = nn.Parameter(torch.randn(context_dim, rank) / math.sqrt(context_dim))
        self.K = nn.Parameter(eye.clone())
        self.T = nn.Parameter(torch.zeros(out_dim, rank))

    def qkv(self, x, c):  # as HeadLowRank.qkv; q' = (X U) M_h, and C V, C S broadcast to every head
        if c is x:
            q, k, v = (x @ torch.cat([self.U, self.V, self.S], 1).to(x.dtype)).chunk(3, -1)
        else:
            q, k, v = x @ self.U.to(x.dtype), c @ self.V.to(c.dtype), c @ self.S.to(c.dtype)
        q = torch.einsum("bnr,hrs->bhns", q, self.M.to(q.dtype))
        b, n, r = k.shape
        return q, k[:, None].expand(b, self.heads, n, r), v[:, None].expand(b, self.heads, n, r)

    def output_heads(self, o):  # (B, H, N, r) -> (sum_h o'_h K_h) T^T
        return torch.einsum("bhnr,hrs->bns", o, self.K.to(o.dtype)) @ self.T.to(o.dtype).t()

    @property
    def A(self) -> torch.Tensor:  # (Dq, H r)
        return torch.einsum("dr,hrs->dhs", self.U, self.M).flatten(1)

    @property
    def B(self) -> torch.Tensor:  # (Dc, H r)
        return self.V.repeat(1, self.heads)

    @property
    def P(self) -> torch.Tensor:  # (Dc, H r)
        return self.S.repeat(1, self.heads)

    @property
    def R(self) -> torch.Tensor:  # (H r, Do)
        return torch.einsum("hrs,os->hro", self.K, self.T).flatten(0, 1)


def low_rank_layer(query_dim: int, context_dim: int, out_dim: int, heads: int, rank: int, shared: bool):
    """A fresh HeadLowRank, or SharedHeadLowRank when `shared`."""
    return (SharedHeadLowRank if shared else HeadLowRank)(query_dim, context_dim, out_dim, heads, rank)


def idle(m: HeadLowRank) -> bool:
    """Whether adapter factors add exactly nothing and want no gradient: B and R still zero, outside
    training. Such an adapter is skipped, so a fresh one leaves the outputs bitwise equal."""
    if torch.is_grad_enabled() and (m.B.requires_grad or m.R.requires_grad):
        return False
    return not (m.B.any() or m.R.any())


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H d) -> (B, H, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def interleave(w0: torch.Tensor, w1: torch.Tensor, heads: int, pad: int, dim: int) -> torch.Tensor:
    """Per-head blocks [w0_h, w1_h, 0] along `dim` (0: rows, 1: columns); w0 has H d, w1 H R there."""
    if dim == 0:  # rows: (H, d, C) and (H, R, C) blocks, a contiguous copy
        c = w0.shape[1]
        parts = [w0.reshape(heads, -1, c), w1.reshape(heads, -1, c)]
        parts += [w0.new_zeros(heads, pad, c)] if pad else []
        return torch.cat(parts, 1).reshape(-1, c)
    o = w0.shape[0]
    parts = [w0.reshape(o, heads, -1), w1.reshape(o, heads, -1)]
    parts += [w0.new_zeros(o, heads, pad)] if pad else []
    return torch.cat(parts, 2).reshape(o, -1)


class WidenedLinear(torch.autograd.Function):
    """y = x W^T + b with W = interleave(W0, W1): W0 (and b) frozen, the gradient formed for W1 only.

    dim 0: W1 (H R, C) adds R outputs per head, x (..., C) -> y (..., H (d + R + pad)).
    dim 1: W1 (O, H R) adds R inputs per head, x (..., H (d + R + pad)) -> y (..., O).
    """

    @staticmethod
    def forward(ctx, x, w0, b0, w1, heads: int, pad: int, dim: int):
        where = x.device.type
        dt = torch.get_autocast_dtype(where) if torch.is_autocast_enabled(where) else x.dtype
        w = interleave(w0.to(dt), w1.to(dt), heads, pad, dim)
        if b0 is not None and dim == 0:
            b0 = interleave(b0[None].to(dt), b0.new_zeros(1, w1.shape[0], dtype=dt), heads, pad, 1)[0]
        x = x.to(dt)
        ctx.save_for_backward(x, w)
        ctx.meta = (heads, w0.shape[dim] // heads, w1.shape[dim] // heads, dim, w1.dtype)
        return F.linear(x, w, None if b0 is None else b0.to(dt))

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        heads, d, r, dim, w1_dtype = ctx.meta
        gy = gy.to(w.dtype)
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gw1 = None
        if ctx.needs_input_grad[3]:
            if dim == 0:
                gw1 = _extra(gy, heads, d, r).t() @ x.reshape(-1, x.shape[-1])
            else:
                gw1 = gy.reshape(-1, gy.shape[-1]).t() @ _extra(x, heads, d, r)
            gw1 = gw1.to(w1_dtype)
        return gx, None, None, gw1, None, None, None


def _extra(t: torch.Tensor, heads: int, d: int, r: int) -> torch.Tensor:
    """(..., H (d + R + pad)) -> (N, H R): the adapter's slots of every head."""
    return t.reshape(-1, heads, t.shape[-1] // heads)[:, :, d : d + r].reshape(-1, heads * r)


def cat_aligned(parts: list[torch.Tensor], multiple: int) -> torch.Tensor:
    """parts joined along the last dimension and zero-padded to a multiple of `multiple`, in one
    copy (exact for q, k and v of SDPA: the zero dimensions add nothing to logits or outputs)."""
    extra = -sum(t.shape[-1] for t in parts) % multiple
    pad = [parts[0].new_zeros(*parts[0].shape[:-1], extra)] if extra else []
    return torch.cat(parts + pad, -1)


class ComcatAttnProcessor(nn.Module):
    """A diffusers attention processor holding named adapters, each with its strength alpha.

    `align`: the widened head dimension d + sum r is zero-padded to a multiple of it (exact). 8 suits
    CUDA's flash and memory-efficient SDPA kernels, and on the CPU SD-1.5's 40-wide heads train faster
    at 48 than at 41 (`benchmarks/diffusion_customization.py`).
    """

    def __init__(self, align: int = 8, base=None):
        super().__init__()
        self.base = base  # the attention's own processor, put back when the last adapter goes
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.align = align

    def add(self, name: str, adapter: HeadLowRank, scale: float) -> None:
        self.adapters[name] = adapter
        self.scales[name] = float(scale)

    def remove(self, name: str) -> None:
        del self.adapters[name]
        del self.scales[name]

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
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

        active = [(m, s) for name, m in self.adapters.items() if (s := self.scales[name]) != 0.0 and not idle(m)]
        if active and _frozen_linears(attn) and not any(isinstance(m, SharedHeadLowRank) for m, _ in active):
            out = self._widened(attn, hidden_states, context, attention_mask, active)
        else:
            out = self._concatenated(attn, hidden_states, context, attention_mask, active)
        out = attn.to_out[1](out)

        if image_input:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _widened(self, attn, x, context, mask, active) -> torch.Tensor:
        """q, k, v and the output through `WidenedLinear` (frozen nn.Linear projections, no q/k norm)."""
        heads, head_dim = attn.heads, attn.to_q.out_features // attn.heads
        rank = sum(m.rank for m, _ in active)
        pad = -(head_dim + rank) % self.align

        def cat(ws):  # adapters' per-head parts side by side: (H, r_1 + r_2 + ..., C) -> (H R, C)
            return torch.cat([w.reshape(heads, w.shape[0] // heads, -1) for w in ws], 1).reshape(heads * rank, -1)

        def project(lin, inp, w1):
            return split_heads(WidenedLinear.apply(inp, lin.weight, lin.bias, w1, heads, pad, 0), heads)

        q = project(attn.to_q, x, cat([(s * m.A).t() for m, s in active]))
        k = project(attn.to_k, context, cat([m.B.t() for m, _ in active]))
        v = project(attn.to_v, context, cat([m.P.t() for m, _ in active]))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        r_out = cat([s * m.R for m, s in active]).t()  # (O, H R)
        lin = attn.to_out[0]
        return WidenedLinear.apply(merge_heads(o), lin.weight, lin.bias, r_out, heads, pad, 1)

    def _concatenated(self, attn, x, context, mask, active) -> torch.Tensor:
        """The general path: [q, alpha q'] etc. concatenated after the base projections."""
        heads = attn.heads
        q = split_heads(attn.to_q(x), heads)
        k = split_heads(attn.to_k(context), heads)
        v = split_heads(attn.to_v(context), heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        head_dim = q.shape[-1]
        if active:
            dt = q.dtype
            xd = x.to(dt)
            cd = xd if context is x else context.to(dt)
            extra = [(s, m.qkv(xd, cd)) for m, s in active]
            q = cat_aligned([q] + [s * e[0] for s, e in extra], self.align)
            k = cat_aligned([k] + [e[1] for _, e in extra], self.align)
            v = cat_aligned([v] + [e[2] for _, e in extra], self.align)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        out = attn.to_out[0](merge_heads(o[..., :head_dim]))
        start = head_dim
        for m, s in active:
            out = out + s * m.output_heads(o[..., start : start + m.rank].to(out.dtype))
            start += m.rank
        return out


def _frozen_linears(attn) -> bool:
    """Whether `ComcatAttnProcessor._widened` applies: plain frozen projections, no q/k norms."""
    lins = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    return (
        attn.norm_q is None
        and attn.norm_k is None
        and all(type(lin) is nn.Linear and not any(p.requires_grad for p in lin.parameters()) for lin in lins)
    )
