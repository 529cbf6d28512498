"""Head-level spectra: thin QR + d x d core SVD vs forming and decomposing the C x C products.

On the deit_base_patch16_224 architecture (random init; 12 blocks x 12 heads, C = 768, d = 64),
both ways in one run, float64, the same threads. Prints the times, the ratio and the largest
difference between the two spectra.

    python benchmarks/analysis_speed.py [--arch deit_base_patch16_224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from comcat.compression import families
from comcat.compression.analysis import analyze, head_factors, head_spectra


@torch.no_grad()
def head_spectra_formed(model) -> dict:
    """Reference: form each C x C product W^QK_h, W^VO_h and take its singular values."""
    out = {"qk": [], "vo": []}
    for block in families.blocks(model):
        for p, (x, y) in head_factors(families.attention(block)).items():
            d = x.shape[-1]
            out[p].append(torch.linalg.svdvals(x @ y.transpose(-1, -2))[..., :d])
    return {p: torch.stack(v).numpy() for p, v in out.items()}


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="deit_base_patch16_224")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = timm.create_model(args.arch, pretrained=False).eval()
    print(f"{args.arch}: torch {torch.__version__}, {torch.get_num_threads()} threads")

    t_qr, fast = timed(lambda: head_spectra(model), args.repeats)
    t_formed, slow = timed(lambda: head_spectra_formed(model), max(1, args.repeats - 2))
    t_full, spectra = timed(lambda: analyze(model), args.repeats)
    diff = max(abs(fast[p] - slow[p]).max() / slow[p].max() for p in fast)
    print(f"head-level spectra, thin QR      : {t_qr:8.3f} s")
    print(f"head-level spectra, formed C x C : {t_formed:8.3f} s")
    print(f"speed-up                         : {t_formed / t_qr:8.1f}x   (max relative difference {diff:.1e})")
    print(f"full analysis (matrix + head)    : {t_full:8.3f} s")
    print(spectra.summary(0.9))


if __name__ == "__main__":
    main()
