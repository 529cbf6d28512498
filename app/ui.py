"""The page: one tab per job (app/tabs/), each a thin layer over the library."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import common
from .tabs.compress import compress_tab
from .tabs.customize import customize_tab
from .tabs.explore import explore_tab
from .tabs.generate import generate_tab

# A visitor's folder goes when it has been idle for common.SESSION_TTL_S (common.expire_idle, run on
# every request), not when the page's heartbeat closes: API clients never open one, and anyone who
# knows a session hash could close it.


def build_demo(data_root: str | None = None) -> gr.Blocks:
    """The page; `data_root`: the server folder whose sub-folders visitors may compress on (None: uploads only)."""
    common.DATA_ROOT = Path(data_root) if data_root else None
    with gr.Blocks(title="comcat", delete_cache=(3600, 3600)) as demo:  # gradio's uploads: an hour at most
        gr.Markdown(
            "# comcat\nHead-level low-rank attention after COMCAT (Xiao et al., ICML 2023): explore "
            "how low-rank a ViT's attention is, compress it under a budget, and teach a text-to-image model a "
            "new concept with per-head low-rank attention adapters."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Explore", id="explore"):
                explored, explore_done, to_compress, budget = explore_tab(demo)
            with gr.Tab("Compress", id="compress"):
                compress_source, ratio = compress_tab(explored)
            with gr.Tab("Customize", id="customize"):
                trained = customize_tab()
            with gr.Tab("Generate", id="generate"):
                generate_tab(trained)
        # a model explored successfully is what Compress offers next; the button takes its budget there
        explore_done.then(
            lambda ex: "model from Explore" if ex is not None else gr.skip(), explored, compress_source, queue=False
        )
        to_compress.click(
            lambda ex, b: (
                ("model from Explore", b, gr.Tabs(selected="compress"))
                if ex is not None
                else (gr.skip(), gr.skip(), gr.skip())
            ),
            [explored, budget],
            [compress_source, ratio, tabs],
            queue=False,
        )
    return demo
