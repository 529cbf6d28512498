"""Distillation fine-tuning of a compressed ViT from its dense teacher.

loss = 1/2 CE(z_s, y) + 1/2 CE(z_s, argmax z_t)                 (DeiT hard-label distillation)
     + w_t * mean_b MSE(h_s^b, h_t^b),  b in {0, 1, -2, -1}       (block outputs, w_t decays to 0)

AdamW with a cosine learning rate (linear warm-up), bf16 autocast on CUDA, the best model on the
validation split kept; stop / resume / DDP as in the rank search.
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import dist
from .errors import ComcatError
from .evaluate import evaluate
from .loop import epoch_batches, loader, seed_step, should_stop as should_stop_all

ALIGN_BLOCKS = (0, 1, -2, -1)


class BlockTaps:
    """Forward hooks keeping the outputs of model.blocks[i] for i in `which`; take() returns them in order."""

    def __init__(self, model: nn.Module, which=ALIGN_BLOCKS):
        n = len(model.blocks)
        self.picked = sorted({i % n for i in which})
        self.outputs: dict[int, torch.Tensor] = {}
        self.hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: self.outputs.__setitem__(i, out))
                      for i in self.picked]

    def take(self) -> list[torch.Tensor]:
        out = [self.outputs[i] for i in self.picked]
        self.outputs.clear()
        return out

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def distill_loss(logits, teacher_logits, labels, feats, teacher_feats, align_weight: float) -> torch.Tensor:
    hard = 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits, teacher_logits.argmax(1))
    if align_weight == 0 or not feats:
        return hard
    align = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(feats, teacher_feats)) / len(feats)
    return hard + align_weight * align


def finetune(student: nn.Module, teacher: nn.Module, train_data, val_data, epochs: int = 2, lr: float = 2e-4,
             weight_decay: float = 0.05, batch_size: int = 64, align: tuple = ALIGN_BLOCKS,
             align_weight: float = 1.0, warmup: float = 0.05, seed: int = 0, device: str = "cpu",
             amp: bool = True, num_workers: int = 0, callback=None, should_stop=None,
             resume: dict | None = None, checkpoint=None) -> dict:
    """Fine-tune `student` (in place) against `teacher`; validation top-1 on `val_data` before
    training and after every epoch decides the best model. Returns {"model": best (eval mode),
    "best_top1", "history", "stopped", "steps", "total"}. callback / should_stop / checkpoint /
    resume behave as in search_ranks."""
    if len(train_data) == 0:
        raise ComcatError("the fine-tuning split is empty: give it a folder with images")
    student.to(device).train().requires_grad_(True)
    teacher = teacher.to(device).eval()            # run under no_grad below; its flags are left alone
    net = DistributedDataParallel(student) if dist.world() > 1 else student
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = len(epoch_batches(len(train_data), batch_size, 0, seed))
    if per_epoch == 0:
        raise ComcatError("the fine-tuning split has fewer images than processes: add images")
    total = epochs * per_epoch
    warm = max(1, int(warmup * total))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp and "cuda" in str(device) else nullcontext

    def validate() -> float:
        return evaluate(student, val_data, device=device, progress=False)["top1"]

    if resume:
        student.load_state_dict(resume["weights"])
        opt.load_state_dict(resume["opt"])
        step, history, best_top1 = resume["step"], list(resume["history"]), resume["best_top1"]
        best = resume["best"]
    else:
        step, history = 0, []
        best_top1, best = validate(), copy.deepcopy(student.state_dict())
        if callback:
            callback({"kind": "validate", "step": 0, "total": total, "top1": best_top1})

    def state():
        return {"step": step, "history": history, "weights": student.state_dict(), "opt": opt.state_dict(),
                "best_top1": best_top1, "best": best}

    def end_epoch(epoch: int) -> None:
        nonlocal best_top1, best
        top1 = validate()
        history.append({"kind": "validate", "epoch": epoch, "step": step, "top1": top1})
        if callback:
            callback({**history[-1], "total": total})
        if top1 >= best_top1:
            best_top1, best = top1, copy.deepcopy(student.state_dict())

    if resume and step % per_epoch == 0 and history and history[-1]["kind"] != "validate":
        end_epoch(step // per_epoch - 1)       # stopped on an epoch's last step: validate it now
    stopped = False
    taps, teacher_taps = BlockTaps(student, align), BlockTaps(teacher, align)
    try:
        for epoch in range(step // per_epoch, epochs):
            batches = epoch_batches(len(train_data), batch_size, epoch, seed)[step - epoch * per_epoch:]
            student.train()
            for x, y in loader(train_data, batches, num_workers):
                seed_step(seed, step)
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, total, lr, warm)
                w = align_weight * (1 - step / total)
                x, y = x.to(device), y.to(device)
                with autocast():
                    with torch.no_grad():
                        t_logits = teacher(x)
                    logits = net(x)
                    loss = distill_loss(logits, t_logits, y, taps.take(), teacher_taps.take(), w)
                if not torch.isfinite(loss):
                    raise ComcatError("the fine-tuning loss became NaN/inf: lower the learning rate (--lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                event = {"kind": "finetune", "epoch": epoch, "step": step, "total": total, "loss": loss.item(),
                         "lr": opt.param_groups[0]["lr"], "align_weight": w}
                history.append(event)
                if callback:
                    callback(event)
                if should_stop_all(should_stop):
                    stopped = True
                    break
            if not stopped:
                end_epoch(epoch)
            if checkpoint and (stopped or epoch < epochs - 1):
                checkpoint(state())
            if stopped:
                break
    finally:
        taps.remove()
        teacher_taps.remove()
    student.load_state_dict(best)
    return {"model": student.eval(), "best_top1": best_top1, "history": history, "stopped": stopped,
            "steps": step, "total": total}
