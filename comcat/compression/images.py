"""Image folders: DIR/<class>/<image> (labels) or a flat DIR/<image> (no labels), read with the
model's timm transforms. A folder's labels are used only when its classes are the model's."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from ..core.images import NO_LABEL, load_rgb, scan


def model_classes(model: nn.Module) -> tuple[int, list[str] | None]:
    """(number of classes, their label names when known: timm's ImageNet synsets or pretrained_cfg's)."""
    n = getattr(model, "num_classes", 0) or 0
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("label_names"):
        return n, list(cfg["label_names"])
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        return n, (list(ImageNetInfo(subset).label_names()) if subset else None)
    except Exception:  # noqa: BLE001 - label names are a convenience
        return n, None


def label_map(classes: list[str] | None, model: nn.Module) -> tuple[list[int] | None, str]:
    """Model class index of each folder class, or None with the reason the labels cannot be used.
    Folder names that are the model's label names (e.g. ImageNet synsets n01440764) map by name;
    other names are not its classes. A model without label names takes as many folders as it has
    classes, in sorted order."""
    if classes is None:
        return None, "a flat folder has no labels"
    n, names = model_classes(model)
    if names and all(c in names for c in classes):
        index = {name: i for i, name in enumerate(names)}
        return [index[c] for c in classes], ""
    if names:
        other = next(c for c in classes if c not in names)
        return None, f"its class folder {other!r} is not one of the model's classes ({', '.join(names[:3])}, ...)"
    if len(classes) == n:
        return list(range(n)), ""
    return None, f"its {len(classes)} class folders are not the model's {n} classes"


class ImageFiles(Dataset):
    """(image tensor, label) of a list of files; label -1 where there is none."""

    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(str(self.files[i]))), self.labels[i]


def transform(model: nn.Module, training: bool = False):
    """The model's timm eval transform, or its augmenting training transform."""
    from timm.data import create_transform

    from .models import data_config

    return create_transform(**data_config(model), is_training=training)


def image_folder(
    root: str | Path, model: nn.Module, limit: int | None = None, training: bool = False, labels: bool = True
) -> ImageFiles:
    """DIR/<class>/<image> or DIR/<image> with the model's transforms; labels mapped to the model's
    classes when they are its classes (label_map), else -1. limit: the first `limit` files."""
    files, idx, classes = scan(root)
    mapping, _ = label_map(classes, model) if labels else (None, "")
    ys = [mapping[i] for i in idx] if mapping is not None else [NO_LABEL] * len(files)
    if limit is not None:
        files, ys = files[:limit], ys[:limit]
    return ImageFiles(files, ys, transform(model, training))
