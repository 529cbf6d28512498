"""The page: one tab per job, each a thin layer over the library (explore.py, compress.py)."""
from __future__ import annotations

import gradio as gr

from comcat.job import run_job
from comcat.models import load_model
from comcat.pipeline import report_markdown
from comcat.plots import ranks_heatmap_plotly

from . import compress, explore
from .common import message, workdir
from .jobs import Busy, Runner

PLOT_NAMES = {"W^Q": "q", "W^K": "k", "W^V": "v", "W^O": "o", "W^QK per head": "qk", "W^VO per head": "vo"}
COMPRESS = Runner("compress")


# ---------------------------------------------------------------- Explore
def on_explore(source, name, upload, arch, shown, layer):
    """-> heatmaps, head spectra, param curves, summary, exports, state."""
    try:
        ex = explore.explore(source, name, upload, arch)
        figs = ex.figures([PLOT_NAMES[s] for s in shown], layer)
        return (*figs, ex.summary(), ex.export(), ex)
    except Exception as e:          # noqa: BLE001 - shown in the page
        return None, None, None, message(e), None, None


def on_replot(ex, shown, layer):
    if ex is None:
        return gr.skip(), gr.skip()
    heat, heads, _ = ex.figures([PLOT_NAMES[s] for s in shown], layer)
    return heat, heads


def explore_tab():
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(list(explore.SOURCES), value="embedded", label="model")
            name = gr.Textbox(value="deit_small_patch16_224", label="timm name (pretrained weights need network)")
            upload = gr.File(label="checkpoint (.safetensors / .pth)", file_types=[".safetensors", ".pth", ".pt", ".bin"],
                             type="filepath")
            arch = gr.Textbox(label="architecture of the checkpoint (timm name)", placeholder="vit_tiny_patch16_224")
            shown = gr.CheckboxGroup(list(PLOT_NAMES), value=list(PLOT_NAMES), label="heatmaps")
            layer = gr.Slider(0, 11, value=0, step=1, label="layer for per-head spectra")
            go = gr.Button("Explore", variant="primary", elem_id="explore-go")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="explore-summary")
            heat = gr.Plot(label="cumulative singular-value energy", elem_id="explore-heatmap")
            curves = gr.Plot(label="head vs matrix level")
            heads = gr.Plot(label="per-head spectra")
            files = gr.File(label="export (JSON + PNG)", file_count="multiple")
    state = gr.State()
    go.click(on_explore, [source, name, upload, arch, shown, layer], [heat, heads, curves, summary, files, state],
             concurrency_id="explore", concurrency_limit=2)
    for control in (shown, layer):
        control.change(on_replot, [state, shown, layer], [heat, heads], concurrency_id="explore")


# ---------------------------------------------------------------- Compress
def loss_figure(p: compress.Progress):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, label in (("search", "search (α steps)"), ("weights", "search (weight steps)"), ("finetune", "fine-tune")):
        if p.losses[key]:
            t, loss = zip(*p.losses[key])
            fig.add_trace(go.Scatter(x=t, y=loss, mode="lines", name=label))
    fig.update_layout(height=300, xaxis_title="seconds", yaxis_title="loss", margin=dict(t=30, l=50, r=20, b=40))
    return fig


def on_compress(ratio, budget, method, search, search_epochs, finetune_epochs, mlp, data_source, data_path,
                data_zip, device, train_images=4096, search_images=1024):
    """Stream (status, ranks heatmap, loss curve, result card, download) while the run goes."""
    nothing = (gr.skip(),) * 4
    try:
        spec = compress.job_spec(ratio, budget, method, search, search_epochs, finetune_epochs, mlp, data_source,
                                 data_path, data_zip, device, train_images, search_images)
        out = workdir("compress") / "model"
        COMPRESS.start(lambda cb, stop: run_job(spec, out, callback=cb, should_stop=stop))
    except (Busy, Exception) as e:   # noqa: BLE001 - shown in the page
        yield (message(e), *nothing)
        return
    yield ("**starting** · loading the model and data", *nothing)
    dense = load_model(spec.model).model
    p = compress.Progress()
    for events in COMPRESS.stream(0.5):
        for e in events:
            p.update(e)
        ranks = gr.skip()
        if p.ranks_changed:
            ranks, p.ranks_changed = ranks_heatmap_plotly(p.ranks, dense), False
        status = p.status() + (" · stopping…" if COMPRESS.stopping and p.phase != "done" else "")
        yield status, ranks, loss_figure(p), gr.skip(), gr.skip()
    if COMPRESS.error is not None:
        yield message(COMPRESS.error), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    result = COMPRESS.result
    small = result["loaded"].model
    head = (f"⏹️ Stopped during {result['stopped']}: the best valid model so far is kept."
            if result["stopped"] else f"✅ Done in {p.elapsed:.0f} s.")
    yield (head, ranks_heatmap_plotly(small.comcat_ranks, dense), loss_figure(p),
           report_markdown(result["report"], result["loaded"].source), str(compress.zip_model(out)))


def on_stop():
    return "**stopping** at the next step…" if COMPRESS.stop() else "nothing is running"


def compress_tab():
    with gr.Row():
        with gr.Column(scale=1):
            ratio = gr.Slider(0.1, 1.0, value=0.5, step=0.05, label="budget: keep this fraction of attention + MLP")
            budget = gr.Radio(["params", "flops"], value="params", label="budget counts")
            method = gr.Radio(["head", "matrix"], value="head", label="factorization")
            search = gr.Checkbox(value=True, label="search ranks (Gumbel-softmax)")
            mlp = gr.Checkbox(value=True, label="also compress the MLPs")
            search_epochs = gr.Slider(1, 20, value=4, step=1, label="search epochs", elem_id="compress-search-epochs")
            finetune_epochs = gr.Slider(0, 20, value=2, step=1, label="fine-tune epochs",
                                        elem_id="compress-finetune-epochs")
            data_source = gr.Radio(list(compress.DATA_SOURCES), value="embedded shapes", label="data")
            data_path = gr.Textbox(label="image folder (train/ + val/, or class folders)")
            data_zip = gr.File(label="zip of an image folder", file_types=[".zip"], type="filepath")
            device = gr.Radio(["auto", "cpu", "cuda"], value="auto", label="device")
            with gr.Accordion("images per epoch", open=False, elem_id="compress-images"):
                train_images = gr.Number(4096, precision=0, label="training images (embedded: generated)",
                                         elem_id="compress-train-images")
                search_images = gr.Number(1024, precision=0, label="search images", elem_id="compress-search-images")
            with gr.Row():
                start = gr.Button("Compress", variant="primary", elem_id="compress-go")
                stop = gr.Button("Stop", variant="stop", elem_id="compress-stop")
        with gr.Column(scale=2):
            status = gr.Markdown("Pick a budget and press Compress.", elem_id="compress-status")
            ranks = gr.Plot(label="ranks per layer", elem_id="compress-ranks")
            losses = gr.Plot(label="loss")
            card = gr.Markdown(elem_id="compress-result")
            download = gr.File(label="compressed model (zip)")
    start.click(on_compress, [ratio, budget, method, search, search_epochs, finetune_epochs, mlp, data_source,
                              data_path, data_zip, device, train_images, search_images], [status, ranks, losses, card, download],
                concurrency_id="compress", concurrency_limit=2)
    stop.click(on_stop, None, status, concurrency_limit=None, queue=False)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="comcat") as demo:
        gr.Markdown("# comcat\nHead-level low-rank attention after COMCAT (Xiao et al., ICML 2023): explore "
                    "how low-rank a ViT's attention is, and compress it under a budget.")
        with gr.Tab("Explore"):
            explore_tab()
        with gr.Tab("Compress"):
            compress_tab()
    return demo
