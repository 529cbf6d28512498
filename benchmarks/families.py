"""Per model family: analysis time and CPU latency of a compressed model against dense, side by side.

For one base-size model of each family comcat supports (random init: cost does not depend on the
weights; no download): the time of the full spectral analysis (matrix and head level), and the
latency at batch --batch of head-level models with uniform ranks keeping --ratio of (a) the
attention parameters and (b) the attention and MLP parameters, dense and compressed timed
alternately over --rounds rounds (median and range of the per-round ratios).

    python benchmarks/families.py [--batch 32] [--rounds 3] [--iters 1] [--json F] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from comcat.compression.analysis import analyze
from comcat.compression.convert import compress
from comcat.compression.cost import compare_latency
from comcat.compression.rank_rules import uniform_ranks
from comcat.core.files import atomic_write_text

FAMILIES = {  # family -> (timm name, keyword arguments): base size, 224 x 224 input
    "ViT": ("vit_base_patch16_224", {}),
    "DeiT": ("deit_base_patch16_224", {}),
    "DINOv2": ("vit_base_patch14_dinov2", {"img_size": 224}),
    "CLIP vision": ("vit_base_patch16_clip_224", {}),
    "SigLIP vision": ("vit_base_patch16_siglip_224", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--models", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--json", metavar="F", help="write the figures to this JSON file")
    args = ap.parse_args()
    results = {"batch": args.batch, "ratio": args.ratio, "rounds": args.rounds, "iters": args.iters,
               "threads": torch.get_num_threads(), "families": {}}  # fmt: skip
    print(f"batch {args.batch}, {args.rounds} alternating rounds of {args.iters} passes, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for family in args.models:
        name, kwargs = FAMILIES[family]
        dense = timm.create_model(name, pretrained=False, **kwargs).eval()
        t0 = time.perf_counter()
        analyze(dense)
        analysis_s = time.perf_counter() - t0
        models = {"dense": dense}
        for label, mlp in (("attention", False), ("attention + MLP", True)):
            models[label] = compress(dense, uniform_ranks(dense, "head", args.ratio, mlp=mlp)).eval()
        with torch.inference_mode():
            size = (3, *dense.patch_embed.img_size)  # the model's input, whatever its pretrained config says
            timing = compare_latency(models, args.batch, size, rounds=args.rounds, iters=args.iters, warmup=1)
        row = {"model": name, "analysis_s": analysis_s, "dense_ms": timing["dense"]["ms"]}
        for label in ("attention", "attention + MLP"):
            t = timing[label]
            row[label] = {"ms": t["ms"], "ratio": t["ratio"], "range": [t["ratio_min"], t["ratio_max"]]}
        results["families"][family] = row
        if args.json:  # after every family: a long run keeps what it measured
            atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(
            f"{family:14} {name:30} analysis {analysis_s:5.1f} s  dense {row['dense_ms']:7.0f} ms  "
            + "  ".join(f"{k} {v['ratio']:.2f}x ({v['range'][0]:.2f}-{v['range'][1]:.2f})"
                        for k, v in row.items() if isinstance(v, dict))  # fmt: skip
            , flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
