"""Real-weights head-to-head on the pretrained ViT-Tiny in ../shared/data (skips when absent).

The images of ../shared/data/imagenet-sample are split as a compress run splits a folder (seed
--seed): a seeded half is the evaluation half, reported here; the other half is fitted on (400
training images for calibration, allocation, search and block distillation; 100 validation images
held out, unused here). Labels are never used for fitting. For each setting (attention at 50% or
30% of its parameters with the MLPs dense, and attention + MLPs at 50%), at head level (COMCAT) and
matrix level, the rows add one step each:

  plain SVD uniform      every site at the same rank, SVD of the weights (what comcat did before)
  calibrated uniform     the same ranks, factors fitted to the layers' inputs (comcat/calibrate.py)
  calibrated + allocation   ranks allocated from the calibrated errors (comcat/allocate.py)
  + search               Gumbel-softmax search from there, KL loss, factors fixed (comcat/search.py)
  + block distillation   the allocation row's model, each block distilled from the dense one
                         (comcat/reconstruct.py); the one-click default
Torch-Pruning (structured: every head's q/k/v dims, and the MLP hidden units in the MLP setting,
Taylor importance on the dense model's own predictions) at the same parameter count gets the same
block distillation. Top-1 and agreement with the dense model on the evaluation half, the 95%
interval of head minus matrix (and minus Torch-Pruning) from a paired bootstrap over images, and
the time of each row (cumulative along a method's steps). Writes JSON, markdown and a plot.

    python benchmarks/real_vit.py [--settings attn50 attn30 all50] [--seed 0] [--search-epochs 4]
        [--distill-steps 100] [--distill-views 2] [--distill-cls 1] [--out docs/results/real_vit]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from compress_embedded import fix_pruned_attention, head_dim_pruner
from search_vit_tiny import attn_ratio, real_vit_tiny, tensors
from torch.utils.data import DataLoader

from comcat.compression.allocate import FISHER_IMAGES, PROBE_IMAGES, calibrated_ranks
from comcat.compression.calibrate import build, calibrate
from comcat.compression.convert import compress
from comcat.compression.cost import Budget, compare_latency, count_params
from comcat.compression.evaluate import predict, scores
from comcat.compression.rank_rules import uniform_ranks
from comcat.compression.reconstruct import AugmentedViews, DistillConfig, distill_blocks
from comcat.compression.search import SearchConfig, search_ranks
from comcat.compression.splits import folder_splits

ROOT = Path(__file__).resolve().parent.parent

SHARED = ROOT.parent / "shared" / "data"
SETTINGS = {"attn50": (0.5, False), "attn30": (0.3, False), "all50": (0.5, True)}


def paired(a: torch.Tensor, b: torch.Tensor, reps: int = 10000, seed: int = 0, scale: float = 100) -> dict:
    """a, b: (N,) per-image figures of two models on the same images (bool right/wrong, or any
    number). Mean difference a - b times `scale` (100: in points) and its 95% interval, images
    resampled with replacement."""
    d = a.double() - b.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (reps, len(d)), generator=g)
    boot = d[idx].mean(1) * scale
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": d.mean().item() * scale, "ci95": [lo, hi]}


def latency(dense, small) -> dict:
    """CPU latency of `small` over the dense model at batch 1 and 32: median ratio and its range over
    5 rounds that time the two models alternately."""
    out = {}
    for batch in (1, 32):
        t = compare_latency({"dense": dense, "compressed": small}, batch)["compressed"]
        out[f"b{batch}"] = {"ratio": t["ratio"], "range": [t["ratio_min"], t["ratio_max"]], "ms": t["ms"]}
    return out


def taylor_grads(dense, train) -> list:
    """Gradients of the cross-entropy with the dense model's own top-1 (no labels) over `train`."""
    model = copy.deepcopy(dense).train()
    model.zero_grad()
    for x, _ in DataLoader(train, batch_size=50):
        with torch.no_grad():
            target = dense(x).argmax(1)
        torch.nn.functional.cross_entropy(model(x), target).backward()
    return [p.grad for p in model.parameters()]


def prune(dense, train, ratio: float, mlp: bool, global_pruning: bool = False, grads=None):
    """Torch-Pruning: remove (1 - ratio) of every head's q/k/v dims (and of the MLP hidden units with
    mlp; with global_pruning of all of them together, ranked across layers), Taylor importance from the
    cross-entropy with the dense model's own top-1 (no labels; `grads` of taylor_grads, if computed)."""

    grads = grads or taylor_grads(dense, train)
    model = copy.deepcopy(dense).train()
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    pruner = head_dim_pruner(model, ratio, mlp)
    pruner.global_pruning = global_pruning
    pruner.step()
    fix_pruned_attention(model)
    model.zero_grad()
    return model.eval().requires_grad_(True)


def prune_to(dense, train, params: int, mlp: bool = True, steps: int = 10):
    """Torch-Pruning's global pruning at the largest keep ratio (bisection) whose model has at most
    `params` parameters: the same parameter count as the model it is compared with."""
    grads = taylor_grads(dense, train)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = prune(dense, train, mid, mlp, global_pruning=True, grads=grads)
        if count_params(model) <= params:
            lo, best = mid, model
        else:
            hi = mid
    return best if best is not None else prune(dense, train, lo, mlp, global_pruning=True, grads=grads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", choices=("head", "matrix", "prune"), default=["head", "matrix", "prune"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the folder split (default 0)")
    ap.add_argument("--search-epochs", type=int, default=4, help="0: no search row")
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--distill-views", type=int, default=2)
    ap.add_argument("--distill-cls", type=float, default=1.0, help="class-token weight in block distillation")
    ap.add_argument("--out", default=None, help="write OUT.json, OUT.md, OUT.png")
    args = ap.parse_args()
    found = real_vit_tiny()
    if found is None:
        return
    dense, images = found
    splits = folder_splits(images, dense, seed=args.seed)
    t = time.perf_counter()
    train, evaluation = tensors(splits.fit), tensors(splits.eval)
    print(
        f"split seed {args.seed}: {len(train)} training images (labels unused), {len(splits.val)} validation "
        f"(unused), {len(evaluation)} evaluation; decoded in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    ref, labels = predict(dense, evaluation, progress=False)
    dense_scores = scores(ref, labels)
    loader = DataLoader(train, batch_size=32)
    views = AugmentedViews(loader, args.distill_views, args.seed)  # what a compress run distills on
    distill = DistillConfig(steps=args.distill_steps, cls_weight=args.distill_cls, seed=args.seed)
    results = {
        "seed": args.seed,
        "distill": {"steps": args.distill_steps, "views": args.distill_views, "cls": args.distill_cls},
        "dense": dense_scores,
        "params": count_params(dense),
        "settings": {},
    }

    def score(model) -> dict:
        logits, _ = predict(model, evaluation, progress=False)
        s = scores(logits, labels, ref, per_image=True)
        return {
            "top1": s["top1"],
            "agreement": s["agreement"],
            "kl": s["kl"],
            "params": count_params(model),
            "_right": s["right"],
        }

    for name in args.settings:
        ratio, mlp = SETTINGS[name]
        rows = results["settings"][name] = {}
        for method in [m for m in args.methods if m != "prune"]:
            t0 = time.perf_counter()
            cal = calibrate(dense, loader, mlp=mlp, matrix=method == "matrix", probe=PROBE_IMAGES, fisher=FISHER_IMAGES)
            t_cal = time.perf_counter() - t0
            uniform = uniform_ranks(dense, method, ratio, mlp=mlp)
            got = rows[method] = {}
            got["plain SVD uniform"] = {
                **score(compress(dense, uniform)),
                "time_s": 0.0,
                "attn_ratio": attn_ratio(dense, uniform),
            }
            got["calibrated uniform"] = {**score(build(dense, uniform, cal)), "time_s": t_cal}
            t0 = time.perf_counter()
            cfg, _ = calibrated_ranks(dense, cal, Budget(ratio, method=method, mlp=mlp))
            allocated = build(dense, cfg, cal)
            t_alloc = t_cal + time.perf_counter() - t0
            got["calibrated + allocation"] = {
                **score(allocated),
                "time_s": t_alloc,
                "ranks": cfg.to_dict(),
                "attn_ratio": attn_ratio(dense, cfg),
            }
            if args.search_epochs:
                t0 = time.perf_counter()
                search = SearchConfig(epochs=args.search_epochs, batch_size=50, lr_weights=0.0, seed=args.seed)
                budget = Budget(ratio, method=method, mlp=mlp)
                searched, _ = search_ranks(dense, train, train, budget, search, calibration=cal, init_ranks=cfg)
                got["+ search"] = {
                    **score(build(dense, searched, cal)),
                    "time_s": t_alloc + time.perf_counter() - t0,
                    "ranks": searched.to_dict(),
                }
            t0 = time.perf_counter()
            distilled = distill_blocks(allocated, dense, views, distill)["model"]
            got["+ block distillation"] = {**score(distilled), "time_s": t_alloc + time.perf_counter() - t0}
            if method == "head":
                results["settings"][name]["_latency"] = latency(dense, distilled)
            for row, r in got.items():
                print(
                    f"{name} {method:7} {row:26} top-1 {r['top1']:6.2f}  agreement {r['agreement']:6.2f}  "
                    f"KL {r['kl']:.3f}  params {r['params']:,}  {r['time_s']:6.0f} s",
                    flush=True,
                )
        if "prune" in args.methods:
            t0 = time.perf_counter()
            pruned = prune(dense, train, ratio, mlp)
            got = rows["torch-pruning"] = {"pruned": {**score(pruned), "time_s": time.perf_counter() - t0}}
            distilled = distill_blocks(pruned, dense, views, distill)["model"]
            got["+ block distillation"] = {**score(distilled), "time_s": time.perf_counter() - t0}
            for row, r in got.items():
                print(
                    f"{name} prune   {row:26} top-1 {r['top1']:6.2f}  agreement {r['agreement']:6.2f}  "
                    f"KL {r['kl']:.3f}  params {r['params']:,}  {r['time_s']:6.0f} s",
                    flush=True,
                )
        # head minus each baseline, row by row, image by image
        comparisons = {}
        for row, r in rows.get("head", {}).items():
            for other in ("matrix", "torch-pruning"):
                peer = rows.get(other, {}).get(
                    row
                    if other == "matrix"
                    else ("+ block distillation" if row == "+ block distillation" else "pruned")
                )
                if peer is not None and (
                    other == "matrix" or row in ("+ block distillation", "calibrated + allocation")
                ):
                    comparisons[f"{row} | head - {other}"] = paired(r["_right"], peer["_right"])
        results["settings"][name]["paired"] = comparisons
        for k, c in comparisons.items():
            print(f"{name} {k:48} {c['diff']:+6.2f} points  95% [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]", flush=True)
        if "_latency" in rows:
            rows["latency"] = rows.pop("_latency")
            for b, t in rows["latency"].items():
                print(
                    f"{name} head + block distillation: CPU latency {b} {t['ratio']:.3f}x dense "
                    f"(range {t['range'][0]:.3f}-{t['range'][1]:.3f})",
                    flush=True,
                )
        if args.out:  # after every setting: a long run keeps what it has
            write(results, Path(args.out))


def public(tree):
    if isinstance(tree, dict):
        return {k: public(v) for k, v in tree.items() if not str(k).startswith("_")}
    return tree


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(public(results), indent=2) + "\n")
    d = results["dense"]
    lines = [
        f"Real ViT-Tiny, split seed {results['seed']}: top-1 on the 500 evaluation images (dense {d['top1']:.1f}%), "
        "agreement with the dense model's top-1, KL(dense || compressed), params, and the time of each row "
        "(cumulative along its method's steps, 2 CPU threads).",
        "",
    ]
    for name, rows in results["settings"].items():
        lines += [
            f"### {name}",
            "",
            "| method | step | top-1 % | agreement % | KL | params | time s |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, got in rows.items():
            if method in ("paired", "latency", "_latency"):
                continue
            for row, r in got.items():
                lines.append(
                    f"| {method} | {row} | {r['top1']:.1f} | {r['agreement']:.1f} | {r['kl']:.3f} | "
                    f"{r['params']:,} | {r['time_s']:.0f} |"
                )
        lines += ["", "| step | comparison | top-1 difference (points) | 95% interval |", "|---|---|---|---|"]
        for k, c in rows.get("paired", {}).items():
            lines.append(f"| {k} | {c['diff']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |")
        if rows.get("latency"):
            lines += [
                "",
                "CPU latency of the head + block distillation model over dense (median ratio, range over 5 "
                "alternating rounds; the machine's load moves it): "
                + ", ".join(
                    f"batch {b[1:]} {t['ratio']:.3f}x ({t['range'][0]:.3f}-{t['range'][1]:.3f})"
                    for b, t in rows["latency"].items()
                ),
            ]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], settings):
        rows = results["settings"][name]
        names = list(rows.get("head", rows.get("matrix", {})))
        for method, marker in (("head", "o"), ("matrix", "s"), ("torch-pruning", "^")):
            if method in rows:
                steps = list(rows[method])
                # Torch-Pruning's rows sit under the first step (no training) and the distillation step
                xs = [names.index(s) if s in names else 0 for s in steps]
                ax.plot(xs, [rows[method][s]["top1"] for s in steps], marker=marker, label=method)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.axhline(results["dense"]["top1"], color="gray", ls="--", label="dense")
        ax.set(title=name, ylabel="top-1 % (evaluation half)", ylim=(0, 90))
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
