"""Disjoint train / validation / evaluation splits for a compress run, in every data layout.

  train  fine-tuning, with the model's augmenting transforms;
  fit    the training images with eval transforms: calibration and the rank search fit on them
         (embedded: separately generated shapes);
  val    held out from training: best-model choice and the live display;
  eval   held out from everything: the report.

embedded:      train = shapes seed 0 (the model's own training stream), fit = seed 2, val = seed 5,
               eval = the held-out shapes (seed 1) every report uses.
DIR/train + DIR/val (ImageNet layout): eval = val/; a seeded tenth of train/ (at most 1000 images)
               is the validation split; train = the rest of train/, fit = a seeded subset of it.
DIR (class folders, or a flat folder of images): a seeded half is the evaluation split; a fifth of
               the other half is the validation split and the rest the training split.
Labels count only when the folder's classes are the model's (images.label_map); else every split
is unlabeled and the report gives agreement with the dense model instead of top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..core.embedded import shapes_tensor
from ..core.errors import ComcatError
from ..core.images import scan
from ..core.shapes import make_shapes
from .images import NO_LABEL, ImageFiles, label_map, transform

TRAIN_SEED, FIT_SEED, HELDOUT_SEED, VAL_SEED = 0, 2, 1, 5
HELDOUT_IMAGES, VAL_IMAGES = 2000, 500
VAL_FRACTION = 0.2  # of the non-evaluation half of a plain folder
MAX_VAL = 1000


@dataclass
class Splits:
    train: Dataset
    fit: Dataset
    val: Dataset
    eval: Dataset
    source: str
    labeled: bool = True
    note: str = ""  # why the labels are not used, when they are not
    unit: str = "images"  # what the items are, in the figures' words ("sentences" for text)

    def sizes(self) -> dict:
        return {"train": len(self.train), "fit": len(self.fit), "val": len(self.val), "eval": len(self.eval)}


def shapes_dataset(n: int, seed: int) -> TensorDataset:
    images, labels, _ = make_shapes(n, seed)
    return TensorDataset(shapes_tensor(images), torch.from_numpy(labels))


def embedded_heldout(n: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED) -> TensorDataset:
    """The held-out shapes every embedded report uses (the model trained on seed 0)."""
    return shapes_dataset(n, seed)


def embedded_splits(
    train: int = 4096, fit: int = 1024, val: int = VAL_IMAGES, evaluate: int = HELDOUT_IMAGES
) -> Splits:
    return Splits(
        shapes_dataset(train, TRAIN_SEED),
        shapes_dataset(fit, FIT_SEED),
        shapes_dataset(val, VAL_SEED),
        embedded_heldout(evaluate),
        "embedded shapes",
    )


def _files(root: Path, model: nn.Module, use_labels: bool) -> tuple[list, list, str]:
    files, idx, classes = scan(root)
    mapping, why = label_map(classes, model)
    if mapping is None and use_labels:
        raise ComcatError(
            f"--labels needs the model's classes, but {root}: {why}; drop --labels (training "
            "then follows the dense model's predictions) or lay the folder out as DIR/<class>/<image>"
        )
    labels = [mapping[i] for i in idx] if mapping is not None else [NO_LABEL] * len(files)
    return files, labels, why


def _pick(items: list, index: list[int]) -> list:
    return [items[i] for i in index]


def folder_splits(
    root: str | Path, model: nn.Module, seed: int = 0, fit_images: int = 1024, use_labels: bool = False
) -> Splits:
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    plain, augment = transform(model), transform(model, training=True)
    if (root / "train").is_dir() and (root / "val").is_dir():
        files, labels, why = _files(root / "train", model, use_labels)
        eval_files, eval_labels, eval_why = _files(root / "val", model, use_labels)
        perm = torch.randperm(len(files), generator=g).tolist()
        n_val = min(MAX_VAL, max(1, len(files) // 10))
        val, train = sorted(perm[:n_val]), sorted(perm[n_val:])
        fit = sorted(torch.tensor(train)[torch.randperm(len(train), generator=g)[:fit_images]].tolist())
        source = f"{root} (train/ + val/)"
        labeled = min(labels + eval_labels, default=NO_LABEL) >= 0
        why = why or eval_why
        evaluation = ImageFiles(eval_files, eval_labels, plain)
    else:
        files, labels, why = _files(root, model, use_labels)
        perm = torch.randperm(len(files), generator=g).tolist()
        held, rest = perm[0::2], perm[1::2]
        n_val = max(1, round(VAL_FRACTION * len(rest)))
        val, train = sorted(rest[:n_val]), sorted(rest[n_val:])
        fit = train
        source = f"{root} (seeded halves; a fifth of the fitting half for validation)"
        labeled = min(labels, default=NO_LABEL) >= 0
        evaluation = ImageFiles(_pick(files, sorted(held)), _pick(labels, sorted(held)), plain)
    if not train or not len(evaluation):
        raise ComcatError(
            f"{root} has {len(files)} image(s): a compress run needs at least 4 (to train on, "
            "to validate on and to evaluate on), and calibration at least 8 to train on"
        )
    return Splits(
        ImageFiles(_pick(files, train), _pick(labels, train), augment),
        ImageFiles(_pick(files, fit), _pick(labels, fit), plain),
        ImageFiles(_pick(files, val), _pick(labels, val), plain),
        evaluation,
        source,
        labeled,
        "" if labeled else f"labels not used: {why}",
    )


def make_splits(
    data: str | Path | None,
    model: nn.Module,
    seed: int = 0,
    training: bool = True,
    train_images: int = 4096,
    fit_images: int = 1024,
    use_labels: bool = False,
) -> Splits:
    """The splits of `data` (None = embedded shapes); without `training` the embedded train, fit and
    validation splits are left empty (nothing to generate)."""
    if data in (None, "", "embedded"):
        return embedded_splits(train_images, fit_images) if training else embedded_splits(0, 0, 0)
    return folder_splits(data, model, seed, fit_images, use_labels)


def subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded subset of n items (all of them when n >= len)."""
    if n >= len(ds):
        return ds
    return Subset(ds, sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()))
