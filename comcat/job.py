"""The one-click compress run: ranks (searched or chosen), distillation fine-tuning, report, export.

A run lives in its output folder:
  job.json           the spec and how far the run got (phase: search | finetune | report | done)
  state/*.json|.safetensors   resumable loop state, written after every epoch and at a stop
  model.safetensors + comcat.json + report.md + ranks.png   the best valid model so far
A stop (flag or Ctrl-C) saves the state and the best valid model; run_job(..., resume=True)
continues from the state and ends where an uninterrupted run would.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import dist
from .compress import compress
from .errors import ComcatError
from .io import (JOB_FILE, atomic_write_text, load_compressed, load_tree, read_run_record, save_compressed,
                 save_tree)
from .models import Loaded, load_model

JOB_FORMAT = "comcat-job/1"


@dataclass
class JobSpec:
    """Everything a compress run depends on (stored in job.json; a resume reads it back)."""
    model: str = "embedded"
    arch: str | None = None
    method: str = "head"
    ratio: float | None = 0.5           # of the compressed sites' params (or FLOPs with budget="flops")
    budget: str = "params"
    search: bool = True
    mlp: bool = False
    classifier: bool = False            # search the classifier's rank too
    classifier_rank: int | None = None  # without search: factorize the classifier at this rank
    ranks_file: str | None = None       # without search: a rank file, an energy threshold or the ratio
    energy: float | None = None
    allocate: str = "uniform"
    search_epochs: int = 4
    finetune_epochs: int = 2
    data: str | None = None
    train_images: int = 4096            # embedded: generated training images; folders: all of train/
    search_images: int = 1024           # embedded: generated search images; train/+val/ folders: search subset
    seed: int = 0
    batch_size: int = 64
    candidates: int = 8
    lr_alpha: float = 0.05
    lr_weights: float = 1e-4
    tau: tuple = (5.0, 0.1)
    beta: float = 1.5
    decode: str = "expected"            # final ranks: expected rank under softmax(alpha), or argmax
    lr: float = 2e-4
    align_weight: float = 1.0
    device: str = "auto"
    workers: int = 0
    evaluate: bool = True
    latency: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        spec = cls(**{k: v for k, v in d.items() if k in known})
        spec.tau = tuple(spec.tau)
        return spec


def _read_job(out: Path) -> dict:
    return read_run_record(out, JOB_FILE, JOB_FORMAT, "compress")


def _write_job(out: Path, job: dict) -> None:
    if dist.is_main():
        atomic_write_text(out / JOB_FILE, json.dumps(job, indent=2) + "\n")


def _checkpoint(path: Path):
    def save(state):
        if dist.is_main():
            save_tree(path, state)
        dist.barrier()
    return save


def start_job(spec: JobSpec, out: str | Path) -> dict:
    """Validate the spec cheaply and claim `out` for a new run (refuses a foreign or unfinished folder)."""
    out = Path(out)
    if spec.search and spec.ratio is None:
        raise ComcatError("--search needs a budget: pass --params-ratio R")
    if (out / JOB_FILE).is_file() and _read_job(out)["phase"] != "done":
        raise ComcatError(f"{out} holds an unfinished run: continue it with --resume {out} or choose another --out")
    if out.exists() and not out.is_dir():
        raise ComcatError(f"--out {out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "comcat.json").is_file() and not (out / JOB_FILE).is_file():
        raise ComcatError(f"{out} exists and is not a comcat model directory: choose an empty or new --out")
    return {"format": JOB_FORMAT, "spec": asdict(spec), "phase": "search" if spec.search else "ranks"}


def run_job(spec: JobSpec | None, out: str | Path, resume: bool = False, callback=None, should_stop=None,
            progress: bool = False) -> dict:
    """Run (or with resume=True continue) a compress run into `out`. Returns {"loaded", "report",
    "stopped", "out"}. callback(event) gets every search/fine-tune step and phase change."""
    out = Path(out)
    job = _read_job(out) if resume else start_job(spec, out)
    if resume and job["phase"] == "done":
        raise ComcatError(f"the run in {out} is already finished: its model is {out / 'model.safetensors'}")
    spec = JobSpec.from_dict(job["spec"])
    dist.setup()
    device = dist.device(spec.device)
    loaded = load_model(spec.model, spec.arch)
    if loaded.compressed:
        raise ComcatError(f"{loaded.source} is already compressed: compress the dense model instead")
    dense = loaded.model.to(device).eval()
    if spec.data is None and loaded.arch != "comcat_shapes_vit" and (spec.search or spec.finetune_epochs):
        raise ComcatError("searching or fine-tuning a timm model needs images: pass --data DIR (an ImageFolder)")
    if job["phase"] == "search":
        from .ranks import uniform_ranks
        from .search import check_budget, search_target
        cost_fn, target = search_target(dense, spec.ratio, spec.budget, spec.mlp)
        check_budget(cost_fn, target, uniform_ranks(dense, spec.method, 1e-9, spec.mlp), spec.budget)
    from .data.splits import make_splits
    training = spec.search or spec.finetune_epochs > 0
    if spec.data is None and loaded.arch != "comcat_shapes_vit":
        spec.evaluate = False                 # nothing to evaluate a timm model on
    splits = make_splits(spec.data, dense, spec.seed, training, spec.train_images, spec.search_images) if (training or spec.evaluate) else None
    if callback and splits:
        callback({"kind": "phase", "phase": "data", "sizes": splits.sizes(), "source": splits.source})
    if resume:
        return _run(job, spec, out, loaded, dense, splits, device, callback, should_stop, progress)
    _write_job(out, job)
    try:
        return _run(job, spec, out, loaded, dense, splits, device, callback, should_stop, progress)
    except ComcatError:
        if dist.is_main() and job["phase"] in ("search", "ranks"):     # no model written yet: leave no trace
            (out / JOB_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / "state", ignore_errors=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def _run(job, spec, out, loaded, dense, splits, device, callback, should_stop, progress) -> dict:
    emit = callback or (lambda e: None)
    state_dir = out / "state"
    times = job.setdefault("time_s", {})
    stop = lambda: bool(should_stop and should_stop())   # noqa: E731

    if job["phase"] == "search":
        from .search import search_ranks
        emit({"kind": "phase", "phase": "search"})
        t = time.perf_counter()
        ranks, info = search_ranks(
            dense, splits.train, splits.search, spec.ratio, spec.method, spec.budget, spec.mlp, spec.classifier,
            spec.search_epochs, spec.candidates, spec.batch_size, spec.lr_alpha, spec.lr_weights, spec.tau,
            spec.beta, decode=spec.decode, seed=spec.seed, device=device, num_workers=spec.workers, callback=callback,
            should_stop=stop, resume=load_tree(state_dir / "search"), checkpoint=_checkpoint(state_dir / "search"))
        times["search"] = times.get("search", 0) + time.perf_counter() - t
        small = info["model"]
        job["search"] = {k: info[k] for k in ("target", "cost", "reduced_to_fit", "steps", "total")}
        job["search"]["budget"] = spec.budget
        if info["stopped"]:
            return _finish(job, out, loaded, dense, small, splits, spec, device, progress, emit, stopped="search")
        job["phase"] = "finetune" if spec.finetune_epochs else "report"
        _save_model(job, out, loaded, small, {"search": job["search"]})
    elif job["phase"] == "ranks":
        from .pipeline import choose_ranks
        cfg = choose_ranks(loaded, spec.method, spec.ranks_file, spec.energy,
                           None if (spec.ranks_file or spec.energy) else spec.ratio, spec.allocate, spec.mlp,
                           spec.classifier_rank)
        small = compress(dense, cfg)
        job["phase"] = "finetune" if spec.finetune_epochs else "report"
        _save_model(job, out, loaded, small, {})
    else:                                   # resuming after the ranks were fixed
        small = load_compressed(out).model.to(device)

    if job["phase"] == "finetune":
        from .distill import finetune
        emit({"kind": "phase", "phase": "finetune"})
        t = time.perf_counter()
        res = finetune(small, dense, splits.train, splits.search, spec.finetune_epochs, spec.lr,
                       batch_size=spec.batch_size, align_weight=spec.align_weight, seed=spec.seed, device=device,
                       num_workers=spec.workers, callback=callback, should_stop=stop,
                       resume=load_tree(state_dir / "finetune"), checkpoint=_checkpoint(state_dir / "finetune"))
        times["finetune"] = times.get("finetune", 0) + time.perf_counter() - t
        small = res["model"]
        job["finetune"] = {k: res[k] for k in ("best_top1", "steps", "total")}
        if res["stopped"]:
            return _finish(job, out, loaded, dense, small, splits, spec, device, progress, emit, stopped="finetune")
        job["phase"] = "report"
    result = _finish(job, out, loaded, dense, small, splits, spec, device, progress, emit)
    if dist.is_main():
        shutil.rmtree(state_dir, ignore_errors=True)
    return result


def _save_model(job: dict, out: Path, loaded: Loaded, small, extra: dict) -> None:
    """Write the current best valid model (and job.json) so a crash still leaves a usable result."""
    if dist.is_main():
        save_compressed(Loaded(small, loaded.arch, loaded.arch_kwargs, loaded.source), out, extra)
    _write_job(out, job)
    dist.barrier()


def _finish(job, out, loaded, dense, small, splits, spec, device, progress, emit, stopped: str | None = None) -> dict:
    from .pipeline import measure_report, report_markdown
    from .plots import ranks_heatmap_mpl, save_png

    emit({"kind": "phase", "phase": "report"})
    report = {}
    if dist.is_main():
        report = measure_report(dense, small, splits and splits.eval, spec.evaluate and splits is not None, spec.latency, device, progress)
        report.update({k: job[k] for k in ("search", "finetune", "time_s") if k in job})
        report["stopped"] = stopped
        report["processes"] = dist.world()
        if splits:
            report["data"] = {"source": splits.source, **splits.sizes()}
        metrics = {k: {m: report[k][m] for m in ("top1", "top5", "images", "latency_ms") if m in report[k]}
                   for k in ("dense", "compressed")}
        save_compressed(Loaded(small, loaded.arch, loaded.arch_kwargs, loaded.source), out,
                        {"metrics": metrics, "report": report})
        save_png(ranks_heatmap_mpl(small.comcat_ranks, dense), out / "ranks.png")
        atomic_write_text(out / "report.md", report_markdown(report, loaded.source, "ranks.png"))
    if not stopped:
        job["phase"] = "done"
    _write_job(out, job)
    dist.barrier()
    emit({"kind": "done", "stopped": stopped, "report": report})
    return {"loaded": Loaded(small, loaded.arch, loaded.arch_kwargs, loaded.source), "report": report,
            "stopped": stopped, "out": out}
