"""Train a vision transformer on the shapes world.

    python assets/train_shapes_vit.py [--steps 9000] [--device cpu|cuda]
    python assets/train_shapes_vit.py --family swin --steps 4000     # -> assets/shapes_swin/
    python assets/train_shapes_vit.py --family swinv2 --steps 4000   # -> assets/shapes_swinv2/

The default (`vit`) writes the embedded model, assets/shapes_vit.safetensors + shapes_vit.json.
`swin` and `swinv2` write small timm Swin / Swin V2 folders (config.json + model.safetensors, the
layout of timm's save_for_hf, plus training.json): trained teachers for the Swin families' tests,
which random weights cannot stand in for.

Data are regenerated from seeds (train seed 0, held-out seed 1); the dihedral group
(flips, 90-degree turns) is a label-preserving augmentation for every shape class.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comcat.core.embedded import (
    ASSETS,
    EMBEDDED_DATA_CFG,
    EMBEDDED_KWARGS,
    EMBEDDED_RECORD,
    EMBEDDED_WEIGHTS,
    build_shapes_vit,
    shapes_tensor,
)
from comcat.core.files import atomic_write, atomic_write_text
from comcat.core.shapes import SHAPES, make_shapes

TRAIN_SEED, HELDOUT_SEED = 0, 1
# two stages: 8 x 8 tokens in 4 x 4 windows (every second block shifted), then 4 x 4 tokens;
# widths 48 and 96, 3 and 6 heads of dim 16
SWIN_KWARGS = dict(
    img_size=32, patch_size=4, window_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6), num_classes=len(SHAPES)
)
TIMM_FAMILIES = {"swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256"}


def build(family: str) -> torch.nn.Module:
    """The family's shapes model, randomly initialised, with the shapes data config."""
    if family == "vit":
        return build_shapes_vit()
    import timm

    model = timm.create_model(TIMM_FAMILIES[family], pretrained=False, **SWIN_KWARGS)
    model.pretrained_cfg = dict(EMBEDDED_DATA_CFG, architecture=TIMM_FAMILIES[family])
    return model


def save(family: str, state: dict, out: Path, record: dict) -> None:
    """Write the weights (and the training record) without leaving a half-written file or folder."""
    if family == "vit":
        atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"arch": "comcat_shapes_vit"}))
        rec_path = out.with_suffix(".json") if out != EMBEDDED_WEIGHTS else EMBEDDED_RECORD
        atomic_write_text(rec_path, json.dumps(record, indent=2) + "\n")
        return
    from timm.models._hub import save_for_hf

    model = build(family)
    model.load_state_dict(state)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(
        model, str(tmp), model_config={"label_names": list(SHAPES)}, model_args=SWIN_KWARGS, safe_serialization=True
    )
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 symmetries of the square, applied to a (B, C, H, W) batch."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return x.flip(3) if k >= 4 else x


@torch.no_grad()
def accuracy(model, x, y, batch=500) -> float:
    model.eval()
    hits = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return hits / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--train-images", type=int, default=100_000)
    ap.add_argument("--heldout-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--family", choices=["vit", *TIMM_FAMILIES], default="vit")
    ap.add_argument("--out", default=None, help="default: the family's file or folder in assets/")
    ap.add_argument("--init", default=None, help="start from these weights (a second, shorter cosine cycle)")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    x, y, _ = make_shapes(args.train_images, TRAIN_SEED)
    xh, yh, _ = make_shapes(args.heldout_images, HELDOUT_SEED)
    x, y = shapes_tensor(x).to(args.device), torch.from_numpy(y).to(args.device)
    xh, yh = shapes_tensor(xh).to(args.device), torch.from_numpy(yh).to(args.device)
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)

    out = Path(args.out) if args.out else EMBEDDED_WEIGHTS if args.family == "vit" else ASSETS / f"shapes_{args.family}"
    model = build(args.family).to(args.device)
    if args.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.init))

    def decays(name: str, p: torch.Tensor) -> bool:  # weight matrices, not positions, biases, norms or temperatures
        return p.ndim > 1 and not any(k in name for k in ("pos_embed", "relative_position", "logit_scale"))

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    best, best_state = -1.0, None
    t_train = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen).to(args.device)
        xb = dihedral(x[idx], int(torch.randint(0, 8, (1,), generator=gen)))
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            acc = accuracy(model, xh, yh)
            if acc >= best:
                best, best_state = acc, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.3f} held-out top-1 {acc:.4f} "
                f"({time.time() - t_train:.0f}s)",
                flush=True,
            )

    record = {
        "arch": "comcat_shapes_vit" if args.family == "vit" else TIMM_FAMILIES[args.family],
        "kwargs": EMBEDDED_KWARGS if args.family == "vit" else SWIN_KWARGS,
        "seed": args.seed,
        "train_seed": TRAIN_SEED,
        "heldout_seed": HELDOUT_SEED,
        "train_images": args.train_images,
        "heldout_images": args.heldout_images,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "init": args.init,
        "heldout_top1": best,
        "train_seconds": round(time.time() - t_train, 1),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save(args.family, best_state, out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
