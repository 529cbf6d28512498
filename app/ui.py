"""The page: one tab per job, each a thin layer over the library (explore.py, compress.py)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from comcat.errors import ComcatError
from comcat.job import run_job
from comcat.models import load_model
from comcat.pipeline import report_markdown
from comcat.plots import ranks_heatmap_plotly

from comcat.customize import CustomizeSpec
from comcat.customize import customize as run_customize
from comcat.diffusion.shapes_t2i import GUIDANCE
from comcat.generate import generate, with_adapters

from . import common, compress, customize, explore
from .common import forget, message, public_text, visitor, workdir
from .jobs import Busy, Runner

PLOT_NAMES = {"W^Q": "q", "W^K": "k", "W^V": "v", "W^O": "o", "W^QK per head": "qk", "W^VO per head": "vo"}
COMPRESS = Runner("compress")
CUSTOMIZE = Runner("customize")
PIPELINES = customize.Pipelines()


# ---------------------------------------------------------------- Explore
def on_explore(source, name, upload, arch, shown, layer, budget=0.5, request: gr.Request = None):
    """-> heatmaps, head spectra, param curves, summary, exports, layer table, recommendation at
    `budget`, the layer slider's range, state."""
    session(request)
    try:
        ex = explore.explore(source, name, upload, arch)
        layer = min(int(layer), ex.spectra.depth - 1)
        figs = ex.figures([PLOT_NAMES[s] for s in shown], layer)
        slider = gr.update(maximum=ex.spectra.depth - 1, value=layer)     # the loaded model's layers
        return (*figs, ex.summary(), ex.export(), ex.table_rows(), ex.recommendation(budget), slider, ex)
    except Exception as e:          # noqa: BLE001 - shown in the page
        return None, None, None, message(e), None, None, None, gr.skip(), None


ADAPTER_COLUMNS = ("site", "kind", "heads", "rank", "QK change mean", "QK change max", "VO change mean",
                   "VO change max", "QK update s1", "VO update s1")


def on_inspect_adapter(pipeline, upload, request: gr.Request = None):
    """-> (summary, table rows, CSV file) of an adapter's per-head updates against its base pipeline."""
    from comcat.adapter.inspect import adapter_summary, adapter_table, to_csv

    session(request)
    try:
        path = customize.adapter_file(upload)
        if path is None:
            raise ComcatError("upload an adapter file (.safetensors) first")
        rows = adapter_table(PIPELINES.get(pipeline), path)
        out = workdir("explore") / f"{path.stem}_updates.csv"
        out.write_text(to_csv(rows))
        table = [[r["site"], r["kind"], r["heads"], r["rank"]] + [round(r[k], 3) for k in (
            "qk_change_mean", "qk_change_max", "vo_change_mean", "vo_change_max")]
            + [round(r["qk_update_sv"][0], 3), round(r["vo_update_sv"][0], 3)] for r in rows]
        return adapter_summary(rows), table, str(out)
    except Exception as e:          # noqa: BLE001 - shown in the page
        return message(e), None, None


def on_calibrated(ex, budget, data_source, data_path, data_zip, request: gr.Request = None,
                  progress=gr.Progress()):
    """-> (the recommendation at `budget` calibrated on the chosen images, its exports)."""
    session(request)
    try:
        if ex is None:
            raise ComcatError("press Explore first: the recommendation is for the explored model")
        data = common.chosen_data(data_source, data_path, data_zip, ex.spec)
        return ex.calibrated_recommendation(budget, data, lambda i, n, what: progress((i, n), desc=what))
    except Exception as e:          # noqa: BLE001 - shown in the page
        return message(e), None


def on_compare(ex, upload, request: gr.Request = None):
    """-> (text, per-head error figure, exports) of a compressed model against the explored one."""
    session(request)
    try:
        if ex is None:
            raise ComcatError("press Explore on the dense model first: the compressed one is compared with it")
        return ex.compare(upload)
    except Exception as e:          # noqa: BLE001 - shown in the page
        return message(e), None, None


def on_budget(ex, budget):
    try:
        return ex.recommendation(budget) if ex is not None else gr.skip()
    except Exception as e:          # noqa: BLE001 - shown in the page
        return message(e)


def on_replot(ex, shown, layer):
    if ex is None:
        return gr.skip(), gr.skip()
    heat, heads, _ = ex.figures([PLOT_NAMES[s] for s in shown], layer)
    return heat, heads


def explore_tab():
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(list(explore.SOURCES), value="embedded", label="model")
            name = gr.Textbox(label="timm name (pretrained weights need network)", placeholder="deit_small_patch16_224")
            upload = gr.File(label="checkpoint (.safetensors / .pth)", file_types=[".safetensors", ".pth", ".pt", ".bin"],
                             type="filepath")
            arch = gr.Textbox(label="architecture of the checkpoint (timm name)", placeholder="vit_tiny_patch16_224")
            shown = gr.CheckboxGroup(list(PLOT_NAMES), value=list(PLOT_NAMES), label="heatmaps")
            layer = gr.Slider(0, 5, value=0, step=1, label="layer for per-head spectra")   # its range: the model's
            go = gr.Button("Explore", variant="primary", elem_id="explore-go")
            budget = gr.Slider(0.1, 1.0, value=0.5, step=0.05, label="recommend ranks at this fraction of the "
                               "attention parameters", elem_id="explore-budget")
            to_compress = gr.Button("Compress this model at this budget", elem_id="explore-to-compress")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="explore-summary")
            advice = gr.Markdown(elem_id="explore-recommendation")
            heat = gr.Plot(label="cumulative singular-value energy", elem_id="explore-heatmap")
            curves = gr.Plot(label="head vs matrix level")
            heads = gr.Plot(label="per-head spectra")
            table = gr.Dataframe(headers=list(explore.COLUMNS), label="per layer: spectral metrics against "
                                 "shuffled weights (structure: how far from noise)", elem_id="explore-table",
                                 interactive=False, max_height=400)
            files = gr.File(label="export (JSON, CSV, PNG)", file_count="multiple")
            with gr.Accordion("calibrate the recommendation on your images", open=False, elem_id="explore-calibrate"):
                c_source = gr.Radio(list(common.DATA_SOURCES), value="embedded shapes",
                                    label="images (labels not needed)", elem_id="explore-data")
                c_path = gr.Textbox(label="image folder under the app's --data-root")
                c_zip = gr.File(label="zip of an image folder", file_types=[".zip"], type="filepath")
                c_go = gr.Button("Recommend with my images", elem_id="explore-calibrate-go")
                c_advice = gr.Markdown(elem_id="explore-calibrated")
                c_files = gr.File(label="export (JSON; ranks.json is a rank file for compress --ranks)",
                                  file_count="multiple")
            with gr.Accordion("a compressed model against this one", open=False, elem_id="explore-compare"):
                k_zip = gr.File(label="compressed model (the zip Compress gives)", file_types=[".zip"],
                                type="filepath", elem_id="explore-compare-zip")
                k_go = gr.Button("Compare with the explored model", elem_id="explore-compare-go")
                k_text = gr.Markdown(elem_id="explore-compare-summary")
                k_plot = gr.Plot(label="relative error per head")
                k_files = gr.File(label="export (CSV, PNG)", file_count="multiple")
            with gr.Accordion("a COMCAT adapter against its base model", open=False, elem_id="explore-adapter"):
                a_pipeline = gr.Textbox("embedded", label="pipeline: embedded or a hub ID")
                example = str(customize.EXAMPLE_ADAPTER) if customize.EXAMPLE_ADAPTER.is_file() else None
                a_file = gr.File(example, label="adapter (.safetensors)", type="filepath", file_types=[".safetensors"])
                a_go = gr.Button("Inspect the adapter", elem_id="explore-adapter-go")
                a_summary = gr.Markdown(elem_id="explore-adapter-summary")
                a_table = gr.Dataframe(headers=list(ADAPTER_COLUMNS), interactive=False, max_height=400,
                                       label="per attention: the update's size against the base, mean and max "
                                             "over heads, and its largest singular value", elem_id="explore-adapter-table")
                a_csv = gr.File(label="export (CSV)")
    state = gr.State()
    explored = go.click(on_explore, [source, name, upload, arch, shown, layer, budget],
                        [heat, heads, curves, summary, files, table, advice, layer, state], concurrency_id="explore", concurrency_limit=2)
    for control in (shown, layer):
        control.change(on_replot, [state, shown, layer], [heat, heads], concurrency_id="explore")
    follow_typing(name, upload, source, "timm name", "uploaded checkpoint")
    budget.release(on_budget, [state, budget], advice, concurrency_id="explore")
    follow_typing(c_path, c_zip, c_source, "folder path", "uploaded zip")
    c_go.click(on_calibrated, [state, budget, c_source, c_path, c_zip], [c_advice, c_files], concurrency_id="explore")
    k_go.click(on_compare, [state, k_zip], [k_text, k_plot, k_files], concurrency_id="explore")
    a_go.click(on_inspect_adapter, [a_pipeline, a_file], [a_summary, a_table, a_csv], concurrency_id="generate")
    return state, explored, to_compress, budget


# ---------------------------------------------------------------- Compress
def loss_figure(p: compress.Progress):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, label in compress.LOSS_CURVES.items():
        if p.losses[key]:
            t, loss = zip(*p.losses[key])
            fig.add_trace(go.Scatter(x=t, y=loss, mode="lines", name=label))
    fig.update_layout(height=300, xaxis_title="seconds", yaxis_title="loss", yaxis_type="log",
                      margin=dict(t=30, l=50, r=20, b=40))
    return fig


def on_compress(model_source="embedded", name="", upload=None, arch="", explored=None, ratio=0.5, budget="params",
                method="head", mlp=False, search=False, search_epochs=4, distill_steps=100, finetune_epochs=0,
                data_source="embedded shapes", data_path="", data_zip=None, device="auto", train_images=4096,
                fit_images=1024, resume_dir=None, request: gr.Request = None):
    """Stream (status, ranks heatmap, loss curve, result card, download, run folder) while the run goes;
    with resume_dir, continue the run stopped there. `request`: the visitor's session (Stop is theirs)."""
    nothing = (gr.skip(),) * 5
    owner = session(request)
    try:
        if resume_dir:
            out, spec = Path(resume_dir), None
        else:
            model, arch_name = compress.chosen_model(model_source, name, upload, arch, explored)
            data = common.chosen_data(data_source, data_path, data_zip, model)
            spec = compress.Settings(ratio, budget, method, mlp, search, search_epochs, distill_steps, finetune_epochs,
                                     device, train_images, fit_images).spec(model, arch_name, data)
            out = workdir("compress") / "model"
        COMPRESS.start(lambda cb, stop: run_job(spec, out, resume=spec is None, callback=cb, should_stop=stop),
                       owner=owner)
    except (Busy, Exception) as e:   # noqa: BLE001 - shown in the page
        yield (message(e), *nothing)
        return
    yield ("**starting** · loading the model and data", *nothing[:-1], str(out))
    p = compress.Progress()
    dense = None
    for events in COMPRESS.stream(0.5):
        for e in events:
            p.update(e)
        ranks = gr.skip()
        if p.ranks_changed:
            if dense is None:
                dense = _run_model(out)
            ranks, p.ranks_changed = ranks_heatmap_plotly(p.ranks, dense), False
        status = public_text(p.status()) + (" · stopping…" if COMPRESS.stopping and p.phase != "done" else "")
        yield status, ranks, loss_figure(p), gr.skip(), gr.skip(), gr.skip()
    if COMPRESS.error is not None:
        yield message(COMPRESS.error), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    result = COMPRESS.result
    small = result["loaded"].model
    head = (f"**Stopped** during {result['stopped']}: the best valid model so far is kept; press Resume to go on."
            if result["stopped"] else f"**Done** in {p.elapsed:.0f} s.")
    card = public_text(compress.result_card(result["report"]) + "\n\n---\n\n"
                 + report_markdown(result["report"], result["loaded"].source))
    yield (head, ranks_heatmap_plotly(small.comcat_ranks, _run_model(out)), loss_figure(p), card,
           str(compress.zip_model(out)), str(out))


def _run_model(out: Path):
    """The dense model of the run in `out` (for the ranks heatmap's full ranks)."""
    import json

    spec = json.loads((out / "job.json").read_text())["spec"]
    return load_model(spec["model"], spec["arch"]).model


def on_compress_resume(run_dir, request: gr.Request = None):
    if not run_dir or not (Path(run_dir) / "job.json").is_file():
        yield "nothing to resume: start a run first", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    yield from on_compress(resume_dir=run_dir, request=request)


def session(request) -> str | None:
    """The visitor's session id (None outside a page: tests, scripts); their folders' owner."""
    return visitor(request)


def on_leave(request: gr.Request = None):
    """The visitor closed the page: stop their runs, then remove their folders once the runs end."""
    import threading

    owner = session(request)
    if owner is None:
        return
    stopped = [r for r in (COMPRESS, CUSTOMIZE) if r.stop(owner) == "stopping"]

    def clean():
        for r in stopped:
            r.wait(600)
        forget(owner)
    threading.Thread(target=clean, name="comcat-forget", daemon=True).start()


STOP_REPLIES = {"stopping": "**stopping** at the next step…", "idle": "nothing is running",
                "other": "another visitor's run is going: only they can stop it"}


def on_stop(request: gr.Request = None):
    return STOP_REPLIES[COMPRESS.stop(session(request))]


def follow_typing(typed, uploaded, choice, typed_value: str, uploaded_value: str) -> None:
    """Typing in a box or uploading a file selects that source in the `choice` radio (a typed path
    is never silently ignored)."""
    typed.input(lambda text: typed_value if text.strip() else gr.skip(), typed, choice, queue=False)
    uploaded.upload(lambda _: uploaded_value, uploaded, choice, queue=False)


def compress_tab(explored):
    with gr.Row():
        with gr.Column(scale=1):
            model_source = gr.Radio(list(compress.MODEL_SOURCES), value="embedded", label="model",
                                    elem_id="compress-model")
            name = gr.Textbox(label="timm name (pretrained weights need network)", placeholder="deit_small_patch16_224")
            upload = gr.File(label="checkpoint (.safetensors / .pth)", file_types=[".safetensors", ".pth", ".pt", ".bin"],
                             type="filepath", elem_id="compress-upload")
            arch = gr.Textbox(label="architecture of the checkpoint (timm name)", placeholder="vit_tiny_patch16_224",
                              elem_id="compress-arch")
            data_source = gr.Radio(list(common.DATA_SOURCES), value="embedded shapes",
                                   label="data (your images; labels not needed)", elem_id="compress-data")
            data_path = gr.Textbox(label="image folder under the app's --data-root (DIR/<image>, DIR/<class>/<image>, "
                                         "or train/ + val/)")
            data_zip = gr.File(label="zip of an image folder", file_types=[".zip"], type="filepath",
                               elem_id="compress-zip")
            ratio = gr.Slider(0.1, 1.0, value=0.5, step=0.05, label="budget: keep this fraction of the compressed "
                                                                   "sites' parameters (attention, + MLPs if ticked)")
            budget = gr.Radio(["params", "flops"], value="params", label="budget counts")
            method = gr.Radio(["head", "matrix"], value="head", label="factorization")
            mlp = gr.Checkbox(value=False, label="also compress the MLPs (small models' MLPs are far from low-rank)")
            distill_steps = gr.Slider(0, 300, value=100, step=10, label="block distillation steps per block",
                                      elem_id="compress-distill-steps")
            with gr.Accordion("more", open=False, elem_id="compress-more"):
                search = gr.Checkbox(value=False, label="search ranks (Gumbel-softmax) instead of allocating them")
                search_epochs = gr.Slider(1, 20, value=4, step=1, label="search epochs", elem_id="compress-search-epochs")
                finetune_epochs = gr.Slider(0, 20, value=0, step=1, label="end-to-end fine-tuning epochs",
                                            elem_id="compress-finetune-epochs")
                device = gr.Radio(["auto", "cpu", "cuda"], value="auto", label="device")
                train_images = gr.Number(4096, precision=0, label="embedded shapes: training images (generated)",
                                         elem_id="compress-train-images")
                fit_images = gr.Number(1024, precision=0, label="embedded shapes: calibration images (generated)",
                                       elem_id="compress-fit-images")
            with gr.Row():
                start = gr.Button("Compress", variant="primary", elem_id="compress-go")
                stop = gr.Button("Stop", variant="stop", elem_id="compress-stop")
                resume = gr.Button("Resume", elem_id="compress-resume")
        with gr.Column(scale=2):
            status = gr.Markdown("Pick a model, your images and a budget, and press Compress.",
                                 elem_id="compress-status")
            ranks = gr.Plot(label="ranks per layer", elem_id="compress-ranks")
            losses = gr.Plot(label="loss", elem_id="compress-losses")
            card = gr.Markdown(elem_id="compress-result")
            download = gr.File(label="compressed model (zip)")
    run_dir = gr.State()
    outputs = [status, ranks, losses, card, download, run_dir]
    start.click(on_compress, [model_source, name, upload, arch, explored, ratio, budget, method, mlp, search,
                              search_epochs, distill_steps, finetune_epochs, data_source, data_path, data_zip, device,
                              train_images, fit_images], outputs, concurrency_id="compress", concurrency_limit=2)
    resume.click(on_compress_resume, run_dir, outputs, concurrency_id="compress", concurrency_limit=2)
    stop.click(on_stop, None, status, concurrency_limit=None, queue=False)
    follow_typing(name, upload, model_source, "timm name", "uploaded checkpoint")
    follow_typing(data_path, data_zip, data_source, "folder path", "uploaded zip")
    return model_source, ratio


# ---------------------------------------------------------------- Customize
def customize_loss_figure(p: customize.Progress):
    import plotly.graph_objects as go

    fig = go.Figure()
    if p.losses:
        steps, losses = zip(*p.losses)
        fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines", name="loss", line=dict(width=1), opacity=0.4))
        fig.add_trace(go.Scatter(x=steps, y=smooth(losses), mode="lines", name="smoothed", line=dict(width=2)))
    fig.update_layout(height=260, xaxis_title="step", yaxis_title="denoising loss",
                      margin=dict(t=20, l=50, r=20, b=40))
    return fig


def smooth(values, beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def on_customize(pipeline, uploads, prompt, token, rank, steps, lr, preview_every, resume_dir=None,
                 request: gr.Request = None):
    """Stream (status, loss curve, preview gallery, adapter download, run folder) while training."""
    owner = session(request)
    try:
        if resume_dir:
            out, spec = Path(resume_dir), None
        else:
            spec = customize.customize_spec(pipeline, uploads, prompt, token, rank, steps, lr, preview_every)
            out = workdir("customize") / "run"
        CUSTOMIZE.start(lambda cb, stop: run_customize(spec or CustomizeSpec(), out, callback=cb, should_stop=stop,
                                                       resume=spec is None), owner=owner)
    except (Busy, Exception) as e:   # noqa: BLE001 - shown in the page
        yield message(e), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    p = customize.Progress()
    yield p.status(), gr.skip(), gr.skip(), gr.skip(), str(out)
    for events in CUSTOMIZE.stream(0.5):
        fresh = any(e["kind"] in ("preview", "start") for e in events)
        for e in events:
            p.update(e)
        status = p.status() + (" · stopping…" if CUSTOMIZE.stopping else "")
        yield status, customize_loss_figure(p), p.gallery() if fresh else gr.skip(), gr.skip(), gr.skip()
    if CUSTOMIZE.error is not None:
        yield message(CUSTOMIZE.error), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    r = CUSTOMIZE.result
    size = Path(r["adapter"]).stat().st_size / 1e3
    head = (f"**Stopped** at step {r['steps_done']}: the adapter so far is saved; press Resume to go on."
            if r["stopped"] else f"**Done**: {r['steps_done']} steps in {r['seconds']:.0f} s.")
    yield (f"{head} Adapter: {size:.0f} kB.", customize_loss_figure(p),
           p.gallery(), r["adapter"], str(out))


def on_resume(run_dir, request: gr.Request = None):
    if not run_dir:
        yield "nothing to resume: start a run first", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    yield from on_customize(None, None, None, None, None, None, None, None, resume_dir=run_dir, request=request)


def on_customize_stop(request: gr.Request = None):
    return STOP_REPLIES[CUSTOMIZE.stop(session(request))]


def customize_tab():
    with gr.Row():
        with gr.Column(scale=1):
            pipeline = gr.Textbox("embedded", label="pipeline: embedded, a hub ID or a local diffusers folder")
            uploads = gr.File(label=f"{customize.MIN_IMAGES}-{customize.MAX_IMAGES} images of the concept "
                                    "(+ optional NAME.txt captions); none: the bundled hearts",
                              file_count="multiple", type="filepath", elem_id="customize-images")
            prompt = gr.Textbox("a V*", label="instance prompt (for images without a caption)")
            token = gr.Textbox("V*", label="concept token")
            rank = gr.Slider(1, 8, value=2, step=1, label="rank per head")
            steps = gr.Slider(10, 1000, value=300, step=10, label="steps", elem_id="customize-steps")
            lr = gr.Number(2.5e-3, label="learning rate")
            preview_every = gr.Slider(0, 200, value=50, step=10, label="preview every N steps (fixed seed)",
                                      elem_id="customize-preview-every")
            with gr.Row():
                start = gr.Button("Customize", variant="primary", elem_id="customize-go")
                stop = gr.Button("Stop", variant="stop", elem_id="customize-stop")
                resume = gr.Button("Resume", elem_id="customize-resume")
        with gr.Column(scale=2):
            status = gr.Markdown("Upload a few images (or keep the bundled hearts) and press Customize.",
                                 elem_id="customize-status")
            losses = gr.Plot(label="loss")
            previews = gr.Gallery(label="your images, then every preview", columns=4, height=360,
                                  elem_id="customize-previews")
            adapter = gr.File(label="adapter (.safetensors)", elem_id="customize-adapter")
    run_dir = gr.State()
    outputs = [status, losses, previews, adapter, run_dir]
    start.click(on_customize, [pipeline, uploads, prompt, token, rank, steps, lr, preview_every], outputs,
                concurrency_id="customize", concurrency_limit=2)
    resume.click(on_resume, run_dir, outputs, concurrency_id="customize", concurrency_limit=2)
    stop.click(on_customize_stop, None, status, concurrency_limit=None, queue=False)
    return adapter


# ---------------------------------------------------------------- Generate
def on_generate(pipeline, prompt, adapter1, scale1, adapter2, scale2, seed, steps, guidance, n,
                request: gr.Request = None):
    """-> (images with the adapters, the same seeds without, status)."""
    session(request)
    try:
        pipe = PIPELINES.get(pipeline)
        plain = generate(pipe, prompt, seed=int(seed), steps=int(steps), guidance=float(guidance), n=int(n))
        chosen = [(customize.adapter_file(a), s) for a, s in ((adapter1, scale1), (adapter2, scale2)) if a]
        names = with_adapters(pipe, [(str(path), float(s)) for path, s in chosen])
        adapted = generate(pipe, prompt, seed=int(seed), steps=int(steps), guidance=float(guidance), n=int(n)) \
            if names else None
        what = f"with {len(names)} adapter(s)" if names else "no adapter chosen: both galleries show the base model"
        return adapted or plain, plain, f"**Done**: {len(plain)} image(s), seed {int(seed)}, {what}."
    except Exception as e:          # noqa: BLE001 - shown in the page
        return None, None, message(e)


def generate_tab(trained_adapter):
    with gr.Row():
        with gr.Column(scale=1):
            pipeline = gr.Textbox("embedded", label="pipeline: embedded, a hub ID or a local diffusers folder")
            prompt = gr.Textbox("a V* in blue", label="prompt", elem_id="generate-prompt")
            example = str(customize.EXAMPLE_ADAPTER) if customize.EXAMPLE_ADAPTER.is_file() else None
            adapter1 = gr.File(example, label="adapter 1 (.safetensors)", type="filepath",
                               file_types=[".safetensors"])
            scale1 = gr.Slider(-1, 2, value=1.0, step=0.05, label="strength 1")
            adapter2 = gr.File(label="adapter 2 (.safetensors)", type="filepath", file_types=[".safetensors"])
            scale2 = gr.Slider(-1, 2, value=1.0, step=0.05, label="strength 2")
            seed = gr.Number(0, precision=0, label="seed")
            steps = gr.Slider(5, 100, value=25, step=1, label="sampling steps")
            guidance = gr.Slider(1, 12, value=GUIDANCE, step=0.5, label="guidance")
            n = gr.Slider(1, 16, value=8, step=1, label="images")
            go = gr.Button("Generate", variant="primary", elem_id="generate-go")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="generate-status")
            with gr.Row():
                adapted = gr.Gallery(label="with the adapters", columns=3, elem_id="generate-adapted")   # 4 clip
                plain = gr.Gallery(label="without (same seeds)", columns=3, elem_id="generate-plain")
    go.click(on_generate, [pipeline, prompt, adapter1, scale1, adapter2, scale2, seed, steps, guidance, n],
             [adapted, plain, status], concurrency_id="generate", concurrency_limit=1)
    trained_adapter.change(lambda f: f or gr.skip(), trained_adapter, adapter1)


def build_demo(data_root: str | None = None) -> gr.Blocks:
    """The page; `data_root`: the server folder whose sub-folders visitors may compress on (None: uploads only)."""
    common.DATA_ROOT = Path(data_root) if data_root else None
    with gr.Blocks(title="comcat", delete_cache=(3600, 3600)) as demo:     # gradio's uploads: an hour at most
        gr.Markdown("# comcat\nHead-level low-rank attention after COMCAT (Xiao et al., ICML 2023): explore "
                    "how low-rank a ViT's attention is, compress it under a budget, and teach a text-to-image model a "
                    "new concept with per-head low-rank attention adapters.")
        with gr.Tabs() as tabs:
            with gr.Tab("Explore", id="explore"):
                explored, explore_done, to_compress, budget = explore_tab()
            with gr.Tab("Compress", id="compress"):
                compress_source, ratio = compress_tab(explored)
            with gr.Tab("Customize", id="customize"):
                trained = customize_tab()
            with gr.Tab("Generate", id="generate"):
                generate_tab(trained)
        # a model explored successfully is what Compress offers next; the button takes its budget there
        explore_done.then(lambda ex: "model from Explore" if ex is not None else gr.skip(), explored, compress_source,
                          queue=False)
        to_compress.click(lambda ex, b: ("model from Explore", b, gr.Tabs(selected="compress")) if ex is not None
                          else (gr.skip(), gr.skip(), gr.skip()), [explored, budget], [compress_source, ratio, tabs],
                          queue=False)
        demo.unload(on_leave)
    return demo
