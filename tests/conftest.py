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


def shapes_data(n: int, seed: int):
    """n generated shapes as a TensorDataset of (normalized images, labels)."""
    from comcat.compression.splits import shapes_dataset

    return shapes_dataset(n, seed)


def png_folder(root: Path, n: int, seed: int, classes=None) -> Path:
    """n generated shapes saved as PNGs: flat in `root`, or in class folders named after
    `classes` (label y goes to classes[y % len(classes)]). Returns root."""
    from PIL import Image

    from comcat.core.shapes import make_shapes

    images, labels, _ = make_shapes(n, seed)
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / classes[y % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """A command in a fresh interpreter from the repository root, as a user runs it (comcat is
    installed, so no PYTHONPATH); `run_cli("-m", "comcat", ...)` for the CLI."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
