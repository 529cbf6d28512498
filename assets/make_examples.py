"""Write the demo concept, assets/examples/heart/: five hearts (the shape the embedded
text-to-image model never saw) in five colours, each with its caption NAME.txt; with --adapter
also train the bundled example adapter on them, assets/examples/heart_adapter.safetensors.

    python assets/make_examples.py [--adapter]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from comcat.core.shapes import ShapeSpec, render

OUT = Path(__file__).resolve().parent / "examples" / "heart"
COLOURS = ("red", "blue", "green", "yellow", "magenta")
BACKGROUNDS = ("dark", "light", "dark", "light", "dark")
SEED = 7


def train_adapter(steps: int = 300):
    """The app's default adapter: the library's customization with its embedded defaults."""
    from comcat.customization.customize import CustomizeSpec, customize

    with tempfile.TemporaryDirectory() as tmp:
        result = customize(CustomizeSpec(images=str(OUT), prompt="a V*", steps=steps, preview_every=0), tmp)
        shutil.copy(result["adapter"], OUT.parent / "heart_adapter.safetensors")
    print(f"trained {steps} steps in {result['seconds']:.0f}s -> {OUT.parent / 'heart_adapter.safetensors'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", action="store_true", help="also train the example adapter")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for colour, background in zip(COLOURS, BACKGROUNDS):
        image = render(ShapeSpec("heart", colour, background), rng)
        Image.fromarray(image).save(OUT / f"heart_{colour}.png")
        (OUT / f"heart_{colour}.txt").write_text(f"a V* in {colour}\n")
    print(f"wrote {len(COLOURS)} images to {OUT}")
    if args.adapter:
        train_adapter()


if __name__ == "__main__":
    main()
