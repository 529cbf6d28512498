"""Loading any model from a SPEC: embedded, a timm name, a checkpoint file (+ arch), or a compressed-model directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.embedded import EMBEDDED_ARCH
from ..core.errors import ComcatError
from .models import (
    CHECKPOINT_SUFFIXES,
    HUB_ID,
    Loaded,
    load_checkpoint,
    load_embedded,
    load_timm_export,
    load_timm_pretrained,
)


def load_model(spec: str = "embedded", arch: str | None = None) -> Loaded:
    """Load from a SPEC: 'embedded' | a compressed-model folder | a checkpoint file (+ arch) | a timm
    name (timm:NAME is never read as a path) | a timm export on the hub (hf-hub:org/name) or in a
    folder (config.json + weights)."""
    spec = str(spec).strip()
    if spec in ("", "embedded", EMBEDDED_ARCH):
        return load_embedded()
    if spec.startswith("timm:"):
        return load_timm_pretrained(spec.removeprefix("timm:"))
    if spec.startswith("hf-hub:"):
        return load_timm_export(spec)
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path)
    if path.suffix in CHECKPOINT_SUFFIXES or path.exists() or spec.startswith((".", os.sep, "~")):
        return load_checkpoint(path, arch)
    if HUB_ID.fullmatch(spec):
        raise ComcatError(
            f"{spec} is not a local file or folder; as a Hugging Face hub id: write hf-hub:{spec} for a timm model "
            "on the hub (Hugging Face transformers models are not supported yet)"
        )
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
    """A compressed-model folder (comcat.json), or a timm export (config.json naming an architecture)."""
    import json

    from .format import COMPRESSED_META, load_compressed

    config = path / "config.json"
    if (path / COMPRESSED_META).is_file() or not config.is_file():
        return load_compressed(path)
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ComcatError(f"{config} is not valid JSON: export the model again") from None
    if isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg:
        raise ComcatError(
            f"{path.name} is a Hugging Face transformers model ({cfg['model_type']}), which comcat does not load yet: "
            "use a timm model (vit_*, deit_*, deit3_*; a name, a checkpoint file with its architecture, or a timm "
            "export folder)"
        )
    return load_timm_export(f"local-dir:{path}")
