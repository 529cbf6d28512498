"""The architecture interface: what comcat needs to know about a transformer, whatever built it.

A `Family` yields a model's transformer blocks and, per block, its attention (comcat's canonical
dense attention: one fused qkv Linear, a proj Linear, num_heads, head_dim, scale, called as
attn(x, attn_mask=None) -> (B, N, C); timm's `Attention` is that module) and its MLP linears, and
swaps comcat's low-rank modules into those places. It also says how the last block's tokens become
the output, which linears are classifiers, and the input geometry the cost model needs. Analysis,
rank rules, calibration, search, fine-tuning, cost and save/reload only go through it.

Row-vector convention (as in timm): q = x W_Q + b_Q with W_Q = qkv.weight[:C].T, so for head h
W^Q_h = W_Q[:, h*d:(h+1)*d] is C x d, and W^O_h = proj.weight[:, h*d:(h+1)*d].T is d x C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Attention
from torch import nn

from ...core.errors import ComcatError


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
    dense_qk: bool = False  # q, k mapped after the projections (rotated, normalized): families/qk_maps.py

    @property
    def num_heads(self) -> int:
        return self.wq.shape[0]

    @property
    def head_dim(self) -> int:
        return self.wq.shape[2]


def check_attention(attn: nn.Module, where: str) -> None:
    """Raise ComcatError unless `attn` is the canonical fused-qkv attention comcat can factorize."""
    if not isinstance(attn, Attention):
        raise ComcatError(
            f"{where} is {type(attn).__name__}, not a multi-head attention comcat factorizes (gated positional "
            "and pooling attentions are not supported yet): use a vit_*, deit_*, deit3_*, beit_*, eva02_*, "
            "vit_*_rope_*, swin_* or swinv2_* (not swinv2_cr_*) model, or a transformers ViT / DeiT / DINOv2 / "
            "CLIP / SigLIP / BERT encoder"
        )
    plain = all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
    if not plain or getattr(attn, "gate", None) is not None or attn.proj.out_features != attn.qkv.in_features:
        raise ComcatError(
            f"{where} uses qk-norm, gating or a projected width, which head-level factorization "
            "does not support: use a plain vit_*, deit_* or deit3_* model"
        )


def head_weights(attn: Attention) -> HeadWeights:
    """Split a canonical attention into per-head float64 weights (see module docstring)."""
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
        getattr(attn, "qk_map", None) is not None,
    )


def matrix_weights(attn: Attention) -> dict[str, torch.Tensor]:
    """The four C x C matrices W^Q, W^K, W^V, W^O as float64 (out, in) weights."""
    C = attn.qkv.in_features
    w = attn.qkv.weight.detach().double()
    return {"q": w[:C], "k": w[C : 2 * C], "v": w[2 * C :], "o": attn.proj.weight.detach().double()}


class RelativePositionBias(nn.Module):
    """A learned bias per head and token pair, B (1, H, N, N) = table[index] (BEiT): added to the
    attention logits, logits_h = scale q_h k_h^T + B_h, so factorizing W^QK_h leaves it as it is."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.detach().clone())  # (P, H)
        self.register_buffer("index", index.detach().clone())  # (N, N) positions into the table

    def forward(self) -> torch.Tensor:
        N = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1).unsqueeze(0)


def logit_bias_mask(module: nn.Module, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """attn_mask with the module's logit bias (its `logit_bias` submodule, if any) added, as the
    additive float mask scaled_dot_product_attention takes."""
    bias = getattr(module, "logit_bias", None)
    if bias is None:
        return attn_mask
    b = bias()
    if attn_mask is None:
        return b
    return b.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else b + attn_mask


class BiasedAttention(Attention):
    """timm's Attention with an additive per-head logit bias (`logit_bias`, e.g. a
    RelativePositionBias): logits_h = scale q_h k_h^T + B_h + mask."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, logit_bias: nn.Module):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.logit_bias = logit_bias

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        return super().forward(x, attn_mask=logit_bias_mask(self, attn_mask), is_causal=is_causal)


def fused_attention(
    qkv_weight: torch.Tensor,
    biases: tuple,
    o: nn.Linear,
    num_heads: int,
    scale: float,
    logit_bias: nn.Module | None = None,
) -> Attention:
    """The canonical attention holding copies of a fused (3C, C) q, k, v weight, its biases
    (b_Q, b_K, b_V), the output projection o (and a logit bias). A missing bias among present ones
    becomes zeros, which is exact (a key bias cancels in the softmax; BEiT, EVA and Swin V2 have none)."""
    C = qkv_weight.shape[1]
    bias = any(b is not None for b in biases)
    if logit_bias is None:
        attn = Attention(C, num_heads=num_heads, qkv_bias=bias, proj_bias=o.bias is not None)
    else:
        attn = BiasedAttention(C, num_heads, qkv_bias=bias, proj_bias=o.bias is not None, logit_bias=logit_bias)
    attn.to(device=qkv_weight.device, dtype=qkv_weight.dtype)
    attn.scale = scale
    with torch.no_grad():
        attn.qkv.weight.copy_(qkv_weight)
        if bias:
            attn.qkv.bias.copy_(torch.cat([qkv_weight.new_zeros(C) if b is None else b for b in biases]))
        attn.proj.weight.copy_(o.weight)
        if o.bias is not None:
            attn.proj.bias.copy_(o.bias)
    return attn.eval()


def canonical_attention(
    q: nn.Linear,
    k: nn.Linear,
    v: nn.Linear,
    o: nn.Linear,
    num_heads: int,
    scale: float,
    logit_bias: nn.Module | None = None,
) -> Attention:
    """The canonical attention holding copies of separate q, k, v, o projections (fused_attention)."""
    qkv = torch.cat([q.weight, k.weight, v.weight]).detach()
    return fused_attention(qkv, (q.bias, k.bias, v.bias), o, num_heads, scale, logit_bias)


def arch_name(model: nn.Module) -> str:
    """The model's architecture name: its pretrained config's, else its class name."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


class Family:
    """One way of building transformers (timm ViTs, transformers encoders...). Subclasses implement
    the methods below; `owns` / `owns_block` say which models and blocks are theirs."""

    name = "family"

    def owns(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def owns_block(self, block: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks in order; each maps tokens (B, N, C) -> (B, N, C) via run_block."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """ComcatError unless every block's attention is one comcat can factorize (after prepare)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put comcat's canonical attention (exactly equal) where a block keeps another kind, in
        place; a no-op where it is there already. Loading does it; returns the model."""
        return model

    def block_names(self, model: nn.Module) -> list[str]:
        """The state-dict prefix of every block ("blocks.0.", ..., or "layers.1.blocks.0." in a Swin)."""
        names = {id(m): n for n, m in model.named_modules()}
        return [names[id(b)] + "." for b in self.blocks(model)]

    def attention(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        raise NotImplementedError

    def mlp(self, block: nn.Module) -> dict[str, nn.Module]:
        """{"fc1": the MLP's first linear, "fc2": its second}."""
        raise NotImplementedError

    def set_mlp(self, block: nn.Module, name: str, module: nn.Module) -> None:
        raise NotImplementedError

    def run_block(self, block: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens h -> the block's output; `valid` marks a text encoder's unpadded tokens (images: None)."""
        return block(h)

    def output(self, model: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output (classifier logits, or the pooled embedding) from the last block's tokens."""
        raise NotImplementedError

    def token_mask(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool of the tokens of input x that are not padding; None for inputs without padding."""
        return None

    def classifiers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The classifier linears by attribute name (empty for a model without a classifier)."""
        raise NotImplementedError

    def set_classifier(self, model: nn.Module, name: str, module: nn.Module) -> None:
        raise NotImplementedError

    def read_tokens(self, model: nn.Module) -> list[int]:
        """Token positions the output reads (class / distillation token), [] when it averages."""
        raise NotImplementedError

    def num_tokens(self, model: nn.Module) -> int:
        raise NotImplementedError

    def block_tokens(self, model: nn.Module) -> list[tuple[int, int]]:
        """Per block: (tokens per input, tokens each one attends to); (N, N) in a ViT."""
        n = self.num_tokens(model)
        return [(n, n)] * len(self.blocks(model))

    def patch_flops(self, model: nn.Module) -> int:
        """FLOPs of one input outside the blocks and classifiers (patch embedding; Swin's patch merging)."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, ...]:
        """One input's shape: (channels, height, width), or (tokens,) for text."""
        raise NotImplementedError

    def example_input(self, model: nn.Module, batch: int = 1, input_size=None) -> torch.Tensor:
        """A random input batch on the model's device and in its dtype."""
        p = next(model.parameters())
        return torch.randn(batch, *(input_size or self.input_size(model)), device=p.device, dtype=p.dtype)

    def describe(self, model: nn.Module) -> str:
        """One line: the family and what comcat factorizes in it."""
        raise NotImplementedError
