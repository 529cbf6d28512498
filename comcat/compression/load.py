"""Loading any model from a SPEC: embedded, a timm name, a checkpoint file (+ arch), or a compressed-model directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.embedded import EMBEDDED_ARCH
from ..core.errors import ComcatError
from .hub import HUB_ID, HUB_ID_RULE, load_transformers, read_config, sentence_pooling
from .models import CHECKPOINT_SUFFIXES, Loaded, load_checkpoint, load_embedded, load_timm_export, load_timm_pretrained


def load_model(spec: str = "embedded", arch: str | None = None) -> Loaded:
    """Load from a SPEC: 'embedded' | a compressed-model folder | a checkpoint file (+ arch) | a timm
    name (timm:NAME is never read as a path) | a timm export on the hub (hf-hub:org/name) or in a
    folder (config.json + weights) | a transformers model in a folder (save_pretrained) or on the hub
    (org/name; hf:org/name is never read as a path)."""
    spec = str(spec).strip()
    if len(spec) > 4096:
        raise ComcatError(f"the model spec is {len(spec):,} characters long: give a path, a timm name or a hub id")
    if spec in ("", "embedded", EMBEDDED_ARCH):
        return load_embedded()
    if spec.startswith("timm:"):
        return load_timm_pretrained(spec.removeprefix("timm:"))
    if spec.startswith("hf-hub:"):
        return load_timm_export(spec)
    if spec.startswith("hf:"):  # a Hugging Face hub id, never read as a path
        return _load_hub(spec.removeprefix("hf:"))
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path)
    if path.suffix in CHECKPOINT_SUFFIXES or path.exists() or spec.startswith((".", os.sep, "~")):
        return load_checkpoint(path, arch)
    if HUB_ID.fullmatch(spec):
        return _load_hub(spec)
    if spec.count("/") == 1 and not path.exists():
        raise ComcatError(f"{spec!r} is neither a file nor a hub id: {HUB_ID_RULE}")
    if os.sep in spec:
        return load_checkpoint(path, arch)
    import timm

    if timm.is_model(spec):
        return load_timm_pretrained(spec)
    raise ComcatError(
        f"{spec!r} is not 'embedded', a file, a compressed-model directory or a timm model "
        "name: try deit_small_patch16_224 or a path"
    )


def _load_folder(path: Path) -> Loaded:
    """A compressed-model folder (comcat.json), a transformers folder (config.json with a model_type),
    or a timm export (config.json naming an architecture)."""
    import json

    from .format import COMPRESSED_META, load_compressed

    config = path / "config.json"
    if (path / COMPRESSED_META).is_file():
        return load_compressed(path)
    st = sentence_pooling(path)
    if st is not None:  # a sentence-transformers folder: its transformer (maybe in a sub-folder) and pooling
        sub, mode, normalize = st
        where = str(path / sub) if sub else str(path)
        cfg = read_config(str(path), where)
        model, arch, kwargs = load_transformers(str(path), where, False, cfg, (mode, normalize))
        return Loaded(model, arch, kwargs, str(path))
    if not config.is_file():
        raise ComcatError(
            f"{path} has neither {COMPRESSED_META} nor config.json: pass a compressed-model folder ('comcat compress "
            "... --out DIR'), a folder written by save_pretrained, or a checkpoint file with --arch"
        )
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ComcatError(f"{config} is not valid JSON: export the model again") from None
    if isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg:
        return _transformers(path.name, str(path), False, cfg)
    return load_timm_export(f"local-dir:{path}")


def _load_hub(hub_id: str) -> Loaded:
    """A Hugging Face hub id: a transformers model, or a timm export."""
    if not HUB_ID.fullmatch(hub_id):
        raise ComcatError(f"{hub_id[:100]!r} is not a hub id: {HUB_ID_RULE}, e.g. google/vit-base-patch16-224")
    cfg = read_config(hub_id, hub_id, hub=True)
    if "model_type" not in cfg and "architecture" in cfg:
        return load_timm_export(f"hf-hub:{hub_id}")
    return _transformers(hub_id, hub_id, True, cfg)


def _transformers(source: str, where: str, hub: bool, cfg: dict) -> Loaded:
    model, arch, kwargs = load_transformers(source, where, hub, cfg)
    return Loaded(model, arch, kwargs, source if hub else where)
