"""Block-wise distillation: each compressed block learns to reproduce its dense block's output.

For block i, on the student's own input tokens h_s (what its compressed blocks 0..i-1 produce) and
the dense block's output t_i = B_i(h_t) on the dense model's tokens h_t (a text encoder's padded
tokens run masked, as in the model, and count in no mean):

    min_theta  mean ||B_i^theta(h_s) - t_i||^2 / Var(t_i)  +  w_cls mean ||r(B_i^theta(h_s)) - r(t_i)||^2 / Var(r(t_i))

by AdamW with a cosine learning rate over `steps` batches of images; the blocks are trained one
after another, so each also learns to undo what the blocks before it still get wrong. Only one
block trains at a time, so a step costs about 1/depth of an end-to-end step, and the targets are
dense (every token of every block), which is what a few hundred images need; the second term
weighs what the head reads by w_cls more: r(t) = t[0], the class token, or for a model that
averages its tokens (a mean-pooled sentence encoder, Swin) the mean of its valid tokens. The tokens of the
training images are computed once per block and kept: 3 x n x N x C floats. `AugmentedViews` adds
seeded random-resized-crop / flip / mixup-cutmix views of the same images to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ComcatError, is_int, is_positive, require
from ..core.loop import RunControl, train_mode
from ..core.records import MAX_BATCH, MAX_SEED, MAX_STEPS, check_count
from . import families
from .calibrate import block_inputs, run_blocks


class AugmentedViews:
    """The (x, y) batches of `loader`, then `views` seeded augmented passes over them: per image a
    random resized crop (scale 0.35-1) and a flip, then mixup/cutmix of the batch (`mix`). The
    same seed gives the same views (a resumed run sees the images it started with)."""

    def __init__(self, loader, views: int = 2, seed: int = 0, mix: bool = True):
        self.loader, self.views, self.seed, self.mix = loader, views, seed, mix

    def __iter__(self):
        import torchvision.transforms.v2 as T

        from .distill import mix_views

        yield from self.loader
        for v in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + v + 1)
                for x, y in self.loader:
                    crop = T.Compose(
                        [T.RandomResizedCrop(x.shape[-2:], scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
                    )
                    x = torch.stack([crop(img) for img in x])
                    yield (mix_views(x)[0] if self.mix and len(x) > 1 else x), y


def token_mse(out: torch.Tensor, want: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """mean ||out - want||^2 / C over the tokens (B, N, C) that are `valid` ((B, N); None: all)."""
    se = (out - want).square().mean(-1)
    return se.mean() if valid is None else (se * valid).sum() / valid.sum().clamp_min(1)


def mean_pool(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, N, C) -> (B, C): the mean of the valid tokens ((B, N); None: all)."""
    if valid is None:
        return t.mean(1)
    w = valid.to(t.dtype)[..., None]
    return (t * w).sum(1) / w.sum(1).clamp_min(1)


def token_var(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Var of the entries of the valid tokens of t (B, N, C)."""
    return (t if valid is None else t[valid]).float().var().clamp_min(1e-12)


def _lr(step: int, total: int, lr: float) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * step / max(1, total)))


def trainable(block: nn.Module, scope: str) -> list[nn.Parameter]:
    """The parameters of a block that distillation trains: all of them, or (scope 'compressed')
    those of its factorized modules (the attention, and MLP linears that are low-rank)."""
    if scope == "all":
        return list(block.parameters())
    from .lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention

    mods = [m for m in block.modules() if isinstance(m, (HeadLowRankAttention, MatrixLowRankAttention, LowRankLinear))]
    params = {id(p): p for m in mods for p in m.parameters()}
    return list(params.values()) or list(block.parameters())


def read_tokens(model: nn.Module) -> list[int]:
    """The tokens the classifier reads: the class token (and a distilled DeiT's distillation token)
    when the model pools by token, none for an average-pooled model."""
    return families.read_tokens(model)


@dataclass
class DistillConfig:
    """Block distillation (module docstring): `steps` AdamW steps per block at `lr` (cosine), on
    batches of `batch_size` images' tokens drawn from `views` augmented passes (crop, flip, and mixup
    / cutmix with `mix`) of the images; the error of what the head reads (the class token, or the mean
    token of a model that averages) weighed `cls_weight` more; `scope` "all" trains every parameter
    of a block, "compressed" only its low-rank modules."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    views: int = 2
    cls_weight: float = 1.0
    mix: bool = True
    scope: str = "all"
    seed: int = 0

    def __post_init__(self):
        require(
            is_int(self.steps) and is_int(self.views) and is_int(self.batch_size, 1),
            "distillation steps and views must be >= 0 and its batch size >= 1",
        )
        require(is_positive(self.lr), f"the distillation learning rate must be a positive number, got {self.lr}")
        require(
            self.cls_weight == 0 or is_positive(self.cls_weight),
            f"the class-token weight must be a number >= 0, got {self.cls_weight}",
        )
        require(self.scope in ("all", "compressed"), f"scope must be 'all' or 'compressed', got {self.scope!r}")
        check_count(self.steps, "distillation steps", 0, MAX_STEPS)
        check_count(self.views, "distillation views", 0, 64)
        check_count(self.batch_size, "the distillation batch size", 1, MAX_BATCH)
        check_count(self.seed, "the seed", 0, MAX_SEED)


def distill_blocks(
    student: nn.Module,
    teacher: nn.Module,
    loader,
    cfg: DistillConfig,
    *,
    device: str = "cpu",
    control: RunControl | None = None,
) -> dict:
    """Train `student`'s blocks in place (module docstring) on the images of `loader` ((x, y)
    batches, eval transforms). Returns {"model" (eval mode), "stopped", "steps", "total", "history"}.
    `control` as in search_ranks, with a checkpoint after every block and at a stop."""
    control = control or RunControl()
    steps, resume = cfg.steps, control.resume
    if steps < 1:
        raise ComcatError("block distillation needs at least 1 step per block")
    student.to(device).eval()
    teacher.to(device).eval()
    s_blocks, t_blocks = families.blocks(student), families.blocks(teacher)
    reads = read_tokens(teacher)
    read = reads if cfg.cls_weight else []
    pool = 0.0 if reads else cfg.cls_weight  # a model that averages its tokens reads their mean
    depth, total = len(t_blocks), len(t_blocks) * steps
    h_t, valid = block_inputs(teacher, loader)
    if len(h_t) == 0:
        raise ComcatError("block distillation got no images: give it a folder with images")
    first, step, history = 0, 0, []
    if resume:
        student.load_state_dict(resume["weights"])
        first, step, history = resume["block"], resume["step"], list(resume["history"])
    h_s = run_blocks(s_blocks[:first], h_t, valid)
    h_t = run_blocks(t_blocks[:first], h_t, valid)
    stopped = False
    for i in range(first, depth):
        block = s_blocks[i]
        target = run_blocks([t_blocks[i]], h_t, valid)
        scale = token_var(target, valid)
        cls_scale = target[:, read].float().var().clamp_min(1e-12) if read else None
        pool_scale = mean_pool(target.float(), valid).var().clamp_min(1e-12) if pool else None
        opt = torch.optim.AdamW(trainable(block, cfg.scope), lr=cfg.lr, weight_decay=0.0)
        if resume and i == first and "opt" in resume:
            opt.load_state_dict(resume["opt"])
        train_mode(block).requires_grad_(True)
        for k in range(step - i * steps, steps):
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + i) * 100_003 + k)
            idx = torch.randint(len(h_s), (min(cfg.batch_size, len(h_s)),), generator=g).to(h_s.device)
            for group in opt.param_groups:
                group["lr"] = _lr(k, steps, cfg.lr)
            v = None if valid is None else valid[idx]
            out, want = families.run_block(block, h_s[idx], v).float(), target[idx].float()
            loss = token_mse(out, want, v) / scale
            if read:
                loss = loss + cfg.cls_weight * F.mse_loss(out[:, read], want[:, read]) / cls_scale
            if pool:
                loss = loss + pool * F.mse_loss(mean_pool(out, v), mean_pool(want, v)) / pool_scale
            if not torch.isfinite(loss):
                raise ComcatError("the block-distillation loss became NaN/inf: lower --distill-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            event = {"kind": "distill", "block": i, "blocks": depth, "step": step, "total": total, "loss": loss.item()}
            history.append(event)
            control.emit(event)
            if control.stopping():
                stopped = k + 1 < steps or i + 1 < depth
                break
        block.eval().requires_grad_(False)
        done = step == (i + 1) * steps
        if stopped or i + 1 < depth:
            control.save(
                {
                    "block": i + done,
                    "step": step,
                    "history": history,
                    "weights": student.state_dict(),
                    **({} if done else {"opt": opt.state_dict()}),
                }
            )
        if stopped:
            break
        h_s, h_t = run_blocks([block], h_s, valid), target
    student.requires_grad_(True)
    return {"model": student.eval(), "stopped": stopped, "steps": step, "total": total, "history": history}
