"""The concept's images and captions, and the generic text/image encoders of a pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...core.errors import ComcatError
from ...core.images import IMAGE_SUFFIXES, load_rgb
from .pipeline import tokenize

MIN_IMAGES, MAX_IMAGES = 3, 10


def resolution(pipe) -> int:
    """Pixel size the pipeline's denoiser was trained at (its pipeline's default)."""
    model = getattr(pipe, "unet", None) or pipe.transformer
    size = getattr(pipe, "default_sample_size", None) or model.config.sample_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size * (getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "pack", 1))


def square(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then resize to size x size."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC if s != size else Image.NEAREST)


def concept_files(folder: str | Path) -> list[Path]:
    """The image files of a concept folder (sorted); a one-line error for a missing folder or files
    other than images and NAME.txt captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ComcatError(f"image folder {folder} does not exist: give a folder of 3-10 images of the concept")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES + (".txt",)]
    if others:
        raise ComcatError(
            f"{folder} holds files that are not images: {', '.join(others[:3])}; "
            "keep only images (and optional NAME.txt captions) there"
        )
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def read_concept(folder: str | Path, prompt: str, token: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images of a folder as (N, 3, size, size) in [-1, 1] and one caption each: `NAME.txt`
    beside `NAME.png` when present, otherwise `prompt`. Every caption must contain `token`."""
    folder = Path(folder)
    images = concept_files(folder)
    if not images:
        raise ComcatError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)}): add 3-10 images of the concept")
    if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
        raise ComcatError(
            f"{folder} has {len(images)} image(s); a concept needs {MIN_IMAGES}-{MAX_IMAGES}: "
            "keep a few varied images of it"
        )
    pixels, captions = [], []
    for p in images:
        img = square(load_rgb(str(p)), size)
        pixels.append(torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        side = p.with_suffix(".txt")
        caption = read_caption(side) if side.is_file() else prompt
        check_prompt(caption, token, str(side) if side.is_file() else "the prompt")
        captions.append(caption)
    return torch.stack(pixels), captions


def check_prompt(prompt: str, token: str, what: str = "the prompt") -> None:
    if token.lower() not in prompt.lower().split():
        raise ComcatError(
            f"{what} {prompt!r} does not contain the concept token {token!r}: "
            f"write it as a word, e.g. 'a photo of {token} dog'"
        )


def encode_text(pipe, prompts: list[str]) -> torch.Tensor:
    """(B, L, D) text-encoder hidden states: the UNet's cross-attention context."""
    ids = tokenize(pipe.tokenizer, prompts).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def encode_images(pipe, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the UNet's sample space: VAE latents (mode, scaled) or packed pixels."""
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
        return z * vae.config.scaling_factor
    return pipe.pack_images(x.to(pipe.unet.device))


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all one size) into one picture."""
    cols = cols or len(images)
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def denoising_loss(unet, noise_sched, z0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Per-sample || unet(z_t, t, c) - target ||^2 with t ~ U{0..T-1}, z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps;
    target eps (epsilon prediction) or v = sqrt(a_t) eps - sqrt(1 - a_t) z0 (v prediction). Shape (B,)."""
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), device=z0.device)
    noise = torch.randn_like(z0)
    zt = noise_sched.add_noise(z0, noise, t)
    target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(z0, noise, t)
    pred = unet(zt, t, context).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(tuple(range(1, z0.ndim)))


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, at most MAX_CAPTION_BYTES; one line naming the file otherwise."""
    from ...core.records import MAX_CAPTION_BYTES

    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise ComcatError(f"the caption {path.name} is over {MAX_CAPTION_BYTES // 1024} kB: write one short sentence")
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ComcatError(f"the caption {path.name} is not UTF-8 text: write one short sentence") from None
