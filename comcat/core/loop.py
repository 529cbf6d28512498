"""What the training loops share: seeded (distributed) batch order, per-step seeds, a stop flag,
and RunControl, how a caller watches, stops and resumes a loop."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import dist


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """This process's batches of epoch `epoch`: a seeded permutation of range(n) split over the
    processes by DistributedSampler (same order on every run, so a resumed run repeats it)."""
    sampler = DistributedSampler(
        range(n), num_replicas=dist.world(), rank=dist.rank(), shuffle=True, seed=seed, drop_last=dist.world() > 1
    )
    sampler.set_epoch(epoch)
    idx = list(sampler)
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # equal batches: no tiny last step
    return batches


class SeededItems(Dataset):
    """ds[i] for a key (i, seed), with python's and torch's random generators seeded by `seed` first:
    the random augmentation of an image (timm's crops draw from python's `random`) then depends only
    on the key, in the main process or a worker, and after a resume."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        random.seed(seed)
        torch.manual_seed(seed)
        return self.ds[i]


def loader(ds: Dataset, batches: list[list[int]], num_workers: int = 0, seed: int = 0, first_step: int = 0):
    """The batches of ds in order; the n-th batch's image i is augmented under the seed
    (seed, first_step + n, i) (SeededItems), so a run and its resume see the same views."""
    keyed = [[(i, step_seed(seed, first_step + n) * 1_000_033 + i) for i in b] for n, b in enumerate(batches)]
    return DataLoader(SeededItems(ds), batch_sampler=keyed, num_workers=num_workers)


def train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """model.train() with its dropout and stochastic depth (timm's DropPath) left off: comcat trains
    a student to reproduce the dense model, and that noise (Swin's default drop path is 0.1) only
    blurs the target. Returns the model."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "DropPath":
            m.eval()
    return model


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step in this process: a function of (seed, step, process) only."""
    return (seed * 1_000_003 + step) * 64 + dist.rank()


def seed_step(seed: int, step: int) -> None:
    """Reseed torch before every step, so sampling noise depends only on (seed, step, process)."""
    torch.manual_seed(step_seed(seed, step))


class StopFlag:
    """A thread-safe stop request; `install_signal()` makes the first Ctrl-C a clean stop."""

    def __init__(self):
        self._event = threading.Event()

    def set(self, *_) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def __call__(self) -> bool:
        return self._event.is_set()

    def install_signal(self) -> None:
        def handler(signum, frame):
            if self():
                raise KeyboardInterrupt
            print("\nstopping after this step (Ctrl-C again to abort)", flush=True)
            self.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def should_stop(flag) -> bool:
    """Evaluate a stop callable and agree on it across processes."""
    return dist.any_true(bool(flag and flag()))


@dataclass
class RunControl:
    """How a long loop talks to its caller: `callback(event)` gets every step, `should_stop()` is
    asked after every step (agreed across processes), `checkpoint(state)` receives the resumable
    state after every epoch (or block) and at a stop, and `resume=state` continues from such a state
    to where an uninterrupted run would end."""

    callback: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint: Callable[[dict], None] | None = None
    resume: dict | None = None

    def emit(self, event: dict) -> None:
        if self.callback is not None:
            self.callback(event)

    def stopping(self) -> bool:
        return should_stop(self.should_stop)

    def save(self, state: dict) -> None:
        if self.checkpoint is not None:
            self.checkpoint(state)
