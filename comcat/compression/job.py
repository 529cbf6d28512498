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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..core import dist
from ..core.errors import ComcatError, is_int, require
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
from ..core.loop import RunControl
from ..core.records import MAX_GENERATED_IMAGES, MAX_SEED, build, check_count
from . import families
from .cost import SCOPES, Budget
from .distill import FinetuneConfig
from .evaluate import distance
from .families.hf_encoders import CAUSAL, pad_id
from .format import JOB_FILE, load_compressed, save_compressed
from .load import load_model
from .models import EMBEDDED_ARCH, Loaded, has_classifier
from .quantize import check_quantize
from .ranks import METHODS, MLP_MODES
from .reconstruct import DistillConfig
from .search import SearchConfig
from .texts import SENTENCE_VIEWS, SentenceViews, data_splits, is_text_encoder, sentence_views

JOB_FORMAT = "comcat-job/3"  # /3: the distillation, search and fine-tuning settings nested
READABLE = (JOB_FORMAT, "comcat-job/2")
CALIBRATIONS = ("auto", "data", "sequential", "none")
FIGURES = ("top1", "top5", "agreement", "kl", "cosine", "retrieval", "images", "latency_ms")  # kept in comcat.json
ALLOCATIONS = ("auto", "uniform", "energy", "greedy", "calibrated")


@dataclass
class JobSpec:
    """Everything a compress run depends on (stored in job.json; a resume reads it back), checked
    once, here: the CLI, the app and Python callers get the same one-line errors.

    The ranks come from `search` when given, else from a rank file, an energy threshold, or the
    budget (`ratio` of the compressed sites' params, or FLOPs with budget="flops") by `allocate`
    ("auto": calibrated when calibrating, else uniform). With images the dense model calibrates
    the factors ("auto": "data" when the run has images), then every block is distilled
    (`distill`, steps 0: not), then with `finetune` the whole model is fine-tuned.

    scope "model": `ratio` is a fraction of the whole model (embeddings, norms and classifier counted as
    they are), and the MLPs are compressed too unless mlp=False; scope "attention": a fraction of the
    compressed sites (attention, plus the MLPs with `mlp`). The MLPs keep neurons ("neurons", refit in
    closed form on the calibration statistics) when the run calibrates, else they are factorized ("lowrank")."""

    model: str = "embedded"
    arch: str | None = None
    data: str | None = None  # a folder of images; None: the embedded shapes (embedded model only)
    method: str = "head"
    ratio: float | None = 0.5
    budget: str = "params"
    scope: str = "attention"  # what `ratio` is a fraction of: the whole model, or the compressed sites
    mlp: bool | str | None = None  # None: with scope "model"; True: "neurons" with images, else "lowrank"
    ranks_file: str | None = None
    energy: float | None = None
    classifier_rank: int | None = None  # factorize the classifier at this rank (without search)
    allocate: str = "auto"
    calibration: str = "auto"
    calibration_images: int = 512  # fit images for calibration and block distillation
    distill: DistillConfig = field(default_factory=DistillConfig)
    search: SearchConfig | None = None
    finetune: FinetuneConfig | None = None
    train_images: int = 4096  # embedded: generated training images; folders: all of train/
    fit_images: int = 1024  # embedded: generated fit images; train/+val/ folders: fit subset
    seed: int = 0
    labels: bool = False  # also train on the images' labels (model's classes only)
    device: str = "auto"
    workers: int = 0
    evaluate: bool = True
    latency: bool = True
    quantize: str | None = None  # "int8": the saved model's linears int8 (torchao), its float32 form in float/
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        if isinstance(self.search, dict):
            self.search = SearchConfig(**self.search)
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        rules = sum(x is not None for x in (self.ranks_file, self.energy))
        require(rules <= 1, "give a rank file or an energy threshold, not both")
        require(
            self.search is None or (rules == 0 and self.ratio is not None),
            "the rank search chooses the ranks itself under a budget: give a ratio, not a rank file or energy",
        )
        require(rules == 1 or self.ratio is not None, "give a budget ratio, a rank file or an energy threshold")
        require(self.scope in SCOPES, f"the budget's scope is one of {SCOPES}, got {self.scope!r}")
        require(
            self.mlp in (None, True, False, *MLP_MODES),
            f"mlp is true, false or one of {MLP_MODES}, got {self.mlp!r}",
        )
        if self.ratio is not None:
            self.budget_of()  # checks the ratio, the unit and the method
        require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        require(
            self.energy is None or (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1),
            f"the energy threshold must be in (0, 1], got {self.energy}",
        )
        require(
            self.calibration in CALIBRATIONS, f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}"
        )
        require(self.allocate in ALLOCATIONS, f"allocation must be one of {ALLOCATIONS}, got {self.allocate!r}")
        require(
            not (self.allocate == "calibrated" and self.calibration == "none"),
            "calibrated allocation shares the budget out by the calibrated errors: drop --calibration none, "
            "or choose --allocate uniform",
        )
        require(
            all(is_int(n, 1) for n in (self.calibration_images, self.train_images, self.fit_images)),
            "the numbers of training, fit and calibration images must be >= 1",
        )
        require(is_int(self.workers) and is_int(self.seed), "workers and seed must be integers >= 0")
        check_count(self.seed, "--seed", 0, MAX_SEED)
        check_count(self.workers, "--workers", 0, 64)
        for flag, n in (("--train-images", self.train_images), ("--fit-images", self.fit_images)):
            check_count(n, flag, 1, MAX_GENERATED_IMAGES)
        check_count(self.calibration_images, "--calibration-images", 1, MAX_GENERATED_IMAGES)
        require(isinstance(self.extra, dict), "extra must be a JSON object")
        require(
            self.classifier_rank is None or is_int(self.classifier_rank, 1),
            f"the classifier rank must be an integer >= 1, got {self.classifier_rank!r}",
        )
        check_quantize(self.quantize, self.device)
        dist.check_device(self.device)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the run's spec") -> "JobSpec":
        """From job.json's spec (format /3), or the flat spec of format /2; every setting checked."""
        fix = "start the run again with a new --out"
        if not isinstance(d, dict):
            raise ComcatError(f"{where} is not a JSON object: {fix}")
        if "search_epochs" in d:
            d = _nested(d)
        d = dict(d)
        d.setdefault("scope", "attention")  # records before the whole-model budget: the attention's ratio
        for name, config in (("distill", DistillConfig), ("search", SearchConfig), ("finetune", FinetuneConfig)):
            if isinstance(d.get(name), dict):
                d[name] = build(config, d[name], f"{where}'s {name} settings", fix)
        return build(cls, d, where, fix)

    def budget_of(self) -> Budget:
        mlp = self.mlp if self.mlp in (False, *MLP_MODES) else self.mlp is True or self.scope == "model"
        return Budget(self.ratio, self.budget, self.method, mlp, self.scope)

    def has_images(self, arch: str) -> bool:
        return self.data is not None or arch == EMBEDDED_ARCH

    def resolved(self, arch: str, text: bool = False) -> "JobSpec":
        """The spec with 'auto' settings decided for a model of architecture `arch` (`text`: a text
        encoder: its sentences are calibrated on and distilled block by block with their padding
        masked, with (1 + views) x the steps and texts.SentenceViews in place of the image views
        (crops, flips, mixup), and, end to end, without block alignment)."""
        out = JobSpec.from_dict(asdict(self))
        if text and self.data is not None:
            steps = self.distill.steps * (1 + self.distill.views)
            out.distill = replace(out.distill, steps=steps, views=0, mix=False)
            if out.finetune is not None:
                out.finetune = replace(out.finetune, mix=False, align_weight=0.0)
        if out.calibration == "auto":
            out.calibration = "data" if self.has_images(arch) else "none"
        if out.allocate == "auto":
            out.allocate = "calibrated" if out.calibration != "none" else "uniform"
        if out.mlp is None:
            out.mlp = out.scope == "model" and out.ranks_file is None
        if out.mlp is True:
            calibrated = out.calibration != "none" and out.search is None and out.ranks_file is None
            calibrated = calibrated and out.energy is None and out.allocate in ("calibrated", "uniform")
            out.mlp = "neurons" if calibrated else "lowrank"
        require(
            out.mlp != "neurons" or out.calibration != "none",
            "MLP neurons are chosen and refit on calibration images: pass --data (or drop --calibration none), "
            "or use --mlp lowrank",
        )
        if not self.has_images(arch):
            out.distill = replace(out.distill, steps=0)
        out.distill = replace(out.distill, seed=out.seed)
        if out.search is not None:
            out.search = replace(out.search, seed=out.seed, labels=out.labels)
        if out.finetune is not None:
            out.finetune = replace(out.finetune, seed=out.seed, labels=out.labels)
        return out


def _nested(d: dict) -> dict:
    """A format /2 (flat) spec in the /3 shape."""
    d = dict(d)
    mix = d.pop("mix", True)
    batch = d.pop("batch_size", 64)
    d["distill"] = {
        "steps": d.pop("distill_steps", 100),
        "lr": d.pop("distill_lr", 1e-3),
        "views": d.pop("distill_views", 2),
        "cls_weight": d.pop("distill_cls", 0.0),
        "mix": mix,
    }
    search = {
        "epochs": d.pop("search_epochs", 4),
        "candidates": d.pop("candidates", 8),
        "batch_size": batch,
        "lr_alpha": d.pop("lr_alpha", 0.05),
        "lr_weights": d.pop("lr_weights", 1e-4),
        "tau": d.pop("tau", (5.0, 0.1)),
        "beta": d.pop("beta", 1.5),
        "decode": d.pop("decode", "expected"),
        "classifier": d.pop("classifier", False),
    }
    d["search"] = search if d.get("search") else None
    epochs = d.pop("finetune_epochs", 0)
    finetune = {
        "epochs": epochs,
        "lr": d.pop("lr", 5e-5),
        "align_weight": d.pop("align_weight", 1.0),
        "batch_size": batch,
        "mix": mix,
    }
    d["finetune"] = finetune if epochs else None
    return d


PHASES = ("search", "ranks", "distill", "finetune", "report", "done")


def _read_job(out: Path) -> dict:
    """job.json of an earlier run, checked: its spec, and a phase that its spec runs."""
    job, path = read_run_record(out, JOB_FILE, READABLE, "compress"), out / JOB_FILE
    fix = "start the run again with a new --out"
    if not isinstance(job.get("spec"), dict):
        raise ComcatError(f"{path} has no spec: {fix}")
    spec = JobSpec.from_dict(job["spec"], str(path))
    phase = job.get("phase")
    if phase not in PHASES:
        raise ComcatError(f"{path} names an unknown phase {phase!r}: {fix}")
    if (
        (phase == "search" and spec.search is None)
        or (phase == "finetune" and spec.finetune is None)
        or (phase == "distill" and not spec.distill.steps)
    ):
        raise ComcatError(f"{path} is in phase {phase!r}, which its spec does not run: {fix}")
    if phase in ("distill", "finetune", "report") and not (out / "comcat.json").is_file():
        from .format import settle

        settle(out)  # a save that a kill interrupted
        if not (out / "comcat.json").is_file():
            raise ComcatError(f"{path} is in phase {phase!r} but {out} holds no saved model: {fix}")
    return job


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
    "float",
)  # what --overwrite removes
FLOAT_DIR = "float"  # with --quantize: the float32 form of the saved model


def start_job(spec: JobSpec, out: str | Path, overwrite: bool = False) -> dict:
    """Validate the spec cheaply and claim `out` for a new run: a foreign folder is refused, and a
    folder holding an earlier run is refused unless `overwrite`, which removes that run's files."""
    out = Path(out)
    claim_out(out, ("comcat.json", JOB_FILE), "comcat model", inputs=(spec.model,), data=spec.data)
    if not overwrite and (out / JOB_FILE).is_file():
        finished = _read_job(out).get("phase") == "done"
        raise ComcatError(
            f"{out} holds {'a finished' if finished else 'an unfinished'} run: "
            f"{'' if finished else f'continue it with --resume {out}, '}start over with --overwrite, "
            "or choose another --out"
        )
    if not overwrite and (out / "comcat.json").is_file():
        raise ComcatError(f"{out} holds a compressed model: replace it with --overwrite or choose another --out")
    return {"format": JOB_FORMAT, "spec": asdict(spec), "phase": "search" if spec.search is not None else "ranks"}


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
            save_compressed(replace(self.loaded, model=small), self.out, extra or {})
        _write_job(self.out, self.job)
        dist.barrier()

    def timed(self, phase: str, t0: float) -> None:
        times = self.job.setdefault("time_s", {})
        times[phase] = times.get(phase, 0) + time.perf_counter() - t0

    def control(self, phase: str) -> RunControl:
        """How `phase`'s loop reports, stops, checkpoints and resumes (its saved state, read by every
        process before the main one can write it)."""
        saved = load_tree(self.out / "state" / phase)
        dist.barrier()
        return RunControl(self.emit, self.stop, _checkpoint(self.out / "state" / phase), saved)


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
    text = is_text_encoder(loaded.model)
    spec = JobSpec.from_dict(job["spec"]).resolved(loaded.arch, text)
    if spec.mlp == "neurons" and job["spec"].get("mlp") in (None, True):  # chosen for the user: gated MLPs factorize
        from .ranks import hidden_width

        if any(hidden_width(b) is None for b in families.blocks(loaded.model)):
            spec.mlp = "lowrank"
    dense = loaded.model.to(device).eval()
    if text and spec.data is not None and getattr(dense, "model_type", "") in CAUSAL:
        raise ComcatError(
            f"{loaded.source} pools each sentence at its end token, which comcat does not follow yet: compress it "
            "without --data (SVD ranks from --params-ratio or --energy)"
        )
    if not spec.has_images(loaded.arch) and (spec.search or spec.finetune or spec.allocate == "calibrated"):
        raise ComcatError(
            "searching, fine-tuning or calibrating a model needs data: pass --data DIR (a folder of images, with "
            "or without class sub-folders; a text file with one sentence per line for a text encoder)"
        )
    if job["phase"] == "search":
        from .cost import check_budget
        from .rank_rules import uniform_ranks

        cost_fn, target = spec.budget_of().target(dense)
        check_budget(cost_fn, target, uniform_ranks(dense, spec.method, 1e-9, spec.mlp), spec.budget)
    splits = None
    if spec.has_images(loaded.arch):  # images, or a text encoder's sentences
        kwargs = dict(train_images=spec.train_images, fit_images=spec.fit_images, use_labels=spec.labels)
        splits = data_splits(spec.data, dense, spec.seed, **kwargs)
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
                "unit": splits.unit,
            }
        )
    job["plan"] = plan(spec, splits.unit if splits else None)
    emit({"kind": "plan", "phases": job["plan"]})
    run = Run(
        job, spec, out, loaded, dense, splits, device, emit, lambda: bool(should_stop and should_stop()), progress
    )
    if not resume:
        _write_job(out, job)
    return _phases(run)


def plan(spec: JobSpec, unit: str | None) -> list[dict]:
    """What the run does, phase by phase, for a resolved spec and data of `unit` ("images",
    "sentences"; None: no data): {"phase", "runs", "how"} where `how` says how it runs or why not."""
    data = "no data: pass --data" if unit is None else None
    rules = {"ranks_file": "ranks from the file", "energy": "ranks from --energy", "search": "ranks searched"}
    rule = next((v for k, v in rules.items() if getattr(spec, k) is not None), None)
    cal = spec.calibration != "none"
    steps = spec.distill.steps
    text = unit == "sentences"
    rows = [
        (
            "calibration",
            cal,
            f"{spec.calibration}: factors fitted to the layers' inputs on the {unit}"
            if cal
            else (data or "--calibration none: plain SVD of the weights"),
        ),
        (
            "allocation",
            rule is None,
            f"{spec.allocate}: ranks shared out under the budget" if rule is None else f"not needed: {rule}",
        ),
        (
            "search",
            spec.search is not None,
            f"{spec.search.epochs} epoch(s)" if spec.search else "not asked for (--search)",
        ),
        (
            "distillation",
            bool(steps),
            f"block by block, {steps} steps per block"
            + (
                f", padding masked, (1 + views) x --distill-steps, on the sentences and up to {SENTENCE_VIEWS} "
                "passes of them shuffled or spliced (in place of image views; fewer when long sentences would "
                "fill 2 GiB)"
                if text
                else ""
            )
            if steps
            else (data or "--distill-steps 0"),
        ),
        (
            "fine-tuning",
            spec.finetune is not None,
            f"end to end, {spec.finetune.epochs} epoch(s)" if spec.finetune else "not asked for (--finetune-epochs N)",
        ),
    ]
    if spec.quantize:
        rows.append(("int8", True, spec.quantize))
    return [{"phase": k, "runs": bool(r), "how": h} for k, r, h in rows]


def _next(spec: JobSpec) -> str:
    return "distill" if spec.distill.steps else ("finetune" if spec.finetune else "report")


def _phases(run: Run) -> dict:
    job, spec = run.job, run.spec
    if job["phase"] in ("ranks", "search"):
        small, stopped = _ranks(run)
        if stopped:
            return _finish(run, small, stopped="search")
        job["phase"] = _next(spec)
        run.save(small, {k: job[k] for k in ("search",) if k in job})
    else:  # resuming after the ranks were fixed (the float32 form, where an int8 one was saved)
        floating = run.out / FLOAT_DIR
        small = load_compressed(floating if (floating / "comcat.json").is_file() else run.out).model.to(run.device)
    if job["phase"] == "distill":
        small, stopped = _distill(run, small)
        if stopped:
            return _finish(run, small, stopped="distill")
        job["phase"] = "finetune" if spec.finetune else "report"
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
            None if (spec.ranks_file or spec.energy) else spec.budget_of().on_sites(run.dense).ratio,
            spec.allocate,
            spec.mlp,
            spec.classifier_rank,
        )
    cal = _calibration(run, allocating)
    if allocating:
        from .allocate import calibrated_ranks

        run.emit({"kind": "phase", "phase": "allocate"})
        t = time.perf_counter()
        progress = lambda i, n: run.emit({"kind": "allocate", "step": i + 1, "total": n})
        cfg, _ = calibrated_ranks(run.dense, cal, spec.budget_of(), progress)
        run.timed("allocate", t)
    if not searching:
        if spec.classifier_rank is not None:
            cfg = replace(cfg, classifier=spec.classifier_rank)
        small = _build(run, cfg.validate(run.dense), cal)
        _validate(run, small, "ranks")
        return small, None
    from .search import search_ranks

    run.emit({"kind": "phase", "phase": "search"})
    t = time.perf_counter()
    search = replace(spec.search, lr_weights=0.0) if cal else spec.search  # calibrated factors stay fixed
    ranks, info = search_ranks(
        run.dense,
        run.splits.train,
        run.splits.fit,
        spec.budget_of(),
        search,
        calibration=cal,
        init_ranks=cfg,
        device=run.device,
        num_workers=spec.workers,
        control=run.control("search"),
    )
    run.timed("search", t)
    job["search"] = {k: info[k] for k in ("target", "cost", "reduced_to_fit", "steps", "total")}
    job["search"]["budget"] = spec.budget
    small = _build(run, ranks, cal) if cal is not None else info["model"]
    return small.to(run.device), ("search" if info["stopped"] else None)


def _validate(run: Run, small, after: str) -> dict:
    """Scores on the validation split (held out from training), shown live and kept in job.json."""
    from .evaluate import predict, scores

    if run.splits is None:  # a run without images (a timm or text model without --data): nothing to score on
        return {}
    if run.val_reference is None:
        run.val_reference = predict(run.dense, run.splits.val, device=run.device, progress=False)[0]
    logits, labels = predict(small, run.splits.val, device=run.device, progress=False)
    s = scores(logits, labels, run.val_reference, embeddings=not has_classifier(run.dense))
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
    images = subset(run.splits.fit, spec.calibration_images, spec.seed)
    cfg = spec.distill
    loader = DataLoader(images, batch_size=32)
    if run.splits.unit == "sentences":
        width = families.mlp(families.blocks(run.dense)[0])["fc2"].out_features
        passes = sentence_views(len(images), len(images[0][0]), width)
        views = SentenceViews(loader, pad_id(run.dense), passes, seed=cfg.seed)
    else:
        views = AugmentedViews(loader, cfg.views, cfg.seed, cfg.mix)
    res = distill_blocks(small, run.dense, views, cfg, device=run.device, control=run.control("distill"))
    run.timed("distill", t)
    run.job["distill"] = {"steps": res["steps"], "total": res["total"]}
    after = _validate(run, small, "distill")
    if distance(after) > distance(before_scores):
        small = copy.deepcopy(small) if res["stopped"] else small  # a stopped run resumes from its state
        small.load_state_dict(before)
        run.job["distill"]["kept"] = "before"  # the distilled model scored worse on the validation split
    return small, ("distill" if res["stopped"] else None)


def _finetune(run: Run, small):
    from .distill import finetune

    spec = run.spec
    run.emit({"kind": "phase", "phase": "finetune"})
    t = time.perf_counter()
    res = finetune(
        small,
        run.dense,
        run.splits.train,
        run.splits.val,
        spec.finetune,
        device=run.device,
        num_workers=spec.workers,
        control=run.control("finetune"),
    )
    run.timed("finetune", t)
    run.job["finetune"] = {"best": res["best"], "steps": res["steps"], "total": res["total"]}
    return res["model"], ("finetune" if res["stopped"] else None)


def _quantized(run: Run, small, report: dict):
    """The int8 form of `small` (quantize.py), its float32 form saved in float/, and report["int8"]: size,
    scores and CPU latency against the dense model in float32 and int8, measured side by side."""
    import copy

    from .quantize import quantize_int8
    from .report import measure_int8

    run.emit({"kind": "phase", "phase": "quantize"})
    t = time.perf_counter()
    save_compressed(replace(run.loaded, model=small), run.out / FLOAT_DIR, {"report": report})
    small_int8 = quantize_int8(copy.deepcopy(small).cpu())
    data = run.splits.eval if (run.spec.evaluate and run.splits is not None) else None
    report["int8"] = measure_int8(run.dense, small, small_int8, data, latency=run.spec.latency)
    run.dense.to(run.device)
    small.to(run.device)
    run.timed("quantize", t)
    report["time_s"] = run.job["time_s"]
    return small_int8


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
        report.update(
            {k: job[k] for k in ("search", "distill", "finetune", "time_s", "validation", "plan") if k in job}
        )
        report["stopped"] = stopped
        report["processes"] = dist.world()
        report["calibration"] = spec.calibration
        if run.splits:
            report["data"] = {
                "source": run.splits.source,
                "labeled": run.splits.labeled,
                "note": run.splits.note,
                "unit": run.splits.unit,
                **run.splits.sizes(),
            }
        metrics = {k: {m: report[k][m] for m in FIGURES if m in report[k]} for k in ("dense", "compressed")}
        saved = small
        if spec.quantize and not stopped:
            saved = _quantized(run, small, report)
        save_compressed(replace(loaded, model=saved), run.out, {"metrics": metrics, "report": report})
        save_png(ranks_heatmap_mpl(small.comcat_ranks, run.dense), run.out / "ranks.png")
        atomic_write_text(run.out / "report.md", report_markdown(report, loaded.source, "ranks.png"))
    if not stopped:
        job["phase"] = "done"
    _write_job(run.out, job)
    dist.barrier()
    run.emit({"kind": "done", "stopped": stopped, "report": report})
    return {
        "loaded": replace(loaded, model=small),
        "report": report,
        "stopped": stopped,
        "out": run.out,
    }
