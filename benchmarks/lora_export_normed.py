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

With --real-width, also Flux's attention at its real widths (real_width below).

    python benchmarks/lora_export_normed.py [--family flux sd3.5] [--steps 100] [--real-width] [--json F]
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

from diffusion_customization import config_model  # noqa: E402
from tiny_pipelines import flux, sd3  # noqa: E402

from comcat.customization.adapter import load_adapter, unload_adapter  # noqa: E402
from comcat.customization.customize import CustomizeSpec, customize  # noqa: E402
from comcat.customization.diffusion.denoisers import denoiser_for  # noqa: E402
from comcat.customization.lora_export import apply_lora, closed_form, fit_file  # noqa: E402
from comcat.customization.lora_normed import QK, NormedFitConfig  # noqa: E402

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


def real_width(steps: int, tokens: tuple[int, int], batch: int = 2) -> list[dict]:
    """Flux's attention at its real widths (24 heads of 128, 3072 wide; one double- and one
    single-stream block, random weights), a rank-2 adapter with random B, R (std 0.02), inputs from
    random latents and text states (`tokens`: image, text tokens; `batch` sequences each to fit, to
    validate, to report on): per attention, the held-out output error of the closed form and of
    what the export keeps, and the fit's time."""
    from comcat.customization.adapter import AdapterConfig, adapter_parameters, add_adapter
    from comcat.customization.lora_normed import capture, refine_site

    torch.manual_seed(0)  # FLUX.1-dev's widths (benchmarks/configs), one block of each kind, no guidance input
    model = config_model("flux_transformer", num_layers=1, num_single_layers=1, guidance_embeds=False)
    model.requires_grad_(False)
    add_adapter(model, AdapterConfig(rank=2), "a")
    for key, p in adapter_parameters(model, "a").items():
        if key.endswith((".B", ".R")):
            p.data.normal_(0, 0.02)
    t = time.perf_counter()
    fits = closed_form(model, "a")
    closed_s = time.perf_counter() - t
    print(f"real width closed form: {closed_s:.0f} s for {len(fits)} attentions, {torch.get_num_threads()} threads")
    n_img, n_txt = tokens
    side = int(n_img**0.5)
    axis = torch.arange(side * 1.0)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1).reshape(-1, 3)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        x, c = torch.randn(batch, side * side, 64, generator=gen), torch.randn(batch, n_txt, 4096, generator=gen)
        pooled, t = torch.randn(batch, 768, generator=gen), torch.rand(batch, generator=gen)
        return lambda: model(x, c, pooled, t, img_ids, torch.zeros(n_txt, 3))

    parts = {part: capture(model, list(fits), run(i + 1)) for i, part in enumerate(("fit", "validation", "held_out"))}
    rows = []
    for site, fit in fits.items():
        t = time.perf_counter()
        inputs = {part: captured[site] for part, captured in parts.items()}
        out = refine_site(model, site, fit, inputs, NormedFitConfig(steps=steps))
        rows.append(
            {
                "site": site,
                "lora_rank": max(len(d) for _, d in out.factors.values()),
                "closed_form": out.err_out_closed_form,
                "kept": out.method_qk,
                "kept_held_out": out.err_out,
                "kept_on_fit_inputs": out.err_fit,
                "fit_s": time.perf_counter() - t,
                "closed_form_s_all_sites": closed_s,
                "threads": torch.get_num_threads(),
                "steps": steps,
                "tokens": [side * side, n_txt],
            }
        )
        r = rows[-1]
        print(
            f"real width {site:34} LoRA rank {r['lora_rank']}: held-out output error closed form "
            f"{r['closed_form']:.3f}; kept ({r['kept']}) {r['kept_held_out']:.3f}, on its fit inputs "
            f"{r['kept_on_fit_inputs']:.3f} ({steps} steps, {r['fit_s']:.0f} s)",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="+", default=list(MAKERS), choices=list(MAKERS))
    ap.add_argument("--steps", type=int, default=100, help="customization steps")
    ap.add_argument("--real-width", action="store_true", help="also Flux's attention at its real widths")
    ap.add_argument("--real-steps", type=int, default=150)
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
    if args.real_width:
        rows += real_width(args.real_steps, (256, 128))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
