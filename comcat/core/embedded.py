"""The embedded default: a small timm ViT trained on the procedural shapes world."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from .shapes import SHAPES

ASSETS = Path(__file__).resolve().parents[2] / "assets"  # the repository's assets/ (an editable install)
EMBEDDED_ARCH = "comcat_shapes_vit"
EMBEDDED_WEIGHTS = ASSETS / "shapes_vit.safetensors"
EMBEDDED_RECORD = ASSETS / "shapes_vit.json"
EMBEDDED_KWARGS = dict(
    img_size=32,
    patch_size=8,
    num_classes=len(SHAPES),
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    qkv_bias=True,
)
# timm data config (what timm.data.resolve_data_config reads from model.pretrained_cfg)
EMBEDDED_DATA_CFG = dict(
    input_size=(3, 32, 32),
    interpolation="bicubic",
    crop_pct=1.0,
    crop_mode="center",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    num_classes=len(SHAPES),
    label_names=list(SHAPES),
)


def build_shapes_vit(**overrides) -> VisionTransformer:
    """The embedded architecture, randomly initialised: 6 blocks, 4 heads of dim 32, width 128."""
    model = VisionTransformer(**{**EMBEDDED_KWARGS, **overrides})
    model.pretrained_cfg = dict(EMBEDDED_DATA_CFG, architecture=EMBEDDED_ARCH)
    return model


def shapes_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) normalised with mean = std = 0.5."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
