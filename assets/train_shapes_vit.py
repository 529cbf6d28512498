"""Train the embedded shapes ViT and write assets/shapes_vit.safetensors + shapes_vit.json.

    python assets/train_shapes_vit.py [--steps 9000] [--device cpu|cuda]

Data are regenerated from seeds (train seed 0, held-out seed 1); the dihedral group
(flips, 90-degree turns) is a label-preserving augmentation for every shape class.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comcat.core.embedded import EMBEDDED_KWARGS, EMBEDDED_RECORD, EMBEDDED_WEIGHTS, build_shapes_vit, shapes_tensor
from comcat.core.shapes import make_shapes

TRAIN_SEED, HELDOUT_SEED = 0, 1


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
    ap.add_argument("--out", default=str(EMBEDDED_WEIGHTS))
    ap.add_argument("--init", default=None, help="start from these weights (a second, shorter cosine cycle)")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    x, y, _ = make_shapes(args.train_images, TRAIN_SEED)
    xh, yh, _ = make_shapes(args.heldout_images, HELDOUT_SEED)
    x, y = shapes_tensor(x).to(args.device), torch.from_numpy(y).to(args.device)
    xh, yh = shapes_tensor(xh).to(args.device), torch.from_numpy(yh).to(args.device)
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)

    model = build_shapes_vit().to(args.device)
    if args.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.init))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
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

    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    save_file(best_state, str(tmp), metadata={"arch": "comcat_shapes_vit"})
    os.replace(tmp, out)
    record = {
        "arch": "comcat_shapes_vit",
        "kwargs": EMBEDDED_KWARGS,
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
    rec_path = Path(args.out).with_suffix(".json") if args.out != str(EMBEDDED_WEIGHTS) else EMBEDDED_RECORD
    rec_path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(rec_path.with_suffix(".tmp"), rec_path)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
