"""MLP neuron selection with a closed-form refit of fc2 on the real ViT-Tiny, no gradient step.

The seed-0 split as a compress run splits ../shared/data/imagenet-sample (400 fitting images, labels
unused; 500 held-out evaluation images). Attention stays dense; every block's MLP keeps the same
fraction of its neurons, chosen from the dense model's statistics on the fitting images
(comcat/compression/neurons.py): by the score E[h_j^2] ||W2[:, j]||^2 ("magnitude", the pilot's), or
greedily by the refit error itself ("greedy"); fc2 dropped as is ("no refit") or refit in closed form.
Top-1, agreement and KL to the dense model on the evaluation images, and the paired 95% bootstrap
interval of greedy minus magnitude (both refit).

--attention R starts instead from the attention compressed to R of its parameters as a compress run
starts (calibrated factors at calibrated ranks, no distillation), and chooses the neurons from that
model's own MLP statistics on the fitting images.

    python benchmarks/mlp_neurons.py [--keep 0.75 0.5] [--attention 0.5] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from real_vit import paired
from search_vit_tiny import real_vit_tiny, tensors
from torch.utils.data import DataLoader

from comcat.compression import families
from comcat.compression.allocate import FISHER_IMAGES, PROBE_IMAGES, calibrated_ranks
from comcat.compression.calibrate import Moments, build, calibrate
from comcat.compression.cost import Budget, count_params
from comcat.compression.evaluate import predict, scores
from comcat.compression.neurons import narrowed, prune_mlp, select_neurons
from comcat.compression.splits import folder_splits


@torch.no_grad()
def mlp_moments(model, loader) -> list[torch.Tensor]:
    """Per block, the augmented second moment of fc2's input on the images of `loader`."""
    moments, hooks = [], []
    for block in families.blocks(model):
        fc2 = families.mlp(block)["fc2"]
        moments.append(Moments(fc2.in_features))
        add = lambda m, a, s=moments[-1]: s.add(a[0].reshape(-1, a[0].shape[-1]))  # noqa: E731
        hooks.append(fc2.register_forward_pre_hook(add))
    try:
        for x, _ in loader:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [m.second() for m in moments]


def pruned(start, moments, frac: float, rule: str, refit: bool):
    model = copy.deepcopy(start)
    for block, g in zip(families.blocks(model), moments):
        mlp = families.mlp(block)
        k = max(1, round(frac * mlp["fc2"].in_features))
        if refit:
            fc1, fc2 = prune_mlp(mlp["fc1"], mlp["fc2"], g, k, rule)
        else:  # the same neurons, fc2's columns as they were
            fc1, fc2 = narrowed(mlp["fc1"], mlp["fc2"], select_neurons(g, mlp["fc2"], k, rule))
        families.set_mlp(block, "fc1", fc1)
        families.set_mlp(block, "fc2", fc2)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--attention", type=float, default=None, help="start from the attention at this budget")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    found = real_vit_tiny()
    if found is None:
        return
    dense, images = found
    splits = folder_splits(images, dense, seed=0)
    fit, evaluation = tensors(splits.fit), tensors(splits.eval)
    ref, labels = predict(dense, evaluation, progress=False)
    base = scores(ref, labels)
    t = time.perf_counter()
    loader = DataLoader(fit, batch_size=32)
    start = dense
    if args.attention is not None:  # the calibrated, allocated attention a compress run starts from
        cal = calibrate(dense, loader, probe=PROBE_IMAGES, fisher=FISHER_IMAGES)
        cfg, _ = calibrated_ranks(dense, cal, Budget(args.attention, "params", "head", False))
        start = build(dense, cfg, cal).eval()
        logits, _ = predict(start, evaluation, progress=False)
        s = scores(logits, labels, ref)
        print(
            f"attention at {args.attention:.0%}: params {count_params(start) / count_params(dense):.3f}×, "
            f"top-1 {s['top1']:.1f}, agreement {s['agreement']:.1f}, KL {s['kl']:.3f}",
            flush=True,
        )
    moments = mlp_moments(start, loader)
    print(
        f"{len(fit)} fitting images, {len(evaluation)} evaluation; dense top-1 {base['top1']:.1f}%; "
        f"statistics in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    rows, right = [], {}
    print(f"{'neurons kept':>12} {'rule':>10} {'fc2':>9} {'params':>7} {'top-1':>6} {'agree':>6} {'KL':>6} {'s':>4}")
    for frac in args.keep:
        for rule in ("magnitude", "greedy"):
            for refit in (False, True):
                t = time.perf_counter()
                model = pruned(start, moments, frac, rule, refit)
                logits, _ = predict(model, evaluation, progress=False)
                s = scores(logits, labels, ref, per_image=True)
                right[(frac, rule, refit)] = s.pop("right")
                s.pop("agree", None)
                row = {"keep": frac, "rule": rule, "refit": refit, "params": count_params(model) / count_params(dense)}
                rows.append({**row, **{k: s[k] for k in ("top1", "agreement", "kl")}})
                print(
                    f"{frac:>12.0%} {rule:>10} {'refit' if refit else 'as is':>9} {row['params']:>6.3f}× "
                    f"{s['top1']:>6.1f} {s['agreement']:>6.1f} {s['kl']:>6.3f} {time.perf_counter() - t:>4.0f}",
                    flush=True,
                )
        d = paired(right[(frac, "greedy", True)], right[(frac, "magnitude", True)])
        print(
            f"  greedy - magnitude (both refit), {frac:.0%} kept: {d['diff']:+.1f} points, "
            f"95% interval [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"
        )
        rows.append({"keep": frac, "greedy_minus_magnitude": d})
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
