"""Loading any model from a SPEC: embedded, a timm name, a checkpoint file (+ arch), or a compressed-model directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.embedded import EMBEDDED_ARCH
from ..core.errors import ComcatError
from .models import CHECKPOINT_SUFFIXES, Loaded, load_checkpoint, load_embedded, load_timm_pretrained


def load_model(spec: str = "embedded", arch: str | None = None) -> Loaded:
    """Load from a SPEC: 'embedded' | compressed dir | checkpoint file (+ arch) | timm name."""
    spec = str(spec).strip()
    if spec in ("", "embedded", EMBEDDED_ARCH):
        return load_embedded()
    if spec.startswith("timm:"):  # a timm name, never read as a path
        return load_timm_pretrained(spec.removeprefix("timm:"))
    path = Path(spec)
    if path.is_dir():
        from .format import load_compressed

        return load_compressed(path)
    if path.suffix in CHECKPOINT_SUFFIXES or os.sep in spec or path.exists():
        return load_checkpoint(path, arch)
    import timm

    if timm.is_model(spec):
        return load_timm_pretrained(spec)
    raise ComcatError(
        f"{spec!r} is not 'embedded', a file, a compressed-model directory or a timm model "
        "name: try deit_small_patch16_224 or a path"
    )
