"""Generate tab: images with and without adapters, same seeds."""

from __future__ import annotations

import gradio as gr

from comcat.customization.diffusion.shapes_t2i import GUIDANCE
from comcat.customization.generate import generate, with_adapters

from ..common import message, visitor
from ..pipelines import EXAMPLE_ADAPTER, PIPELINES, adapter_file


def on_generate(
    pipeline, prompt, adapter1, scale1, adapter2, scale2, seed, steps, guidance, n, request: gr.Request = None
):
    """-> (images with the adapters, the same seeds without, status)."""
    visitor(request)
    try:
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


def generate_tab(trained_adapter):
    with gr.Row():
        with gr.Column(scale=1):
            pipeline = gr.Textbox("embedded", label="pipeline: embedded, a hub ID or a local diffusers folder")
            prompt = gr.Textbox("a V* in blue", label="prompt", elem_id="generate-prompt")
            example = str(EXAMPLE_ADAPTER) if EXAMPLE_ADAPTER.is_file() else None
            adapter1 = gr.File(example, label="adapter 1 (.safetensors)", type="filepath", file_types=[".safetensors"])
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
    trained_adapter.change(lambda f: f or gr.skip(), trained_adapter, adapter1)
