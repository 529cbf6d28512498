"""COMCAT vs baselines at an equal parameter budget on the embedded shapes ViT (CPU).

  comcat   head-level low rank, Gumbel-softmax rank search + distillation fine-tuning
  matrix   matrix-level low rank (W^Q, W^K, W^V, W^O separately), the same search + fine-tuning
  prune    structured pruning with Torch-Pruning (per-head dims of qkv + MLP hidden channels,
           Taylor importance), the same distillation fine-tuning
All compress the attention and MLP weights to --ratio of their parameters and are evaluated on the
2,000 held-out shapes every report uses, and on --big-eval fresh shapes (--big-eval-seed, default 3,
used nowhere else: one image is 0.005 points in 20,000, so methods that tie on 2,000 can be told
apart). Comcat is compared with each baseline image by image on both sets: the mean paired difference
with a 95% interval from a bootstrap over training seeds and images (a fixed evaluation set is itself
a sample). Prints one table; --json writes it.

    python benchmarks/compress_embedded.py [--ratio 0.5] [--seeds 0 1 2] [--methods comcat matrix prune]
        [--big-eval 20000] [--big-eval-seed 3] [--json docs/results/compress_embedded.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch

from comcat.compression.cost import count_params, layer_params, measure_latency
from comcat.compression.distill import FinetuneConfig, finetune
from comcat.compression.evaluate import evaluate
from comcat.compression.job import JobSpec, run_job
from comcat.compression.load import load_model
from comcat.compression.search import SearchConfig
from comcat.compression.splits import embedded_heldout, embedded_splits


def fix_pruned_attention(model: torch.nn.Module) -> None:
    """After Torch-Pruning cut the q/k/v dims: the head dims timm reads in forward, at the dense
    logit scale (so no fused attention, which would rescale)."""
    from timm.models.vision_transformer import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
            m.fused_attn = False


def head_dim_pruner(model, ratio: float, mlp: bool):
    """A Torch-Pruning MetaPruner (Taylor importance) that removes (1 - ratio) of every head's q/k/v
    dims, and with `mlp` of the MLP hidden units; the residual width and the head count stay."""
    import torch_pruning as tp

    ignored = [model.head, model.patch_embed.proj] + [b.attn.proj for b in model.blocks]
    ignored += [b.mlp.fc2 for b in model.blocks] + ([] if mlp else [b.mlp.fc1 for b in model.blocks])
    size = model.patch_embed.img_size
    return tp.pruner.MetaPruner(
        model,
        torch.randn(1, 3, *size),
        importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=1 - ratio,
        ignored_layers=ignored,
        num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
        prune_head_dims=True,
        prune_num_heads=False,
        global_pruning=False,
    )


def prune_baseline(dense, splits, ratio: float, epochs: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """Torch-Pruning: remove (1 - ratio) of every head's qkv dims and of the MLP hidden channels;
    the residual width stays, so the same block-output distillation applies."""
    import copy

    model = copy.deepcopy(dense).train()
    pruner = head_dim_pruner(model, ratio, mlp=True)
    loader = torch.utils.data.DataLoader(
        splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model.zero_grad()
    for i, (x, y) in enumerate(loader):
        if i == 8:
            break
        torch.nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    fix_pruned_attention(model)
    model.zero_grad()
    before = evaluate(model, splits.eval, progress=False)["top1"]
    t = time.perf_counter()
    res = finetune(model, dense, splits.train, splits.val, FinetuneConfig(epochs=epochs, seed=seed))
    return res["model"], {"top1_before_finetune": before, "time_s": time.perf_counter() - t}


METHODS = {"comcat": "comcat (head)", "matrix": "matrix", "prune": "torch-pruning"}  # --methods: row names


def run_seed(dense, splits, args, seed: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, method in [(n, m) for n, m in (("comcat", "head"), ("matrix", "matrix")) if n in args.methods]:
            spec = JobSpec(
                method=method,
                ratio=args.ratio,
                mlp=True,
                search=SearchConfig(epochs=args.search_epochs),
                finetune=FinetuneConfig(epochs=args.finetune_epochs) if args.finetune_epochs else None,
                seed=seed,
                evaluate=False,
                latency=False,
            )
            t = time.perf_counter()
            res = run_job(spec, Path(tmp) / method)
            small, r = res["loaded"].model, res["report"]
            rows.append(
                {
                    "method": METHODS[name],
                    "params": count_params(small),
                    "time_s": time.perf_counter() - t,
                    "search_s": r["time_s"]["search"],
                    "finetune_s": r["time_s"]["finetune"],
                    "latency_b32_ms": measure_latency(small, 32, iters=30),
                    **per_image(small, splits, args),
                }
            )
            print(f"seed {seed}", public(rows[-1]), flush=True)
    if "prune" in args.methods:
        small, info = prune_baseline(dense, splits, args.ratio, args.finetune_epochs, seed)
        rows.append(
            {
                "method": METHODS["prune"],
                "params": count_params(small),
                "time_s": info["time_s"],
                "top1_before_finetune": info["top1_before_finetune"],
                "latency_b32_ms": measure_latency(small, 32, iters=30),
                **per_image(small, splits, args),
            }
        )
        print(f"seed {seed}", public(rows[-1]), flush=True)
    return rows


@functools.cache
def fresh_shapes(n: int, seed: int):
    return embedded_heldout(n, seed=seed)


def per_image(model, splits, args) -> dict:
    """top-1 and NLL on the 2,000 held-out shapes and on the --big-eval fresh ones, and (kept out of
    the JSON) which images of each the model gets right."""
    held = evaluate(model, splits.eval, batch_size=500, progress=False, per_image=True)
    out = {"top1": held["top1"], "nll": held["nll"], "_right": held["right"]}
    if args.big_eval:
        big = evaluate(
            model, fresh_shapes(args.big_eval, args.big_eval_seed), batch_size=500, progress=False, per_image=True
        )
        out.update(top1_big=big["top1"], nll_big=big["nll"], _right_big=big["right"])
    return out


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def paired(a: torch.Tensor, b: torch.Tensor, reps: int = 4000, seed: int = 0) -> dict:
    """a, b: (S, N) bool, right/wrong of two methods in S training seeds on the same N images.
    Mean paired top-1 difference a - b in points, and its 95% interval from a two-way bootstrap:
    seeds resampled with replacement, images by Poisson(1) counts (only images where a and b ever
    differ matter; the others add zero)."""
    d = a.double() - b.double()
    S, N = d.shape
    d = d[:, d.abs().sum(0) > 0]
    g = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(0, reps, 500):
        seeds = torch.randint(S, (500, S), generator=g)
        counts = torch.poisson(torch.ones(500, d.shape[1], dtype=torch.float64), generator=g)
        stats.append((d[seeds].mean(1) * counts).sum(1) * 100 / N)
    lo, hi = torch.quantile(torch.cat(stats), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "diff": d.sum().item() * 100 / (S * N),
        "ci95": [lo, hi],
        "ahead_seeds": int((d.sum(1) > 0).sum()),
        "behind_seeds": int((d.sum(1) < 0).sum()),
        "images_differing": d.shape[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed; top-1 is averaged")
    ap.add_argument(
        "--methods", nargs="+", choices=("comcat", "matrix", "prune"), default=["comcat", "matrix", "prune"]
    )
    ap.add_argument("--big-eval", type=int, default=20000, help="fresh shapes for a finer top-1 (0: skip)")
    ap.add_argument("--big-eval-seed", type=int, default=3, help="seed of the fresh shapes (default 3)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    torch.set_num_threads(2)

    dense = load_model("embedded").model
    splits = embedded_splits()
    dense_scores = public(per_image(dense, splits, args))
    dense_top1 = dense_scores["top1"]
    sites = sum(l["attn"] + l["mlp"] for l in layer_params(dense))
    print(f"dense top-1 {dense_top1:.2f}%  ({count_params(dense):,} params, attention+MLP {sites:,})")
    runs = {seed: run_seed(dense, splits, args, seed) for seed in args.seeds}
    rows = [
        {
            "method": "dense",
            "params": count_params(dense),
            "top1_per_seed": [dense_top1],
            "time_s": 0.0,
            "latency_b32_ms": measure_latency(dense, 32, iters=30),
            **dense_scores,
        }
    ]
    right = {}  # method -> {set: (seeds, images) bool}
    for i, first in enumerate(runs[args.seeds[0]]):
        per_seed = [runs[s][i] for s in args.seeds]
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in first if isinstance(first[k], float)}
        rows.append({**public(first), **mean, "top1_per_seed": [r["top1"] for r in per_seed]})
        if args.big_eval:
            rows[-1]["top1_big_per_seed"] = [r["top1_big"] for r in per_seed]
        right[first["method"]] = {key: torch.stack([r[key] for r in per_seed]) for key in first if key.startswith("_")}
    if args.big_eval:
        rows[0]["top1_big_per_seed"] = [rows[0]["top1_big"]]
    comparisons = {}
    if METHODS["comcat"] in right:
        ours = right.pop(METHODS["comcat"])
        comparisons = {
            f"comcat - {m}": {
                ("fresh" if key == "_right_big" else "heldout"): paired(ours[key], theirs[key]) for key in theirs
            }
            for m, theirs in right.items()
        }

    print(
        f"\nembedded shapes ViT, attention + MLP at {args.ratio:.0%} of their params, 2 CPU threads; "
        f"top-1 on 2,000 held-out images, mean over seeds {args.seeds}"
    )
    print(
        f"{'method':15} {'params':>10} {'ratio':>6} {'top-1 %':>8} {'drop':>6} {'per seed':>20} "
        f"{'eval NLL':>9} {'time s':>7} {'b32 ms':>7}"
    )
    for r in rows:
        seeds = " ".join(f"{t:.2f}" for t in r["top1_per_seed"])
        print(
            f"{r['method']:15} {r['params']:>10,} {r['params'] / rows[0]['params']:>6.3f} {r['top1']:>8.2f} "
            f"{r['top1'] - dense_top1:>+6.2f} {seeds:>20} {r['nll']:>9.4f} {r['time_s']:>7.1f} "
            f"{r['latency_b32_ms']:>7.2f}"
        )
    if args.big_eval:
        print(f"\non {args.big_eval:,} fresh shapes (seed {args.big_eval_seed}):")
        print(f"{'method':15} {'top-1 %':>8} {'drop':>6} {'per seed':>26} {'NLL':>8}")
        for r in rows:
            seeds = " ".join(f"{t:.3f}" for t in r["top1_big_per_seed"])
            print(
                f"{r['method']:15} {r['top1_big']:>8.3f} {r['top1_big'] - rows[0]['top1_big']:>+6.3f} {seeds:>26} "
                f"{r['nll_big']:>8.4f}"
            )
    if comparisons:
        print("\ncomcat minus each baseline, image by image (points; 95% interval over seeds and images):")
        for name, sets in comparisons.items():
            for where, c in sets.items():
                print(
                    f"{name:26} {where:8} {c['diff']:+7.3f}  [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]  "
                    f"ahead in {c['ahead_seeds']} seeds, behind in {c['behind_seeds']}, "
                    f"{c['images_differing']} images ever differ"
                )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "ratio": args.ratio,
                    "seeds": args.seeds,
                    "big_eval": args.big_eval,
                    "big_eval_seed": args.big_eval_seed,
                    "rows": rows,
                    "paired": comparisons,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
