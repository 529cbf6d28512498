"""The architecture interface (see base.py): every function here dispatches to the family that owns
the model or block. Add a family by subclassing `Family` and listing it in FAMILIES."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import ComcatError
from .base import Family, HeadWeights, arch_name, canonical_attention, check_attention, head_weights, matrix_weights
from .hf_encoders import SUPPORTED as HF_SUPPORTED
from .hf_encoders import Transformers
from .timm_eva import TimmEva
from .timm_swin import TimmSwin
from .timm_vit import TimmViT

FAMILIES: list[Family] = [TimmEva(), TimmSwin(), TimmViT(), Transformers()]  # first match owns
SUPPORTED = (
    "timm vit_*, deit_*, deit3_*, beit_*, eva02_*, vit_*_rope_*, swin_*, swinv2_* (not swinv2_cr_*) models and the "
    "timm DINOv2 / CLIP / SigLIP ViTs, "
    f"e.g. deit_small_patch16_224; {HF_SUPPORTED}"
)

__all__ = [
    "Family",
    "HeadWeights",
    "canonical_attention",
    "check_attention",
    "head_weights",
    "matrix_weights",
]


def family_of(model: nn.Module) -> Family:
    """The family that owns `model`; ComcatError naming what is supported otherwise."""
    for f in FAMILIES:
        if f.owns(model):
            return f
    raise ComcatError(f"{arch_name(model)} is not a model family comcat supports: use {SUPPORTED}")


def _block_family(block: nn.Module) -> Family:
    for f in FAMILIES:
        if f.owns_block(block):
            return f
    raise ComcatError(f"{type(block).__name__} is not a transformer block comcat knows")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a supported model; ComcatError otherwise."""
    return family_of(model).blocks(model)


def check(model: nn.Module) -> None:
    """ComcatError unless every block's attention can be factorized (after prepare)."""
    family_of(model).check(model)


def prepare(model: nn.Module) -> nn.Module:
    """Put comcat's canonical attention in every block, exactly (in place; idempotent)."""
    return family_of(model).prepare(model)


def block_names(model: nn.Module) -> list[str]:
    return family_of(model).block_names(model)


def attention(block: nn.Module) -> nn.Module:
    return _block_family(block).attention(block)


def set_attention(block: nn.Module, module: nn.Module) -> None:
    _block_family(block).set_attention(block, module)


def mlp(block: nn.Module) -> dict[str, nn.Module]:
    return _block_family(block).mlp(block)


def set_mlp(block: nn.Module, name: str, module: nn.Module) -> None:
    _block_family(block).set_mlp(block, name, module)


def run_block(block: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output tokens for input tokens h; `valid` (B, N) bool: the tokens that are not padding."""
    return _block_family(block).run_block(block, h, valid)


def output(model: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    return family_of(model).output(model, h, valid)


def token_mask(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """(B, N) bool, True where a token of input x is not padding (a text encoder's); None: no padding."""
    return family_of(model).token_mask(model, x)


def classifiers(model: nn.Module) -> dict[str, nn.Module]:
    return family_of(model).classifiers(model)


def set_classifier(model: nn.Module, name: str, module: nn.Module) -> None:
    family_of(model).set_classifier(model, name, module)


def read_tokens(model: nn.Module) -> list[int]:
    return family_of(model).read_tokens(model)


def num_tokens(model: nn.Module) -> int:
    return family_of(model).num_tokens(model)


def block_tokens(model: nn.Module) -> list[tuple[int, int]]:
    return family_of(model).block_tokens(model)


def patch_flops(model: nn.Module) -> int:
    return family_of(model).patch_flops(model)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    return family_of(model).input_size(model)


def example_input(model: nn.Module, batch: int = 1, input_size=None) -> torch.Tensor:
    return family_of(model).example_input(model, batch, input_size)


def describe(model: nn.Module) -> str:
    return family_of(model).describe(model)


class StopPass(Exception):
    """Raised from a forward hook to end a pass once what it needed is kept."""


def run_capturing(
    block: nn.Module,
    h: torch.Tensor,
    modules: dict[str, nn.Module],
    stop: bool = False,
    valid: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Run `block` on tokens h, keeping the input (first positional argument) of each module in
    `modules` by name, and as "<name>.mask" the attention mask it was called with, if any (Swin's
    shifted windows, a text encoder's padding). stop: end the pass once all are kept (output None)."""
    kept: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, kwargs):
            kept[name] = args[0]
            if isinstance(kwargs.get("attn_mask"), torch.Tensor):
                kept[f"{name}.mask"] = kwargs["attn_mask"]
            if stop and all(n in kept for n in modules):
                raise StopPass

        return hook

    hooks = [m.register_forward_pre_hook(keep(n), with_kwargs=True) for n, m in modules.items()]
    try:
        out = run_block(block, h, valid)
    except StopPass:
        out = None
    finally:
        for hk in hooks:
            hk.remove()
    return kept, out
