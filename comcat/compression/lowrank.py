"""Low-rank layers: LowRankLinear, head-level HeadLowRankAttention, matrix-level MatrixLowRankAttention.

All take the call signature of timm's Attention (x, attn_mask=None, is_causal=False), so they drop
into a timm Block in place of `block.attn`. The attentions keep the dense one's position terms: its
logit bias (a `logit_bias` submodule, e.g. BEiT's relative position bias), added to the logits as it
was, and its map of q and k (a `qk_map` submodule: rotary embeddings, cosine attention;
families/qk_maps.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .families.base import logit_bias_mask
from .families.qk_maps import map_qk


class LowRankLinear(nn.Module):
    """y = up(down(x)) = x V U^T + b: a rank-r factorization of an nn.Linear (in -> out).

    down: in -> r (no bias), up: r -> out (with the original bias). Params r (in + out) + out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        self.rank_mask: torch.Tensor | None = None  # (r,) soft rank mask while a rank search runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on the sub-layers' parameters: the same arithmetic as up(down(x)) without two more
        # module calls (about 9 us per layer on the CPU, which a small model at batch 32 notices)
        down, up = self._modules["down"], self._modules["up"]
        h = F.linear(x, down._parameters["weight"])
        return F.linear(
            h if self.rank_mask is None else h * self.rank_mask, up._parameters["weight"], up._parameters["bias"]
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """Truncated SVD W = U S V^T: up.weight = U_r S_r^1/2, down.weight = S_r^1/2 V_r^T."""
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.down.weight.copy_(root[:, None] * vh[:rank])
        layer.up.weight.copy_(u[:, :rank] * root)
        if linear.bias is not None:
            layer.up.bias.copy_(linear.bias)
        return layer


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*r) -> (B, H, N, r)."""
    B, N, _ = x.shape
    return x.reshape(B, N, num_heads, -1).transpose(1, 2)


class HeadLowRankAttention(nn.Module):
    """Multi-head attention with per-head low-rank W^QK_h ~ A_h B_h^T and W^VO_h ~ P_h R_h^T.

        logits_h = scale * (X A_h + a_h)(X B_h)^T       ([A_h; a_h] B_h^T ~ [W^Q_h; b^Q_h] W^K_h^T)
        out      = sum_h softmax(logits_h) (X P_h) R_h^T + b_out     (b_out = b^O + sum_h b^V_h W^O_h)

    A_h, B_h: C x r_qk, a_h: r_qk (the query bias, factorized with W^QK_h as its extra row);
    P_h, R_h: C x r_vo. The key bias cancels in the softmax and the value bias folds into b_out
    because attention rows sum to 1, so at r = d this is exact.
    """

    pad_heads = True  # False on an instance: no zero padding (counted_flops counts the factorized arithmetic)
    fused = True  # False on an instance: q, k, v and proj run as their own modules (int8 linears, quantize.py)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        rank_qk: int,
        rank_vo: int,
        scale: float,
        query_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if rank_qk < 1 or rank_vo < 1:
            raise ValueError(f"ranks must be >= 1, got qk={rank_qk} vo={rank_vo}")
        self.num_heads, self.rank_qk, self.rank_vo, self.scale = num_heads, rank_qk, rank_vo, scale
        self.q = nn.Linear(dim, num_heads * rank_qk, bias=query_bias)  # [A_1 ... A_H], [a_1 ... a_H]
        self.k = nn.Linear(dim, num_heads * rank_qk, bias=False)  # [B_1 ... B_H]
        self.v = nn.Linear(dim, num_heads * rank_vo, bias=False)  # [P_1 ... P_H]
        self.proj = nn.Linear(num_heads * rank_vo, dim, bias=True)  # [R_1 ... R_H], b_out
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.rank_mask_qk: torch.Tensor | None = None  # (r_qk,), (r_vo,) soft rank masks while a
        self.rank_mask_vo: torch.Tensor | None = None  # rank search runs: A diag(c) B^T = U diag(s c) V^T
        self._cache: tuple | None = None  # (key, fused weights) for inference, see _weights
        self.logit_bias: nn.Module | None = None  # the dense attention's additive logit bias, if it had one
        self.qk_map: nn.Module | None = None  # its map of q and k (then r_qk = d and A_h, B_h = W^Q_h, W^K_h)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        H, rq, rv = self.num_heads, self.rank_qk, self.rank_vo
        attn_mask = logit_bias_mask(self, attn_mask)
        # SDPA's fused kernels need one head dim for q, k and v (else the math path, about 2x slower on
        # the CPU): when r_qk != r_vo the smaller side gets zero rows per head up to max(r_qk, r_vo) (exact)
        dq, dv = (max(rq, rv),) * 2 if self.pad_heads and self.fused else (rq, rv)
        if not self.fused:  # each factor through its own module (quantize.py: int8 linears)
            q, k, v = _heads(self.q(x), H), _heads(self.k(x), H), _heads(self.v(x), H)
        else:
            weight, bias, proj, proj_bias = self._weights(dq, dv)
            qkv = F.linear(x, weight, bias)
            if dq == dv:
                q, k, v = qkv.view(B, N, 3, H, dq).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q, k, v = (_heads(t, H) for t in qkv.split([H * dq, H * dq, H * dv], dim=-1))
        if self.rank_mask_qk is not None:
            q = q * F.pad(self.rank_mask_qk, (0, dq - rq))
        if self.rank_mask_vo is not None:
            v = v * F.pad(self.rank_mask_vo, (0, dv - rv))
        q, k = map_qk(self, q, k)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        o = o.transpose(1, 2).reshape(B, N, H * dv)
        out = self.proj(o) if not self.fused else F.linear(o, proj, proj_bias)
        return self.proj_drop(out) if self.training else out  # dropout is the identity in eval

    def _weights(self, dq: int, dv: int) -> tuple:
        """The one input matmul's weight [A | B | P] (rows zero-padded per head to dq, dq, dv) and bias
        [a | 0 | 0], and the output weight [R_1 ... R_H] padded to dv with its bias. Rebuilt whenever
        gradients flow; else cached until a parameter changes (in place or replaced), saving the
        concatenation at inference."""
        mods = self._modules  # dict lookups: nn.Module.__getattr__ costs ~0.7 us a call
        q, k, v, o = (mods[n]._parameters for n in ("q", "k", "v", "proj"))
        params = (q["weight"], k["weight"], v["weight"], o["weight"], o["bias"]) + (
            () if q.get("bias") is None else (q["bias"],)
        )
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (
            None
            if grad
            else (
                dq,
                dv,
                torch.is_inference_mode_enabled(),
                *[p._version for p in params],
                *[p.data_ptr() for p in params],
                params[0].dtype,
                params[0].device,
            )
        )
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        H, rv = self.num_heads, self.rank_vo
        weight = torch.cat(
            [_pad_rows(q["weight"], H, dq), _pad_rows(k["weight"], H, dq), _pad_rows(v["weight"], H, dv)]
        )
        bias = (
            None
            if q.get("bias") is None
            else torch.cat([_pad_rows(q["bias"], H, dq), q["bias"].new_zeros(H * (dq + dv))])
        )
        proj = o["weight"] if rv == dv else F.pad(o["weight"].view(-1, H, rv), (0, dv - rv)).flatten(1)
        out = (weight, bias, proj, o["bias"])
        if key is not None:
            self._cache = (key, out)
        return out


def _pad_rows(w: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """(H r, ...) per-head rows of a weight or bias -> (H d, ...) with d - r zero rows after each head's r."""
    r = w.shape[0] // heads
    if r == d:
        return w
    return F.pad(w.reshape(heads, r, -1), (0, 0, 0, d - r)).reshape(heads * d, *w.shape[1:])


class MatrixLowRankAttention(nn.Module):
    """Baseline: standard MHA with W^Q, W^K, W^V, W^O each replaced by its own LowRankLinear
    (or kept dense where its rank is None). Biases are kept as they are, so r = C is exact."""

    def __init__(
        self,
        q: nn.Module,
        k: nn.Module,
        v: nn.Module,
        proj: nn.Module,
        num_heads: int,
        scale: float,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.q, self.k, self.v, self.proj = q, k, v, proj
        self.num_heads, self.scale, self.attn_drop = num_heads, scale, attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.logit_bias: nn.Module | None = None  # the dense attention's additive logit bias, if it had one
        self.qk_map: nn.Module | None = None  # its map of q and k, if it had one

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        attn_mask = logit_bias_mask(self, attn_mask)
        q, k, v = (_heads(f(x), self.num_heads) for f in (self.q, self.k, self.v))
        q, k = map_qk(self, q, k)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, -1)))
