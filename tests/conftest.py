import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
VIT_TINY = SHARED / "vit_tiny_patch16_224.safetensors"
IMAGENET = SHARED / "imagenet-sample"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def embedded():
    from comcat.compression.load import load_model

    return load_model("embedded")


def with_random_biases(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 copy with non-trivial biases everywhere, so bias folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max()).item()


def checkpoint_and_photos(tmp_path: Path) -> tuple[Path, Path]:
    """The embedded model saved as an uploaded checkpoint would be, and a zip of 40 unlabeled shapes
    (photos/<i>.png): what a visitor uploads to compress their own model on their own images."""
    import zipfile

    from PIL import Image
    from safetensors.torch import save_file

    from comcat.compression.load import load_model
    from comcat.core.shapes import make_shapes

    ckpt = tmp_path / "mine.safetensors"
    save_file(load_model("embedded").model.state_dict(), str(ckpt))
    images, _, _ = make_shapes(40, 3)
    zpath = tmp_path / "photos.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for i, img in enumerate(images):
            path = tmp_path / f"{i}.png"
            Image.fromarray(img).save(path)
            z.write(path, f"photos/{i}.png")
    return ckpt, zpath
