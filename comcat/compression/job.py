"""The one-click compress run: calibrate, choose ranks, build, distill, fine-tune, report, export.

  data       disjoint train / fit / val / eval splits (comcat/data/splits.py)
  ranks      calibration statistics on the fit images (comcat/calibrate.py), then the ranks: a
             rank file, an energy threshold, uniform, or allocated from the calibrated errors
             (comcat/allocate.py); or
  search     the Gumbel-softmax rank search (comcat/search.py), from the calibrated factors;
             either way the model is built from the calibrated factors at those ranks
  distill    block-wise distillation from the dense model (comcat/reconstruct.py)
  finetune   end-to-end distillation (comcat/distill.py), when asked for
  report     held-out figures (comcat/pipeline.py)

A run lives in its output folder:
  job.json           the spec and how far the run got (phase)
  state/*.json|.safetensors   resumable loop state, written after every epoch / block and at a stop
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

from ..core import dist
from ..core.errors import ComcatError
from ..core.files import (
    atomic_write_text,
    claim_out,
    clean_temp,
    clear_run,
    load_tree,
    out_lock,
    read_run_record,
    save_tree,
)
from .format import JOB_FILE, load_compressed, save_compressed
from .load import load_model
from .models import EMBEDDED_ARCH, Loaded

JOB_FORMAT = "comcat-job/2"
CALIBRATIONS = ("auto", "data", "sequential", "none")


@dataclass
class JobSpec:
    """Everything a compress run depends on (stored in job.json; a resume reads it back)."""

    model: str = "embedded"
    arch: str | None = None
    method: str = "head"
    ratio: float | None = 0.5  # of the compressed sites' params (or FLOPs with budget="flops")
    budget: str = "params"
    search: bool = False
    mlp: bool = False
    classifier: bool = False  # search the classifier's rank too
    classifier_rank: int | None = None  # without search: factorize the classifier at this rank
    ranks_file: str | None = None  # without search: a rank file, an energy threshold or the ratio
    energy: float | None = None
    allocate: str = "auto"  # auto: "calibrated" when calibrating, else "uniform"
    calibration: str = "auto"  # auto: "data" when the run has images, else "none"
    calibration_images: int = 512  # fit images for calibration and block distillation
    distill_steps: int = 100  # block distillation steps per block (0: none)
    distill_lr: float = 1e-3
    distill_views: int = 2  # augmented (crop, flip, mix) passes over the images to distill on
    distill_cls: float = 1.0  # extra weight of the class token's error in block distillation
    search_epochs: int = 4
    finetune_epochs: int = 0  # end-to-end distillation epochs
    data: str | None = None
    train_images: int = 4096  # embedded: generated training images; folders: all of train/
    fit_images: int = 1024  # embedded: generated fit images; train/+val/ folders: fit subset
    seed: int = 0
    batch_size: int = 64
    candidates: int = 8
    lr_alpha: float = 0.05
    lr_weights: float = 1e-4  # search weight epochs (plain SVD only; calibrated factors stay fixed)
    tau: tuple = (5.0, 0.1)
    beta: float = 1.5
    decode: str = "expected"  # final searched ranks: expected rank under softmax(alpha), or argmax
    lr: float = 5e-5
    align_weight: float = 1.0
    labels: bool = False  # also train on the images' labels (model's classes only)
    mix: bool = True  # mixup / cutmix views in end-to-end fine-tuning
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

    def has_images(self, arch: str) -> bool:
        return self.data is not None or arch == EMBEDDED_ARCH

    def resolved(self, arch: str) -> "JobSpec":
        """The spec with 'auto' settings decided for a model of architecture `arch`."""
        if self.calibration not in CALIBRATIONS:
            raise ComcatError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ComcatError(f"the budget ratio must be in (0, 1], got {self.ratio}")
        out = JobSpec.from_dict(asdict(self))
        if out.calibration == "auto":
            out.calibration = "data" if self.has_images(arch) else "none"
        if out.allocate == "auto":
            out.allocate = "calibrated" if out.calibration != "none" else "uniform"
        elif out.allocate == "calibrated" and out.calibration == "none":
            raise ComcatError(
                "--allocate calibrated shares the budget out by the calibrated errors: drop "
                "--calibration none, or choose --allocate uniform"
            )
        if not self.has_images(arch):
            out.distill_steps = 0
        return out


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


RUN_FILES = (
    "comcat.json",
    "model.safetensors",
    JOB_FILE,
    "state",
    "ranks.png",
    "report.md",
)  # what --overwrite removes


def start_job(spec: JobSpec, out: str | Path, overwrite: bool = False) -> dict:
    """Validate the spec cheaply and claim `out` for a new run: a foreign folder is refused, and a
    folder holding an earlier run is refused unless `overwrite`, which removes that run's files."""
    out = Path(out)
    if spec.search and spec.ratio is None:
        raise ComcatError("--search needs a budget: pass --params-ratio R")
    if spec.calibration not in CALIBRATIONS:
        raise ComcatError(f"calibration must be one of {CALIBRATIONS}, got {spec.calibration!r}")
    claim_out(out, ("comcat.json", JOB_FILE), "comcat model")
    if not overwrite and (out / JOB_FILE).is_file():
        finished = _read_job(out).get("phase") == "done"
        raise ComcatError(
            f"{out} holds {'a finished' if finished else 'an unfinished'} run: "
            f"{'' if finished else f'continue it with --resume {out}, '}start over with --overwrite, "
            "or choose another --out"
        )
    if not overwrite and (out / "comcat.json").is_file():
        raise ComcatError(f"{out} holds a compressed model: replace it with --overwrite or choose another --out")
    return {"format": JOB_FORMAT, "spec": asdict(spec), "phase": "search" if spec.search else "ranks"}


@dataclass
class Run:
    """What every phase of one run reads: the spec (its 'auto' settings decided), where it goes,
    the dense model, the data, and how to report and stop."""

    job: dict
    spec: JobSpec
    out: Path
    loaded: Loaded
    dense: object
    splits: object
    device: str
    emit: object
    stop: object
    progress: bool
    val_reference: object = None  # the dense model's logits on the validation split

    def save(self, small, extra: dict | None = None) -> None:
        """Write the current best valid model (and job.json) so a crash still leaves a usable result."""
        if dist.is_main():
            save_compressed(
                Loaded(small, self.loaded.arch, self.loaded.arch_kwargs, self.loaded.source), self.out, extra or {}
            )
        _write_job(self.out, self.job)
        dist.barrier()

    def timed(self, phase: str, t0: float) -> None:
        times = self.job.setdefault("time_s", {})
        times[phase] = times.get(phase, 0) + time.perf_counter() - t0

    def state(self, phase: str):
        """(the saved state of `phase` or None, its checkpoint writer); read by every process before
        the main one can write it."""
        saved = load_tree(self.out / "state" / phase)
        dist.barrier()
        return saved, _checkpoint(self.out / "state" / phase)


def run_job(
    spec: JobSpec | None,
    out: str | Path,
    resume: bool = False,
    callback=None,
    should_stop=None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run (or with resume=True continue) a compress run into `out`. Returns {"loaded", "report",
    "stopped", "out"}. callback(event) gets every step and phase change. `overwrite`: a new run
    replaces an earlier one in `out`. One process at a time writes `out` (a lock file)."""
    out = Path(out)
    job = _read_job(out) if resume else start_job(spec, out, overwrite)
    if resume and job["phase"] == "done":
        raise ComcatError(f"the run in {out} is already finished: its model is {out / 'model.safetensors'}")
    with out_lock(out):
        if resume:
            clean_temp(out)
        elif overwrite:
            clear_run(out, RUN_FILES)
        try:
            return _start(job, out, resume, callback, should_stop, progress)
        except BaseException:
            if not resume and dist.is_main() and job["phase"] in ("search", "ranks"):  # no model yet: no trace
                clear_run(out, (JOB_FILE, "state"))
            raise


def _start(job: dict, out: Path, resume: bool, callback, should_stop, progress: bool) -> dict:
    dist.setup()
    device = dist.device(JobSpec.from_dict(job["spec"]).device)
    loaded = load_model(job["spec"]["model"], job["spec"]["arch"])
    if loaded.compressed:
        raise ComcatError(f"{loaded.source} is already compressed: compress the dense model instead")
    spec = JobSpec.from_dict(job["spec"]).resolved(loaded.arch)
    dense = loaded.model.to(device).eval()
    if not spec.has_images(loaded.arch) and (spec.search or spec.finetune_epochs or spec.allocate == "calibrated"):
        raise ComcatError(
            "searching, fine-tuning or calibrating a timm model needs images: pass --data DIR "
            "(a folder of images, with or without class sub-folders)"
        )
    if job["phase"] == "search":
        from .cost import budget_target, check_budget
        from .rank_rules import uniform_ranks

        cost_fn, target = budget_target(dense, spec.ratio, spec.budget, spec.mlp)
        check_budget(cost_fn, target, uniform_ranks(dense, spec.method, 1e-9, spec.mlp), spec.budget)
    from .splits import make_splits

    splits = (
        make_splits(
            spec.data, dense, spec.seed, spec.has_images(loaded.arch), spec.train_images, spec.fit_images, spec.labels
        )
        if spec.has_images(loaded.arch)
        else None
    )
    if not spec.has_images(loaded.arch):
        spec.evaluate = False  # nothing to evaluate a timm model on
    emit = callback or (lambda e: None)
    if splits:
        emit(
            {
                "kind": "phase",
                "phase": "data",
                "sizes": splits.sizes(),
                "source": splits.source,
                "labeled": splits.labeled,
                "note": splits.note,
            }
        )
    run = Run(
        job, spec, out, loaded, dense, splits, device, emit, lambda: bool(should_stop and should_stop()), progress
    )
    if not resume:
        _write_job(out, job)
    return _phases(run)


def _next(spec: JobSpec) -> str:
    return "distill" if spec.distill_steps else ("finetune" if spec.finetune_epochs else "report")


def _phases(run: Run) -> dict:
    job, spec = run.job, run.spec
    if job["phase"] in ("ranks", "search"):
        small, stopped = _ranks(run)
        if stopped:
            return _finish(run, small, stopped="search")
        job["phase"] = _next(spec)
        run.save(small, {k: job[k] for k in ("search",) if k in job})
    else:  # resuming after the ranks were fixed
        small = load_compressed(run.out).model.to(run.device)
    if job["phase"] == "distill":
        small, stopped = _distill(run, small)
        if stopped:
            return _finish(run, small, stopped="distill")
        job["phase"] = "finetune" if spec.finetune_epochs else "report"
        run.save(small)
    if job["phase"] == "finetune":
        small, stopped = _finetune(run, small)
        if stopped:
            return _finish(run, small, stopped="finetune")
        job["phase"] = "report"
    result = _finish(run, small)
    if dist.is_main():
        shutil.rmtree(run.out / "state", ignore_errors=True)
    return result


def _calibration(run: Run, allocating: bool):
    """Statistics of the dense model on the fit images (None without calibration)."""
    from torch.utils.data import DataLoader

    from .allocate import FISHER_IMAGES, PROBE_IMAGES
    from .calibrate import calibrate
    from .splits import subset

    spec = run.spec
    if spec.calibration == "none":
        return None
    run.emit({"kind": "phase", "phase": "calibrate"})
    t = time.perf_counter()
    images = subset(run.splits.fit, spec.calibration_images, spec.seed)
    cal = calibrate(
        run.dense,
        DataLoader(images, batch_size=32),
        mlp=spec.mlp,
        matrix=spec.method == "matrix",
        probe=PROBE_IMAGES if allocating else 0,
        fisher=FISHER_IMAGES if allocating else 0,
        progress=lambda i, n: run.emit({"kind": "calibrate", "step": i + 1, "total": n}),
    )
    run.timed("calibrate", t)
    return cal


def _build(run: Run, cfg, cal):
    """The compressed model at `cfg`: calibrated factors (dense statistics, or sequential), or plain SVD."""
    from torch.utils.data import DataLoader

    from .calibrate import build, calibrate_sequential
    from .splits import subset

    spec = run.spec
    if spec.calibration == "sequential":
        images = subset(run.splits.fit, spec.calibration_images, spec.seed)
        return calibrate_sequential(run.dense, DataLoader(images, batch_size=32), cfg)
    return build(run.dense, cfg, cal)


def _ranks(run: Run):
    """(the compressed model at the chosen or searched ranks, stopped during the search)."""
    spec, job = run.spec, run.job
    searching = job["phase"] == "search"
    allocating = spec.allocate == "calibrated" and spec.ranks_file is None and spec.energy is None
    cfg = None
    if not searching and not allocating:  # a bad rank file or energy fails before the data pass
        from .rank_rules import choose_ranks

        cfg = choose_ranks(
            run.loaded,
            spec.method,
            spec.ranks_file,
            spec.energy,
            None if (spec.ranks_file or spec.energy) else spec.ratio,
            spec.allocate,
            spec.mlp,
            spec.classifier_rank,
        )
    cal = _calibration(run, allocating)
    if allocating:
        from .allocate import calibrated_ranks
        from .cost import budget_target

        run.emit({"kind": "phase", "phase": "allocate"})
        t = time.perf_counter()
        cost_fn, target = budget_target(run.dense, spec.ratio, spec.budget, spec.mlp)
        cfg, _ = calibrated_ranks(
            run.dense,
            cal,
            spec.method,
            cost_fn,
            target,
            spec.ratio,
            spec.mlp,
            progress=lambda i, n: run.emit({"kind": "allocate", "step": i + 1, "total": n}),
        )
        run.timed("allocate", t)
    if not searching:
        if spec.classifier_rank is not None:
            from dataclasses import replace

            cfg = replace(cfg, classifier=spec.classifier_rank)
        small = _build(run, cfg.validate(run.dense), cal)
        _validate(run, small, "ranks")
        return small, None
    from .search import search_ranks

    run.emit({"kind": "phase", "phase": "search"})
    t = time.perf_counter()
    resume, checkpoint = run.state("search")
    ranks, info = search_ranks(
        run.dense,
        run.splits.train,
        run.splits.fit,
        spec.ratio,
        spec.method,
        spec.budget,
        spec.mlp,
        spec.classifier,
        spec.search_epochs,
        spec.candidates,
        spec.batch_size,
        spec.lr_alpha,
        0.0 if cal else spec.lr_weights,
        spec.tau,
        spec.beta,
        labels=spec.labels,
        calibration=cal,
        init_ranks=cfg,
        decode=spec.decode,
        seed=spec.seed,
        device=run.device,
        num_workers=spec.workers,
        callback=run.emit,
        should_stop=run.stop,
        resume=resume,
        checkpoint=checkpoint,
    )
    run.timed("search", t)
    job["search"] = {k: info[k] for k in ("target", "cost", "reduced_to_fit", "steps", "total")}
    job["search"]["budget"] = spec.budget
    small = _build(run, ranks, cal) if cal is not None else info["model"]
    return small.to(run.device), ("search" if info["stopped"] else None)


def _validate(run: Run, small, after: str) -> dict:
    """Scores on the validation split (held out from training), shown live and kept in job.json."""
    from .evaluate import predict, scores

    if run.val_reference is None:
        run.val_reference = predict(run.dense, run.splits.val, device=run.device, progress=False)[0]
    logits, labels = predict(small, run.splits.val, device=run.device, progress=False)
    s = scores(logits, labels, run.val_reference)
    run.job.setdefault("validation", {})[after] = s
    run.emit({"kind": "validate", "after": after, "step": 0, **s})
    return s


def _distill(run: Run, small):
    """Block-wise distillation; its result is kept only when it scores better on the validation
    split than the model it started from (also at a stop)."""
    import copy

    from torch.utils.data import DataLoader

    from .reconstruct import AugmentedViews, distill_blocks
    from .splits import subset

    spec = run.spec
    run.emit({"kind": "phase", "phase": "distill"})
    before_scores = run.job.get("validation", {}).get("ranks") or _validate(run, small, "ranks")
    start = run.out / "state" / "distill_start"  # the weights it started from, kept for a resume
    before = load_tree(start)
    dist.barrier()  # every process has looked before the main one writes
    if before is None:
        before = copy.deepcopy(small.state_dict())
        _checkpoint(start)(before)
    t = time.perf_counter()
    resume, checkpoint = run.state("distill")
    images = subset(run.splits.fit, spec.calibration_images, spec.seed)
    views = AugmentedViews(DataLoader(images, batch_size=32), spec.distill_views, spec.seed, spec.mix)
    res = distill_blocks(
        small,
        run.dense,
        views,
        spec.distill_steps,
        spec.distill_lr,
        seed=spec.seed,
        device=run.device,
        callback=run.emit,
        should_stop=run.stop,
        resume=resume,
        checkpoint=checkpoint,
        cls_weight=spec.distill_cls,
    )
    run.timed("distill", t)
    run.job["distill"] = {"steps": res["steps"], "total": res["total"]}
    after = _validate(run, small, "distill")
    if after["kl"] > before_scores["kl"]:
        small = copy.deepcopy(small) if res["stopped"] else small  # a stopped run resumes from its state
        small.load_state_dict(before)
        run.job["distill"]["kept"] = "the model before it (the distilled one scored worse on the validation split)"
    return small, ("distill" if res["stopped"] else None)


def _finetune(run: Run, small):
    from .distill import finetune

    spec = run.spec
    run.emit({"kind": "phase", "phase": "finetune"})
    t = time.perf_counter()
    resume, checkpoint = run.state("finetune")
    res = finetune(
        small,
        run.dense,
        run.splits.train,
        run.splits.val,
        spec.finetune_epochs,
        spec.lr,
        batch_size=spec.batch_size,
        align_weight=spec.align_weight,
        labels=spec.labels,
        mix=spec.mix,
        seed=spec.seed,
        device=run.device,
        num_workers=spec.workers,
        callback=run.emit,
        should_stop=run.stop,
        resume=resume,
        checkpoint=checkpoint,
    )
    run.timed("finetune", t)
    run.job["finetune"] = {"best": res["best"], "steps": res["steps"], "total": res["total"]}
    return res["model"], ("finetune" if res["stopped"] else None)


def _finish(run: Run, small, stopped: str | None = None) -> dict:
    from .plots import ranks_heatmap_mpl, save_png
    from .report import measure_report, report_markdown

    job, spec, loaded = run.job, run.spec, run.loaded
    run.emit({"kind": "phase", "phase": "report"})
    report = {}
    if dist.is_main():
        report = measure_report(
            run.dense,
            small,
            run.splits and run.splits.eval,
            spec.evaluate and run.splits is not None,
            spec.latency,
            run.device,
            run.progress,
        )
        report.update({k: job[k] for k in ("search", "distill", "finetune", "time_s", "validation") if k in job})
        report["stopped"] = stopped
        report["processes"] = dist.world()
        report["calibration"] = spec.calibration
        if run.splits:
            report["data"] = {
                "source": run.splits.source,
                "labeled": run.splits.labeled,
                "note": run.splits.note,
                **run.splits.sizes(),
            }
        metrics = {
            k: {m: report[k][m] for m in ("top1", "top5", "agreement", "kl", "images", "latency_ms") if m in report[k]}
            for k in ("dense", "compressed")
        }
        save_compressed(
            Loaded(small, loaded.arch, loaded.arch_kwargs, loaded.source),
            run.out,
            {"metrics": metrics, "report": report},
        )
        save_png(ranks_heatmap_mpl(small.comcat_ranks, run.dense), run.out / "ranks.png")
        atomic_write_text(run.out / "report.md", report_markdown(report, loaded.source, "ranks.png"))
    if not stopped:
        job["phase"] = "done"
    _write_job(run.out, job)
    dist.barrier()
    run.emit({"kind": "done", "stopped": stopped, "report": report})
    return {
        "loaded": Loaded(small, loaded.arch, loaded.arch_kwargs, loaded.source),
        "report": report,
        "stopped": stopped,
        "out": run.out,
    }
