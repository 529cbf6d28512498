"""End-to-end distillation fine-tuning of a compressed ViT from its dense teacher.

Teacher and student see the same view x~ of every image: a random-resized crop and flip (the
training transforms), then mixup or cutmix of the batch ("function matching"):

loss = KL(softmax(z_t(x~)) || softmax(z_s(x~)))                           (the teacher's full predictions)
     + w_t * mean_b MSE(h_s^b, h_t^b) / Var(h_t^b),  b in {0, 1, -2, -1}   (block outputs, w_t decays to 0)
     [+ lam CE(z_s, y) + (1 - lam) CE(z_s, y[perm])   only with labels of the model's classes]

For a model without a classifier the first term matches the pooled embeddings e instead (match_loss):
1 - cos(e_s, e_t) + MSE(e_s, e_t) / Var(e_t), averaged over the batch, + w_sim MSE(S_s, S_t) with
S = ê ê^T the batch's cosine-similarity matrix (what retrieval ranks by).

AdamW with a cosine learning rate (linear warm-up); bf16 autocast on CUDA and on CPUs with bf16
units; after every epoch the model is scored on the validation split (held out from training) by
its KL divergence to the dense model, and the best one is kept. Stop / resume / DDP as in the rank
search.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core import dist
from ..core.errors import ComcatError, is_int, is_positive, require
from ..core.loop import RunControl, epoch_batches, loader, seed_step, train_mode
from ..core.records import MAX_BATCH, MAX_EPOCHS, MAX_SEED, check_count
from . import families
from .evaluate import distance, predict, scores
from .models import has_classifier

ALIGN_BLOCKS = (0, 1, -2, -1)


class BlockTaps:
    """Forward hooks keeping the outputs of the model's blocks i for i in `which`; take() returns them in order."""

    def __init__(self, model: nn.Module, which=ALIGN_BLOCKS):
        blocks = families.blocks(model)
        self.picked = sorted({i % len(blocks) for i in which})
        self.outputs: dict[int, torch.Tensor] = {}
        self.hooks = [
            blocks[i].register_forward_hook(lambda m, a, out, i=i: self.outputs.__setitem__(i, out))
            for i in self.picked
        ]

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


def mix_views(x: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Mixup (half the batches) or cutmix of a batch x (B, 3, H, W) with a permutation of itself,
    lam ~ Beta(alpha, alpha) from torch's seeded generator: returns (mixed x, lam, perm), lam = the
    share of each image's own pixels. The teacher and the student are both given the mixed x."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(len(x)).to(x.device)
    if torch.rand(()) < 0.5:
        return lam * x + (1 - lam) * x[perm], lam, perm
    H, W = x.shape[-2:]
    h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(n, ())) for n in (H, W))
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (H * W), perm


def match_loss(
    out: torch.Tensor, teacher_out: torch.Tensor, embeddings: bool = False, similarity: float = 0.0
) -> torch.Tensor:
    """How far the student's outputs (B, K) are from the teacher's: KL(softmax(z_t) || softmax(z_s))
    for logits; for embeddings 1 - cos(e_s, e_t) + MSE(e_s, e_t) / Var(e_t), batch means, plus
    `similarity` x MSE of the batch's cosine-similarity matrices."""
    out, teacher_out = out.float(), teacher_out.float()
    if embeddings:
        cos = F.cosine_similarity(out, teacher_out, dim=-1).mean()
        loss = 1 - cos + F.mse_loss(out, teacher_out) / teacher_out.var().clamp_min(1e-12)
        if similarity:
            s, t = F.normalize(out, dim=-1), F.normalize(teacher_out, dim=-1)
            loss = loss + similarity * F.mse_loss(s @ s.T, t @ t.T)
        return loss
    return F.kl_div(out.log_softmax(-1), teacher_out.log_softmax(-1), log_target=True, reduction="batchmean")


def distill_loss(
    logits,
    teacher_logits,
    feats,
    teacher_feats,
    align_weight: float,
    labels=None,
    lam: float = 1.0,
    perm=None,
    embeddings: bool = False,
    similarity: float = 0.0,
) -> torch.Tensor:
    """match_loss to the teacher + decaying block alignment [+ mixed cross-entropy with labels]."""
    loss = match_loss(logits, teacher_logits, embeddings, similarity)
    if labels is not None:
        other = labels if perm is None else labels[perm]
        loss = loss + lam * F.cross_entropy(logits.float(), labels) + (1 - lam) * F.cross_entropy(logits.float(), other)
    if align_weight and feats:
        loss = loss + align_weight * sum(
            F.mse_loss(s.float(), t.float()) / t.float().var().clamp_min(1e-12) for s, t in zip(feats, teacher_feats)
        ) / len(feats)
    return loss


def bf16_autocast(device: str):
    """bf16 autocast where the hardware has bf16 units (CUDA; CPUs with AVX512-BF16 or AMX), else none:
    on other CPUs bf16 is emulated and several times slower than fp32."""
    if "cuda" in str(device):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext


def validation_scores(model: nn.Module, data, reference: torch.Tensor, device: str) -> dict:
    """Fidelity to the dense model (and top-1 when labeled) on the validation split (scores())."""
    logits, labels = predict(model, data, device=device, progress=False)
    return scores(logits, labels, reference, embeddings=not has_classifier(model))


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (module docstring): `epochs` of AdamW at `lr` (cosine, `warmup` of
    the steps linear), the block-output alignment weighted `align_weight` (decaying to 0) at blocks
    `align`, mixup / cutmix views with `mix`, the images' labels with `labels`, bf16 with `amp`;
    for embeddings the similarity-matrix term weighted `similarity`."""

    epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.05
    batch_size: int = 64
    align: tuple = ALIGN_BLOCKS
    align_weight: float = 1.0
    warmup: float = 0.05
    labels: bool = False
    mix: bool = True
    amp: bool = True
    seed: int = 0
    similarity: float = 0.0

    def __post_init__(self):
        self.align = tuple(self.align)
        require(is_int(self.epochs, 1) and is_int(self.batch_size, 1), "fine-tuning epochs and batch size must be >= 1")
        require(is_positive(self.lr), f"the fine-tuning learning rate must be a positive number, got {self.lr}")
        require(
            self.weight_decay >= 0 and self.align_weight >= 0 and self.similarity >= 0 and 0 <= self.warmup < 1,
            "weight decay, align and similarity weights must be >= 0 and warmup in [0, 1)",
        )
        check_count(self.epochs, "fine-tuning epochs", 1, MAX_EPOCHS)
        check_count(self.batch_size, "the batch size", 1, MAX_BATCH)
        check_count(self.seed, "the seed", 0, MAX_SEED)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train_data,
    val_data,
    cfg: FinetuneConfig,
    *,
    device: str = "cpu",
    num_workers: int = 0,
    control: RunControl | None = None,
) -> dict:
    """Fine-tune `student` (in place) against `teacher` (module docstring) on `train_data`. Its KL
    to the teacher on `val_data` before training and after every epoch decides the best model.
    Returns {"model": best (eval mode), "best": its validation scores, "history", "stopped", "steps",
    "total"}. `control` as in search_ranks (a checkpoint after every epoch and at a stop)."""
    control = control or RunControl()
    if len(train_data) == 0 or len(val_data) == 0:
        raise ComcatError("fine-tuning needs training and validation images: give it a folder with images")
    # setup: the student in training, its optimizer, the teacher's validation logits
    train_mode(student.to(device)).requires_grad_(True)
    teacher = teacher.to(device).eval()  # run under no_grad below; its flags are left alone
    net = DistributedDataParallel(student) if dist.world() > 1 else student
    embeddings = not has_classifier(teacher)  # match pooled embeddings, not predictions
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(epoch_batches(len(train_data), cfg.batch_size, 0, cfg.seed))
    if per_epoch == 0:
        raise ComcatError("the fine-tuning split has fewer images than processes: add images")
    total = cfg.epochs * per_epoch
    warm = max(1, int(cfg.warmup * total))
    autocast = bf16_autocast(device) if cfg.amp else nullcontext
    reference = predict(teacher, val_data, device=device, progress=False)[0]
    best = BestModel(student, val_data, reference, device)
    if control.resume:
        student.load_state_dict(control.resume["weights"])
        opt.load_state_dict(control.resume["opt"])
        step, history = control.resume["step"], list(control.resume["history"])
        best.scores, best.weights = control.resume["best_scores"], control.resume["best"]
    else:
        step, history = 0, []
        best.scores, best.weights = best.validate(), copy.deepcopy(student.state_dict())
        control.emit({"kind": "validate", "step": 0, "total": total, **best.scores})
    if control.resume and step % per_epoch == 0 and history and history[-1]["kind"] != "validate":
        best.end_epoch(step // per_epoch - 1, step, total, history, control)  # stopped on an epoch's last step

    # loop: epochs of distillation steps, each epoch ending with a validation
    stopped = False
    taps, teacher_taps = BlockTaps(student, cfg.align), BlockTaps(teacher, cfg.align)
    try:
        for epoch in range(step // per_epoch, cfg.epochs):
            batches = epoch_batches(len(train_data), cfg.batch_size, epoch, cfg.seed)[step - epoch * per_epoch :]
            train_mode(student)
            for x, y in loader(train_data, batches, num_workers, cfg.seed, step):
                seed_step(cfg.seed, step)
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, total, cfg.lr, warm)
                w = cfg.align_weight * (1 - step / total)
                x, y = x.to(device), torch.as_tensor(y).to(device)
                x, lam, perm = mix_views(x) if cfg.mix else (x, 1.0, None)
                with autocast():
                    with torch.no_grad():
                        t_logits = teacher(x)
                    logits = net(x)
                    labels = y if cfg.labels and not embeddings else None
                    feats, t_feats = taps.take(), teacher_taps.take()
                    loss = distill_loss(
                        logits, t_logits, feats, t_feats, w, labels, lam, perm, embeddings, cfg.similarity
                    )
                if not torch.isfinite(loss):
                    raise ComcatError("the fine-tuning loss became NaN/inf: lower the learning rate (--lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                event = {
                    "kind": "finetune",
                    "epoch": epoch,
                    "step": step,
                    "total": total,
                    "loss": loss.item(),
                    "lr": opt.param_groups[0]["lr"],
                    "align_weight": w,
                }
                history.append(event)
                control.emit(event)
                if control.stopping():
                    stopped = True
                    break
            if not stopped:
                best.end_epoch(epoch, step, total, history, control)
            if stopped or epoch < cfg.epochs - 1:
                control.save(
                    {
                        "step": step,
                        "history": history,
                        "weights": student.state_dict(),
                        "opt": opt.state_dict(),
                        "best_scores": best.scores,
                        "best": best.weights,
                    }
                )
            if stopped:
                break
    finally:
        taps.remove()
        teacher_taps.remove()

    # finish: the best model by validation KL
    student.load_state_dict(best.weights)
    return {
        "model": student.eval(),
        "best": best.scores,
        "history": history,
        "stopped": stopped,
        "steps": step,
        "total": total,
    }


class BestModel:
    """The student's best weights so far by its KL to the teacher on the validation split."""

    def __init__(self, student: nn.Module, val_data, reference: torch.Tensor, device: str):
        self.student, self.val_data, self.reference, self.device = student, val_data, reference, device
        self.scores: dict = {}
        self.weights: dict = {}

    def validate(self) -> dict:
        return validation_scores(self.student, self.val_data, self.reference, self.device)

    def end_epoch(self, epoch: int, step: int, total: int, history: list, control: RunControl) -> None:
        """Validate after an epoch; keep the weights when the KL is not worse than the best."""
        now = self.validate()
        history.append({"kind": "validate", "epoch": epoch, "step": step, **now})
        control.emit({**history[-1], "total": total})
        if distance(now) <= distance(self.scores):
            self.scores, self.weights = now, copy.deepcopy(self.student.state_dict())
