"""Post-training top-1 (no fine-tuning) of head-level vs matrix-level low-rank attention.

At attention-parameter ratios 0.9 ... 0.3, with uniform ranks and with energy-based allocation
(one energy threshold for all layers, chosen to meet the budget). Runs on the embedded model, and,
when ../shared/data/ is present, on the real pretrained ViT-Tiny evaluated on real ImageNet images.

    python benchmarks/head_vs_matrix.py [--images 1000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from comcat.compression.evaluate import evaluate, image_folder
from comcat.compression.load import load_model
from comcat.compression.models import load_checkpoint
from comcat.compression.rank_rules import choose_ranks
from comcat.compression.report import run_compress
from comcat.core.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent

SHARED = ROOT.parent / "shared" / "data"
RATIOS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3)


def cached(ds):
    """Decode and transform the evaluation images once; every variant reuses the tensors."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.utils.data.TensorDataset(torch.stack(xs), torch.tensor(ys))


def run(name, loaded, data, ratios):
    rows = []
    dense = evaluate(loaded.model, data, progress=False)
    for method in ("head", "matrix"):
        for allocate in ("uniform", "energy", "greedy"):
            for ratio in ratios:
                t = time.time()
                cfg = choose_ranks(loaded, method, params_ratio=ratio, allocate=allocate)
                _, rep = run_compress(loaded, cfg, data, latency=False, progress=False, dense_top1=dense)
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        "allocate": allocate,
                        "ratio": ratio,
                        "attn_ratio": round(rep["attn_params_ratio"], 4),
                        "top1": rep["compressed"]["top1"],
                        "dense_top1": dense["top1"],
                        "seconds": round(time.time() - t, 1),
                    }
                )
                print(
                    f"{name:10} {method:6} {allocate:7} ratio {ratio:.2f} (actual {rep['attn_params_ratio']:.3f}) "
                    f"top-1 {rep['compressed']['top1']:6.2f}  (dense {dense['top1']:.2f})",
                    flush=True,
                )
    return rows


def table(rows, ratios) -> str:
    head = "| model | method | allocation | " + " | ".join(f"{r:.2f}" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (3 + len(ratios))]
    keys = sorted({(r["model"], r["method"], r["allocate"]) for r in rows}, key=lambda k: (k[0], k[1] != "head", k[2]))
    for key in keys:
        vals = {r["ratio"]: r["top1"] for r in rows if (r["model"], r["method"], r["allocate"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{vals[r]:.1f}" for r in ratios) + " |")
    return "\n".join(lines)


def plot(rows, ratios, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for method, allocate, style in (
            ("head", "greedy", "o-"),
            ("head", "energy", "o-."),
            ("head", "uniform", "o--"),
            ("matrix", "greedy", "s-"),
            ("matrix", "energy", "s-."),
            ("matrix", "uniform", "s--"),
        ):
            pts = sorted(
                (r["ratio"], r["top1"])
                for r in rows
                if (r["model"], r["method"], r["allocate"]) == (m, method, allocate)
            )
            ax.plot(*zip(*pts), style, label=f"{method} level, {allocate}")
        dense = next(r["dense_top1"] for r in rows if r["model"] == m)
        low = min(r["top1"] for r in rows if r["model"] == m)
        ax.axhline(dense, ls=":", c="gray", label="dense")
        ax.set(
            title=m,
            xlabel="attention params / dense",
            ylabel="top-1 %",
            ylim=(0 if low < 50 else low - 1, 100 if low < 50 else dense + 0.5),
        )
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--images",
        type=int,
        default=1000,
        help="ImageNet images to evaluate on: every (1000 // N)-th of the 1000, so all classes spread",
    )
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and plot from OUT/head_vs_matrix.json")
    args = ap.parse_args()
    if args.plot_only:
        rows = json.loads((Path(args.out) / "head_vs_matrix.json").read_text())
        print(table(rows, args.ratios))
        plot(rows, args.ratios, Path(args.out) / "head_vs_matrix.png")
        return
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = run("embedded", load_model("embedded"), None, args.ratios)
    ckpt = SHARED / "vit_tiny_patch16_224.safetensors"
    if ckpt.is_file() and (SHARED / "imagenet-sample").is_dir():
        vit = load_checkpoint(ckpt, "vit_tiny_patch16_224")
        folder = image_folder(SHARED / "imagenet-sample", vit.model)
        data = cached(torch.utils.data.Subset(folder, range(0, len(folder), max(1, len(folder) // args.images))))
        rows += run("vit_tiny", vit, data, args.ratios)
    else:
        print(f"{SHARED} not found: skipping the real ViT-Tiny")
    md = table(rows, args.ratios)
    print("\ntop-1 % at attention-parameter ratio\n" + md)
    atomic_write_text(out / "head_vs_matrix.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "head_vs_matrix.md", md + "\n")
    plot(rows, args.ratios, out / "head_vs_matrix.png")
    print(f"wrote {out}/head_vs_matrix.{{json,md,png}}")


if __name__ == "__main__":
    main()
