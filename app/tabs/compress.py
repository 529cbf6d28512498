"""Compress tab: a compress run of the library (comcat.compression.job.run_job) streamed to the page."""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from comcat.compression import families
from comcat.compression.distill import FinetuneConfig
from comcat.compression.evaluate import fidelity
from comcat.compression.job import JobSpec, run_job
from comcat.compression.load import load_model
from comcat.compression.plots import ranks_heatmap_plotly
from comcat.compression.reconstruct import DistillConfig
from comcat.compression.report import FEW_VALIDATION, noise_note, report_markdown
from comcat.compression.search import SearchConfig
from comcat.core.errors import ComcatError

from .. import common
from ..common import STOP_REPLIES, follow_typing, message, model_inputs, model_spec, public_text, visitor, workdir
from ..runner import Busy, Runner

MODEL_SOURCES = ("embedded", "timm name", "uploaded checkpoint", "model from Explore")


def chosen_model(
    source: str, name: str = "", upload: str | None = None, arch: str = "", explored=None
) -> tuple[str, str | None]:
    """(SPEC, arch) to compress: picked here as in Explore, or the model the Explore tab loaded."""
    if source == "model from Explore":
        if explored is None:
            raise ComcatError(
                "no model has been explored yet: press Explore in the Explore tab first, or pick another model here"
            )
        return explored.spec, explored.arch
    return model_spec(source, name, upload, arch)


SCOPES = {"whole model": "model", "attention only": "attention"}  # the page's words -> JobSpec.scope


@dataclass
class Settings:
    """The page's compression settings (what a JobSpec takes besides the model and the data)."""

    ratio: float = 0.5
    budget: str = "params"
    method: str = "head"
    mlp: bool = False
    search: bool = False
    search_epochs: int = 4
    distill_steps: int = 100
    finetune_epochs: int = 0
    device: str = "auto"
    train_images: int = 4096
    fit_images: int = 1024
    scope: str = "whole model"  # or "attention only"
    int8: bool = False

    def spec(self, model: str, arch: str | None, data: str | None) -> JobSpec:
        """The JobSpec of these settings (which checks them, as for the CLI)."""
        whole = lambda x: int(x) if float(x).is_integer() else x  # a slider's 4.0 is the integer 4
        search = SearchConfig(epochs=whole(self.search_epochs)) if self.search else None
        finetune = FinetuneConfig(epochs=whole(self.finetune_epochs)) if self.finetune_epochs else None
        return JobSpec(
            model=model,
            arch=arch,
            data=data,
            method=self.method,
            ratio=float(self.ratio),
            budget=self.budget,
            scope=SCOPES.get(self.scope, self.scope),
            mlp=None if SCOPES.get(self.scope) == "model" else bool(self.mlp),
            quantize="int8" if self.int8 else None,
            distill=DistillConfig(steps=whole(self.distill_steps)),
            search=search,
            finetune=finetune,
            device=self.device,
            train_images=whole(self.train_images),
            fit_images=whole(self.fit_images),
        )


LOSS_CURVES = {
    "search": "search (α steps)",
    "weights": "search (weight steps)",
    "distill": "block distillation",
    "finetune": "end-to-end fine-tuning",
}
STEPPED = ("calibrate", "allocate", "search", "distill", "finetune")


@dataclass
class Progress:
    """What the page shows while a run goes: built up from the library's callback events."""

    phase: str = "starting"
    started: float = field(default_factory=time.perf_counter)
    spent: float = 0.0  # seconds of the run's earlier sessions (before a Stop), carried across a resume
    ended: float | None = None  # when this session ended (the time a run sits stopped does not count)
    phase_started: float = field(default_factory=time.perf_counter)
    first_step: int | None = None  # steps of this phase done before this session (a resumed phase starts midway)
    resuming: bool = False  # the next stepped phase is the one a Stop interrupted
    step: int = 0
    total: int = 0
    last: dict = field(default_factory=dict)
    ranks: object = None
    ranks_changed: bool = False
    losses: dict = field(default_factory=lambda: {k: [] for k in LOSS_CURVES})
    val: list = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def update(self, e: dict) -> None:
        kind = e.get("kind")
        if kind == "phase":
            self.phase, self.phase_started, self.step, self.total = e["phase"], time.perf_counter(), 0, 0
            self.first_step = None
            if e["phase"] == "data":
                self.data = e
        elif kind in STEPPED:
            if self.first_step is None:
                self.first_step = e["step"] - 1 if self.resuming else 0
                self.resuming = False
            self.step, self.total, self.last = e["step"], e["total"], e
            if "loss" in e:
                self.losses[e.get("phase", "search") if kind == "search" else kind].append((self.elapsed, e["loss"]))
            if kind == "search" and e.get("ranks") is not None and e["ranks"] != self.ranks:
                self.ranks, self.ranks_changed = e["ranks"], True
        elif kind == "validate":
            self.val.append(e)
        elif kind == "done":
            self.phase = "done"

    @property
    def elapsed(self) -> float:
        """Seconds of work on the run: its earlier sessions and this one."""
        return self.spent + (self.ended or time.perf_counter()) - self.started

    def end(self) -> None:
        """This session is over (done, stopped or failed): the clock stops."""
        self.ended = self.ended or time.perf_counter()

    def resumed(self) -> "Progress":
        """This progress continued in a new session (after a Stop): time and loss curves carry on."""
        self.spent, self.started, self.ended = self.elapsed, time.perf_counter(), None
        self.phase, self.first_step, self.step, self.total, self.resuming = "resuming", None, 0, 0, True
        return self

    def eta(self) -> float | None:
        """Seconds left in this phase at the rate of this session's steps."""
        done = self.step - (self.first_step or 0)
        if done <= 0 or self.total <= 0:
            return None
        return (time.perf_counter() - self.phase_started) / done * (self.total - self.step)

    def status(self) -> str:
        """One markdown line: phase, step, loss, cost vs budget, temperature, validation, ETA."""
        parts = [f"**{self.phase}**"]
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        e = self.last
        if self.phase == "search" and e.get("kind") == "search":
            parts += [f"loss {e['loss']:.3f}", f"cost {e['cost'] / e['target']:.0%} of budget", f"τ {e['tau']:.2f}"]
        elif self.phase == "distill" and e.get("kind") == "distill":
            parts += [f"block {e['block'] + 1}/{e['blocks']}", f"loss {e['loss']:.4f}"]
        elif self.phase == "finetune" and e.get("kind") == "finetune":
            parts.append(f"loss {e['loss']:.3f}")
        if self.phase == "report":
            parts.append("measuring the held-out figures and the latency (no steps to show)")
        elif self.val:
            v = self.val[-1]
            top1 = f", top-1 {v['top1']:.1f}%" if "top1" in v else ""
            unit = self.data.get("unit", "images")
            after = f" after {v['after']}" if v.get("after") else ""
            parts.append(f"validation{after} ({v['images']} held-out {unit}): {fidelity(v, 1)} against dense{top1}")
        eta = self.eta()
        if eta is not None and self.phase in STEPPED:
            parts.append(f"ETA {eta:.0f} s")
        parts.append(f"{self.elapsed:.0f} s elapsed")
        return " · ".join(parts)


def result_card(report: dict) -> str:
    """The headline figures of a finished run, each saying what it is measured on."""
    d, c = report["dense"], report["compressed"]
    lines = []
    val = next(iter(report.get("validation", {}).values()), {})
    if val and val.get("images", FEW_VALIDATION) < FEW_VALIDATION and ("finetune" in report or "distill" in report):
        lines.append(noise_note(val["images"]))
    data = report.get("data", {})
    unit = data.get("unit", "images")
    if "agreement" in c:
        where = f"{c['images']} held-out {unit}" + (
            f" of {Path(data['source'].split(' (')[0]).name}" if data.get("source") else ""
        )
        lines.append(
            f"**{c['agreement']:.1f}% agreement with the dense model** (same top-1; KL {c['kl']:.3f}) on {where}"
        )
        if "top1" in c:
            lines.append(f"top-1 **{c['top1']:.1f}%** (dense {d['top1']:.1f}%, {c['top1'] - d['top1']:+.1f} points)")
        elif data.get("note"):
            lines.append(f"no top-1: {data['note']}")
    if "cosine" in c:
        lines.append(
            f"**cosine {c['cosine']:.3f} to the dense model's embeddings**, the same nearest {unit[:-1]} for "
            f"**{c['retrieval']:.1f}%** of {c['images']} held-out {unit} (no classifier: no top-1)"
        )
    mlp = report.get("mlp_params_ratio")
    lines.append(
        f"**model at {c['params'] / d['params']:.2f}× of its parameters** ({c['params']:,}, "
        f"{c['params'] * 4 / 2**20:.1f} MB in float32) · FLOPs {c['flops'] / 1e6:,.0f}M "
        f"({c['flops'] / d['flops']:.2f}×) · attention at {report['attn_params_ratio']:.0%} of its params"
        + ("" if mlp is None else f", MLPs at {mlp:.0%}")
    )
    q = report.get("int8")
    if q:
        ci, di = q["compressed int8"], q["dense int8"]
        fig = (
            f", top-1 {ci['top1']:.1f}% (dense int8 {di['top1']:.1f}%)"
            if "top1" in ci and "top1" in di
            else (f", agreement {ci['agreement']:.1f}%" if "agreement" in ci else "")
        )
        lines.append(
            f"**int8: {ci['mb']:.1f} MB on disk** (float32 {q['compressed']['mb']:.1f} MB; dense "
            f"{q['dense']['mb']:.1f} MB, dense int8 {di['mb']:.1f} MB){fig}"
            + (
                f"; CPU batch 32 {ci['cpu_b32_ms']:.0f} ms vs dense float32 {q['dense']['cpu_b32_ms']:.0f} ms "
                "(torchao's int8 kernels: the ONNX file runs int8 faster on a CPU)"
                if "cpu_b32_ms" in ci
                else ""
            )
        )
    if report.get("heads_lost_most"):
        lines.append(
            "heads that lost most (relative weight error of the per-head product): "
            + ", ".join(
                f"layer {h['layer']} head {h['head']} {h['product'].upper()} {h['error']:.0%}"
                for h in report["heads_lost_most"][:3]
            )
        )
    if report.get("plan"):
        lines.append(
            "phases: "
            + "; ".join(
                f"{p['phase']} {p['how']}" if p["runs"] else f"~~{p['phase']}~~ ({p['how']})" for p in report["plan"]
            )
        )
    for key, r in report.get("latency_ratio", {}).items():
        lines.append(
            f"latency {key.replace('_b', ' batch ')}: {c['latency_ms'][key]:.1f} ms vs {d['latency_ms'][key]:.1f} ms "
            f"dense, {r['median']:.2f}× (range {r['range'][0]:.2f}–{r['range'][1]:.2f} over 5 alternating "
            "rounds; the server's load moves it)"
        )
    return "\n\n".join(lines)


ZIPPED = ("model.safetensors", "comcat.json", "report.md", "ranks.png")  # what the visitor downloads
PUBLIC = ("comcat.json", "report.md")  # written with the server's paths cut to what the visitor knows


def zip_model(out: Path) -> Path:
    """The model of out/ (weights, comcat.json, report) as a zip next to it, written to a temp name
    then renamed; no run state, and no server path: an uploaded file is named by its file name."""
    target = out.parent / f"{out.name}-compressed.zip"
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ZIPPED:
            if (out / name).is_file():  # at the root: the unzipped folder loads
                if name in PUBLIC:
                    z.writestr(name, public_text((out / name).read_text()))
                else:
                    z.write(out / name, name)
    os.replace(tmp, target)
    return target


COMPRESS = Runner("compress")
PROGRESS: dict = {}  # run folder -> its Progress, so a resumed run's page carries time and losses on


def progress_of(out: Path, resume: bool) -> Progress:
    """A new run's Progress, or a resumed run's own continued (or, after a server restart, started
    at the time its job.json records)."""
    import json

    if resume and str(out) in PROGRESS:
        return PROGRESS[str(out)].resumed()
    p = Progress()
    if resume:
        try:
            p.spent = sum(json.loads((out / "job.json").read_text()).get("time_s", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    while len(PROGRESS) >= 64:  # the most recent runs only
        PROGRESS.pop(next(iter(PROGRESS)))
    PROGRESS[str(out)] = p
    return p


def loss_figure(p: Progress):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, label in LOSS_CURVES.items():
        if p.losses[key]:
            t, loss = zip(*p.losses[key])
            fig.add_trace(go.Scatter(x=t, y=loss, mode="lines", name=label))
    fig.update_layout(
        height=300, xaxis_title="seconds", yaxis_title="loss", yaxis_type="log", margin=dict(t=30, l=50, r=20, b=40)
    )
    fig.update_yaxes(dtick=1, tickformat=".0e", minor=dict(showgrid=False))
    return fig


def on_compress(
    model_source="embedded",
    name="",
    upload=None,
    arch="",
    explored=None,
    ratio=0.5,
    budget="params",
    method="head",
    mlp=False,
    search=False,
    search_epochs=4,
    distill_steps=100,
    finetune_epochs=0,
    data_source="embedded shapes",
    data_path="",
    data_zip=None,
    device="auto",
    train_images=4096,
    fit_images=1024,
    scope="whole model",
    int8=False,
    onnx=False,
    resume_dir=None,
    request: gr.Request = None,
):
    """Stream (status, ranks heatmap, loss curve, result card, download, run folder, ONNX file) while the
    run goes; with resume_dir, continue the run stopped there. `request`: the visitor's session (Stop is
    theirs). `onnx`: also export the finished model as ONNX (int8 by ONNX Runtime with `int8`)."""
    nothing = (gr.skip(),) * 6
    owner = visitor(request)
    try:
        if resume_dir:
            out, spec = Path(resume_dir), None
        else:
            model, arch_name = chosen_model(model_source, name, upload, arch, explored)
            data = common.chosen_data(data_source, data_path, data_zip, model)
            spec = Settings(
                ratio,
                budget,
                method,
                mlp,
                search,
                search_epochs,
                distill_steps,
                finetune_epochs,
                device,
                train_images,
                fit_images,
                scope,
                int8,
            ).spec(model, arch_name, data)
            out = workdir("compress") / "model"
        job = COMPRESS.start(
            lambda cb, stop: run_job(spec, out, resume=spec is None, callback=cb, should_stop=stop), owner=owner
        )
    except (Busy, Exception) as e:  # noqa: BLE001 - shown in the page
        yield (message(e), *nothing)
        return
    yield ("**starting** · loading the model and data", *nothing[:-2], str(out), gr.skip())
    p = progress_of(out, resume_dir is not None)
    dense = None
    for events in job.stream(0.5):
        for e in events:
            p.update(e)
        ranks = gr.skip()
        if p.ranks_changed:
            if dense is None:
                dense = _run_model(out)
            ranks, p.ranks_changed = ranks_heatmap_plotly(p.ranks, dense), False
        stopping = job.stopping and p.phase not in ("done", "report")  # the report is written whatever happens
        status = public_text(p.status()) + (" · stopping…" if stopping else "")
        yield status, ranks, loss_figure(p), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    p.end()
    if job.error is not None:
        yield message(job.error), *nothing
        return
    result = job.result
    small = result["loaded"].model
    head = (
        f"**Stopped** during {result['stopped']}: the best valid model so far is kept; press Resume to go on."
        if result["stopped"]
        else f"**Done** in {p.elapsed:.0f} s."
    )
    card = public_text(
        result_card(result["report"]) + "\n\n---\n\n" + report_markdown(result["report"], result["loaded"].source)
    )
    onnx_file = gr.skip()
    if onnx and not result["stopped"]:
        try:
            onnx_file, note = export_for_page(out, result, int8)
            card += "\n\n" + note
        except Exception as e:  # noqa: BLE001 - shown in the page
            card += "\n\n" + message(e)
    yield (
        head,
        ranks_heatmap_plotly(small.comcat_ranks, _run_model(out)),
        loss_figure(p),
        card,
        str(zip_model(out)),
        str(out),
        onnx_file,
    )


def export_for_page(out: Path, result: dict, int8: bool) -> tuple[str, str]:
    """(the ONNX file of the run's float32 model beside its zip, a line on its error and latency)."""
    from comcat.compression.evaluate import resolve_data
    from comcat.compression.export import export_onnx
    from comcat.compression.format import load_compressed

    floating = out / "float"
    model = load_compressed(floating if (floating / "comcat.json").is_file() else out).model
    data = resolve_data(None, model) if tuple(families.input_size(model)) == (3, 32, 32) else None
    inputs = torch.stack([data[i][0] for i in range(16)]) if data is not None else families.example_input(model, 8)
    target = out.parent / f"{out.name}{'-int8' if int8 else ''}.onnx"
    r = export_onnx(model, target, inputs, int8=int8)
    b32 = r["latency"]["b32"]
    return str(target), (
        f"ONNX{' (int8, ONNX Runtime)' if int8 else ''}: {r['bytes'] / 2**20:.1f} MB, largest error "
        f"{r['max_rel_error']:.1e} of the output's scale against PyTorch; batch 32 in ONNX Runtime "
        f"{b32['onnx_ms']:.0f} ms vs PyTorch {b32['torch_ms']:.0f} ms "
        "(5 alternating rounds; the server's load moves it)"
    )


def _run_model(out: Path):
    """The dense model of the run in `out` (for the ranks heatmap's full ranks)."""
    import json

    spec = json.loads((out / "job.json").read_text())["spec"]
    return load_model(spec["model"], spec["arch"]).model


def on_compress_resume(run_dir, request: gr.Request = None):
    if not run_dir or not (Path(run_dir) / "job.json").is_file():
        yield "nothing to resume: start a run first", *(gr.skip(),) * 6
        return
    yield from on_compress(resume_dir=run_dir, request=request)


def on_stop(request: gr.Request = None):
    return STOP_REPLIES[COMPRESS.stop(visitor(request))]


def compress_tab(explored):
    with gr.Row():
        with gr.Column(scale=1):
            model_source = gr.Radio(list(MODEL_SOURCES), value="embedded", label="model", elem_id="compress-model")
            name, upload, arch = model_inputs("compress")
            data_source = gr.Radio(
                [*common.DATA_SOURCES, common.NO_DATA],
                value="embedded shapes",
                label="data (your images, or sentences for a text encoder; labels not needed)",
                elem_id="compress-data",
            )
            data_path = gr.Textbox(
                label="image folder under the app's --data-root (DIR/<image>, DIR/<class>/<image>, or train/ + val/)"
            )
            data_zip = gr.File(
                label="zip of your images (or, for a text encoder, a text file of sentences, one per line)",
                file_types=[".zip", ".txt"],
                type="filepath",
                elem_id="compress-zip",
            )
            ratio = gr.Slider(
                0.1,
                1.0,
                value=0.5,
                step=0.05,
                label="budget: keep this fraction of the parameters (of the whole model, or of the attention)",
            )
            scope = gr.Radio(
                list(SCOPES),
                value="whole model",
                label="the budget is a fraction of (whole model: MLPs keep their most useful neurons)",
                elem_id="compress-scope",
            )
            budget = gr.Radio(["params", "flops"], value="params", label="budget counts")
            method = gr.Radio(["head", "matrix"], value="head", label="factorization")
            mlp = gr.Checkbox(value=False, label="attention only: also compress the MLPs")
            with gr.Row():
                int8 = gr.Checkbox(
                    value=False, label="int8 (the saved model's linears; its size and speed beside float32)"
                )
                onnx = gr.Checkbox(value=False, label="also an ONNX file")
            distill_steps = gr.Slider(
                0, 300, value=100, step=10, label="block distillation steps per block", elem_id="compress-distill-steps"
            )
            with gr.Accordion("more", open=False, elem_id="compress-more"):
                search = gr.Checkbox(value=False, label="search ranks (Gumbel-softmax) instead of allocating them")
                search_epochs = gr.Slider(
                    1, 20, value=4, step=1, label="search epochs", elem_id="compress-search-epochs"
                )
                finetune_epochs = gr.Slider(
                    0, 20, value=0, step=1, label="end-to-end fine-tuning epochs", elem_id="compress-finetune-epochs"
                )
                device = gr.Radio(["auto", "cpu", "cuda"], value="auto", label="device")
                train_images = gr.Number(
                    4096,
                    precision=0,
                    label="embedded shapes: training images (generated)",
                    elem_id="compress-train-images",
                )
                fit_images = gr.Number(
                    1024,
                    precision=0,
                    label="embedded shapes: calibration images (generated)",
                    elem_id="compress-fit-images",
                )
            with gr.Row():
                start = gr.Button("Compress", variant="primary", elem_id="compress-go")
                stop = gr.Button("Stop", variant="stop", elem_id="compress-stop")
                resume = gr.Button("Resume", elem_id="compress-resume")
        with gr.Column(scale=2):
            status = gr.Markdown(
                "Pick a model, your images and a budget, and press Compress.", elem_id="compress-status"
            )
            ranks = gr.Plot(label="ranks per layer", elem_id="compress-ranks")
            losses = gr.Plot(label="loss", elem_id="compress-losses")
            card = gr.Markdown(elem_id="compress-result")
            download = gr.File(label="compressed model (zip)")
            onnx_file = gr.File(label="ONNX file (runs without comcat, in ONNX Runtime)")
    run_dir = gr.State(time_to_live=common.SESSION_TTL_S)
    outputs = [status, ranks, losses, card, download, run_dir, onnx_file]
    start.click(
        on_compress,
        [
            model_source,
            name,
            upload,
            arch,
            explored,
            ratio,
            budget,
            method,
            mlp,
            search,
            search_epochs,
            distill_steps,
            finetune_epochs,
            data_source,
            data_path,
            data_zip,
            device,
            train_images,
            fit_images,
            scope,
            int8,
            onnx,
        ],
        outputs,
        concurrency_id="compress",
        concurrency_limit=2,
    )
    resume.click(on_compress_resume, run_dir, outputs, concurrency_id="compress", concurrency_limit=2)
    stop.click(on_stop, None, status, concurrency_limit=None, queue=False)
    follow_typing(name, upload, model_source, "timm name", "uploaded checkpoint")
    follow_typing(data_path, data_zip, data_source, "folder path", "uploaded zip")
    return model_source, ratio
