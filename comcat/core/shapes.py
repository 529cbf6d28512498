"""Procedural *shapes* world: coloured shapes on random backgrounds, generated from a seed.

Every image is drawn from (shape, colour, background) with a random size, position and
rotation; a 4x supersampled mask is box-filtered down, so edges are anti-aliased. The same
seed always gives the same images, so datasets are never committed, only regenerated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "crescent", "arrow", "semicircle")

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "magenta": (220, 40, 200),
    "cyan": (30, 210, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = ("dark", "light")
SUPERSAMPLE = 4


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16.5


def _outlines(shape: str) -> list[tuple[np.ndarray, int]]:
    """Polygons in unit coordinates, each with its mask value (255 fill, 0 cut out)."""
    a = 0.3  # half width of the cross arms / arrow shaft
    table = {
        "circle": [(_circle(), 255)],
        "square": [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), 255)],
        "triangle": [(_circle(3, 1.0) @ np.array([[0, 1], [1, 0]]) * [1, -1] + [0, 0.2], 255)],
        "star": [(_star(), 255)],
        "cross": [
            (
                np.array(
                    [
                        [-a, -1],
                        [a, -1],
                        [a, -a],
                        [1, -a],
                        [1, a],
                        [a, a],
                        [a, 1],
                        [-a, 1],
                        [-a, a],
                        [-1, a],
                        [-1, -a],
                        [-a, -a],
                    ]
                ),
                255,
            )
        ],
        "heart": [(_heart(), 255)],
        "ring": [(_circle(), 255), (_circle(r=0.55), 0)],
        "crescent": [(_circle(), 255), (_circle(r=0.85, cx=0.5, cy=-0.1), 0)],
        "arrow": [(np.array([[-1, -a], [0.15, -a], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, a], [-1, a]]), 255)],
        "semicircle": [(np.concatenate([_circle(33)[:17], [[-1, 0]]]) * [1, -1] + [0, 0.42], 255)],
    }
    return table[shape]


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `caption` is its text description."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def _mask(spec_shape: str, size: int, centre, radius: float, angle: float) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of one rotated, scaled shape."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for poly, fill in _outlines(spec_shape):
        pts = (poly @ rot.T * radius + centre) * SUPERSAMPLE
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _background(rng: np.random.Generator, kind: str, size: int, avoid) -> np.ndarray:
    """(size, size, 3) float32: a tinted gradient with a little noise, far from `avoid`."""
    while True:
        level = rng.uniform(10, 80) if kind == "dark" else rng.uniform(170, 240)
        tint = rng.normal(0, 18, 3)
        base = np.clip(level + tint, 0, 255)
        if abs(_luma(base) - _luma(avoid)) > 60 or np.linalg.norm(base - avoid) > 160:
            break
    grad_dir = rng.normal(size=2)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    grad = (xx * grad_dir[0] + yy * grad_dir[1])[..., None] * rng.uniform(0, 40)
    noise = rng.normal(0, rng.uniform(0, 6), (size, size, 3))
    return np.clip(base + grad + noise, 0, 255).astype(np.float32)


def render(spec: ShapeSpec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One (size, size, 3) uint8 image of `spec` at a random size, position and rotation."""
    fg = np.clip(np.array(COLOURS[spec.colour], np.float32) + rng.normal(0, 12, 3), 0, 255)
    bg = _background(rng, spec.background, size, fg)
    radius = rng.uniform(0.22, 0.42) * size
    margin = radius * 0.9
    centre = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * math.pi)
    alpha = _mask(spec.shape, size, centre, radius, angle)[..., None]
    return np.clip(bg * (1 - alpha) + fg * alpha + 0.5, 0, 255).astype(np.uint8)


def sample_specs(
    n: int, rng: np.random.Generator, shapes=SHAPES, colours=tuple(COLOURS), backgrounds=BACKGROUNDS
) -> list[ShapeSpec]:
    """n specs with shapes cycled evenly (balanced classes) and random colour/background."""
    order = rng.permutation(n) % len(shapes)
    return [
        ShapeSpec(shapes[i], colours[rng.integers(len(colours))], backgrounds[rng.integers(len(backgrounds))])
        for i in order
    ]


def make_shapes(n: int, seed: int, size: int = 32, shapes=SHAPES):
    """Generate a balanced dataset.

    Returns (images uint8 (n, size, size, 3), labels int64 (n,) indexing `shapes`, specs).
    """
    rng = np.random.default_rng(seed)
    specs = sample_specs(n, rng, shapes=shapes)
    images = np.stack([render(s, rng, size) for s in specs]) if n else np.zeros((0, size, size, 3), np.uint8)
    labels = np.array([shapes.index(s.shape) for s in specs], dtype=np.int64)
    return images, labels, specs
