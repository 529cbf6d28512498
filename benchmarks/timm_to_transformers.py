"""Re-save a timm ViT (class token, token pooling: vit_*, the embedded shapes ViT) as a Hugging Face
transformers ViTForImageClassification folder (save_pretrained layout), with the same weights.

    python benchmarks/timm_to_transformers.py [--model SPEC] [--arch NAME] --out DIR

The default model is the real ViT-Tiny in ../shared/data/. The transformers copy computes the same
function (checked here on random inputs before saving), so comcat's spectra of the two must agree:
benchmarks/families.py --spectra compares them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

SHARED_VIT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vit_tiny_patch16_224.safetensors"


def convert(model) -> torch.nn.Module:
    """A transformers ViTForImageClassification equal to a timm VisionTransformer with a class token."""
    from transformers import ViTConfig, ViTForImageClassification

    if getattr(model, "global_pool", "token") != "token" or getattr(model, "num_reg_tokens", 0):
        raise ValueError("only class-token ViTs without register tokens convert")
    C, blocks = model.embed_dim, list(model.blocks)
    attn = blocks[0].attn
    cfg = ViTConfig(
        hidden_size=C,
        num_hidden_layers=len(blocks),
        num_attention_heads=attn.num_heads,
        intermediate_size=blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",
        layer_norm_eps=model.norm.eps,
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        qkv_bias=attn.qkv.bias is not None,
        num_labels=model.num_classes,
    )
    hf = ViTForImageClassification(cfg).eval()
    sd = {
        "vit.embeddings.cls_token": model.cls_token,
        "vit.embeddings.position_embeddings": model.pos_embed,
        "vit.embeddings.patch_embeddings.projection.weight": model.patch_embed.proj.weight,
        "vit.embeddings.patch_embeddings.projection.bias": model.patch_embed.proj.bias,
        "vit.layernorm.weight": model.norm.weight,
        "vit.layernorm.bias": model.norm.bias,
        "classifier.weight": model.head.weight,
        "classifier.bias": model.head.bias,
    }
    for i, b in enumerate(blocks):
        p = f"vit.layers.{i}."
        qkv_w, qkv_b = b.attn.qkv.weight.chunk(3), (b.attn.qkv.bias.chunk(3) if b.attn.qkv.bias is not None else None)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[p + f"attention.{name}.weight"] = qkv_w[j]
            if qkv_b is not None:
                sd[p + f"attention.{name}.bias"] = qkv_b[j]
        sd |= {
            p + "attention.o_proj.weight": b.attn.proj.weight,
            p + "attention.o_proj.bias": b.attn.proj.bias,
            p + "layernorm_before.weight": b.norm1.weight,
            p + "layernorm_before.bias": b.norm1.bias,
            p + "layernorm_after.weight": b.norm2.weight,
            p + "layernorm_after.bias": b.norm2.bias,
            p + "mlp.fc1.weight": b.mlp.fc1.weight,
            p + "mlp.fc1.bias": b.mlp.fc1.bias,
            p + "mlp.fc2.weight": b.mlp.fc2.weight,
            p + "mlp.fc2.bias": b.mlp.fc2.bias,
        }
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion left keys out: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf


def main() -> None:
    from comcat.compression.load import load_model
    from comcat.compression.models import data_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED_VIT), help="timm model SPEC (default: the shared ViT-Tiny)")
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    loaded = load_model(args.model, args.arch)
    hf = convert(loaded.model)
    x = torch.randn(4, *data_config(loaded.model)["input_size"])
    with torch.no_grad():
        err = (hf(pixel_values=x).logits - loaded.model(x)).abs().max().item()
    print(f"max |logit difference| timm vs transformers on random inputs: {err:.2e}")
    hf.save_pretrained(args.out)
    dc = data_config(loaded.model)
    (args.out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "ViTImageProcessor",
                "image_mean": list(dc["mean"]),
                "image_std": list(dc["std"]),
                "resample": 3 if dc["interpolation"] == "bicubic" else 2,
                "size": {"shortest_edge": math.floor(dc["input_size"][1] / dc["crop_pct"])},  # timm's resize
                "crop_size": {"height": dc["input_size"][1], "width": dc["input_size"][2]},
                "do_resize": True,
                "do_normalize": True,
                "do_center_crop": True,
            },
            indent=2,
        )
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
