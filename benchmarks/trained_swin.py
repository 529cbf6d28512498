"""Search and fine-tuning on trained Swin / Swin V2 teachers: what each step of a compress run adds.

The teachers are the shapes-world Swin and Swin V2 in assets/ (assets/train_shapes_vit.py; random
Swins are no teachers: their outputs hardly depend on the image). Each is compressed by the CLI, as
a user runs it, at --ratio of its attention and MLP parameters (default 20% for Swin, 30% for
Swin V2, whose W^Q and W^K stay dense: at 20% every other rank is 1), on --images generated shapes in
class folders (seed --seed; the run splits them into its own train, fit, validation and evaluation
parts), once per row:

  calibrated allocation      --distill-steps 0 --finetune-epochs 0
  + fine-tuning              --finetune-epochs 3 --lr 1e-4
  + search                   --search --search-epochs 2 (factors fixed: only the ranks move)
  + search + fine-tuning     both
  one-click default          block distillation (100 steps per block), no search or fine-tuning

Every saved model is then scored against its teacher on --eval-images fresh shapes (seed 1, the
teachers' held-out seed, never seen by a run): KL to the teacher, agreement and top-1, and the 95%
interval of each row's KL minus the first row's from a paired bootstrap over images.

    python benchmarks/trained_swin.py [--families swin swinv2] [--ratio R] [--images 400] [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from comcat.compression.load import load_model
from comcat.core.embedded import ASSETS, shapes_tensor
from comcat.core.files import atomic_write_text
from comcat.core.shapes import SHAPES, make_shapes

RATIOS = {"swin": 0.2, "swinv2": 0.3}
ROWS = {
    "calibrated allocation": ["--distill-steps", "0", "--finetune-epochs", "0"],
    "+ fine-tuning": ["--distill-steps", "0", "--finetune-epochs", "3", "--lr", "1e-4"],
    "+ search": ["--distill-steps", "0", "--search", "--search-epochs", "2"],
    "+ search + fine-tuning": ["--distill-steps", "0", "--search", "--search-epochs", "2", "--finetune-epochs", "3"]
    + ["--lr", "1e-4"],
    "one-click default": [],
}


def shapes_folder(root: Path, n: int, seed: int) -> Path:
    images, labels, _ = make_shapes(n, seed)
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / SHAPES[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / SHAPES[y] / f"{i:04d}.png")
    return root


def bootstrap(d: torch.Tensor, reps: int = 10000, seed: int = 0) -> list[float]:
    """95% interval of the mean of d (N,), images resampled with replacement."""
    idx = torch.randint(len(d), (reps, len(d)), generator=torch.Generator().manual_seed(seed))
    return torch.quantile(d.double()[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


@torch.no_grad()
def per_image(model, x: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> dict:
    logits = torch.cat([model.eval()(x[i : i + 250]) for i in range(0, len(x), 250)])
    kl = F.kl_div(logits.log_softmax(1), teacher_logits.log_softmax(1), log_target=True, reduction="none").sum(1)
    return {"kl": kl, "agree": logits.argmax(1) == teacher_logits.argmax(1), "right": logits.argmax(1) == y}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", choices=["swin", "swinv2"], default=["swin", "swinv2"])
    ap.add_argument("--ratio", type=float, help="the same ratio for every family (default: RATIOS)")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", metavar="F")
    args = ap.parse_args()

    xs, ys, _ = make_shapes(args.eval_images, 1)
    x, y = shapes_tensor(xs), torch.from_numpy(ys)
    out = {"images": args.images, "eval_images": args.eval_images, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = shapes_folder(Path(tmp) / "photos", args.images, args.seed)
        for family in args.families:
            teacher_dir = ASSETS / f"shapes_{family}"
            with torch.no_grad():
                teacher = load_model(str(teacher_dir)).model.eval()
                t_logits = torch.cat([teacher(x[i : i + 250]) for i in range(0, len(x), 250)])
            ratio = args.ratio or RATIOS[family]
            rows, first = {}, None
            teacher_top1 = 100 * (t_logits.argmax(1) == y).double().mean().item()
            print(f"\n{family} at {ratio:.0%} of its attention and MLP parameters, teacher top-1 {teacher_top1:.1f}%")
            print(f"{'row':26s} {'KL':>8s} {'KL - first [95%]':>28s} {'agree %':>8s} {'top-1 %':>8s} {'time s':>7s}")
            for label, extra in ROWS.items():
                dest = Path(tmp) / f"{family}-{len(rows)}"
                cmd = [sys.executable, "-m", "comcat", "compress", "--model", str(teacher_dir), "--data", str(data)]
                cmd += ["--params-ratio", str(ratio), "--mlp", "--no-latency", "--workers", "0", "--out", str(dest)]
                t = time.perf_counter()
                r = subprocess.run([*cmd, *extra], capture_output=True, text=True)
                seconds = time.perf_counter() - t
                if r.returncode != 0:
                    sys.exit(f"{family} {label} failed:\n{r.stderr[-2000:]}")
                s = per_image(load_model(str(dest)).model, x, t_logits, y)
                first = first or s
                d = s["kl"] - first["kl"]
                rows[label] = {
                    "kl": s["kl"].mean().item(),
                    "kl_minus_first": d.mean().item(),
                    "ci95": bootstrap(d),
                    "agreement": 100 * s["agree"].double().mean().item(),
                    "top1": 100 * s["right"].double().mean().item(),
                    "seconds": round(seconds, 1),
                    "ranks": json.loads((dest / "comcat.json").read_text())["ranks"]["blocks"],
                }
                row = rows[label]
                lo, hi = row["ci95"]
                print(
                    f"{label:26s} {row['kl']:8.4f} {row['kl_minus_first']:+9.4f} [{lo:+.4f}, {hi:+.4f}]"
                    f" {row['agreement']:8.1f} {row['top1']:8.1f} {seconds:7.0f}",
                    flush=True,
                )
            out["families"][family] = {"ratio": ratio, "teacher_top1": teacher_top1, "rows": rows}
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
