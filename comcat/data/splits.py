"""Train / search / evaluation splits for a compress run.

embedded:  train = shapes seed 0 (the model's own training stream), search = seed 2,
           eval = the held-out shapes (seed 1) every report uses.
DIR with train/ and val/ (ImageNet layout): train = train/ (augmenting timm transforms),
           search = a seeded subset of train/ (eval transforms), eval = val/.
DIR of class folders: a seeded half is the evaluation split; the other half is both the
           search split (eval transforms) and the training split (augmenting transforms).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..embedded import shapes_tensor
from ..errors import ComcatError
from ..evaluate import embedded_heldout, image_folder
from .shapes import make_shapes

TRAIN_SEED, SEARCH_SEED = 0, 2


@dataclass
class Splits:
    train: Dataset
    search: Dataset
    eval: Dataset
    source: str

    def sizes(self) -> dict:
        return {"train": len(self.train), "search": len(self.search), "eval": len(self.eval)}


def shapes_dataset(n: int, seed: int) -> TensorDataset:
    images, labels, _ = make_shapes(n, seed)
    return TensorDataset(shapes_tensor(images), torch.from_numpy(labels))


def embedded_splits(train: int = 4096, search: int = 1024, evaluate: int = 2000) -> Splits:
    return Splits(shapes_dataset(train, TRAIN_SEED), shapes_dataset(search, SEARCH_SEED),
                  embedded_heldout(evaluate), "embedded shapes")


def folder_splits(root: str | Path, model: nn.Module, seed: int = 0, search_images: int = 1000) -> Splits:
    root = Path(root)
    if not root.is_dir():
        raise ComcatError(f"data folder {root} does not exist: pass a folder with one sub-folder per class")
    g = torch.Generator().manual_seed(seed)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = image_folder(root / "train", model, training=True)
        pick = torch.randperm(len(train), generator=g)[:search_images].tolist()
        search = Subset(image_folder(root / "train", model), pick)
        splits = Splits(train, search, image_folder(root / "val", model), f"{root} (train/ + val/)")
    else:
        plain = image_folder(root, model)
        if len(plain) < 2:
            raise ComcatError(f"{root} has {len(plain)} image(s): a compress run needs at least 2 (half to "
                              "search and fine-tune on, half to evaluate)")
        perm = torch.randperm(len(plain), generator=g).tolist()
        fit, held = sorted(perm[1::2]), sorted(perm[0::2])
        splits = Splits(Subset(image_folder(root, model, training=True), fit), Subset(plain, fit),
                        Subset(plain, held), f"{root} (seeded halves)")
    return splits


def make_splits(data: str | Path | None, model: nn.Module, seed: int = 0, training: bool = True,
                train_images: int = 4096, search_images: int = 1024) -> Splits:
    """The splits of `data` (None = embedded shapes); without `training` the embedded train and
    search splits are left empty (nothing to generate)."""
    if data in (None, "", "embedded"):
        return embedded_splits(train_images, search_images) if training else embedded_splits(0, 0)
    return folder_splits(data, model, seed, search_images)
