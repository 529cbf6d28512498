"""Data-parallel helpers: the same code runs alone or under `torchrun --nproc_per_node N`."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); no-op when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check_device(requested: str | None) -> None:
    """A one-line ComcatError unless `requested` is auto, cpu, cuda[:N] with that GPU here, or mps."""
    from .errors import ComcatError

    if requested in (None, "auto", "cpu"):
        return
    try:
        d = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ComcatError(f"--device {requested!r} is not a device: use auto, cpu or cuda") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ComcatError(f"--device {requested}: no such CUDA GPU here: use --device cpu (or auto)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ComcatError("--device mps: no Apple GPU here: use --device cpu (or auto)")
    if d.type not in ("cuda", "mps"):
        raise ComcatError(f"--device {requested!r} is not supported: use auto, cpu or cuda")


def device(requested: str | None = None) -> str:
    """'cuda' (this process's GPU) when available, else 'cpu'; an explicit request wins."""
    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if dist.is_initialized() else "cuda"
    return "cpu"


def average_grads(params) -> None:
    """Mean of the gradients over processes (for parameters DDP does not own, e.g. rank logits)."""
    if world() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world()


def any_true(flag: bool) -> bool:
    """True on every process when it is true on any (a stop pressed on one stops all)."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
