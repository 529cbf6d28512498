"""LoRA factors for attention that normalizes q and k (SD3.5, Flux), fitted on the model's own inputs.

With q/k norms a head's logits are n(X W^Q_h) n(C W^K_h)^T (Flux also rotates both by position),
so the adapter's alpha q'_h k'_h^T has no closed-form LoRA. Per attention, the factors start from
the closed-form fit's W^V, W^O updates (adapter/lora.py; no norm touches W^VO_h) with zero updates
of W^Q, W^K, and then minimize, by Adam on inputs captured at that attention, the output error

    e = sum ||y(W + up down) - y_adapter||^2 / sum ||y_adapter - y_base||^2

where y is the attention's output after its output projections (a Flux single-stream block: the
columns of proj_out that take the attention). The inputs are captured with the adapter loaded,
from prompts with the concept's word on random latents. Validation prompts pick the step to keep
(or the closed form, or no update, when either does better there); e is reported on a third set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..core.errors import ComcatError
from ..core.loop import RunControl
from .adapter.layer import ComcatAttnProcessor
from .adapter.lora import SiteFit
from .adapter.model import _unet, attention_sites
from .diffusion.denoisers import denoiser_for

FIT_PROMPTS = ("a photo of {t}", "{t} on a table", "a painting of {t}", "{t} in the snow")
VALIDATION_PROMPTS = ("{t} at night", "a drawing of {t}")
HELD_PROMPTS = ("a close-up of {t}", "{t} next to a tree")
QK = ("to_q", "to_k", "add_q_proj", "add_k_proj")  # the projections whose updates pass the norms


@dataclass
class NormedFitConfig:
    """steps: Adam steps per attention, the validation error checked every `check`; lr: relative to
    each factor's rms (a zero factor: to the weight's); latent: the side of the random latents the
    inputs are captured on; prompts to fit, to pick the step (validation) and to report (held out)."""

    steps: int = 150
    check: int = 10
    lr: float = 0.05
    latent: int = 32
    seed: int = 0
    prompts: tuple = field(default=FIT_PROMPTS)
    validation: tuple = field(default=VALIDATION_PROMPTS)
    held_out: tuple = field(default=HELD_PROMPTS)


def normed(attn) -> bool:
    return getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None


@torch.no_grad()
def capture(unet, sites: list[str], run) -> dict[str, tuple]:
    """site -> (args, kwargs) that the attention at `site` of `unet` received while `run()` ran."""
    store, hooks = {}, []
    for site in sites:

        def keep(module, args, kwargs, site=site):
            store[site] = (_detached(args), _detached(kwargs))

        hooks.append(unet.get_submodule(site).register_forward_pre_hook(keep, with_kwargs=True))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return store


def capture_prompts(pipe, sites: list[str], prompts: list[str], latent: int, seed: int) -> dict[str, tuple]:
    """`capture` in one denoising step of `prompts` on random latents (latent x latent, before
    Flux's packing) at random noise levels."""
    den = denoiser_for(pipe)

    def run():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            den.loss(den.random_latents(len(prompts), latent), den.condition(list(prompts)))

    return capture(_unet(pipe), sites, run)


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(t) for t in x)
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def _processor(attn, proc):
    old = attn.processor
    attn.set_processor(proc)
    try:
        yield
    finally:
        attn.set_processor(old)


def _lora(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x down^T up^T in x's dtype: a LoRA's output, without forming W + up down."""
    return (x @ down.T.to(x.dtype)) @ up.T.to(x.dtype)


@contextlib.contextmanager
def _lora_hooks(modules: dict, factors: dict):
    """Each module's output plus its LoRA's (`_lora`) while inside."""
    hooks = []
    for path, module in modules.items():
        up, down = factors[path]

        def add(module, inp, out, u=up, d=down):
            return out + _lora(inp[0], u, d).to(out.dtype)

        hooks.append(module.register_forward_hook(add))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class SiteOutputs:
    """y(factors) of one attention on captured inputs: its own processor with a LoRA up down on
    each projection, then the output projections (module docstring)."""

    def __init__(self, unet, site: str, attn, fit: SiteFit):
        self.attn = attn
        self.base = attn.processor.base if isinstance(attn.processor, ComcatAttnProcessor) else attn.processor
        self.inside = {p: attn.get_submodule(p[len(site) + 1 :]) for p in fit.factors if p.startswith(site + ".")}
        outside = [p for p in fit.factors if p not in self.inside]  # Flux single-stream: the block's proj_out
        self.proj = None
        if outside:
            (path,) = outside
            self.proj = (path, unet.get_submodule(path).weight.detach()[:, : attn.to_q.out_features])

    def __call__(self, inputs: tuple, factors: dict | None = None, adapter: bool = False) -> list[torch.Tensor]:
        args, kwargs = inputs
        hooks = _lora_hooks(self.inside, factors) if factors is not None else contextlib.nullcontext()
        with hooks, contextlib.nullcontext() if adapter else _processor(self.attn, self.base):
            y = self.attn(*args, **kwargs)
        ys = [t for t in (y if isinstance(y, tuple) else (y,)) if t is not None]
        if self.proj is not None:
            path, w = self.proj
            if factors is None:
                ys = [t @ w.T for t in ys]
            else:
                up, down = factors[path]
                ys = [t @ w.T + _lora(t, up, down[:, : w.shape[1]]) for t in ys]
        return ys


def output_error(outputs: SiteOutputs, inputs: tuple, target: list, base: list, factors: dict) -> torch.Tensor:
    """e of the module docstring on one captured batch."""
    num = sum((a - b).float().square().sum() for a, b in zip(outputs(inputs, factors), target))
    den = sum((a - b).float().square().sum() for a, b in zip(target, base))
    return num / den.clamp_min(1e-30)


class ExportStopped(ComcatError):
    """A stop was asked for during a LoRA fit: nothing was written."""


def check_stop(control: RunControl | None) -> None:
    if control is not None and control.stopping():
        raise ExportStopped("stopped: no LoRA file was written; export again to start over")


def refine_site(
    unet, site: str, fit: SiteFit, inputs: dict, config: NormedFitConfig, control: RunControl | None = None
) -> SiteFit:
    """`fit` (closed form) refined on inputs["fit"] (module docstring), the W^Q and W^K updates
    started at zero. Kept: whichever of the closed form, no update at all, and the factors every
    `config.check` steps has the smallest error on inputs["validation"]; err_out = sqrt(e) of it on
    inputs["held_out"] (err_out_closed_form: the closed form's; err_fit: on the fit inputs).
    `control.should_stop` is asked at every check (ExportStopped)."""
    attn = unet.get_submodule(site)
    outputs = SiteOutputs(unet, site, attn, fit)
    with torch.no_grad():
        ref = {k: (outputs(v, adapter=True), outputs(v)) for k, v in inputs.items()}
    err = lambda part, f: float(output_error(outputs, inputs[part], *ref[part], f))  # noqa: E731
    frozen = lambda fs: {p: (u.detach().clone(), d.detach().clone()) for p, (u, d) in fs.items()}  # noqa: E731
    factors, groups = {}, []
    for path, (up, down) in fit.factors.items():
        if path.endswith(QK):
            up = torch.zeros_like(up)
            down = torch.randn_like(down) * down.norm() / max(down.numel(), 1) ** 0.5
        factors[path] = (up.clone().requires_grad_(), down.clone().requires_grad_())
        w = outputs.inside[path].weight if path in outputs.inside else outputs.proj[1]
        for t in factors[path]:
            scale = t.detach().square().mean().sqrt()
            scale = scale if scale > 0 else w.detach().square().mean().sqrt()
            groups.append({"params": [t], "lr": config.lr * float(scale)})
    none = {p: (torch.zeros_like(u), d) for p, (u, d) in fit.factors.items()}
    with torch.no_grad():
        best = min(
            ((err("validation", f), f, m) for f, m in ((fit.factors, "closed form"), (none, "none"))),
            key=lambda b: b[0],
        )
    opt = torch.optim.Adam(groups)
    for step in range(config.steps + 1):
        if step % config.check == 0 or step == config.steps:
            check_stop(control)
            with torch.no_grad():
                if (e := err("validation", factors)) < best[0]:
                    best = (e, frozen(factors), "fitted on inputs")
        if step == config.steps:
            break
        opt.zero_grad(set_to_none=True)
        output_error(outputs, inputs["fit"], *ref["fit"], factors).backward()
        opt.step()
    with torch.no_grad():
        out = SiteFit(factors=best[1], err_qk=float("nan"), err_vo=fit.err_vo, method_qk=best[2])
        out.method_vo = fit.method_vo
        out.err_out, out.err_out_closed_form = err("held_out", best[1]) ** 0.5, err("held_out", fit.factors) ** 0.5
        out.err_fit = err("fit", best[1]) ** 0.5
    return out


def check_pipeline(pipe) -> None:
    """One line when `pipe` is a bare denoiser with q/k-normed attention: its LoRA needs the inputs
    that the pipeline's text encoders give. Cheap: called before any fitting."""
    unet = _unet(pipe)
    site = next((s for s, a in attention_sites(unet).items() if normed(a)), None)
    if unet is pipe and site is not None:
        raise ComcatError(
            f"{site} normalizes q and k: its LoRA is fitted on inputs that the pipeline's text encoders give, "
            "so export from the whole pipeline, not its denoiser alone"
        )


def refine_normed(
    pipe, fits: dict[str, SiteFit], token: str, config: NormedFitConfig | None = None, control: RunControl | None = None
) -> dict:
    """Every q/k-normed site of `fits` refined (refine_site) on inputs captured in `pipe`, whose
    adapter is loaded; the other sites' closed-form fits are kept. `control` gets
    {"kind": "lora", "stage": "q/k-normed", "step", "total"} after every site and may stop the fit."""
    config = config or NormedFitConfig()
    unet = _unet(pipe)
    check_pipeline(pipe)
    sites = [s for s, a in attention_sites(unet).items() if s in fits and normed(a)]
    if not sites:
        return fits
    captured = {
        part: capture_prompts(pipe, sites, [p.format(t=token) for p in prompts], config.latent, config.seed + i)
        for i, (part, prompts) in enumerate(
            (("fit", config.prompts), ("validation", config.validation), ("held_out", config.held_out))
        )
    }
    control = control or RunControl()
    for i, site in enumerate(sites, 1):
        fits[site] = refine_site(unet, site, fits[site], {k: v[site] for k, v in captured.items()}, config, control)
        control.emit({"kind": "lora", "stage": "q/k-normed", "step": i, "total": len(sites)})
    return fits
