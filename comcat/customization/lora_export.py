"""An adapter as a LoRA file that diffusers, kohya-based tools and ComfyUI load, or baked into a pipeline.

Formats (the fitted factors of `adapter.lora` are the same in all three):
  diffusers  unet.<module>.to_q.lora_A.weight (R, in) / lora_B.weight (out, R): peft keys, what
             `load_lora_weights` / `load_lora_adapter` read
  kohya      lora_unet_<module with _>_to_q.lora_down.weight / lora_up.weight / alpha: diffusers' own
             `convert_state_dict_to_kohya` of the diffusers keys (kohya's SD 1.x layout)
  comfy      the same in the original (LDM / sgm) UNet layout: input_blocks.N.1, middle_block.1,
             output_blocks.N.1, which ComfyUI and A1111 map natively and diffusers reads back by
             `_maybe_map_sgm_blocks_to_diffusers`
A learned token goes beside it as a textual-inversion file ({"emb_params": (1, width)}).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.errors import ComcatError
from ..core.files import atomic_write
from ..core.loop import RunControl
from .adapter.layer import ComcatAttnProcessor
from .adapter.lora import SiteFit, fit_site
from .adapter.model import _processors, _unet, attention_sites, output_projection, read_adapter
from .lora_normed import NormedFitConfig, check_pipeline, check_stop, refine_normed

FORMATS = ("diffusers", "kohya", "comfy")


def closed_form(pipe, name: str, rank: int | None = None, control: RunControl | None = None) -> dict[str, SiteFit]:
    """attention site -> the closed-form LoRA (adapter/lora.py) of adapter `name` loaded in `pipe`
    at its strength, blind to any q/k norms. `control` gets {"kind": "lora", "stage": "closed form",
    "step", "total"} after every site and may stop the fit (ExportStopped)."""
    unet = _unet(pipe)
    sites = attention_sites(unet)
    adapted = {s: p for s, p in _processors(unet).items() if isinstance(p, ComcatAttnProcessor) and name in p.adapters}
    fits, control = {}, control or RunControl()
    for i, (site, proc) in enumerate(adapted.items(), 1):
        check_stop(control)
        attn = sites[site]
        out = output_projection(unet, site, attn)
        fits[site] = fit_site(attn, proc.adapters[name], proc.scales[name], out, rank, site)
        control.emit({"kind": "lora", "stage": "closed form", "step": i, "total": len(adapted)})
    if not fits:
        raise ComcatError(f"no adapter called {name!r} is loaded")
    for f in fits.values():  # a proj_out LoRA spans the block's MLP columns too: zeros there
        for path, (up, down) in f.factors.items():
            width = unet.get_submodule(path).in_features
            if down.shape[1] < width:
                f.factors[path] = (up, torch.nn.functional.pad(down, (0, width - down.shape[1])))
    return fits


def fit_lora(
    pipe,
    name: str,
    rank: int | None = None,
    token: str = "V*",
    fit: NormedFitConfig | None = None,
    control: RunControl | None = None,
) -> dict[str, SiteFit]:
    """attention site -> its fitted LoRA, for adapter `name` loaded in `pipe` at its strength: the
    closed form, refined where the attention normalizes q and k on the model's own inputs for
    prompts with `token` (lora_normed.py, configured by `fit`); progress and stop through `control`."""
    check_pipeline(pipe)
    return refine_normed(pipe, closed_form(pipe, name, rank, control), token, fit, control)


def prefix(unet) -> str:
    """The key prefix diffusers' LoRA loaders expect for this denoiser: 'unet' or 'transformer'."""
    return "unet" if hasattr(unet, "conv_in") and hasattr(unet, "up_blocks") else "transformer"


def _ldm_site(site: str, layers_per_block: int) -> str:
    """A diffusers UNet attention path -> the original UNet's ('down_blocks.1.attentions.0.x' ->
    'input_blocks.4.1.x' for 2 layers per block)."""
    parts = site.split(".")
    n = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        head = ["input_blocks", str(1 + int(parts[1]) * n + int(parts[3])), "1"]
    elif parts[0] == "up_blocks" and parts[2] == "attentions":
        head = ["output_blocks", str(int(parts[1]) * n + int(parts[3])), "1"]
    elif parts[0] == "mid_block" and parts[1] == "attentions":
        head = ["middle_block", "1"]
    else:
        raise ComcatError(
            f"the comfy layout covers UNet down, mid and up blocks; {site} is outside them: use --format diffusers"
        )
    rest = parts[4:] if parts[0] != "mid_block" else parts[3:]
    return ".".join(head + rest)


def check_layout(fmt: str, unet=None) -> str:
    """The key prefix of `fmt` for the denoiser `unet` ('unet' or 'transformer'), or one line when
    the layout cannot hold this denoiser's LoRA. Cheap: export calls it before fitting."""
    if fmt not in FORMATS:
        raise ComcatError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    head = prefix(unet) if unet is not None else "unet"
    if head != "unet" and fmt != "diffusers":
        raise ComcatError(
            f"the {fmt} layout covers UNets (SD 1.x/2.x, SDXL); for a transformer use --format diffusers, "
            "whose transformer.… keys ComfyUI also reads (SD3, Flux)"
        )
    if fmt == "comfy" and not isinstance(unet.config.layers_per_block, int):
        raise ComcatError("this UNet has a different number of layers per block: use --format diffusers or kohya")
    return head


def lora_state_dict(fits: dict[str, SiteFit], fmt: str, unet=None) -> dict[str, torch.Tensor]:
    """The fitted factors under `fmt`'s keys (float32) for the denoiser `unet` (check_layout first)."""
    head = check_layout(fmt, unet)
    factors = {path: f for fit in fits.values() for path, f in fit.factors.items()}
    peft = {}
    for path, (up, down) in sorted(factors.items()):
        peft[f"{head}.{path}.lora_A.weight"] = down.contiguous()
        peft[f"{head}.{path}.lora_B.weight"] = up.contiguous()
    if fmt == "diffusers":
        return peft
    if fmt == "kohya":
        from diffusers.utils import convert_state_dict_to_kohya

        return convert_state_dict_to_kohya(peft)
    lpb = unet.config.layers_per_block
    out = {}
    for path, (up, down) in sorted(factors.items()):
        key = "lora_unet_" + _ldm_site(path, lpb).replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(len(down)))
    return out


def apply_lora(unet, fits: dict[str, SiteFit]) -> None:
    """Add each fitted update up @ down to its projection's weight, in place (a bake)."""
    with torch.no_grad():
        for fit in fits.values():
            for path, (up, down) in fit.factors.items():
                w = unet.get_submodule(path).weight
                w += (up @ down).to(w)


def token_file(tensors: dict, path: Path) -> Path | None:
    """The adapter's learned token row as a textual-inversion file (diffusers, A1111, ComfyUI read it)."""
    if "token_embedding" not in tensors:
        return None
    emb = tensors["token_embedding"].float()[None].contiguous()
    return atomic_write(path, lambda tmp: save_file({"emb_params": emb}, tmp))


def fit_file(
    pipe,
    adapter: str | Path,
    rank: int | None = None,
    fit: NormedFitConfig | None = None,
    control: RunControl | None = None,
) -> tuple:
    """(config, tensors, fits) of the adapter file `adapter`, fitted in `pipe` (loaded, then unloaded)."""
    from .adapter.model import load_adapter, unload_adapter

    config, tensors = read_adapter(adapter)
    name = load_adapter(pipe, adapter, name="lora-fit")
    try:
        return config, tensors, fit_lora(pipe, name, rank, config.token, fit, control)
    finally:
        unload_adapter(pipe, name)


def summary(config, fits: dict[str, SiteFit]) -> dict:
    """The token, the LoRA rank, the sites, the largest relative errors of W^QK_h and W^VO_h over the
    closed-form sites (None where every site was fitted on inputs) and the largest held-out output
    error of the q/k-normed sites (None where there are none)."""
    closed = [f for f in fits.values() if f.err_out is None]
    fitted = [f.err_out for f in fits.values() if f.err_out is not None]
    return {
        "token": config.token,
        "rank": max(len(down) for f in fits.values() for _, down in f.factors.values()),
        "sites": len(fits),
        "err_qk": max((f.err_qk for f in closed), default=None),
        "err_vo": max((f.err_vo for f in closed), default=None),
        "err_out": max(fitted, default=None),
        "fitted_sites": len(fitted),
        "fits": fits,
    }


def error_line(r: dict) -> str:
    """What the LoRA misses of the adapter, in one line (from `summary`)."""
    parts = []
    if r["err_qk"] is not None:
        parts.append(
            f"relative error of the per-head products W^QK {r['err_qk']:.3f}, W^VO {r['err_vo']:.3f} (a LoRA keeps "
            "each head's width, so part of the adapter's extra per-head rank cannot be carried over)"
        )
    if r["err_out"] is not None:
        parts.append(
            f"output error {r['err_out']:.3f} of the {r['fitted_sites']} attentions that normalize q and k, on "
            "held-out prompts (fitted on the model's own inputs: no closed form passes the norms)"
        )
    return (
        "Largest " + "; ".join(parts) + "; a lower rank (comcat export --rank) gives a smaller file and a larger error"
    )


def export_adapter(
    pipe,
    adapter: str | Path,
    fmt: str,
    out: str | Path,
    rank: int | None = None,
    fit: NormedFitConfig | None = None,
    control: RunControl | None = None,
) -> dict:
    """Fit adapter `adapter` (loaded into `pipe` here, at its stored strength) as a LoRA and write it
    to `out` in `fmt`, with the token beside it (OUT stem + '.token.safetensors'). Returns the
    files, the LoRA rank per site and the relative errors of W^QK_h and W^VO_h. `control` gets the
    fit's progress events and may stop it before anything is written (ExportStopped)."""
    out, unet = Path(out), _unet(pipe)
    check_layout(fmt, unet)  # a layout that cannot hold this model is refused before the fit
    config, tensors, fits = fit_file(pipe, adapter, rank, fit, control)
    sd = lora_state_dict(fits, fmt, unet)
    meta = {"comcat_token": config.token, "comcat_scale": str(config.scale), "format": "pt"}
    atomic_write(out, lambda tmp: save_file(sd, tmp, metadata=meta))
    tok = token_file(tensors, out.with_name(out.stem + ".token.safetensors"))
    return {"file": str(out), "token_file": None if tok is None else str(tok), "format": fmt, **summary(config, fits)}


BAKE_MARKER = "comcat_baked.json"


def bake_adapter(
    pipe,
    adapter: str | Path,
    out: str | Path,
    rank: int | None = None,
    overwrite: bool = False,
    fit: NormedFitConfig | None = None,
    control: RunControl | None = None,
) -> dict:
    """The pipeline with the adapter's fitted LoRA merged into its weights and its learned token
    added, saved whole to the folder `out` (written beside it, then renamed into place): a model
    that needs neither the adapter nor comcat's processor."""
    import json
    import shutil
    import tempfile

    from ..core.files import claim_out
    from .adapter.model import add_token

    out = Path(out)
    claim_out(out, (BAKE_MARKER,), "baked pipeline", inputs=(str(adapter),))
    if (out / BAKE_MARKER).is_file() and not overwrite:
        raise ComcatError(f"{out} holds an earlier bake: replace it with --overwrite, or choose another --out")
    config, tensors, fits = fit_file(pipe, adapter, rank, fit, control)
    apply_lora(_unet(pipe), fits)
    if "token_embedding" in tensors:
        add_token(pipe, config.token, tensors["token_embedding"])
    r = {"adapter": str(adapter), **summary(config, fits)}
    del r["fits"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / BAKE_MARKER).write_text(json.dumps(r, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**r, "fits": fits}
