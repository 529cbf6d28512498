"""The text-to-image side the page holds: the two most recently used pipelines, adapter files."""

from __future__ import annotations

from pathlib import Path

from comcat.core import dist
from comcat.core.embedded import ASSETS
from comcat.customization.adapter import adapter_names, unload_adapter
from comcat.customization.diffusion.pipeline import load_pipeline

from .common import Recent, pipeline_spec, take_upload

EXAMPLE_ADAPTER = ASSETS / "examples" / "heart_adapter.safetensors"


class Pipelines:
    """The Generate tab's pipelines: the `keep` most recently used, keyed by what they are (a local
    folder by its resolved path, so two spellings of one folder share one entry)."""

    def __init__(self, keep: int = 2):
        self.cache = Recent(keep)

    def get(self, text: str):
        key = pipeline_spec(text)  # a folder resolved, a hub ID marked as one
        pipe = self.cache.get(key, lambda: load_pipeline(key, device=dist.device("auto")))
        if adapter_names(pipe):
            unload_adapter(pipe)
        return pipe


PIPELINES = Pipelines()


def adapter_file(upload: str | None) -> Path | None:
    return None if not upload else take_upload(upload, (".safetensors",), "adapter file (.safetensors)", 200)
