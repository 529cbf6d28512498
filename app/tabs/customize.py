"""Customize tab: the library's customize() behind the page, streamed."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from comcat.core.embedded import ASSETS
from comcat.core.errors import ComcatError
from comcat.core.images import IMAGE_SUFFIXES
from comcat.customization.customize import CustomizeSpec, customize
from comcat.customization.diffusion.concept import check_prompt

from .. import common
from ..common import STOP_REPLIES, message, pipeline_spec, take_upload, visitor, workdir
from ..runner import Busy, Runner

EXAMPLE_IMAGES = ASSETS / "examples" / "heart"
MIN_IMAGES, MAX_IMAGES, MAX_IMAGE_MB = 3, 10, 20


def concept_folder(uploads: list[str] | None) -> Path:
    """Uploaded images (and optional NAME.txt captions) copied into one folder of the app;
    no uploads: the bundled example concept."""
    if not uploads:
        return EXAMPLE_IMAGES
    images = [u for u in uploads if Path(u).suffix.lower() in IMAGE_SUFFIXES]
    if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
        raise ComcatError(f"upload {MIN_IMAGES}-{MAX_IMAGES} images of the concept (got {len(images)})")
    folder = workdir("concept")
    for u in uploads:
        src = take_upload(u, IMAGE_SUFFIXES + (".txt",), "image or .txt caption", MAX_IMAGE_MB)
        shutil.move(str(src), folder / Path(u).name)
    return folder


def customize_spec(
    pipeline: str,
    uploads,
    prompt: str,
    token: str,
    rank: int,
    steps: int,
    lr: float,
    preview_every: int,
    learn_token: bool = True,
    shared_basis: bool = False,
) -> CustomizeSpec:
    check_prompt(prompt.strip(), token.strip())  # before a job starts: the message shows at once
    return CustomizeSpec(
        pipeline=pipeline_spec(pipeline),
        images=str(concept_folder(uploads)),
        prompt=prompt.strip(),
        token=token.strip(),
        rank=int(rank),
        steps=int(steps),
        lr=float(lr),
        preview_every=int(preview_every),
        learn_token=bool(learn_token),
        shared_basis=bool(shared_basis),
    )


@dataclass
class Progress:
    """The Customize tab's view of a run, built from the library's callback events; a resumed run
    starts from the losses so far, and its ETA from the steps this session trained."""

    step: int = 0
    steps: int = 0
    first: int = 0  # the step this session started from
    losses: list = field(default_factory=list)  # (step, loss)
    concept: list = field(default_factory=list)  # the concept's image files
    previews: list = field(default_factory=list)  # (step, PIL images, prompts) oldest first
    started: float = field(default_factory=time.time)

    def update(self, e: dict) -> None:
        if e["kind"] == "start":
            self.step = self.first = e["step"]
            self.steps, self.concept = e["steps"], e["images"]
            self.losses = list(enumerate(e["losses"], 1))
            self.started = time.time()
        elif e["kind"] == "step":
            self.step, self.steps = e["step"], e["steps"]
            self.losses.append((e["step"], e["loss"]))
        elif e["kind"] == "preview":
            self.previews.append((e["step"], e["images"], e.get("prompts") or [""] * len(e["images"])))

    def gallery(self) -> list:
        """The concept's images, then every preview so far with its step and prompt."""
        return [(str(f), f"concept image: {Path(f).name}") for f in self.concept] + [
            (im, f"step {step} · {prompt}")
            for step, images, prompts in self.previews
            for im, prompt in zip(images, prompts)
        ]

    def status(self) -> str:
        if not self.steps:
            return "**starting** · loading the pipeline and the images"
        elapsed = time.time() - self.started
        done = self.step - self.first
        eta = elapsed / done * (self.steps - self.step) if done else 0
        loss = f" · loss {self.losses[-1][1]:.4f}" if self.losses else ""
        return f"**training** · step {self.step}/{self.steps}{loss} · ETA {eta:.0f} s"


CUSTOMIZE = Runner("customize")


def customize_loss_figure(p: Progress):
    import plotly.graph_objects as go

    fig = go.Figure()
    if p.losses:
        steps, losses = zip(*p.losses)
        fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines", name="loss", line=dict(width=1), opacity=0.4))
        fig.add_trace(go.Scatter(x=steps, y=smooth(losses), mode="lines", name="smoothed", line=dict(width=2)))
    fig.update_layout(height=260, xaxis_title="step", yaxis_title="denoising loss", margin=dict(t=20, l=50, r=20, b=40))
    return fig


def smooth(values, beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def on_customize(
    pipeline,
    uploads,
    prompt,
    token,
    rank,
    steps,
    lr,
    preview_every,
    shared_basis=False,
    resume_dir=None,
    request: gr.Request = None,
):
    """Stream (status, loss curve, preview gallery, adapter download, run folder) while training."""
    owner = visitor(request)
    try:
        if resume_dir:
            out, spec = Path(resume_dir), None
        else:
            spec = customize_spec(
                pipeline, uploads, prompt, token, rank, steps, lr, preview_every, shared_basis=shared_basis
            )
            out = workdir("customize") / "run"
        job = CUSTOMIZE.start(
            lambda cb, stop: customize(
                spec or CustomizeSpec(), out, callback=cb, should_stop=stop, resume=spec is None
            ),
            owner=owner,
        )
    except (Busy, Exception) as e:  # noqa: BLE001 - shown in the page
        yield message(e), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    p = Progress()
    yield p.status(), gr.skip(), gr.skip(), gr.skip(), str(out)
    for events in job.stream(0.5):
        fresh = any(e["kind"] in ("preview", "start") for e in events)
        for e in events:
            p.update(e)
        status = p.status() + (" · stopping…" if job.stopping else "")
        yield status, customize_loss_figure(p), p.gallery() if fresh else gr.skip(), gr.skip(), gr.skip()
    if job.error is not None:
        yield message(job.error), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    r = job.result
    size = Path(r["adapter"]).stat().st_size / 1024  # KB as the download box shows it
    head = (
        f"**Stopped** at step {r['steps_done']}: the adapter so far is saved; press Resume to go on."
        if r["stopped"]
        else f"**Done**: {r['steps_done']} steps in {r['seconds']:.0f} s."
    )
    yield (f"{head} Adapter: {size:.1f} KB.", customize_loss_figure(p), p.gallery(), r["adapter"], str(out))


def on_resume(run_dir, request: gr.Request = None):
    if not run_dir:
        yield "nothing to resume: start a run first", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    yield from on_customize(None, None, None, None, None, None, None, None, resume_dir=run_dir, request=request)


def on_customize_stop(request: gr.Request = None):
    return STOP_REPLIES[CUSTOMIZE.stop(visitor(request))]


DEFAULT_STEPS = CustomizeSpec.steps  # the library's (and the CLI's) default: 500


def customize_tab():
    with gr.Row():
        with gr.Column(scale=1):
            pipeline = gr.Textbox(
                "embedded",
                label="pipeline: embedded, a hub ID or a local diffusers folder",
                elem_id="customize-pipeline",
            )
            uploads = gr.File(
                label=f"{MIN_IMAGES}-{MAX_IMAGES} images of the concept "
                "(+ optional NAME.txt captions); none: the bundled hearts",
                file_count="multiple",
                type="filepath",
                elem_id="customize-images",
            )
            prompt = gr.Textbox("a V*", label="instance prompt (for images without a caption)")
            token = gr.Textbox("V*", label="concept token")
            rank = gr.Slider(1, 8, value=2, step=1, label="rank per head")
            shared_basis = gr.Checkbox(
                False,
                label="heads share a basis (a file the size of a rank-r LoRA on many-headed models: SDXL, SD3, Flux)",
            )
            steps = gr.Slider(
                10,
                1000,
                value=DEFAULT_STEPS,
                step=10,
                label="steps (on the embedded model the concept usually shows from about step 400; "
                "the previews before look nearly blank)",
                elem_id="customize-steps",
            )
            lr = gr.Number(2.5e-3, label="learning rate")
            preview_every = gr.Slider(
                0,
                500,
                value=100,
                step=10,
                label="preview every N steps (fixed seed)",
                elem_id="customize-preview-every",
            )
            with gr.Row():
                start = gr.Button("Customize", variant="primary", elem_id="customize-go")
                stop = gr.Button("Stop", variant="stop", elem_id="customize-stop")
                resume = gr.Button("Resume", elem_id="customize-resume")
        with gr.Column(scale=2):
            status = gr.Markdown(
                "Upload a few images (or keep the bundled hearts) and press Customize.", elem_id="customize-status"
            )
            losses = gr.Plot(label="loss")
            previews = gr.Gallery(
                label="your images, then every preview", columns=4, height=360, elem_id="customize-previews"
            )
            adapter = gr.File(label="adapter (.safetensors)", elem_id="customize-adapter")
    run_dir = gr.State(time_to_live=common.SESSION_TTL_S)
    outputs = [status, losses, previews, adapter, run_dir]
    start.click(
        on_customize,
        [pipeline, uploads, prompt, token, rank, steps, lr, preview_every, shared_basis],
        outputs,
        concurrency_id="customize",
        concurrency_limit=2,
    )
    resume.click(on_resume, run_dir, outputs, concurrency_id="customize", concurrency_limit=2)
    stop.click(on_customize_stop, None, status, concurrency_limit=None, queue=False)
    return adapter
