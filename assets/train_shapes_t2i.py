"""Train the embedded text-to-image model and write assets/shapes_t2i/ (a diffusers folder).

    python assets/train_shapes_t2i.py [--steps 4000] [--batch 48] [--device cpu|cuda]

Pretraining sees nine of the ten shapes (never the heart, which is the demo's new concept);
images are regenerated from seeds, with the dihedral group as augmentation, and 10% of the
captions are dropped for classifier-free guidance. The saved weights are an EMA of training.
A checkpoint is written every --save-every steps, so a stopped run still leaves a model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from comcat.core.embedded import shapes_tensor
from comcat.core.shapes import make_shapes
from comcat.customization.diffusion.pipeline import EMBEDDED_PIPELINE, ShapesPipeline
from comcat.customization.diffusion.shapes_t2i import (
    TRAIN_SHAPES,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    caption,
)

TRAIN_SEED = 10


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return x.flip(3) if k >= 4 else x


def save(pipe: ShapesPipeline, ema: AveragedModel, out: Path, record: dict):
    """Write the EMA weights as a diffusers folder, atomically (temp folder, then rename)."""
    unet, text_encoder = ema.module
    pipe = ShapesPipeline(unet=unet, scheduler=pipe.scheduler, text_encoder=text_encoder, tokenizer=pipe.tokenizer)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(record, indent=2))
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--train-images", type=int, default=60_000)
    ap.add_argument("--drop-caption", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(EMBEDDED_PIPELINE))
    ap.add_argument("--init", default=None, help="start from this saved pipeline (a second, shorter cosine cycle)")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    images, _, specs = make_shapes(args.train_images, TRAIN_SEED, shapes=TRAIN_SHAPES)
    x_all = shapes_tensor(images)
    print(f"{len(x_all)} images in {time.time() - t0:.0f}s", flush=True)

    if args.init:
        pipe = ShapesPipeline.from_pretrained(args.init)
    else:
        tokenizer = build_tokenizer()
        pipe = ShapesPipeline(
            unet=build_unet(),
            scheduler=build_scheduler(),
            text_encoder=build_text_encoder(tokenizer),
            tokenizer=tokenizer,
        )
    pipe.to(args.device)
    models = torch.nn.ModuleList([pipe.unet, pipe.text_encoder])
    ema = AveragedModel(models, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
    opt = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    alphas = pipe.scheduler.alphas_cumprod.to(args.device)
    record = dict(
        vars(args),
        train_seed=TRAIN_SEED,
        shapes=list(TRAIN_SHAPES),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    if args.init and (Path(args.init) / "training.json").exists():  # the cycles before this one
        record["previous"] = json.loads((Path(args.init) / "training.json").read_text())
    out = Path(args.out)
    running = None
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x_all), (args.batch,))
        x0 = dihedral(x_all[idx], rng.randrange(8)).to(args.device)
        prompts = ["" if rng.random() < args.drop_caption else caption(specs[i], rng) for i in idx.tolist()]
        z0 = pipe.pack_images(x0)
        t = torch.randint(0, len(alphas), (args.batch,), device=args.device)
        noise = torch.randn_like(z0)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(pipe.unet(zt, t, pipe.encode_prompt(prompts)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(models)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {running:.4f} {time.time() - t0:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save(pipe, ema, out, dict(record, step=step, loss=running, train_seconds=round(time.time() - t0, 1)))
    print(f"done in {time.time() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    main()
