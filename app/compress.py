"""Compress tab: a compress run of the library (comcat.job.run_job) streamed to the page."""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from comcat.errors import ComcatError
from comcat.job import JobSpec

from .common import workdir
from .explore import model_spec

MODEL_SOURCES = ("embedded", "timm name", "uploaded checkpoint", "model from Explore")
def chosen_model(source: str, name: str = "", upload: str | None = None, arch: str = "",
                 explored=None) -> tuple[str, str | None]:
    """(SPEC, arch) to compress: picked here as in Explore, or the model the Explore tab loaded."""
    if source == "model from Explore":
        if explored is None:
            raise ComcatError("no model has been explored yet: press Explore in the Explore tab first, or pick "
                              "another model here")
        return explored.spec, explored.arch
    return model_spec(source, name, upload, arch)


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

    def spec(self, model: str, arch: str | None, data: str | None) -> JobSpec:
        return JobSpec(model=model, arch=arch, method=self.method, ratio=float(self.ratio), budget=self.budget,
                       search=bool(self.search), search_epochs=max(1, int(self.search_epochs)),
                       distill_steps=max(0, int(self.distill_steps)), finetune_epochs=max(0, int(self.finetune_epochs)),
                       mlp=bool(self.mlp), data=data, device=self.device, train_images=max(1, int(self.train_images)),
                       fit_images=max(1, int(self.fit_images)))


LOSS_CURVES = {"search": "search (α steps)", "weights": "search (weight steps)", "distill": "block distillation",
               "finetune": "end-to-end fine-tuning"}
STEPPED = ("calibrate", "allocate", "search", "distill", "finetune")


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
    losses: dict = field(default_factory=lambda: {k: [] for k in LOSS_CURVES})
    val: list = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def update(self, e: dict) -> None:
        kind = e.get("kind")
        if kind == "phase":
            self.phase, self.phase_started, self.step, self.total = e["phase"], time.perf_counter(), 0, 0
            if e["phase"] == "data":
                self.data = e
        elif kind in STEPPED:
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
        return time.perf_counter() - self.started

    def eta(self) -> float | None:
        """Seconds left in this phase at the rate so far."""
        if self.step <= 0 or self.total <= 0:
            return None
        return (time.perf_counter() - self.phase_started) / self.step * (self.total - self.step)

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
        if self.val:
            v = self.val[-1]
            top1 = f", top-1 {v['top1']:.1f}%" if "top1" in v else ""
            parts.append(f"validation ({v['images']} held-out images): agrees with dense {v['agreement']:.1f}%{top1}")
        eta = self.eta()
        if eta is not None and self.phase in STEPPED:
            parts.append(f"ETA {eta:.0f} s")
        parts.append(f"{self.elapsed:.0f} s elapsed")
        return " · ".join(parts)


def result_card(report: dict) -> str:
    """The headline figures of a finished run, each saying what it is measured on."""
    d, c = report["dense"], report["compressed"]
    lines = []
    if "agreement" in c:
        data = report.get("data", {})
        where = f"{c['images']} held-out images" + (f" of {Path(data['source'].split(' (')[0]).name}"
                                                    if data.get("source") else "")
        lines.append(f"**{c['agreement']:.1f}% agreement with the dense model** (same top-1; KL {c['kl']:.3f}) on {where}")
        if "top1" in c:
            lines.append(f"top-1 **{c['top1']:.1f}%** (dense {d['top1']:.1f}%, {c['top1'] - d['top1']:+.1f} points)")
        elif data.get("note"):
            lines.append(f"no top-1: {data['note']}")
    lines.append(f"params {c['params']:,} ({c['params'] / d['params']:.2f}× dense) · FLOPs {c['flops'] / 1e6:,.0f}M "
                 f"({c['flops'] / d['flops']:.2f}×) · attention at {report['attn_params_ratio']:.0%} of its params")
    if report.get("heads_lost_most"):
        lines.append("heads that lost most (relative weight error of the per-head product): " + ", ".join(
            f"layer {h['layer']} head {h['head']} {h['product'].upper()} {h['error']:.0%}"
            for h in report["heads_lost_most"][:3]))
    for key, r in report.get("latency_ratio", {}).items():
        lines.append(f"latency {key.replace('_b', ' batch ')}: {c['latency_ms'][key]:.1f} ms vs {d['latency_ms'][key]:.1f} ms "
                     f"dense, {r['median']:.2f}× (range {r['range'][0]:.2f}–{r['range'][1]:.2f} over 5 alternating "
                     "rounds; the server's load moves it)")
    return "\n\n".join(lines)


def zip_model(out: Path) -> Path:
    """out/ (model, comcat.json, report) as a zip next to it, written to a temp name then renamed."""
    target = out.parent / f"{out.name}-compressed.zip"
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(out.rglob("*")):
            if p.is_file() and "state" not in p.relative_to(out).parts:
                z.write(p, p.relative_to(out))          # at the root: the unzipped folder loads
    os.replace(tmp, target)
    return target
