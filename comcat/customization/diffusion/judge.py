"""Judge generated shapes images: the shape by the embedded ViT classifier, the colour by the
foreground pixels (those far from the border's median colour) matched to the palette."""

from __future__ import annotations

import numpy as np
import torch

from ...core.embedded import shapes_tensor
from ...core.shapes import COLOURS, SHAPES

PALETTE = np.array(list(COLOURS.values()), np.float32)


def colour_of(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> the palette colour nearest to the mean of the foreground pixels."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.linalg.norm(img - np.median(border, 0), axis=-1)
    fg = img[dist > 0.6 * dist.max()] if dist.max() > 0 else img.reshape(-1, 3)
    return list(COLOURS)[int(np.linalg.norm(PALETTE - fg.mean(0), axis=1).argmin())]


@torch.no_grad()
def judge(images: np.ndarray, classifier: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(N, 32, 32, 3) uint8 -> (shape names by the classifier, colour names)."""
    classifier.eval()
    logits = torch.cat([classifier(shapes_tensor(images[i : i + 256])) for i in range(0, len(images), 256)])
    return [SHAPES[i] for i in logits.argmax(1).tolist()], [colour_of(im) for im in images]


def rates(images: np.ndarray, classifier, shape: str | list[str], colour: str | list[str]) -> dict:
    """Fractions of images judged as the prompted shape and as the prompted colour."""
    shapes, colours = judge(images, classifier)
    n = len(images)
    shape = [shape] * n if isinstance(shape, str) else shape
    colour = [colour] * n if isinstance(colour, str) else colour
    return dict(
        shape=float(np.mean([a == b for a, b in zip(shapes, shape)])),
        colour=float(np.mean([a == b for a, b in zip(colours, colour)])),
        both=float(np.mean([a == b and c == d for a, b, c, d in zip(shapes, shape, colours, colour)])),
        images=n,
    )
