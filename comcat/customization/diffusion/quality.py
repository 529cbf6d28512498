"""Quality of the embedded text-to-image model, judged by the embedded ViT (see judge.py)."""

from __future__ import annotations

import numpy as np
import torch

from ...core.shapes import COLOURS
from .judge import rates
from .pipeline import guidance_kwargs
from .shapes_t2i import HELD_OUT, TRAIN_SHAPES


def sample(
    pipe,
    prompts: list[str],
    per_prompt: int,
    seed: int,
    steps: int = 25,
    guidance: float | None = None,
    batch: int = 64,
) -> np.ndarray:
    """(len(prompts) * per_prompt, H, W, 3) uint8, prompt-major, from one seed (guidance None: the
    pipeline's default)."""
    gen = torch.Generator().manual_seed(seed)
    todo = [p for p in prompts for _ in range(per_prompt)]
    out = [
        pipe(
            todo[i : i + batch], generator=gen, num_inference_steps=steps, **guidance_kwargs(guidance), output_type="np"
        ).images
        for i in range(0, len(todo), batch)
    ]
    return np.concatenate(out)


def base_quality(pipe, classifier, per_prompt: int = 4, seed: int = 0, **kw) -> dict:
    """'a {colour} {shape}' for every trained shape and colour: rates of the prompted shape/colour."""
    pairs = [(s, c) for s in TRAIN_SHAPES for c in COLOURS]
    images = sample(pipe, [f"a {c} {s}" for s, c in pairs], per_prompt, seed, **kw)
    return rates(
        images,
        classifier,
        [s for s, _ in pairs for _ in range(per_prompt)],
        [c for _, c in pairs for _ in range(per_prompt)],
    )


def concept_quality(
    pipe, classifier, token: str = "V*", concept: str = HELD_OUT, per_colour: int = 8, seed: int = 0, **kw
) -> dict:
    """'a {token} in {colour}' for every colour: rates of the concept's shape and the prompted colour."""
    images = sample(pipe, [f"a {token} in {c}" for c in COLOURS], per_colour, seed, **kw)
    return rates(images, classifier, concept, [c for c in COLOURS for _ in range(per_colour)])
