"""COMCAT vs baselines at an equal parameter budget on the embedded shapes ViT (CPU).

  comcat   head-level low rank, Gumbel-softmax rank search + distillation fine-tuning
  matrix   matrix-level low rank (W^Q, W^K, W^V, W^O separately), the same search + fine-tuning
  prune    structured pruning with Torch-Pruning (per-head dims of qkv + MLP hidden channels,
           Taylor importance), the same distillation fine-tuning
All compress the attention and MLP weights to --ratio of their parameters and are evaluated on the
2,000 held-out shapes every report uses, and on --big-eval fresh shapes (seed 3, used nowhere else:
one image is 0.005 points there, so methods that tie on 2,000 can be told apart). Prints one table;
--json writes it.

    python benchmarks/compress_embedded.py [--ratio 0.5] [--seeds 0 1 2] [--big-eval 20000] [--json docs/results/compress_embedded.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comcat.cost import count_params, layer_params, measure_latency  # noqa: E402
from comcat.data.splits import embedded_splits  # noqa: E402
from comcat.distill import finetune  # noqa: E402
from comcat.evaluate import embedded_heldout, evaluate  # noqa: E402
from comcat.job import JobSpec, run_job  # noqa: E402
from comcat.models import load_model  # noqa: E402


def prune_baseline(dense, splits, ratio: float, epochs: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """Torch-Pruning: remove (1 - ratio) of every head's qkv dims and of the MLP hidden channels;
    the residual width stays, so the same block-output distillation applies."""
    import copy

    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    model = copy.deepcopy(dense).train()
    ignored = [model.head, model.patch_embed.proj] + [m for b in model.blocks for m in (b.attn.proj, b.mlp.fc2)]
    num_heads = {b.attn.qkv: b.attn.num_heads for b in model.blocks}
    imp = tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=1 - ratio,
                                  ignored_layers=ignored, num_heads=num_heads, prune_head_dims=True,
                                  prune_num_heads=False, global_pruning=False)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    for i, (x, y) in enumerate(loader):
        if i == 8:
            break
        torch.nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    for m in model.modules():
        if isinstance(m, Attention):       # timm reads these in forward; keep the dense logit scale
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
            m.fused_attn = False
    model.zero_grad()
    before = evaluate(model, splits.eval, progress=False)["top1"]
    t = time.perf_counter()
    res = finetune(model, dense, splits.train, splits.search, epochs=epochs, seed=seed)
    return res["model"], {"top1_before_finetune": before, "time_s": time.perf_counter() - t}


def run_seed(dense, splits, args, seed: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("head", "matrix"):
            spec = JobSpec(method=method, ratio=args.ratio, mlp=True, search_epochs=args.search_epochs,
                           finetune_epochs=args.finetune_epochs, seed=seed, latency=False)
            t = time.perf_counter()
            res = run_job(spec, Path(tmp) / method)
            small, r = res["loaded"].model, res["report"]
            rows.append({"method": "comcat (head)" if method == "head" else "matrix", "params": count_params(small),
                         "top1": r["compressed"]["top1"], "nll": r["compressed"]["nll"],
                         "time_s": time.perf_counter() - t,
                         "search_s": r["time_s"]["search"], "finetune_s": r["time_s"]["finetune"],
                         "latency_b32_ms": measure_latency(small, 32, iters=30), **big_eval(small, args)})
            print(f"seed {seed}", rows[-1], flush=True)
    small, info = prune_baseline(dense, splits, args.ratio, args.finetune_epochs, seed)
    scores = evaluate(small, splits.eval, progress=False)
    rows.append({"method": "torch-pruning", "params": count_params(small),
                 "top1": scores["top1"], "nll": scores["nll"], "time_s": info["time_s"],
                 "top1_before_finetune": info["top1_before_finetune"],
                 "latency_b32_ms": measure_latency(small, 32, iters=30), **big_eval(small, args)})
    print(f"seed {seed}", rows[-1], flush=True)
    return rows


@functools.cache
def fresh_shapes(n: int):
    return embedded_heldout(n, seed=3)


def big_eval(model, args) -> dict:
    """top-1 and NLL on the --big-eval fresh shapes (seed 3)."""
    if not args.big_eval:
        return {}
    scores = evaluate(model, fresh_shapes(args.big_eval), batch_size=500, progress=False)
    return {"top1_big": scores["top1"], "nll_big": scores["nll"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed; top-1 is averaged")
    ap.add_argument("--big-eval", type=int, default=20000, help="fresh shapes for a finer top-1 (0: skip)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    torch.set_num_threads(2)

    dense = load_model("embedded").model
    splits = embedded_splits()
    dense_scores = evaluate(dense, splits.eval, progress=False)
    dense_top1 = dense_scores["top1"]
    sites = sum(l["attn"] + l["mlp"] for l in layer_params(dense))
    print(f"dense top-1 {dense_top1:.2f}%  ({count_params(dense):,} params, attention+MLP {sites:,})")
    runs = {seed: run_seed(dense, splits, args, seed) for seed in args.seeds}
    rows = [{"method": "dense", "params": count_params(dense), "top1": dense_top1, "nll": dense_scores["nll"],
             "top1_per_seed": [dense_top1],
             "time_s": 0.0, "latency_b32_ms": measure_latency(dense, 32, iters=30), **big_eval(dense, args)}]
    for i, first in enumerate(runs[args.seeds[0]]):
        per_seed = [runs[s][i] for s in args.seeds]
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in first if isinstance(first[k], float)}
        rows.append({**first, **mean, "top1_per_seed": [r["top1"] for r in per_seed]})
        if args.big_eval:
            rows[-1]["top1_big_per_seed"] = [r["top1_big"] for r in per_seed]
    if args.big_eval:
        rows[0]["top1_big_per_seed"] = [rows[0]["top1_big"]]

    print(f"\nembedded shapes ViT, attention + MLP at {args.ratio:.0%} of their params, 2 CPU threads; "
          f"top-1 on 2,000 held-out images, mean over seeds {args.seeds}")
    print(f"{'method':15} {'params':>10} {'ratio':>6} {'top-1 %':>8} {'drop':>6} {'per seed':>20} {'eval NLL':>9} {'time s':>7} {'b32 ms':>7}")
    for r in rows:
        seeds = " ".join(f"{t:.2f}" for t in r["top1_per_seed"])
        print(f"{r['method']:15} {r['params']:>10,} {r['params'] / rows[0]['params']:>6.3f} {r['top1']:>8.2f} "
              f"{r['top1'] - dense_top1:>+6.2f} {seeds:>20} {r['nll']:>9.4f} {r['time_s']:>7.1f} {r['latency_b32_ms']:>7.2f}")
    if args.big_eval:
        print(f"\non {args.big_eval:,} fresh shapes (seed 3):")
        print(f"{'method':15} {'top-1 %':>8} {'drop':>6} {'per seed':>26} {'NLL':>8}")
        for r in rows:
            seeds = " ".join(f"{t:.3f}" for t in r["top1_big_per_seed"])
            print(f"{r['method']:15} {r['top1_big']:>8.3f} {r['top1_big'] - rows[0]['top1_big']:>+6.3f} {seeds:>26} "
                  f"{r['nll_big']:>8.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ratio": args.ratio, "seeds": args.seeds, "big_eval": args.big_eval,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
