"""timm EVA models (eva02_*, vit_*_rope_*, eva_*): ViT blocks whose attention rotates q and k by
position (RoPE), has no key bias and may keep q, k, v as separate linears; eva02 base / large use a
SwiGLU MLP.

On loading (`prepare`), each EvaAttention is replaced, exactly, by an `EvaSlot` holding comcat's
canonical attention with the same weights (key bias 0) and the model's rotary embedding for its
image size (families/qk_maps.py), and a SwiGLU MLP (separate gate and value linears) by timm's
GluMlp with the two packed into one fc1 = [W_gate; W_x], which computes the same
act(x W_gate^T) * (x W_x^T). The QK path of a rotary layer stays dense (qk_maps.py)."""

from __future__ import annotations

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from ...core.errors import ComcatError
from .base import arch_name, canonical_attention, fused_attention
from .qk_maps import Rotary, has_qk_map, with_qk_map
from .timm_vit import TimmViT


class EvaSlot(nn.Module):
    """Stands where an EVA block keeps its attention: takes its call attn(x, rope, attn_mask,
    is_causal); the rotation is the attention's own (its Rotary), so `rope` must match it."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        rotary = getattr(self.attn, "qk_map", None)
        if rope is not None and (rotary is None or rope.shape[-2:] != rotary.embed.shape[-2:]):
            raise ComcatError(
                f"this EVA model was prepared for {0 if rotary is None else rotary.embed.shape[0]} rotary positions "
                f"and is called with {rope.shape[-2]}: give it images of the size it was loaded for"
            )
        return self.attn(x, attn_mask=attn_mask, is_causal=is_causal)


def _rope_embed(model: Eva) -> torch.Tensor | None:
    """The rotary embedding (N - prefix, 2 d) the model's forward uses at its own image size."""
    if model.rope is None:
        return None
    if getattr(model.rope, "feat_shape", None) is not None:
        return model.rope.get_embed()
    return model.rope.get_embed(shape=model.patch_embed.grid_size)


@torch.no_grad()
def eva_slot(attn: EvaAttention, embed: torch.Tensor | None) -> EvaSlot:
    """An EvaSlot equal to `attn`: q, k, v from the fused qkv (with q_bias, v_bias) or q_proj, k_proj, v_proj."""
    H, scale = attn.num_heads, float(attn.scale)
    if attn.qkv is not None:  # k_bias is a zero buffer
        dense = fused_attention(attn.qkv.weight, (attn.q_bias, attn.k_bias, attn.v_bias), attn.proj, H, scale)
    else:
        dense = canonical_attention(attn.q_proj, attn.k_proj, attn.v_proj, attn.proj, H, scale)
    if embed is None:
        return EvaSlot(dense)
    rotary = Rotary(embed.to(dense.qkv.weight), attn.num_prefix_tokens, half=bool(getattr(attn, "rotate_half", False)))
    return EvaSlot(with_qk_map(dense, rotary))


@torch.no_grad()
def glu_mlp(mlp: SwiGLU) -> GluMlp:
    """timm's GluMlp equal to a SwiGLU with separate gate and value linears (fc1 = [W_gate; W_x])."""
    C, hidden = mlp.fc1_g.in_features, mlp.fc1_g.out_features
    norm = None if isinstance(mlp.norm, nn.Identity) else type(mlp.norm)
    new = GluMlp(C, 2 * hidden, out_features=mlp.fc2.out_features, act_layer=type(mlp.act), norm_layer=norm,
                 bias=mlp.fc1_g.bias is not None, gate_last=False)  # fmt: skip
    new.to(mlp.fc2.weight)
    new.fc1.weight.copy_(torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]))
    if mlp.fc1_g.bias is not None:
        new.fc1.bias.copy_(torch.cat([mlp.fc1_g.bias, mlp.fc1_x.bias]))
    if norm is not None:
        new.norm.load_state_dict(mlp.norm.state_dict())
    new.fc2.load_state_dict(mlp.fc2.state_dict())
    return new.eval()


def _check_block(block: nn.Module, i: int, arch: str) -> None:
    attn, what = block.attn, None
    if not isinstance(attn, EvaAttention):
        what = f"a {type(attn).__name__}"
    elif not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm)):
        what = "qk-norm"
    elif not isinstance(attn.norm, nn.Identity):
        what = "a norm before W^O (sub-LN), which ties the heads' W^VO_h together,"
    elif attn.gate is not None:
        what = "a gated attention"
    elif attn.num_heads * attn.head_dim != attn.proj.out_features:
        what = "its own head dimension"
    elif not isinstance(block.mlp, (Mlp, GluMlp, SwiGLU)):
        what = f"a {type(block.mlp).__name__} MLP"
    if what:
        raise ComcatError(
            f"{arch} block {i} uses {what}, which comcat does not factorize: use eva02_tiny/small/base or a "
            "vit_*_rope_* model"
        )


class TimmEva(TimmViT):
    name = "timm EVA"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def owns_block(self, block: nn.Module) -> bool:
        return isinstance(block, (EvaBlock, EvaBlockPostNorm))

    def check(self, model: nn.Module) -> None:
        arch = arch_name(model)
        if getattr(model, "rope_mixed", False):
            raise ComcatError(
                f"{arch} learns its rotary frequencies per layer (mixed RoPE): use eva02_* or vit_*_rope_*"
            )
        for i, b in enumerate(self.blocks(model)):
            if not isinstance(b.attn, EvaSlot):
                _check_block(b, i, arch)

    def prepare(self, model: nn.Module) -> nn.Module:
        self.check(model)
        embed = _rope_embed(model)
        for b in self.blocks(model):
            if not isinstance(b.attn, EvaSlot):
                b.attn = eva_slot(b.attn, embed)
            if isinstance(b.mlp, SwiGLU):
                b.mlp = glu_mlp(b.mlp)
        return model

    def attention(self, block: nn.Module) -> nn.Module:
        if not isinstance(block.attn, EvaSlot):
            raise ComcatError("an EVA attention is converted on loading: load the model with comcat.load_model")
        return block.attn.attn

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        block.attn.attn = module

    def describe(self, model: nn.Module) -> str:
        blocks = self.blocks(model)
        rotary = isinstance(blocks[0].attn, EvaSlot) and has_qk_map(blocks[0].attn.attn)
        if not rotary:
            return super().describe(model)
        return (
            f"{self.name} ({arch_name(model)}), rotary attention: per-head W^VO_h of every block; W^Q and W^K stay "
            "dense, as rotary positions make W^QK_h depend on the token distance (the MLP linears too when asked)"
        )
