"""Customize and Generate tabs: the library's customize() and generate() behind the page."""
from __future__ import annotations

import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from comcat.adapter import adapter_names, unload_adapter
from comcat.customize import CustomizeSpec, resolve_device
from comcat.diffusion.concept import check_prompt
from comcat.diffusion.pipeline import load_pipeline
from comcat.errors import ComcatError
from comcat.evaluate import IMAGE_SUFFIXES
from comcat.embedded import ASSETS

from .common import pipeline_spec, take_upload, workdir

EXAMPLE_IMAGES = ASSETS / "examples" / "heart"
EXAMPLE_ADAPTER = ASSETS / "examples" / "heart_adapter.safetensors"
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


def customize_spec(pipeline: str, uploads, prompt: str, token: str, rank: int, steps: int, lr: float,
                   preview_every: int, learn_token: bool = True) -> CustomizeSpec:
    check_prompt(prompt.strip(), token.strip())          # before a job starts: the message shows at once
    return CustomizeSpec(pipeline=pipeline_spec(pipeline), images=str(concept_folder(uploads)),
                         prompt=prompt.strip(), token=token.strip(), rank=int(rank), steps=int(steps),
                         lr=float(lr), preview_every=int(preview_every), learn_token=bool(learn_token))


@dataclass
class Progress:
    """The Customize tab's view of a run, built from the library's callback events; a resumed run
    starts from the losses so far, and its ETA from the steps this session trained."""
    step: int = 0
    steps: int = 0
    first: int = 0                                   # the step this session started from
    losses: list = field(default_factory=list)       # (step, loss)
    concept: list = field(default_factory=list)      # the concept's image files
    previews: list = field(default_factory=list)     # (step, PIL images, prompts) oldest first
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
        return ([(str(f), f"concept image: {Path(f).name}") for f in self.concept]
                + [(im, f"step {step} · {prompt}") for step, images, prompts in self.previews
                   for im, prompt in zip(images, prompts)])

    def status(self) -> str:
        if not self.steps:
            return "**starting** · loading the pipeline and the images"
        elapsed = time.time() - self.started
        done = self.step - self.first
        eta = elapsed / done * (self.steps - self.step) if done else 0
        loss = f" · loss {self.losses[-1][1]:.4f}" if self.losses else ""
        return f"**training** · step {self.step}/{self.steps}{loss} · ETA {eta:.0f} s"


class Pipelines:
    """The Generate tab's pipelines: the `keep` most recently used, keyed by what they are (a local
    folder by its resolved path, so two spellings of one folder share one entry)."""

    def __init__(self, keep: int = 2):
        self.cache: OrderedDict = OrderedDict()
        self.keep = keep

    def get(self, text: str):
        key = pipeline_spec(text)         # a folder resolved, a hub ID marked as one
        if key not in self.cache:
            self.cache[key] = load_pipeline(key, device=resolve_device("auto"))
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        pipe = self.cache[key]
        if adapter_names(pipe):
            unload_adapter(pipe)
        return pipe


def adapter_file(upload: str | None) -> Path | None:
    return None if not upload else take_upload(upload, (".safetensors",), "adapter file (.safetensors)", 200)
