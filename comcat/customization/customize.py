"""Teach a text-to-image pipeline a new concept with a COMCAT adapter; the model stays frozen.

    loss = || eps_theta(z_t, t, c) - target ||^2   (+ w * the same on class images: prior preservation)

A run lives in its output folder (one process at a time writes it: .comcat.lock):
  customize.json            the spec and how far the run got (written first: the folder is a run)
  adapter.safetensors       the adapter at the last checkpoint (fp16 by default)
  state.json + state.*.safetensors   adapter, optimizer and step, every `checkpoint_every` steps
                            and at a stop, for --resume (also after the process was killed);
                            removed when the run finishes, which leaves the adapter, its record
                            and the previews
  previews/step_NNNNN.png   a fixed-seed preview every `preview_every` steps
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core import dist
from ..core.errors import ComcatError, is_int, is_positive, require
from ..core.files import (
    atomic_write,
    atomic_write_text,
    claim_out,
    clean_temp,
    clear_run,
    load_tree,
    out_lock,
    read_run_record,
    save_tree,
)
from ..core.loop import RunControl, seed_step
from ..core.records import MAX_SEED, MAX_STEPS, build, check_count
from .adapter import AdapterConfig, add_adapter, save_adapter
from .adapter.model import _unet, add_token, fingerprint, train_token_row
from .diffusion.concept import check_prompt, concept_files, grid, read_concept, resolution
from .diffusion.denoisers import Denoiser, cat_conditions, denoiser_for
from .diffusion.pipeline import guidance_kwargs, load_pipeline, tokenize

RUN_FILE = "customize.json"
RUN_FILES = (
    RUN_FILE,
    "adapter.safetensors",
    "state.json",
    "state.*.safetensors",
    "previews",
    "class_images.pt",
)  # what --overwrite removes
PRECISIONS = ("auto", "fp32", "bf16")
MAX_CUSTOMIZE_BATCH = 64  # images per step (a concept has at most 10, flipped: 20)
FORMAT = "comcat-customize/1"


@dataclass
class CustomizeSpec:
    """A customization run (stored in customize.json; --resume reads it back)."""

    pipeline: str = "embedded"
    images: str = ""
    prompt: str = "a photo of V* dog"
    token: str = "V*"
    rank: int = 2
    shared_basis: bool = False  # heads share a basis per side (AdapterConfig.shared_basis)
    targets: tuple = ("self", "cross")
    steps: int = 500
    lr: float = 2.5e-3
    batch_size: int = 4
    learn_token: bool = True  # also learn the token's embedding (new token if unknown)
    class_prompt: str | None = None  # prior preservation: images of the class, by the base model
    class_images: int = 8
    prior_weight: float = 1.0
    preview_every: int = 50
    checkpoint_every: int = 50  # resumable state every K steps (a killed run resumes from the last)
    preview_prompts: tuple = ()  # default: the prompt
    preview_steps: int = 25
    guidance: float | None = None  # previews; None: the pipeline's default
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 (autocast) or fp32; auto: bf16 on CUDA, fp32 on the CPU
    save_dtype: str = "float16"

    def __post_init__(self):
        self.targets, self.preview_prompts = tuple(self.targets), tuple(self.preview_prompts)
        AdapterConfig(rank=self.rank, targets=self.targets, token=self.token, shared_basis=self.shared_basis)
        require(
            is_int(self.steps, 1) and is_positive(self.lr) and is_int(self.batch_size, 1),
            f"steps, lr and batch size must be positive numbers, got {self.steps}, {self.lr}, {self.batch_size}",
        )
        require(
            self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        )
        require(
            is_int(self.preview_every) and is_int(self.checkpoint_every) and is_int(self.class_images, 1),
            "preview and checkpoint intervals must be >= 0 and class images >= 1",
        )
        check_prompt(self.prompt, self.token)
        check_count(self.steps, "--steps", 1, MAX_STEPS)
        check_count(self.batch_size, "--batch-size", 1, MAX_CUSTOMIZE_BATCH)
        check_count(self.class_images, "--class-images", 1, 64)
        check_count(self.seed, "--seed", 0, MAX_SEED)
        check_count(self.preview_steps, "preview sampling steps", 1, 1000)
        for flag, n in (("--preview-every", self.preview_every), ("--checkpoint-every", self.checkpoint_every)):
            check_count(n, flag, 0, MAX_STEPS)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the run's spec") -> "CustomizeSpec":
        """From customize.json's spec; every setting checked."""
        return build(cls, d, where, "start the run again with a new --out")


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 (mixed precision) on CUDA, fp32 elsewhere; 'fp32' and 'bf16' as given."""
    return ("bf16" if str(device).startswith("cuda") else "fp32") if precision == "auto" else precision


def _check_token(pipe, spec: CustomizeSpec, learned: bool) -> None:
    ids = tokenize(pipe.tokenizer, [spec.token])[0].tolist()
    unk = pipe.tokenizer.unk_token_id
    if unk is not None and unk in ids and not learned:
        fix = "use --learn-token to learn it, or pick" if spec.learn_token is False else "pick"
        raise ComcatError(f"the token {spec.token!r} is unknown to this pipeline's tokenizer: {fix} a word it knows")


def _class_latents(den: Denoiser, spec: CustomizeSpec, out: Path) -> tuple[torch.Tensor, list[str]] | None:
    """Prior preservation: the base model's own images of `class_prompt` (generated once, cached)."""
    if not spec.class_prompt:
        return None
    cache = out / "class_images.pt"
    if cache.is_file():
        x = torch.load(cache, weights_only=True)
    else:
        gen = torch.Generator().manual_seed(spec.seed + 1)
        x = den.pipe(
            spec.class_prompt,
            num_images_per_prompt=spec.class_images,
            generator=gen,
            num_inference_steps=spec.preview_steps,
            output_type="pt",
        ).images
        x = x if x.min() < 0 else x * 2 - 1  # diffusers pipelines give [0, 1]
        atomic_write(cache, lambda tmp: torch.save(x.cpu(), tmp))
    return den.latents(x), [spec.class_prompt] * len(x)


PREVIEWS = 4  # preview images per prompt


def preview(pipe, spec: CustomizeSpec, n: int = PREVIEWS):
    """Fixed-seed samples of the preview prompts (n per prompt) as PIL images."""
    prompts = list(spec.preview_prompts) or [spec.prompt]
    gen = torch.Generator().manual_seed(spec.seed)
    return pipe(
        prompts,
        num_images_per_prompt=n,
        generator=gen,
        num_inference_steps=spec.preview_steps,
        **guidance_kwargs(spec.guidance),
    ).images


def _write_run(out: Path, spec: CustomizeSpec, **progress) -> None:
    atomic_write_text(out / RUN_FILE, json.dumps(dict(format=FORMAT, spec=asdict(spec), **progress), indent=2))


def read_run(out: Path) -> dict:
    return read_run_record(out, RUN_FILE, FORMAT, "customize")


def customize(
    spec: CustomizeSpec,
    out: str | Path,
    pipe=None,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train an adapter for `spec`; returns {adapter, steps_done, stopped, losses, seconds}.

    callback receives {"kind": "start", step, steps, losses (so far), images (the concept's files)}
    once, {"kind": "step", step, steps, loss} after every step and {"kind": "preview", step, images
    (PIL), prompts (one per image), path} every `preview_every` steps and at the end.
    should_stop() is checked every step; a stop saves the adapter and the resumable state, as every
    `checkpoint_every` steps do. `overwrite`: a new run replaces an earlier run's files in `out`.
    """
    out = Path(out)
    if resume:
        record = read_run(out)
        if record.get("done"):
            raise ComcatError(f"the run in {out} is already finished: its adapter is {out / 'adapter.safetensors'}")
        spec = CustomizeSpec.from_dict(record.get("spec"), str(out / RUN_FILE))
    else:
        claim_out(out, (RUN_FILE,), "customize run", inputs=(spec.pipeline,), data=spec.images)
        if (out / RUN_FILE).is_file() and not overwrite:
            raise ComcatError(
                f"{out} holds an earlier customize run: continue it with --resume {out}, start over "
                "with --overwrite, or choose another --out"
            )
    read_concept(spec.images, spec.prompt, spec.token, 8)  # every image readable, before any work
    with out_lock(out):
        if resume:
            clean_temp(out)
        elif overwrite:
            clear_run(out, RUN_FILES)
        return _train(spec, out, pipe, RunControl(callback, should_stop), resume)


def _train(spec: CustomizeSpec, out: Path, pipe, control: RunControl, resume: bool) -> dict:
    # setup: the pipeline with its adapter, the concept's latents, the optimizer, a resumed state
    config = AdapterConfig(
        rank=spec.rank,
        shared_basis=spec.shared_basis,
        targets=spec.targets,
        token=spec.token,
        base_model=spec.pipeline,
    )
    device = dist.device(spec.device) if pipe is None else str(pipe.device)  # a given pipe trains where it is
    pipe = pipe if pipe is not None else load_pipeline(spec.pipeline, device=device)
    den = denoiser_for(pipe)
    learn_token = config.token_embedding = spec.learn_token and den.learns_token
    if spec.learn_token and not learn_token:
        control.emit(
            dict(
                kind="note",
                text=f"{type(pipe).__name__} reads prompts through several text encoders: "
                f"the adapter learns the concept under {spec.token!r} as its tokenizers read it "
                "(no new token is learned)",
            )
        )
    pixels, captions = read_concept(spec.images, spec.prompt, spec.token, resolution(pipe))
    if learn_token:
        add_token(pipe, spec.token)
    _check_token(pipe, spec, learn_token)
    cuda = device.startswith("cuda")
    den.model.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    if cuda:
        den.model.enable_gradient_checkpointing()

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    params = add_adapter(pipe, config, "default")
    train = list(params)
    if learn_token:
        embedding, token_id = train_token_row(pipe, spec.token)  # only the concept's row learns
        frozen_rows = embedding.detach().clone()
        train.append(embedding)
    opt = torch.optim.AdamW(train, lr=spec.lr, weight_decay=0.0 if learn_token else 1e-2)

    latents = torch.cat([den.latents(pixels), den.latents(pixels.flip(3))])
    captions = captions * 2
    prior = _class_latents(den, spec, out)
    fixed_context = (
        None
        if learn_token
        else {c: den.condition([c]) for c in set(captions) | ({spec.class_prompt} if prior else set())}
    )

    start, losses, before = 0, [], 0.0  # before: seconds of the earlier sessions of a resumed run
    state = load_tree(out / "state") if resume else None
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(train, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        start, losses, before = state["step"], state["losses"], state.get("seconds", 0.0)

    if not resume:
        _write_run(out, spec, step=0, steps=spec.steps)  # from here on the folder is a resumable run
    files = [str(p) for p in concept_files(spec.images)]
    control.emit(dict(kind="start", step=start, steps=spec.steps, losses=list(losses), images=files))

    # loop: denoising steps on the concept (and the class images), checkpoints and previews
    t0, stopped, step = time.time() - before, False, start
    bf16 = resolve_precision(spec.precision, device) == "bf16"
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    for step in range(start + 1, spec.steps + 1):
        if control.should_stop is not None and control.should_stop():
            stopped, step = True, step - 1
            break
        seed_step(spec.seed, step)
        idx = torch.randint(len(latents), (spec.batch_size,))
        z0, batch_captions = latents[idx], [captions[i] for i in idx.tolist()]
        if prior is not None:
            pidx = torch.randint(len(prior[0]), (spec.batch_size,))
            z0 = torch.cat([z0, prior[0][pidx]])
            batch_captions += [prior[1][i] for i in pidx.tolist()]
        with amp:
            err = den.loss(z0, _context(den, fixed_context, batch_captions))
        loss = err[: spec.batch_size].mean()
        if prior is not None:
            loss = loss + spec.prior_weight * err[spec.batch_size :].mean()
        if not torch.isfinite(loss):
            raise ComcatError(f"the loss became {loss.item()} at step {step}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if learn_token:
            with torch.no_grad():  # AdamW decay / numerical drift must not touch other rows
                rows = torch.arange(len(embedding), device=embedding.device) != token_id
                embedding[rows] = frozen_rows[rows]
        losses.append(round(loss.item(), 5))
        control.emit(dict(kind="step", step=step, steps=spec.steps, loss=losses[-1]))
        if spec.checkpoint_every > 0 and step % spec.checkpoint_every == 0 and step < spec.steps:
            _save(pipe, config, spec, out, train, opt, step, losses, time.time() - t0)
        if spec.preview_every > 0 and step % spec.preview_every == 0 and step < spec.steps:
            _preview(pipe, spec, out, step, control)

    # finish: the adapter and the state as they are, a last preview; a finished run keeps no state
    _save(pipe, config, spec, out, train, opt, step, losses, time.time() - t0, done=not stopped)
    if not stopped:
        clear_run(out, ("state.json", "state.*.safetensors", "class_images.pt"))
        _preview(pipe, spec, out, step, control)
    if learn_token:
        embedding.requires_grad_(False)
    return dict(
        adapter=str(out / "adapter.safetensors"),
        steps_done=step,
        stopped=stopped,
        losses=losses,
        seconds=round(time.time() - t0, 1),
        pipe=pipe,
    )


def _context(den: Denoiser, fixed: dict | None, captions: list[str]) -> dict:
    """The conditioning of `captions`: precomputed when the token is not learned."""
    return cat_conditions([fixed[c] for c in captions]) if fixed is not None else den.condition(captions)


def _save(
    pipe,
    config: AdapterConfig,
    spec: CustomizeSpec,
    out: Path,
    train: list,
    opt,
    step: int,
    losses: list,
    seconds: float,
    done: bool = False,
):
    """The adapter, the resumable state (trained tensors, optimizer, step, losses, seconds of training
    so far) and customize.json (`done`: the run finished, its record says so and its state is no
    longer needed)."""
    save_adapter(pipe, config, out, dtype=getattr(torch, spec.save_dtype))
    if not done:
        state = {"params": [p.detach().cpu() for p in train], "optimizer": opt.state_dict(), "step": step}
        save_tree(out / "state", {**state, "losses": losses, "seconds": seconds})
    _write_run(out, spec, step=step, steps=spec.steps, fingerprint=fingerprint(_unet(pipe)), done=done)


def _preview(pipe, spec: CustomizeSpec, out: Path, step: int, control: RunControl) -> None:
    """Fixed-seed previews written to out/previews/ and handed to the callback."""
    if control.callback is None and spec.preview_every <= 0:
        return
    images = preview(pipe, spec)
    prompts = [p for p in (list(spec.preview_prompts) or [spec.prompt]) for _ in range(PREVIEWS)]
    path = out / "previews" / f"step_{step:05d}.png"
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, grid(images).save)
    control.emit(dict(kind="preview", step=step, images=images, prompts=prompts, path=str(path)))
