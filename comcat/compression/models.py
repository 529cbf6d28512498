"""Dense models: the embedded one, timm names with pretrained weights, local checkpoints (+ arch).
Every failure is a ComcatError with a one-line fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.embedded import EMBEDDED_ARCH, EMBEDDED_DATA_CFG, EMBEDDED_WEIGHTS, build_shapes_vit
from ..core.errors import ComcatError, first_line
from . import families
from .hub import HUB_ID, TRANSFORMERS, build_transformers, check_reachable

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class Loaded:
    """A model plus how to rebuild its architecture: timm name (or the embedded one) and kwargs."""

    model: nn.Module
    arch: str
    arch_kwargs: dict = field(default_factory=dict)
    source: str = ""
    meta: dict = field(default_factory=dict)  # comcat.json of a compressed model, else {}

    @property
    def compressed(self) -> bool:
        return bool(self.meta)


def build_arch(arch: str, **kwargs) -> nn.Module:
    """A randomly initialised architecture: the embedded ViT or any timm model name."""
    if arch == EMBEDDED_ARCH:
        return build_shapes_vit(**kwargs)
    if arch.startswith(TRANSFORMERS):
        return build_transformers(arch.removeprefix(TRANSFORMERS), **kwargs)
    import timm

    if not timm.is_model(arch):
        raise ComcatError(
            f"unknown architecture {arch!r}: use a timm model name such as vit_tiny_patch16_224 "
            "or deit_small_patch16_224"
        )
    return timm.create_model(arch, pretrained=False, **kwargs)


def has_classifier(model: nn.Module) -> bool:
    """Whether the model ends in a classifier (timm: num_classes > 0); without one it outputs a
    pooled embedding, and comcat measures fidelity to the dense model instead of top-1."""
    return getattr(model, "num_classes", 1) > 0


def check_supported(model: nn.Module, name: str) -> nn.Module:
    try:
        families.check(model)
    except ComcatError as e:
        raise ComcatError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or (weights_only) .pth/.pt/.bin; unwraps {'model': ...}
    / {'state_dict': ...} and DDP 'module.' prefixes."""
    if not path.is_file():
        raise ComcatError(f"checkpoint {path} does not exist: check the path")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ComcatError(f"{path.name}: unsupported checkpoint type {path.suffix!r}; use one of {CHECKPOINT_SUFFIXES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, truncated download...
        first = first_line(e)
        raise ComcatError(f"could not read checkpoint {path.name} ({first}): re-download or re-export it") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ComcatError(f"{path.name} does not hold a state dict of tensors: save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_checkpoint(path: str | Path, arch: str | None) -> Loaded:
    """A local checkpoint file of a timm architecture `arch`."""
    path = Path(path)
    if not path.is_file():
        raise ComcatError(f"checkpoint {path} does not exist: check the path")
    sd = read_state_dict(path)
    if arch is None:
        raise ComcatError(
            f"{path.name} is a bare checkpoint: also pass its architecture, e.g. "
            f"--arch {guess_arch(sd) or 'vit_tiny_patch16_224'}"
        )
    kwargs = {}
    head = sd.get("head.weight")
    probe = build_arch(arch)
    if head is not None and getattr(probe, "num_classes", None) != head.shape[0]:
        kwargs["num_classes"] = head.shape[0]
        probe = build_arch(arch, **kwargs)
    elif head is None and getattr(probe, "num_classes", 0) > 0 and any(k.startswith("blocks.") for k in sd):
        kwargs["num_classes"] = 0  # a backbone without a classifier (e.g. DINOv2-style weights)
        probe = build_arch(arch, **kwargs)
    model = check_supported(probe, arch)
    guess = guess_arch(sd)
    check_finite(sd, path.name)
    load_state(
        model,
        sd,
        f"{path.name} does not match {arch}",
        f"pass the right --arch{f' (its shapes fit {guess})' if guess and guess != arch else ''}",
    )
    return Loaded(families.prepare(model).eval(), arch, kwargs, str(path))


VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def guess_arch(sd: dict) -> str | None:
    """The timm ViT / DeiT name whose shapes a state dict has (width, depth, patch, image size), or
    None: width 192, 12 blocks, patch 16, 197 tokens -> vit_tiny_patch16_224."""
    import math

    import timm

    proj, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if proj is None or pos is None or proj.ndim != 4 or VIT_SIZES.get(proj.shape[0]) is None:
        return None
    prefix = 2 if "dist_token" in sd else 1
    side = math.isqrt(max(pos.shape[1] - prefix, 0))
    family = "deit" if "dist_token" in sd else "vit"
    size = VIT_SIZES[proj.shape[0]]
    name = f"{family}_{size}_{'distilled_' if prefix == 2 else ''}patch{proj.shape[-1]}_{side * proj.shape[-1]}"
    if not timm.is_model(name) or (size == "base" and depth != 12) or (size in ("tiny", "small") and depth != 12):
        return None
    return name


def guess_checkpoint_arch(path: str | Path) -> str | None:
    """The architecture a checkpoint file's shapes fit (a timm ViT / DeiT name, or the embedded
    model's), or None when it cannot tell or cannot read the file."""
    try:
        sd = read_state_dict(Path(path))
    except ComcatError:
        return None
    guess = guess_arch(sd)
    if guess is None:
        embedded = load_embedded().model.state_dict()
        if sd.keys() == embedded.keys() and all(sd[k].shape == embedded[k].shape for k in sd):
            guess = EMBEDDED_ARCH
    return guess


def check_finite(sd: dict, where: str) -> None:
    """A one-line error when a floating-point tensor of `sd` holds NaN or inf."""
    broken = next((k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:
        raise ComcatError(f"{where}: {broken} holds NaN or inf values: the weights are broken, export them again")


def load_state(model: nn.Module, sd: dict, what: str, fix: str) -> None:
    """Strict load_state_dict whose failure (missing, unexpected or mis-shaped keys) is one line."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        shape = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), "shapes differ")
        raise ComcatError(f"{what} ({shape[:160]}): {fix}") from None
    if missing or unexpected:
        raise ComcatError(
            f"{what} (missing {len(missing)} keys e.g. {missing[:2]}, unexpected "
            f"{len(unexpected)} e.g. {unexpected[:2]}): {fix}"
        )


def load_timm_pretrained(name: str) -> Loaded:
    """A timm ViT-family model with pretrained weights (download or local hub cache)."""
    import timm

    if not timm.is_model(name):
        raise ComcatError(f"{name!r} is not a timm model name: try vit_tiny_patch16_224 or deit_small_patch16_224")
    check_supported(timm.create_model(name, pretrained=False), name)
    check_reachable(name)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        first = first_line(e)
        raise ComcatError(
            f"could not get pretrained weights for {name} (offline? {first}): download them "
            f"where you have network, or pass a local file with --model PATH --arch {name}"
        ) from None
    return Loaded(families.prepare(model).eval(), name, {}, f"timm:{name}")


def load_timm_export(source: str) -> Loaded:
    """A timm model exported as config.json + weights (timm's push_to_hub / save_for_hf layout): on the
    Hugging Face hub (SPEC hf-hub:org/name, from the hub or the local hub cache) or in a local folder
    (local-dir:PATH). The Loaded names the timm architecture and the config's model arguments, so a
    compressed copy reloads without the hub."""
    import timm
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    kind, where = source.split(":", 1)
    if kind == "hf-hub":
        if not HUB_ID.fullmatch(where):
            raise ComcatError(
                f"{source[:100]} is not a hub id: write hf-hub:org/name, e.g. hf-hub:timm/vit_tiny_patch16_224."
                "augreg_in21k (org and name: letters, digits, '-', '_', '.', no '..')"
            )
        check_reachable(source, where, ("config.json",))
    try:
        _, arch, model_args = (
            load_model_config_from_hf(where) if kind == "hf-hub" else load_model_config_from_path(where)
        )
    except Exception as e:
        first = first_line(e)
        raise ComcatError(f"{source} has no readable timm config.json ({first}): is it a timm model?") from None
    if not timm.is_model(arch):
        raise ComcatError(f"{source} names the architecture {arch!r}, which this timm does not know: update timm")
    check_supported(build_arch(arch, **model_args), f"{source} ({arch})")
    if kind == "hf-hub":
        check_reachable(source, where, ("model.safetensors", "pytorch_model.bin"))
    try:
        model = timm.create_model(source, pretrained=True)
    except Exception as e:
        first = first_line(e)
        raise ComcatError(
            f"could not read the weights of {source} ({first}): download them again, or pass a local file with "
            f"--model PATH --arch {arch}"
        ) from None
    return Loaded(families.prepare(model).eval(), arch, dict(model_args), source if kind == "hf-hub" else where)


def load_embedded() -> Loaded:
    if not EMBEDDED_WEIGHTS.is_file():
        raise ComcatError(f"embedded weights {EMBEDDED_WEIGHTS} are missing: run python assets/train_shapes_vit.py")
    model = build_shapes_vit()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(EMBEDDED_WEIGHTS)))
    return Loaded(model.eval(), EMBEDDED_ARCH, {}, "embedded")


def data_config(model: nn.Module) -> dict:
    """The model's timm data config (input size, interpolation, crop, mean/std)."""
    from timm.data import resolve_data_config

    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture") == EMBEDDED_ARCH:
        return {
            k: EMBEDDED_DATA_CFG[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
        }
    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = families.input_size(model)  # the size the model was built for
    return cfg
