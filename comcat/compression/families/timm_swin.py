"""timm Swin Transformers (swin_*, swinv2_*): stages of blocks whose attention runs inside 7 x 7 (or
other) windows, every other block on windows shifted by half a window, with a learned relative
position bias per head; the stages halve the resolution (patch merging) and double the width and heads.

On loading (`prepare`), each WindowAttention is replaced, exactly, by a `SwinSlot` holding comcat's
canonical attention with the same weights and the relative position bias B_h as its `logit_bias`
(families/base.py): logits_h = scale q_h k_h^T + B_h + M, M the shifted windows' mask, so W^QK_h is
factorized as in a ViT and B_h, M stay as they are. Blocks are numbered through the stages; the
first block of a stage runs the stage's patch merging before it (`run_block`), so block by block
the tokens pass as they pass in the model: (B, H, W, C) maps.

Swin V2 uses cosine attention, logits_h = tau_h cos(q_h, k_h) + 16 sigmoid(CPB_h), its position bias
made by a small MLP from the relative coordinates (CPB): its canonical attention maps q and k with a
`CosineQK` (qk_maps.py), so its QK path stays dense and W^VO_h is factorized per head, and holds the
CPB as its logit bias; query and value biases, no key bias, as in BEiT."""

from __future__ import annotations

import copy
import math

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from torch import nn

from ...core.errors import ComcatError
from .base import Family, RelativePositionBias, arch_name, check_attention, fused_attention
from .qk_maps import CosineQK, has_qk_map, with_qk_map

DOWNSAMPLE = "_comcat_downsample"  # a plain attribute (no submodule: the weights stay the stage's)


class SwinSlot(nn.Module):
    """Stands where a Swin block keeps its attention: takes its call attn(x, mask) on windows x
    (B nW, N, C) and passes the shifted windows' mask (nW, N, N) on as an additive attention mask."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            windows, N = mask.shape[0], x.shape[1]
            mask = mask.view(1, windows, 1, N, N).expand(x.shape[0] // windows, -1, -1, -1, -1).reshape(-1, 1, N, N)
        return self.attn(x, attn_mask=mask)


@torch.no_grad()
def swin_slot(attn: WindowAttention) -> SwinSlot:
    """A SwinSlot equal to a timm WindowAttention (fused qkv with bias, its relative position bias)."""
    n = attn.window_area
    bias = RelativePositionBias(attn.relative_position_bias_table, attn.relative_position_index.reshape(n, n))
    biases = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None,) * 3
    return SwinSlot(fused_attention(attn.qkv.weight, biases, attn.proj, attn.num_heads, float(attn.scale), bias))


class ContinuousPositionBias(nn.Module):
    """Swin V2's bias B (1, H, N, N) = 16 sigmoid(mlp(coords)[index]): an MLP from the log-spaced
    relative coordinates of every token pair in a window to one logit bias per head."""

    def __init__(self, mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor, heads: int):
        super().__init__()
        self.mlp, self.heads = copy.deepcopy(mlp), heads
        self.register_buffer("coords", coords.detach().clone(), persistent=False)  # recomputed on loading
        self.register_buffer("index", index.detach().clone(), persistent=False)  # (N, N) pair -> table row

    def forward(self) -> torch.Tensor:
        N = self.index.shape[0]
        table = self.mlp(self.coords).view(-1, self.heads)
        return 16 * torch.sigmoid(table[self.index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)).unsqueeze(0)


@torch.no_grad()
def swin_v2_slot(attn: WindowAttentionV2) -> SwinSlot:
    """A SwinSlot equal to a timm Swin V2 WindowAttention: bias [b_q, 0, b_v], cosine attention
    (scale 1 after CosineQK), the continuous position bias."""
    H, n = attn.num_heads, attn.window_size[0] * attn.window_size[1]
    index = attn.relative_position_index.reshape(n, n)
    bias = ContinuousPositionBias(attn.cpb_mlp, attn.relative_coords_table, index, H)
    dense = fused_attention(attn.qkv.weight, (attn.q_bias, attn.k_bias, attn.v_bias), attn.proj, H, 1.0)
    return SwinSlot(with_qk_map(dense, CosineQK(attn.logit_scale), bias))


class TimmSwin(Family):
    name = "timm Swin Transformer"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, (SwinTransformer, SwinTransformerV2))

    def owns_block(self, block: nn.Module) -> bool:
        return isinstance(block, (SwinTransformerBlock, SwinTransformerV2Block))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [b for stage in model.layers for b in stage.blocks]

    def check(self, model: nn.Module) -> None:
        for i, b in enumerate(self.blocks(model)):
            if isinstance(b.attn, (WindowAttention, WindowAttentionV2)):
                if b.attn.qkv.out_features != 3 * b.attn.qkv.in_features:
                    raise ComcatError(
                        f"block {i} sets its own head dimension (head_dim): use a swin_* model without it"
                    )
            elif isinstance(b.attn, SwinSlot):
                check_attention(b.attn.attn, f"block {i} attention")
            else:
                raise ComcatError(f"block {i} attention is {type(b.attn).__name__}: use a timm swin_* model")

    def prepare(self, model: nn.Module) -> nn.Module:
        self.check(model)
        for stage in model.layers:
            for b in stage.blocks:
                if isinstance(b.attn, WindowAttention):
                    b.attn = swin_slot(b.attn)
                elif isinstance(b.attn, WindowAttentionV2):
                    b.attn = swin_v2_slot(b.attn)
            first = stage.blocks[0]
            if not isinstance(stage.downsample, nn.Identity):
                object.__setattr__(first, DOWNSAMPLE, stage.downsample)
        return model

    def attention(self, block: nn.Module) -> nn.Module:
        if not isinstance(block.attn, SwinSlot):
            raise ComcatError("a Swin attention is converted on loading: load the model with comcat.load_model")
        return block.attn.attn

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        block.attn.attn = module

    def mlp(self, block: nn.Module) -> dict[str, nn.Module]:
        return {"fc1": block.mlp.fc1, "fc2": block.mlp.fc2}

    def set_mlp(self, block: nn.Module, name: str, module: nn.Module) -> None:
        setattr(block.mlp, name, module)

    def run_block(self, block: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        merge = getattr(block, DOWNSAMPLE, None)
        return block(h if merge is None else merge(h))

    def output(self, model: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return model.forward_head(model.norm(h))

    def classifiers(self, model: nn.Module) -> dict[str, nn.Module]:
        fc = getattr(model.head, "fc", None)
        return {"head": fc} if hasattr(fc, "in_features") else {}

    def set_classifier(self, model: nn.Module, name: str, module: nn.Module) -> None:
        model.head.fc = module

    def read_tokens(self, model: nn.Module) -> list[int]:
        return []  # global average pooling

    def num_tokens(self, model: nn.Module) -> int:
        return self.block_tokens(model)[0][0]

    def block_tokens(self, model: nn.Module) -> list[tuple[int, int]]:
        """Per block: tokens per image (padded to whole windows) and the tokens each one attends to."""
        out = []
        for b in self.blocks(model):
            wh, ww = b.window_size
            h, w = b.input_resolution
            out.append((math.ceil(h / wh) * wh * math.ceil(w / ww) * ww, wh * ww))
        return out

    def patch_flops(self, model: nn.Module) -> int:
        """The patch embedding and the patch merging linears (4C -> 2C per merged token)."""
        pe = model.patch_embed.proj
        grid = model.patch_embed.grid_size
        flops = 2 * grid[0] * grid[1] * pe.weight[0].numel() * pe.out_channels
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                h, w = stage.blocks[0].input_resolution
                lin = stage.downsample.reduction
                flops += 2 * h * w * lin.in_features * lin.out_features
        return flops

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)

    def describe(self, model: nn.Module) -> str:
        arch = arch_name(model)
        if has_qk_map(self.attention(self.blocks(model)[0])):
            return (
                f"{self.name} V2 ({arch}), cosine attention: per-head W^VO_h of every block's window attention, "
                "stage by stage; W^Q and W^K stay dense, as the cosine makes the logits no bilinear form (the "
                "position bias and the shifted windows' mask stay as they are; the MLP linears too when asked)"
            )
        return (
            f"{self.name} ({arch}): per-head W^QK_h and W^VO_h of every block's window attention, stage by "
            "stage (the relative position bias and the shifted windows' mask stay as they are; the MLP linears "
            "too when asked)"
        )
