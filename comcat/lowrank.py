"""Low-rank layers: LowRankLinear, head-level HeadLowRankAttention, matrix-level MatrixLowRankAttention.

All take the call signature of timm's Attention (x, attn_mask=None, is_causal=False), so they drop
into a timm Block in place of `block.attn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """y = up(down(x)) = x V U^T + b: a rank-r factorization of an nn.Linear (in -> out).

    down: in -> r (no bias), up: r -> out (with the original bias). Params r (in + out) + out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        self.rank_mask: torch.Tensor | None = None   # (r,) soft rank mask while a rank search runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        return self.up(h if self.rank_mask is None else h * self.rank_mask)

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


def _merge_mask(bias: torch.Tensor | None, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Combine the additive key-bias term with a caller's mask (bool: True = attend)."""
    if attn_mask is None or bias is None:
        return bias if attn_mask is None else attn_mask
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=bias.dtype).masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask


class HeadLowRankAttention(nn.Module):
    """Multi-head attention with per-head low-rank W^QK_h ~ A_h B_h^T and W^VO_h ~ P_h R_h^T.

        logits_h = scale * (X A_h)(X B_h)^T + 1 (X u_h)^T          (u_h = scale * W^K_h b^Q_h)
        out      = sum_h softmax(logits_h) (X P_h) R_h^T + b_out     (b_out = b^O + sum_h b^V_h W^O_h)

    A_h, B_h: C x r_qk;  P_h: C x r_vo;  R_h: C x r_vo. The key bias cancels in the softmax and the
    value bias folds into b_out because attention rows sum to 1, so at r = d this is exact.
    """

    def __init__(self, dim: int, num_heads: int, rank_qk: int, rank_vo: int, scale: float,
                 key_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if rank_qk < 1 or rank_vo < 1:
            raise ValueError(f"ranks must be >= 1, got qk={rank_qk} vo={rank_vo}")
        self.num_heads, self.rank_qk, self.rank_vo, self.scale = num_heads, rank_qk, rank_vo, scale
        self.q = nn.Linear(dim, num_heads * rank_qk, bias=False)        # [A_1 ... A_H]
        self.k = nn.Linear(dim, num_heads * rank_qk, bias=False)        # [B_1 ... B_H]
        self.key_bias = nn.Linear(dim, num_heads, bias=False) if key_bias else None  # [u_1 ... u_H]
        self.v = nn.Linear(dim, num_heads * rank_vo, bias=False)        # [P_1 ... P_H]
        self.proj = nn.Linear(num_heads * rank_vo, dim, bias=True)      # [R_1 ... R_H], b_out
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.rank_mask_qk: torch.Tensor | None = None   # (r_qk,), (r_vo,) soft rank masks while a
        self.rank_mask_vo: torch.Tensor | None = None   # rank search runs: A diag(c) B^T = U diag(s c) V^T

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        H, rq, rv = self.num_heads, self.rank_qk, self.rank_vo
        # one matmul for X [A | B | P | u]: the four input projections share their input
        weights = [self.q.weight, self.k.weight, self.v.weight] + ([self.key_bias.weight] if self.key_bias else [])
        y = F.linear(x, torch.cat(weights))
        q, k, v, *u = y.split([H * rq, H * rq, H * rv] + ([H] if self.key_bias else []), dim=-1)
        q, k, v = _heads(q, H), _heads(k, H), _heads(v, H)
        if self.rank_mask_qk is not None:
            q = q * self.rank_mask_qk
        if self.rank_mask_vo is not None:
            v = v * self.rank_mask_vo
        bias = u[0].transpose(1, 2).unsqueeze(2) if u else None      # (B, H, 1, N): X u_h per key
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_merge_mask(bias, attn_mask), is_causal=is_causal,
                                           dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, -1)))


class MatrixLowRankAttention(nn.Module):
    """Baseline: standard MHA with W^Q, W^K, W^V, W^O each replaced by its own LowRankLinear
    (or kept dense where its rank is None). Biases are kept as they are, so r = C is exact."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, proj: nn.Module, num_heads: int,
                 scale: float, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.q, self.k, self.v, self.proj = q, k, v, proj
        self.num_heads, self.scale, self.attn_drop = num_heads, scale, attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (_heads(f(x), self.num_heads) for f in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, -1)))
