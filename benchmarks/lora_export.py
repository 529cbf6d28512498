"""What converting a COMCAT adapter to a LoRA file loses, on the embedded text-to-image model.

An adapter is trained on assets/examples/heart (or --adapter gives one), then written as a diffusers
LoRA at several ranks (`comcat export --format diffusers`) and loaded back by diffusers' own
`load_lora_adapter` (with the learned token from its textual-inversion file). For each rank:
  - the relative error of the per-head W^QK_h and W^VO_h against the adapter's update (mean and
    largest over attentions);
  - the output error on the concept's prompts: ||eps_lora - eps_adapter|| / ||eps_adapter - eps_base||
    of the UNet's noise prediction, over 8 prompts x 4 timesteps on fixed noise;
  - the embedded judge's concept rate ('a V* in {colour}', 8 colours x --per-colour images), beside
    the adapter's own and the base model's.

    python benchmarks/lora_export.py [--steps 300] [--adapter DIR] [--ranks 0 2 4] [--seed S] [--json F]
    (--ranks: multiples of heads x the adapter's rank; 0 = the best rank-d fit at full rank)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from comcat.compression.load import load_model
from comcat.core.files import atomic_write_text
from comcat.core.shapes import COLOURS
from comcat.customization.adapter import load_adapter, unload_adapter
from comcat.customization.adapter.model import add_token, read_adapter
from comcat.customization.customize import CustomizeSpec, customize
from comcat.customization.diffusion.concept import encode_text
from comcat.customization.diffusion.pipeline import load_pipeline
from comcat.customization.diffusion.quality import concept_quality
from comcat.customization.lora_export import export_adapter

ROOT = Path(__file__).resolve().parent.parent


def noise_predictions(pipe, token: str, seed: int = 0) -> torch.Tensor:
    """eps(x_t, t, 'a V* in {colour}') for 8 prompts x 4 timesteps on seeded noise: (32, C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(len(COLOURS) * 4, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([100, 300, 600, 900]).repeat(len(COLOURS))
    context = encode_text(pipe, [f"a {token} in {c}" for c in COLOURS for _ in range(4)])
    with torch.no_grad():
        return unet(x, t, context).sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="customization steps when no --adapter")
    ap.add_argument("--adapter", default=None, help="an adapter to convert (default: train one on the hearts)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 0])
    ap.add_argument("--per-colour", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="seeds the adapter's training and the judge's images")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    classifier = load_model("embedded").model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe = load_pipeline("embedded")
        base_eps = noise_predictions(pipe, "V*")
        adapter = args.adapter
        if adapter is None:
            spec = CustomizeSpec(
                images=str(ROOT / "assets/examples/heart"),
                prompt="a V*",
                steps=args.steps,
                preview_every=0,
                seed=args.seed,
            )
            customize(spec, tmp / "heart", pipe=pipe)
            unload_adapter(pipe)
            adapter = tmp / "heart"
        config, _ = read_adapter(adapter)
        rows = {"base": concept_quality(pipe, classifier, per_colour=args.per_colour, seed=args.seed)}
        load_adapter(pipe, adapter, name="adapter")
        ref_eps = noise_predictions(pipe, config.token)
        rows["adapter"] = concept_quality(pipe, classifier, per_colour=args.per_colour, seed=args.seed)
        unload_adapter(pipe)
        effect = float((ref_eps - base_eps).norm())
        heads_r = None
        for mult in args.ranks:
            t0 = time.perf_counter()
            fresh = load_pipeline("embedded")
            if heads_r is None:
                attn = next(m for m in fresh.unet.modules() if type(m).__name__ == "Attention")
                heads_r = attn.heads * config.rank
            rank = 10**6 if mult == 0 else mult * heads_r
            file = tmp / f"lora_{mult}.safetensors"
            r = export_adapter(fresh, adapter, "diffusers", file, rank)
            fit_s = time.perf_counter() - t0
            fresh.unet.load_lora_adapter(str(file), prefix="unet", adapter_name="lora")
            add_token(fresh, config.token, load_file(r["token_file"])["emb_params"][0])
            eps = noise_predictions(fresh, config.token)
            fits = r["fits"].values()
            row = {
                "lora_rank": r["rank"],
                "file_kb": file.stat().st_size / 1e3,
                "err_qk_mean": statistics.mean(f.err_qk for f in fits),
                "err_qk_max": r["err_qk"],
                "err_vo_mean": statistics.mean(f.err_vo for f in fits),
                "err_vo_max": r["err_vo"],
                "out_err": float((eps - ref_eps).norm()) / effect,
                "fit_s": fit_s,
                **concept_quality(fresh, classifier, per_colour=args.per_colour, seed=args.seed),
            }
            rows[f"lora x{mult}" if mult else "lora full"] = row
            print(
                f"LoRA rank {row['lora_rank']:4d} ({row['file_kb']:6.0f} kB, fit {fit_s:4.1f} s): W^QK error "
                f"{row['err_qk_mean']:.3f} mean / {row['err_qk_max']:.3f} max, W^VO {row['err_vo_mean']:.3f} / "
                f"{row['err_vo_max']:.3f}, output error {row['out_err']:.3f}, concept {100 * row['shape']:.1f}%, "
                f"colour {100 * row['colour']:.1f}%",
                flush=True,
            )
        for k in ("base", "adapter"):
            print(f"{k:8}: concept {100 * rows[k]['shape']:.1f}%, colour {100 * rows[k]['colour']:.1f}%")
    if args.json:
        atomic_write_text(args.json, json.dumps({"adapter_rank": config.rank, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
