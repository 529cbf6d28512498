"""Searched vs uniform head-level vs matrix-level ranks on the real pretrained ViT-Tiny, no fine-tuning.

Attention compressed to --ratio of its parameters (MLPs dense, weights frozen). The searched ranks
are decoded as expected ranks (the default); the same search decoded by argmax is shown below them. The rank search
runs on the odd-indexed images of ../shared/data/imagenet-sample (one image per class) and top-1
is reported on the even-indexed ones, so search and report never share an image. Exits quietly
when the shared data is absent.

    python benchmarks/search_vit_tiny.py [--ratio 0.6] [--epochs 10] [--json docs/results/search_vit_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import Subset, TensorDataset

from comcat.compression.convert import compress
from comcat.compression.cost import Budget, layer_params
from comcat.compression.evaluate import evaluate, image_folder
from comcat.compression.load import load_model
from comcat.compression.rank_rules import uniform_ranks
from comcat.compression.search import SearchConfig, search_ranks

ROOT = Path(__file__).resolve().parent.parent

SHARED = ROOT.parent / "shared" / "data"


def tensors(ds) -> TensorDataset:
    """Decode and transform once (the search visits every image many times)."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return TensorDataset(torch.stack(xs), torch.tensor(ys))


def real_vit_tiny():
    """(the real ViT-Tiny of ../shared/data in eval mode, its imagenet-sample folder), or None with a
    line saying why when they are absent; 2 CPU threads, as measured."""
    weights, images = SHARED / "vit_tiny_patch16_224.safetensors", SHARED / "imagenet-sample"
    if not (weights.is_file() and images.is_dir()):
        print(f"skipped: {SHARED} with the ViT-Tiny weights and imagenet-sample is absent")
        return None
    torch.set_num_threads(2)
    return load_model(str(weights), "vit_tiny_patch16_224").model.eval(), images


def attn_ratio(dense, cfg) -> float:
    return sum(l["attn"] for l in layer_params(dense, cfg)) / sum(l["attn"] for l in layer_params(dense))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr-alpha", type=float, default=0.05)
    ap.add_argument("--images", type=int, default=1000, help="use the first N images (halves of N/2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    found = real_vit_tiny()
    if found is None:
        return
    dense, images = found
    folder = image_folder(images, dense, limit=args.images)
    t = time.perf_counter()
    search_half = tensors(Subset(folder, range(1, len(folder), 2)))
    report_half = tensors(Subset(folder, range(0, len(folder), 2)))
    print(f"decoded {len(search_half)} + {len(report_half)} images in {time.perf_counter() - t:.0f} s")

    rows = [("dense", None, evaluate(dense, report_half, progress=False)["top1"], 0.0)]
    for method in ("head", "matrix"):
        cfg = uniform_ranks(dense, method, args.ratio)
        rows.append(
            (f"uniform {method}", cfg, evaluate(compress(dense, cfg), report_half, progress=False)["top1"], 0.0)
        )
    t = time.perf_counter()
    cfg, info = search_ranks(
        dense,
        search_half,
        search_half,
        Budget(args.ratio),
        SearchConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr_alpha=args.lr_alpha, lr_weights=0, seed=args.seed
        ),
    )
    secs = time.perf_counter() - t
    rows.append(("searched head", cfg, evaluate(info["model"], report_half, progress=False)["top1"], secs))
    argmax = info["decoded"]["argmax"]  # the same search decoded by argmax (frozen weights: compress == truncate)
    rows.append(
        ("  argmax decode", argmax, evaluate(compress(dense, argmax), report_half, progress=False)["top1"], secs)
    )
    print(
        f"\nreal ViT-Tiny, attention at {args.ratio:.0%} of its params, no fine-tuning; search on "
        f"{len(search_half)} images, top-1 on the other {len(report_half)}"
    )
    print(f"{'ranks':15} {'attn params':>11} {'top-1 %':>8} {'search s':>9}")
    for name, c, top1, secs in rows:
        print(f"{name:15} {1.0 if c is None else attn_ratio(dense, c):>11.3f} {top1:>8.2f} {secs:>9.0f}")
    print(
        "searched ranks (qk, vo) per layer:",
        [(b["qk"], b["vo"]) for b in cfg.blocks],
        "(scaled down to fit)" if info["reduced_to_fit"] else "",
    )
    if args.json:
        out = {
            "ratio": args.ratio,
            "epochs": args.epochs,
            "lr_alpha": args.lr_alpha,
            "search_images": len(search_half),
            "report_images": len(report_half),
            "rows": [
                {
                    "ranks": n,
                    "attn_params_ratio": 1.0 if c is None else attn_ratio(dense, c),
                    "top1": t1,
                    "search_s": s,
                    **({"config": c.to_dict()} if c is not None else {}),
                }
                for n, c, t1, s in rows
            ],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
