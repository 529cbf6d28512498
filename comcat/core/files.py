"""Files that are never half-written: atomic writes, run folders (a lock per folder, claims,
cleanup) and saved states (nested tensors as safetensors + JSON)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ComcatError

LOCK_FILE = ".comcat.lock"  # held (flock) by the process writing a run's folder


def usual_mode(path: str | Path, folder: bool = False) -> None:
    """Give a mkstemp / mkdtemp file (0600) or folder (0700) the mode a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp) on a temp file in path's folder, then rename it to path: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clean_temp(out: Path) -> None:
    """Remove what a killed atomic write left in `out` and `out/state` (.NAME.*.tmp* files)."""
    for folder in (out, out / "state"):
        for p in folder.glob(".*.tmp*") if folder.is_dir() else ():
            if p.is_file():
                p.unlink(missing_ok=True)
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _lock(fd: int, out: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ComcatError(
            f"another comcat process is writing to {out}: wait for it to finish or choose another --out"
        ) from None


def _locking() -> bool:
    """Whether this process takes part in --out locks: on POSIX, and under torchrun rank 0 alone
    (it holds the lock for all ranks)."""
    return os.name == "posix" and os.environ.get("RANK", "0") == "0"


def check_unlocked(out: Path) -> None:
    """A one-line error when another process holds `out`'s lock (see out_lock)."""
    if not _locking() or not (out / LOCK_FILE).is_file():
        return
    fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    _lock(fd, out)
    os.close(fd)  # closing releases the probe's lock


@contextmanager
def out_lock(out: Path):
    """Hold an exclusive lock on the run folder `out` (flock on out/.comcat.lock) while writing it;
    a second writer gets a one-line error. The folder is made if needed, and removed again when
    it is left empty. Without flock, and on torchrun ranks other than 0, it does nothing."""
    if not _locking():
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _lock(fd, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def clear_run(out: Path, ours: tuple[str, ...]) -> None:
    """--overwrite: remove the files and folders of an earlier run in `out` that the names or glob
    patterns `ours` match (nothing else)."""
    for p in (p for pattern in ours for p in out.glob(pattern)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def claim_out(out: Path, ours: tuple[str, ...], what: str) -> None:
    """Refuse an --out that is a file, a non-empty folder holding none of the files `ours` (someone
    else's), or a place this process cannot write to; one line each."""
    if out.exists() and not out.is_dir():
        raise ComcatError(f"--out {out} is a file: choose a folder")
    check_unlocked(out)
    others = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if others and not any((out / name).is_file() for name in ours):
        raise ComcatError(f"{out} exists and is not a {what} folder: choose an empty or new --out")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ComcatError(f"cannot write to {out}: choose a folder you can write to")


def read_run_record(out: Path, name: str, fmt: str | tuple[str, ...], command: str) -> dict:
    """The JSON record `out/name` of a resumable run, checked to be of format `fmt` (or one of them)."""
    check_unlocked(out)
    try:
        record = json.loads((out / name).read_text())
    except FileNotFoundError:
        raise ComcatError(f"{out} has no {name}: --resume takes the --out folder of an earlier {command} run") from None
    except json.JSONDecodeError:
        raise ComcatError(f"{out / name} is corrupt: start the run again with a new --out") from None
    if record.get("format") not in ((fmt,) if isinstance(fmt, str) else fmt):
        raise ComcatError(f"{out / name} is not a comcat {command} run ({record.get('format')!r}): start a new run")
    return record


def _flatten(tree, prefix: str, tensors: dict):
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _unflatten(tree, tensors: dict):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def save_tree(path: str | Path, tree) -> None:
    """Save a nested dict/list of tensors and plain values (model + optimizer states) as
    PATH.json naming a fresh PATH.<id>.safetensors; the JSON, renamed into place last, is the commit
    point, so a crash at any moment leaves the previous state readable."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, "", tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        usual_mode(tmp)
        atomic_write_text(path.with_suffix(".json"), json.dumps({"tensors": Path(tmp).name, "tree": skeleton}))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in path.parent.glob(f"{path.name}.*.safetensors"):
        if old.name != Path(tmp).name:
            old.unlink(missing_ok=True)


def load_tree(path: str | Path):
    """Inverse of save_tree; None when PATH.json is absent."""
    path = Path(path)
    if not path.with_suffix(".json").is_file():
        return None
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        tree = _unflatten(meta["tree"], load_file(str(path.parent / meta["tensors"])))
    except Exception as e:
        raise ComcatError(
            f"the saved run state {path}.json is unreadable ({type(e).__name__}): start the run again without --resume"
        ) from None
    for old in path.parent.glob(f"{path.name}.*.safetensors"):  # a killed save's orphans
        if old.name != meta["tensors"]:
            old.unlink(missing_ok=True)
    return tree
