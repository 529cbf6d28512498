"""Sampling with adapters: `python -m comcat generate` and the app's Generate tab."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import ComcatError
from ..core.files import atomic_write
from .adapter import load_adapter
from .diffusion.pipeline import guidance_kwargs


def parse_adapter_arg(arg: str) -> tuple[str, float | None]:
    """'DIR' or 'DIR:SCALE' -> (path, scale or None)."""
    path, sep, scale = arg.rpartition(":")
    if not sep or not path:
        return arg, None
    try:
        value = float(scale)
    except ValueError:
        return arg, None
    if not math.isfinite(value):
        raise ComcatError(f"--adapter {arg}: the strength after ':' must be a finite number, e.g. {path}:0.8")
    return path, value


def with_adapters(pipe, adapters: list[tuple[str, float | None]]) -> list[str]:
    """Load each (path, scale) into `pipe` under its own name; returns the names."""
    return [load_adapter(pipe, path, scale=scale, name=f"a{i}") for i, (path, scale) in enumerate(adapters)]


def generate(pipe, prompt: str, seed: int = 0, steps: int = 25, guidance: float | None = None, n: int = 1):
    """n images (PIL) of `prompt` from a fixed seed (guidance None: the pipeline's default)."""
    if not prompt.strip():
        raise ComcatError("the prompt is empty: describe the image, e.g. 'a V* in blue'")
    if steps < 1 or n < 1:
        raise ComcatError("--steps and --n must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    images = pipe(
        prompt,
        num_images_per_prompt=n,
        generator=gen,
        num_inference_steps=steps,
        output_type="np",
        **guidance_kwargs(guidance),
    ).images
    if images.dtype != np.uint8:  # diffusers pipelines: floats in [0, 1]
        if not np.isfinite(images).all():
            raise ComcatError(
                "sampling produced NaN/inf values: a loaded adapter or the model is broken "
                "(retrain it, lower its strength, or generate without it)"
            )
        images = (images.clip(0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in images]


def save_image(image, path: str | Path) -> Path:
    """Save a PIL image atomically (temp name, then rename); the suffix picks the format."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ComcatError(f"--out {path}: give an image file name ending in .png, .jpg or .webp")
    return atomic_write(path, image.save)
