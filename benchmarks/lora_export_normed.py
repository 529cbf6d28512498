"""What a LoRA file of a q/k-normed adapter (Flux, SD3.5) misses, fitted three ways, side by side.

Small random-init Flux and SD3.5-style pipelines (tests/customization/tiny_pipelines.py: 8-wide
heads, the embedded model's tokenizer), an adapter trained on assets/examples/heart for --steps
under the word V*, then its LoRA:
  closed form   the per-head fit of adapter/lora.py, blind to the norms (what export did on SD3)
  VO only       the closed form's W^V, W^O updates, no W^Q, W^K update
  fitted        `comcat export`'s: refined on the model's own inputs (customization/lora_normed.py)
For each: the largest held-out output error of an attention (fitted only: its sites are scored on
prompts held out from the fit), and the whole denoiser's prediction error on two more held-out
prompts, ||y_lora - y_adapter|| / ||y_adapter - y_base||, with the LoRA loaded by diffusers'
`load_lora_weights`.

    python benchmarks/lora_export_normed.py [--family flux sd3.5] [--steps 100] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "customization"))

from tiny_pipelines import flux, sd3  # noqa: E402

from comcat.customization.adapter import load_adapter, unload_adapter  # noqa: E402
from comcat.customization.customize import CustomizeSpec, customize  # noqa: E402
from comcat.customization.diffusion.denoisers import denoiser_for  # noqa: E402
from comcat.customization.lora_export import apply_lora, closed_form, fit_file  # noqa: E402
from comcat.customization.lora_normed import QK  # noqa: E402

MAKERS = {"flux": flux, "sd3.5": lambda: sd3(qk_norm="rms_norm", dual_attention_layers=(0,))}
HELD = ["a V* in a garden", "an old photo of a V*"]


def closed_form_fits(pipe, adapter: Path, vo_only: bool) -> dict:
    """The closed-form fit of every site; its W^Q, W^K updates dropped when `vo_only`."""
    name = load_adapter(pipe, adapter, name="closed")
    try:
        fits = closed_form(pipe, name)
    finally:
        unload_adapter(pipe, name)
    for f in fits.values() if vo_only else ():
        f.factors = {p: ((torch.zeros_like(u), d) if p.endswith(QK) else (u, d)) for p, (u, d) in f.factors.items()}
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="+", default=list(MAKERS), choices=list(MAKERS))
    ap.add_argument("--steps", type=int, default=100, help="customization steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for family in args.family:
        pipe = MAKERS[family]()
        pipe.set_progress_bar_config(disable=True)
        with tempfile.TemporaryDirectory() as tmp:
            spec = CustomizeSpec(
                images=str(ROOT / "assets/examples/heart"),
                prompt="a V*",
                steps=args.steps,
                preview_every=0,
            )
            adapter = Path(customize(spec, Path(tmp) / "run", pipe=pipe)["adapter"])
            unload_adapter(pipe)  # customize leaves the trained adapter in the pipeline it was given
            den = denoiser_for(pipe)
            base = den.fixed_prediction(HELD)
            load_adapter(pipe, adapter)
            adapted = den.fixed_prediction(HELD)
            unload_adapter(pipe)
            weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
            t = time.perf_counter()
            _, _, fitted = fit_file(pipe, adapter)
            seconds = time.perf_counter() - t
            for method, fits in (
                ("closed form", closed_form_fits(pipe, adapter, vo_only=False)),
                ("VO only", closed_form_fits(pipe, adapter, vo_only=True)),
                ("fitted", fitted),
            ):
                apply_lora(pipe.transformer, fits)
                y = den.fixed_prediction(HELD)
                pipe.transformer.load_state_dict(weights)
                row = {
                    "family": family,
                    "method": method,
                    "sites": len(fits),
                    "site_err_max": max((f.err_out for f in fits.values() if f.err_out is not None), default=None)
                    if method == "fitted"
                    else None,
                    "output_error": float((y - adapted).norm() / (base - adapted).norm()),
                    "fit_s": seconds if method == "fitted" else None,
                }
                rows.append(row)
                site = "" if row["site_err_max"] is None else f", largest site (held out) {row['site_err_max']:.3f}"
                print(f"{family:6} {method:12} whole-model output error {row['output_error']:.3f}{site}", flush=True)
            print(f"{family:6} fit time {seconds:.1f} s for {len(fitted)} attentions (2 CPU cores)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
