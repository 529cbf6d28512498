"""Latency (CPU by default) of compressed vs dense models at ~50% of the parameters, measured side by side.

Models: the embedded shapes ViT and the deit_small_patch16_224 architecture (random weights, no
download), each compressed at head level with uniform ranks keeping 50% of the attention and MLP
parameters. Dense and compressed are timed alternately (median of --rounds rounds of --iters
forward passes) so machine noise hits both alike; on the CPU once per --threads count.

    python benchmarks/latency.py [--batches 1 32] [--rounds 5] [--iters 5] [--models ...]
        [--threads 1 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from comcat.compression.convert import compress
from comcat.compression.cost import count_params, measure_latency
from comcat.compression.load import load_model
from comcat.compression.models import build_arch
from comcat.compression.rank_rules import uniform_ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda (fp32)")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[torch.get_num_threads()],
        help="CPU intra-op thread counts to time at (default: torch's, one per core)",
    )
    ap.add_argument(
        "--models",
        default="embedded,deit_small_patch16_224",
        help="comma-separated: embedded and/or timm architectures (random weights)",
    )
    args = ap.parse_args()
    models = {
        name: load_model("embedded").model if name == "embedded" else build_arch(name)
        for name in args.models.split(",")
    }
    where = "CPU" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{where}, head level, uniform ranks, attention + MLP at {args.ratio:.0%}")
    print(f"{'model':24} {'params':>7} {'threads':>7} {'batch':>5} {'dense ms':>9} {'comcat ms':>9} {'ratio':>6}")
    for name, dense in models.items():
        dense.eval()
        small = compress(dense, uniform_ranks(dense, "head", args.ratio, mlp=True)).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                d, c = [], []
                for _ in range(args.rounds):
                    d.append(measure_latency(dense, batch, iters=args.iters, device=args.device))
                    c.append(measure_latency(small, batch, iters=args.iters, device=args.device))
                d, c = statistics.median(d), statistics.median(c)
                print(
                    f"{name:24} {count_params(small) / count_params(dense):>7.3f} {threads:>7} {batch:>5} "
                    f"{d:>9.2f} {c:>9.2f} {c / d:>6.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
