"""Generate tab: images with and without adapters, same seeds."""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import gradio as gr

from comcat.core.errors import ComcatError
from comcat.core.loop import RunControl
from comcat.customization.diffusion.shapes_t2i import GUIDANCE
from comcat.customization.generate import generate, with_adapters
from comcat.customization.lora_export import FORMATS, error_line, export_adapter
from comcat.customization.lora_normed import ExportStopped

from ..common import STOP_REPLIES, check_quota, message, visitor, workdir
from ..pipelines import EXAMPLE_ADAPTER, PIPELINES, adapter_file
from ..runner import Busy, Runner

EXPORT = Runner("LoRA export")


def on_generate(
    pipeline, prompt, adapter1, scale1, adapter2, scale2, seed, steps, guidance, n, request: gr.Request = None
):
    """-> (images with the adapters, the same seeds without, status)."""
    visitor(request)
    try:
        if EXPORT.running:  # it holds an adapter in a shared pipeline (a page closed mid-export leaves it going)
            raise ComcatError("a LoRA export is running on the page's pipelines: wait for it, or press Stop export")
        pipe = PIPELINES.get(pipeline)
        plain = generate(pipe, prompt, seed=int(seed), steps=int(steps), guidance=float(guidance), n=int(n))
        chosen = [(adapter_file(a), s) for a, s in ((adapter1, scale1), (adapter2, scale2)) if a]
        names = with_adapters(pipe, [(str(path), float(s)) for path, s in chosen])
        adapted = (
            generate(pipe, prompt, seed=int(seed), steps=int(steps), guidance=float(guidance), n=int(n))
            if names
            else None
        )
        what = f"with {len(names)} adapter(s)" if names else "no adapter chosen: both galleries show the base model"
        return adapted or plain, plain, f"**Done**: {len(plain)} image(s), seed {int(seed)}, {what}."
    except Exception as e:  # noqa: BLE001 - shown in the page
        return None, None, message(e)


def export_zip(pipeline: str, adapter: Path, fmt: str, folder: Path, stem: str, control: RunControl) -> tuple:
    """(the export's summary, a zip of the LoRA file and its token file in `folder`)."""
    out = folder / f"{stem}_{fmt}_lora.safetensors"
    r = export_adapter(PIPELINES.get(pipeline), adapter, fmt, out, control=control)
    archive = folder / f"{stem}_{fmt}_lora.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (r["file"], r["token_file"]):
            if f:
                z.write(f, Path(f).name)
    return r, archive


def fit_status(e: dict | None, since: float) -> str:
    """The LoRA fit's progress line from its last event (None: nothing fitted yet)."""
    if e is None:
        return "**fitting the LoRA** · loading the pipeline and the adapter"
    eta = max(time.time() - since, 0) / e["step"] * (e["total"] - e["step"])
    return f"**fitting the LoRA** · {e['stage']}: attention {e['step']}/{e['total']} · ETA {eta:.0f} s"


def on_export_lora(pipeline, adapter1, fmt, request: gr.Request = None):
    """Stream (zip of adapter 1 as a LoRA file of format `fmt` and its token file, status) while the
    LoRA is fitted; Stop ends the fit with nothing written."""
    owner = visitor(request)
    try:
        path = adapter_file(adapter1)
        if path is None:
            raise ComcatError("choose adapter 1 first: the LoRA is fitted to it")
        check_quota(2, "the LoRA file")
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(adapter1).stem)[:40] or "adapter"
        folder = workdir("lora")
        job = EXPORT.start(
            lambda cb, stop: export_zip(pipeline, path, fmt, folder, stem, RunControl(cb, stop)), owner=owner
        )
    except (Busy, Exception) as e:  # noqa: BLE001 - shown in the page
        yield None, message(e)
        return
    last, starts, mark = None, {}, time.time()
    yield gr.skip(), fit_status(None, 0)
    for events in job.stream(0.5):
        now = time.time()
        for e in events:
            starts.setdefault(e["stage"], mark)  # a stage starts when the one before it ended
            mark = now if e["step"] == e["total"] else mark
            last = e
        status = fit_status(last, starts[last["stage"]]) if last else fit_status(None, 0)
        yield gr.skip(), status + (" · stopping…" if job.stopping else "")
    if isinstance(job.error, ExportStopped):
        yield None, "**Stopped**: no LoRA file was written; press Export to start over."
    elif job.error is not None:
        yield None, message(job.error)
    else:
        r, archive = job.result
        token = f" and {r['token']} as a textual-inversion file" if r["token_file"] else ""
        yield (
            str(archive),
            (f"**LoRA written** ({fmt}, rank {r['rank']} on {r['sites']} attentions{token}). {error_line(r)}."),
        )


def on_export_stop(request: gr.Request = None):
    return STOP_REPLIES[EXPORT.stop(visitor(request))]


def generate_tab(trained_adapter):
    with gr.Row():
        with gr.Column(scale=1):
            pipeline = gr.Textbox(
                "embedded",
                label="pipeline: embedded, a hub ID or a local diffusers folder",
                elem_id="generate-pipeline",
            )
            prompt = gr.Textbox("a V* in blue", label="prompt", elem_id="generate-prompt")
            example = str(EXAMPLE_ADAPTER) if EXAMPLE_ADAPTER.is_file() else None
            adapter1 = gr.File(example, label="adapter 1 (.safetensors)", type="filepath", file_types=[".safetensors"])
            scale1 = gr.Slider(-1, 2, value=1.0, step=0.05, label="strength 1")
            adapter2 = gr.File(label="adapter 2 (.safetensors)", type="filepath", file_types=[".safetensors"])
            scale2 = gr.Slider(-1, 2, value=1.0, step=0.05, label="strength 2")
            seed = gr.Number(0, precision=0, label="seed")
            steps = gr.Slider(5, 100, value=25, step=1, label="sampling steps", elem_id="generate-steps")
            guidance = gr.Slider(1, 12, value=GUIDANCE, step=0.5, label="guidance")
            n = gr.Slider(1, 16, value=8, step=1, label="images", elem_id="generate-n")
            go = gr.Button("Generate", variant="primary", elem_id="generate-go")
            with gr.Row():
                lora_format = gr.Dropdown(list(FORMATS), value="diffusers", label="LoRA file for", scale=1)
                export = gr.Button("Export adapter 1 as a LoRA", elem_id="generate-export", scale=1)
                export_stop = gr.Button("Stop export", variant="stop", elem_id="generate-export-stop", scale=0)
            lora_file = gr.File(label="LoRA (zip: the LoRA and the token's embedding)", elem_id="generate-lora")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="generate-status")
            with gr.Row():
                adapted, plain = (
                    gr.Gallery(label=label, columns=3, height="auto", object_fit="contain", elem_id=f"generate-{key}")
                    for key, label in (("adapted", "with the adapters"), ("plain", "without (same seeds)"))
                )
    go.click(
        on_generate,
        [pipeline, prompt, adapter1, scale1, adapter2, scale2, seed, steps, guidance, n],
        [adapted, plain, status],
        concurrency_id="generate",
        concurrency_limit=1,
    )
    export.click(
        on_export_lora,
        [pipeline, adapter1, lora_format],
        [lora_file, status],
        concurrency_id="generate",  # the export and Generate share the pipelines: one at a time
        concurrency_limit=1,
    )
    export_stop.click(on_export_stop, None, status, concurrency_limit=None, queue=False)
    trained_adapter.change(lambda f: f or gr.skip(), trained_adapter, adapter1)
