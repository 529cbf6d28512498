"""Predictions of a model on a dataset, and what they say: top-1 / top-5 against labels (when the
images carry the model's labels), agreement and KL divergence against a reference model's
predictions (the dense model's, for a compressed one)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core import dist
from ..core.errors import ComcatError
from .images import image_folder
from .models import has_classifier
from .splits import embedded_heldout


def resolve_data(data: str | Path | Dataset | None, model: nn.Module) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if data in (None, "", "embedded"):
        return embedded_heldout()
    return image_folder(data, model)


@torch.no_grad()
def predict(
    model: nn.Module,
    data: str | Path | Dataset | None = None,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, classes) float32 on the CPU, labels (n,), -1 where an image has none)."""
    ds = resolve_data(data, model)
    if len(ds) == 0:
        raise ComcatError("the evaluation set is empty: pass a folder with images")
    if batch_size < 1:
        raise ComcatError(f"the batch size must be >= 1, got {batch_size}")
    device = dist.device(device)
    model = model.eval().to(device)
    logits, labels = [], []
    for x, y in tqdm(
        DataLoader(ds, batch_size=batch_size, num_workers=num_workers),
        desc="evaluate",
        disable=not progress,
        leave=False,
    ):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    per_image: bool = False,
    embeddings: bool = False,
) -> dict:
    """From a model's outputs: {'images'}; for a classifier's logits with labels (all >= 0) {'top1',
    'top5' (%), 'nll'}, with a reference model's logits {'agreement' (% same top-1), 'kl' (mean
    KL(reference || model))}; for `embeddings` (a model without a classifier: pooled features) with
    a reference {'cosine' (mean cosine similarity to the reference's), 'retrieval' (% of images whose
    nearest other image, by cosine, is the same under both models)}. With a reference, 'distance'
    is what a run minimizes on its validation split: kl, or 1 - cosine. per_image adds 'right'
    (top-1 right per image, with labels) and 'agree' (with a reference)."""
    out: dict = {"images": len(logits)}
    if embeddings:
        if reference is not None:
            cosine = F.cosine_similarity(logits.double(), reference.double(), dim=1)
            same = nearest_other(logits) == nearest_other(reference)
            out.update(cosine=cosine.mean().item(), retrieval=100.0 * same.double().mean().item())
            out["distance"] = 1.0 - out["cosine"]
            if per_image:
                out["agree"] = same
        return out
    if len(labels) and int(labels.min()) >= 0:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right = top[:, 0] == labels
        out.update(
            top1=100.0 * right.double().mean().item(),
            top5=100.0 * (top == labels[:, None]).any(1).double().mean().item(),
            nll=F.cross_entropy(logits, labels).item(),
        )
        if per_image:
            out["right"] = right
    if reference is not None:
        agree = logits.argmax(1) == reference.argmax(1)
        out.update(
            agreement=100.0 * agree.double().mean().item(),
            kl=F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean").item(),
        )
        out["distance"] = out["kl"]
        if per_image:
            out["agree"] = agree
    return out


def nearest_other(x: torch.Tensor) -> torch.Tensor:
    """(n,) index of each row's nearest other row of x (n, D) by cosine similarity."""
    x = F.normalize(x.double(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def distance(s: dict) -> float:
    """The validation distance of scores() (runs recorded before 'distance' existed carry 'kl')."""
    return s.get("distance", s.get("kl"))


def fidelity(s: dict, digits: int = 2) -> str:
    """Scores against the dense model in words: agreement and KL, or cosine and retrieval."""
    if "cosine" in s:
        return f"cosine {s['cosine']:.4f}, retrieval agreement {s['retrieval']:.{digits}f}%"
    return f"agreement {s['agreement']:.{digits}f}%, KL {s['kl']:.4f}"


def evaluate(
    model: nn.Module,
    data: str | Path | Dataset | None = None,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = True,
    num_workers: int = 0,
    per_image: bool = False,
    reference: torch.Tensor | None = None,
) -> dict:
    """scores() of `model` on `data` (None / 'embedded' = the embedded held-out shapes)."""
    logits, labels = predict(model, data, batch_size, device, progress, num_workers)
    return scores(logits, labels, reference, per_image, embeddings=not has_classifier(model))
