"""The whole model under one budget on the real ViT-Tiny in ../shared/data (skips when absent).

Split as a compress run splits the folder (seed --seed): 400 training images (labels unused) for
calibration, allocation and block distillation, 500 held-out evaluation images reported here. For
each whole-model parameter ratio (--ratios, default 0.70 and 0.55) the rows are:

  head + neurons     head ranks and MLP neurons allocated together (the default one-click recipe)
  head + lowrank     head ranks and whitened low-rank MLPs (what comcat did before)
  matrix + neurons   matrix-level attention, neuron MLPs
  torch-pruning      Torch-Pruning's global structured pruning of head dims and MLP channels (Taylor
                     importance on the dense model's own predictions), at the same parameter count
each before and after the same block distillation; then int8 (torchao) of the dense model and of
the default's distilled model. Top-1, agreement, KL, params, MB, paired bootstrap intervals of the
default minus each other row, and CPU latency at batch 1 and 32 of the default, measured side by
side with dense. Writes OUT.json, OUT.md and a Pareto plot OUT.png.

    python benchmarks/whole_model.py [--ratios 0.7 0.55] [--rows neurons lowrank matrix prune]
        [--distill-steps 100] [--out docs/results/whole_model] [--latency-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from real_vit import latency, paired, prune_to, public
from search_vit_tiny import real_vit_tiny, tensors
from torch.utils.data import DataLoader

from comcat.compression.allocate import FISHER_IMAGES, PROBE_IMAGES, calibrated_ranks
from comcat.compression.calibrate import build, calibrate
from comcat.compression.cost import Budget, count_params
from comcat.compression.evaluate import predict, scores
from comcat.compression.quantize import quantize_int8
from comcat.compression.reconstruct import AugmentedViews, DistillConfig, distill_blocks
from comcat.compression.report import weights_mb
from comcat.compression.splits import folder_splits

ROWS = {"neurons": ("head", "neurons"), "lowrank": ("head", "lowrank"), "matrix": ("matrix", "neurons")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.7, 0.55])
    ap.add_argument("--rows", nargs="+", choices=[*ROWS, "prune"], default=[*ROWS, "prune"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--latency-only", action="store_true", help="re-time the default rows of OUT.json alone")
    args = ap.parse_args()
    found = real_vit_tiny()
    if found is None:
        return
    dense, images = found
    if args.latency_only:
        return retime(dense, Path(args.out))
    splits = folder_splits(images, dense, seed=args.seed)
    train, evaluation = tensors(splits.fit), tensors(splits.eval)
    ref, labels = predict(dense, evaluation, progress=False)
    loader = DataLoader(train, batch_size=32)
    views = AugmentedViews(loader, 2, args.seed)
    distill = DistillConfig(steps=args.distill_steps, cls_weight=1.0, seed=args.seed)
    total = count_params(dense)
    results = {"seed": args.seed, "dense": {**scores(ref, labels), "params": total, "mb": weights_mb(dense)}}

    def score(model, t0) -> dict:
        logits, _ = predict(model, evaluation, progress=False)
        s = scores(logits, labels, ref, per_image=True)
        keep = ("top1", "agreement", "kl", "right")
        out = {k if k != "right" else "_right": s[k] for k in keep}
        size = {"params": count_params(model) / total, "mb": weights_mb(model)}
        return {**out, **size, "time_s": time.perf_counter() - t0}

    dense_int8 = quantize_int8(copy.deepcopy(dense))
    results["dense int8"] = score(dense_int8, time.perf_counter())
    cals = {}
    for ratio in args.ratios:
        rows = results[f"{ratio:.2f}"] = {}
        default = None
        for name in [r for r in args.rows if r in ROWS]:
            method, mlp = ROWS[name]
            t0 = time.perf_counter()
            if method not in cals:
                matrix = method == "matrix"
                cals[method] = calibrate(dense, loader, True, matrix, probe=PROBE_IMAGES, fisher=FISHER_IMAGES)
            cal = cals[method]
            cfg, _ = calibrated_ranks(dense, cal, Budget(ratio, "params", method, mlp, "model"))
            small = build(dense, cfg, cal)
            rows[name] = {**score(small, t0), "ranks": cfg.to_dict()}
            small = distill_blocks(small, dense, views, distill)["model"].eval()
            rows[f"{name} + distillation"] = score(small, t0)
            if name == "neurons":
                default = small
        if "prune" in args.rows:
            t0 = time.perf_counter()
            pruned = prune_to(dense, train, int(ratio * total))  # equal parameters
            rows["torch-pruning"] = score(pruned, t0)
            pruned = distill_blocks(pruned, dense, views, distill)["model"].eval()
            rows["torch-pruning + distillation"] = score(pruned, t0)
        if default is not None:
            t0 = time.perf_counter()
            rows["neurons + distillation + int8"] = score(quantize_int8(copy.deepcopy(default)), t0)
            rows["_latency"] = latency(dense, default)
        best = rows.get("neurons + distillation")
        rows["paired"] = {
            f"default - {k}": paired(best["_right"], r["_right"])
            for k, r in rows.items()
            if best is not None and isinstance(r, dict) and "_right" in r and k != "neurons + distillation"
        }
        for k, r in rows.items():
            if isinstance(r, dict) and "top1" in r:
                print(
                    f"{ratio:.2f} {k:34} top-1 {r['top1']:6.2f}  agreement {r['agreement']:6.2f}  KL {r['kl']:.3f}  "
                    f"params {r['params']:.3f}x  {r['mb']:6.2f} MB  {r['time_s']:6.0f} s",
                    flush=True,
                )
        for k, c in rows["paired"].items():
            print(f"{ratio:.2f} {k:48} {c['diff']:+6.2f} points  95% [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]")
        if "_latency" in rows:
            rows["latency"] = rows.pop("_latency")
            print(f"{ratio:.2f} CPU latency of the default over dense: {rows['latency']}", flush=True)
        if args.out:
            write(results, Path(args.out))


def retime(dense, out: Path) -> None:
    """CPU latency of each ratio's default over dense again, on its ranks (latency depends on the
    shapes only; the weights are the data-free skeleton's), for a machine that is idle now."""
    from comcat.compression.convert import compress
    from comcat.compression.ranks import RankConfig

    results = json.loads(out.with_suffix(".json").read_text())
    for ratio, rows in results.items():
        if ratio[0].isdigit() and "ranks" in rows.get("neurons", {}):
            small = compress(dense, RankConfig.from_dict(rows["neurons"]["ranks"]))
            rows["latency"] = latency(dense, small)
            print(f"{ratio} CPU latency of the default over dense: {rows['latency']}", flush=True)
    write(results, out)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(public(results), indent=2) + "\n")
    d = results["dense"]
    lines = [
        f"Real ViT-Tiny, split seed {results['seed']}: 500 held-out evaluation images (dense top-1 {d['top1']:.1f}%, "
        f"{d['mb']:.1f} MB).",
        "",
        "| budget | row | top-1 % | agreement % | KL | params | MB | time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    q = results["dense int8"]
    lines.append(
        f"| - | dense int8 | {q['top1']:.1f} | {q['agreement']:.1f} | {q['kl']:.3f} | 1.000x | {q['mb']:.2f} | - |"
    )
    for ratio, rows in results.items():
        if not ratio[0].isdigit():
            continue
        for k, r in rows.items():
            if isinstance(r, dict) and "top1" in r:
                lines.append(
                    f"| {ratio} | {k} | {r['top1']:.1f} | {r['agreement']:.1f} | {r['kl']:.3f} | {r['params']:.3f}x | "
                    f"{r['mb']:.2f} | {r['time_s']:.0f} |"
                )
    lines += ["", "| budget | comparison | top-1 difference (points) | 95% interval |", "|---|---|---|---|"]
    for ratio, rows in results.items():
        for k, c in rows.get("paired", {}).items() if ratio[0].isdigit() else ():
            lines.append(f"| {ratio} | {k} | {c['diff']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    """Pareto plot: top-1 against params (and against CPU latency at batch 1 and 32 for the default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    points = {}
    for ratio, rows in results.items():
        if ratio[0].isdigit():
            for k, r in rows.items():
                if isinstance(r, dict) and "top1" in r and "distillation" in k:
                    points.setdefault(k, []).append((r["params"], r["top1"], rows.get("latency")))
    for k, ps in points.items():
        ps.sort()
        axes[0].plot([p[0] for p in ps], [p[1] for p in ps], marker="o", label=k)
    axes[0].scatter([1.0], [results["dense"]["top1"]], color="k", label="dense")
    axes[0].set(xlabel="params / dense", ylabel="top-1 % (500 held-out images)", title="top-1 against parameters")
    axes[0].legend(fontsize=8)
    for b in ("b1", "b32"):
        ps = [p for p in points.get("neurons + distillation", []) if p[2]]
        axes[1].plot([p[2][b]["ratio"] for p in ps], [p[1] for p in ps], marker="o", label=f"default, batch {b[1:]}")
    axes[1].scatter([1.0], [results["dense"]["top1"]], color="k", label="dense")
    axes[1].set(xlabel="CPU latency / dense", ylabel="top-1 %", title="top-1 against CPU latency")
    axes[1].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
