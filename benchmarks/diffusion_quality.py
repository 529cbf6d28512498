"""Quality of the embedded text-to-image model and of a COMCAT customization, judged by the
embedded ViT (shape) and the foreground colour (comcat/diffusion/judge.py).

    python benchmarks/diffusion_quality.py [--steps 300] [--seeds 3] [--per-prompt 8] [--json F]

1. base model: 'a {colour} {shape}' for the 9 trained shapes x 8 colours;
2. before customization: 'a V* in {colour}' (8 colours), share judged a heart;
3. after customizing on assets/examples/heart (5 images, captions 'a V* in {colour}' for 5 colours)
   with the library's defaults for --steps: the same prompts, share judged a heart / the right colour,
   for --seeds training seeds (each a fresh pipeline) and their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from comcat.compression.load import load_model
from comcat.core.files import atomic_write_text
from comcat.customization.customize import CustomizeSpec, customize
from comcat.customization.diffusion.pipeline import load_pipeline
from comcat.customization.diffusion.quality import base_quality, concept_quality, sample

ROOT = Path(__file__).resolve().parent.parent


def save_grid(pipe, seed: int, path: str) -> None:
    """4 samples of 'a V* in {colour}' for each colour, two colours to a row."""
    from PIL import Image

    from comcat.core.shapes import COLOURS
    from comcat.customization.diffusion.concept import grid

    images = sample(pipe, [f"a V* in {c}" for c in COLOURS], 4, seed)
    grid([Image.fromarray(a) for a in images], 8).save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--per-prompt", type=int, default=8, help="base model images per prompt (default 8)")
    ap.add_argument("--per-colour", type=int, default=16, help="concept images per colour (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--seeds", type=int, default=3, help="customization runs, training seeds 0..N-1 (default 3)")
    ap.add_argument("--json")
    ap.add_argument("--grid", help="save a grid of the customized samples here (PNG)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    classifier = load_model("embedded").model
    pipe = load_pipeline("embedded")
    t0 = time.time()
    base = base_quality(pipe, classifier, per_prompt=args.per_prompt, seed=args.seed)
    print(
        f"base model ({base['images']} images, {time.time() - t0:.0f}s): shape {100 * base['shape']:.1f}%  "
        f"colour {100 * base['colour']:.1f}%  both {100 * base['both']:.1f}%",
        flush=True,
    )
    before = concept_quality(pipe, classifier, per_colour=args.per_colour, seed=args.seed)
    print(f"before customization: heart {100 * before['shape']:.1f}%  colour {100 * before['colour']:.1f}%", flush=True)
    runs = []
    for train_seed in range(args.seeds):
        pipe = load_pipeline("embedded") if train_seed else pipe
        with tempfile.TemporaryDirectory() as tmp:
            spec = CustomizeSpec(
                images=str(ROOT / "assets/examples/heart"),
                prompt="a V*",
                steps=args.steps,
                rank=args.rank,
                preview_every=0,
                seed=train_seed,
            )
            result = customize(spec, tmp, pipe=pipe)
            size = Path(result["adapter"]).stat().st_size
        after = concept_quality(pipe, classifier, per_colour=args.per_colour, seed=args.seed)
        runs.append(dict(after, seed=train_seed, train_seconds=result["seconds"], adapter_bytes=size))
        if args.grid and train_seed == 0:
            save_grid(pipe, args.seed, args.grid)
        print(
            f"after {args.steps} steps, training seed {train_seed} ({result['seconds']:.0f}s training, adapter "
            f"{size / 1e3:.0f} kB): heart {100 * after['shape']:.1f}%  colour {100 * after['colour']:.1f}%  "
            f"both {100 * after['both']:.1f}%",
            flush=True,
        )
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("shape", "colour", "both", "train_seconds")}
    print(
        f"mean of {len(runs)} training seeds: heart {100 * mean['shape']:.1f}%  colour {100 * mean['colour']:.1f}%  "
        f"training {mean['train_seconds']:.0f}s"
    )
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(
                dict(
                    base=base,
                    before=before,
                    after=runs,
                    after_mean=mean,
                    steps=args.steps,
                    rank=args.rank,
                    sampler=type(pipe.scheduler).__name__,
                    threads=torch.get_num_threads(),
                    torch=torch.__version__,
                ),
                indent=2,
            )
            + "\n",
        )


if __name__ == "__main__":
    main()
