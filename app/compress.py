"""Compress tab: a compress run of the library (comcat.job.run_job) streamed to the page."""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from comcat.errors import ComcatError
from comcat.job import JobSpec

from .common import take_upload, workdir

DATA_SOURCES = ("embedded shapes", "folder path", "uploaded zip")
MAX_ZIP_FILES = 200_000


def unzip_images(path: str | None) -> Path:
    """Extract an uploaded ImageFolder zip under the app's temp folder, refusing paths that leave it."""
    src = take_upload(path, (".zip",), "zip of an image folder")
    out = workdir("data")
    try:
        with zipfile.ZipFile(src) as z:
            names = z.namelist()
            if len(names) > MAX_ZIP_FILES:
                raise ComcatError(f"{src.name} holds {len(names):,} files, over the app's limit of {MAX_ZIP_FILES:,}")
            for n in names:
                if n.startswith(("/", "\\")) or ".." in Path(n).parts:
                    raise ComcatError(f"{src.name} has an unsafe path {n!r}: zip the image folder itself")
            z.extractall(out)
    except zipfile.BadZipFile:
        raise ComcatError(f"{src.name} is not a readable zip file") from None
    entries = [p for p in out.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out   # folder/… or its contents


def job_spec(ratio: float, budget: str, method: str, search: bool, search_epochs: int, finetune_epochs: int,
             mlp: bool, data_source: str, data_path: str = "", data_zip: str | None = None,
             device: str = "auto", train_images: int = 4096, search_images: int = 1024,
             model: str = "embedded") -> JobSpec:
    """The page's settings as a JobSpec (the same one the CLI builds)."""
    if data_source == "folder path":
        if not data_path.strip() or not Path(data_path.strip()).is_dir():
            raise ComcatError(f"data folder {data_path.strip()!r} does not exist: give the path of an image folder")
        data = data_path.strip()
    elif data_source == "uploaded zip":
        data = str(unzip_images(data_zip))
    else:
        data = None
    return JobSpec(model=model, method=method, ratio=float(ratio), budget=budget, search=bool(search),
                   search_epochs=max(1, int(search_epochs)), finetune_epochs=max(0, int(finetune_epochs)),
                   mlp=bool(mlp), data=data, device=device, train_images=max(1, int(train_images)),
                   search_images=max(1, int(search_images)))


@dataclass
class Progress:
    """What the page shows while a run goes: built up from the library's callback events."""
    phase: str = "starting"
    started: float = field(default_factory=time.perf_counter)
    phase_started: float = field(default_factory=time.perf_counter)
    step: int = 0
    total: int = 0
    last: dict = field(default_factory=dict)
    ranks: object = None
    ranks_changed: bool = False
    losses: dict = field(default_factory=lambda: {"search": [], "weights": [], "finetune": []})
    val: list = field(default_factory=list)

    def update(self, e: dict) -> None:
        kind = e.get("kind")
        if kind == "phase":
            self.phase, self.phase_started, self.step, self.total = e["phase"], time.perf_counter(), 0, 0
        elif kind in ("search", "finetune"):
            self.step, self.total, self.last = e["step"], e["total"], e
            self.losses[e.get("phase", "finetune") if kind == "search" else "finetune"].append((self.elapsed, e["loss"]))
            if kind == "search" and e.get("ranks") is not None and e["ranks"] != self.ranks:
                self.ranks, self.ranks_changed = e["ranks"], True
        elif kind == "validate":
            self.val.append((e.get("step", 0), e["top1"]))
        elif kind == "done":
            self.phase = "done"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self) -> float | None:
        """Seconds left in this phase at the rate so far."""
        if self.step <= 0 or self.total <= 0:
            return None
        return (time.perf_counter() - self.phase_started) / self.step * (self.total - self.step)

    def status(self) -> str:
        """One markdown line: phase, step, loss, cost vs budget, temperature, ETA."""
        parts = [f"**{self.phase}**"]
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        e = self.last
        if self.phase == "search" and e.get("kind") == "search":
            parts += [f"loss {e['loss']:.3f}", f"cost {e['cost'] / e['target']:.0%} of budget", f"τ {e['tau']:.2f}"]
        elif self.phase == "finetune" and e.get("kind") == "finetune":
            parts.append(f"loss {e['loss']:.3f}")
        if self.val:
            parts.append(f"val top-1 {self.val[-1][1]:.2f}%")
        eta = self.eta()
        if eta is not None and self.phase in ("search", "finetune"):
            parts.append(f"ETA {eta:.0f} s")
        parts.append(f"{self.elapsed:.0f} s elapsed")
        return " · ".join(parts)


def zip_model(out: Path) -> Path:
    """out/ (model, comcat.json, report) as a zip next to it, written to a temp name then renamed."""
    target = out.parent / f"{out.name}-compressed.zip"
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(out.rglob("*")):
            if p.is_file() and "state" not in p.relative_to(out).parts:
                z.write(p, Path(out.name) / p.relative_to(out))
    os.replace(tmp, target)
    return target

