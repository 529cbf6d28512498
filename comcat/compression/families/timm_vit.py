"""timm ViTs: VisionTransformer (vit_*, deit_*, deit3_*, and the timm DINOv2, CLIP and SigLIP ViTs)
and BEiT (beit_*): blocks in model.blocks, attention in block.attn (timm's Attention is comcat's
canonical one), MLP linears block.mlp.fc1 / fc2, classifiers model.head (and a distilled DeiT's
head_dist). A BEiT attention (query and value biases, no key bias, a relative position bias) is
replaced on loading by a BeitSlot holding the canonical attention with the same weights and a
RelativePositionBias added to the logits."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import ComcatError
from .base import Family, RelativePositionBias, arch_name, check_attention, fused_attention


def _is_beit_attention(attn: nn.Module) -> bool:
    return type(attn).__module__ == "timm.models.beit" and type(attn).__name__ == "Attention"


class BeitSlot(nn.Module):
    """Stands where a timm BEiT block keeps its attention: takes its call attn(x, shared_rel_pos_bias)
    and passes the shared bias (if any) on as an additive attention mask."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, attn_mask=shared_rel_pos_bias)


@torch.no_grad()
def beit_slot(attn: nn.Module) -> BeitSlot:
    """A BeitSlot equal to a timm BEiT Attention: qkv bias [b_q, 0, b_v], its relative position bias."""
    C, H = attn.qkv.in_features, attn.num_heads
    if attn.qkv.out_features != 3 * C:
        raise ComcatError("this BEiT sets its own head dimension (attn_head_dim): use a beit_* model without it")
    table = attn.relative_position_bias_table
    bias = None if table is None else RelativePositionBias(table, attn.relative_position_index)
    biases = (attn.q_bias, None, attn.v_bias)  # no key bias: zeros
    return BeitSlot(fused_attention(attn.qkv.weight, biases, attn.proj, H, float(attn.scale), bias))


class TimmViT(Family):
    name = "timm VisionTransformer"

    def owns(self, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and self.owns_block(blocks[0])

    def owns_block(self, block: nn.Module) -> bool:
        return hasattr(block, "attn") and hasattr(block, "mlp") and hasattr(block, "norm1")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        name = arch_name(model)
        for i, block in enumerate(model.blocks):
            if not self.owns_block(block):
                raise ComcatError(f"{name} block {i} has no attention and MLP: use a vit_*, deit_* or deit3_* model")
        return list(model.blocks)

    def check(self, model: nn.Module) -> None:
        for i, b in enumerate(self.blocks(model)):
            if not _is_beit_attention(b.attn):  # a BEiT attention converts on prepare
                check_attention(self.attention(b), f"block {i} attention")

    def prepare(self, model: nn.Module) -> nn.Module:
        for b in self.blocks(model):
            if _is_beit_attention(b.attn):
                b.attn = beit_slot(b.attn)
        return model

    def attention(self, block: nn.Module) -> nn.Module:
        if _is_beit_attention(block.attn):
            raise ComcatError("a BEiT attention is converted on loading: load the model with comcat.load_model")
        return block.attn.attn if isinstance(block.attn, BeitSlot) else block.attn

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        if isinstance(block.attn, BeitSlot):
            block.attn.attn = module
        else:
            block.attn = module

    def mlp(self, block: nn.Module) -> dict[str, nn.Module]:
        return {"fc1": block.mlp.fc1, "fc2": block.mlp.fc2}

    def set_mlp(self, block: nn.Module, name: str, module: nn.Module) -> None:
        setattr(block.mlp, name, module)

    def output(self, model: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return model.forward_head(model.norm(h))

    def classifiers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n in ("head", "head_dist") if hasattr(m := getattr(model, n, None), "in_features")}

    def set_classifier(self, model: nn.Module, name: str, module: nn.Module) -> None:
        setattr(model, name, module)

    def read_tokens(self, model: nn.Module) -> list[int]:
        if getattr(model, "global_pool", "token") != "token":
            return []
        return [0, 1] if getattr(model, "dist_token", None) is not None else [0]

    def num_tokens(self, model: nn.Module) -> int:
        return model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)

    def patch_flops(self, model: nn.Module) -> int:
        pe = model.patch_embed.proj
        return 2 * model.patch_embed.num_patches * pe.weight[0].numel() * pe.out_channels

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        size = getattr(model.patch_embed, "img_size", None)  # what the model was built for
        if size is None:
            return tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
        return (model.patch_embed.proj.in_channels, *size)

    def describe(self, model: nn.Module) -> str:
        arch = arch_name(model)
        what = "per-head W^QK_h and W^VO_h of every block's attention (the MLP linears too when asked)"
        return f"{self.name} ({arch}): {what}"
