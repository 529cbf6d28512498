"""top-1 / top-5 on the embedded held-out shapes or on an ImageFolder directory."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from .data.shapes import make_shapes
from .embedded import shapes_tensor
from .errors import ComcatError
from .models import data_config

HELDOUT_SEED = 1          # the embedded ViT was trained on seed 0 (assets/train_shapes_vit.py)
HELDOUT_IMAGES = 2000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def embedded_heldout(n: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED) -> TensorDataset:
    images, labels, _ = make_shapes(n, seed)
    return TensorDataset(shapes_tensor(images), torch.from_numpy(labels))


def load_rgb(path: str):
    """PIL loader that turns an unreadable image into a one-line ComcatError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ComcatError(f"cannot read image {path} ({type(e).__name__}): remove or replace it") from None


def image_folder(root: str | Path, model: nn.Module, limit: int | None = None, training: bool = False) -> Dataset:
    """An ImageFolder (class sub-folders, sorted = label order) with the model's timm transforms
    (the augmenting training transforms when `training`)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise ComcatError(f"data folder {root} does not exist: pass a folder with one sub-folder per class")
    try:
        ds = ImageFolder(str(root), transform=create_transform(**data_config(model), is_training=training), loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise ComcatError(f"{root} has no images in class sub-folders ({str(e).splitlines()[0][:120]}): "
                          "lay it out as DIR/<class>/<image>.jpg") from None
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return ds


def resolve_data(data: str | Path | Dataset | None, model: nn.Module) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if data in (None, "", "embedded"):
        return embedded_heldout()
    return image_folder(data, model)


@torch.no_grad()
def evaluate(model: nn.Module, data: str | Path | Dataset | None = None, batch_size: int = 128,
             device: str | None = None, progress: bool = True, num_workers: int = 0, per_image: bool = False) -> dict:
    """{'top1': %, 'top5': %, 'nll': mean cross-entropy, 'images': n} of `model` on `data`
    (None/'embedded' = shapes held-out); with `per_image` also 'right': (n,) bool, top-1 right per image."""
    ds = resolve_data(data, model)
    if len(ds) == 0:
        raise ComcatError("the evaluation set is empty: pass a folder with images")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.eval().to(device)
    correct1 = correct5 = n = 0
    nll, right = 0.0, []
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        logits = model(x.to(device))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        right.append(top[:, 0] == y)
        correct1 += right[-1].sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        nll += F.cross_entropy(logits.float().cpu(), y, reduction="sum").item()
        n += len(y)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "nll": nll / n, "images": n,
            **({"right": torch.cat(right)} if per_image else {})}
