"""Files that are never half-written: atomic writes, run folders (a lock per folder, claims,
cleanup) and saved states (nested tensors as safetensors + JSON)."""

from __future__ import annotations

import json
import os
import shutil
import stat
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


SPECIAL_ROOTS = ("/proc", "/sys", "/dev")  # kernel filesystems: never a place for a run's folder


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp) on a temp file in path's folder, then rename it to path: never half-written.
    A symlink is followed. A character device or named pipe (/dev/stdout, a FIFO) is written into
    in place, as a shell redirection would; a folder or any other special file is refused."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # what the path (or the symlink's target) is
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            return _write_in_place(path, write)
        raise ComcatError(f"{path} is {'a folder' if stat.S_ISDIR(mode) else 'not a regular file'}: give a file name")
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
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


def _write_in_place(path: Path, write) -> Path:
    """write() to a temp file, then its bytes copied into the device or pipe `path` (never replaced)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / ("out" + path.suffix)
        write(str(tmp))
        try:
            with open(path, "wb") as dst, open(tmp, "rb") as src:
                shutil.copyfileobj(src, dst)
        except OSError as e:
            raise ComcatError(f"could not write to {path} ({e.strerror}): give another file") from None
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


def check_out_place(out: Path, inputs: tuple = (), data: str | None = None) -> None:
    """Refuse an --out that is a file, lies in a kernel filesystem (/proc, /sys, /dev), is one of
    the run's `inputs` (the model, the pipeline) or is, or lies inside, its `data` folder; one line
    each, before any work."""
    if out.exists() and not out.is_dir():
        raise ComcatError(f"--out {out} is a file: choose a folder")
    real = Path(os.path.realpath(out))
    within = lambda root: real == Path(root) or Path(root) in real.parents  # noqa: E731
    if any(within(r) for r in SPECIAL_ROOTS) and not within("/dev/shm"):  # shm: a memory filesystem, allowed
        raise ComcatError(f"--out {out} is in a kernel filesystem ({real}): choose a folder on a disk")
    for given in (*inputs, data):
        if not given or not Path(given).exists():
            continue
        src = Path(os.path.realpath(given))
        if real == src or (given == data and src in real.parents):
            raise ComcatError(f"--out {out} is your input {given}: choose a new folder for the output")


def check_file_out(path: Path, suffix: str, flag: str, source: str | None, overwrite: bool) -> None:
    """Refuse an output FILE (`flag`) whose folder check_out_place refuses, without `suffix`, that is
    a folder, the input `source` itself, or a file that exists (unless `overwrite`); one line each."""
    check_out_place(path.parent, (), None)
    if path.suffix != suffix:
        raise ComcatError(f"{flag} {path}: give a file name ending in {suffix}")
    if path.is_dir():
        raise ComcatError(f"{flag} {path} is a folder: give a file name ending in {suffix}")
    if source and Path(source).exists() and path.resolve() == Path(source).resolve():
        raise ComcatError(f"{flag} {path} is your input: choose a new file")
    if path.exists() and not overwrite:
        raise ComcatError(f"{path} exists: replace it with --overwrite, or choose another file")


def claim_out(out: Path, markers: tuple[str, ...], what: str, inputs: tuple = (), data: str | None = None) -> None:
    """Refuse an --out that check_out_place refuses, a non-empty folder holding none of the run
    markers `markers` (someone else's files: nothing in it is ever replaced, --overwrite or not),
    or a place this process cannot write to; one line each."""
    check_out_place(out, inputs, data)
    check_unlocked(out)
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if present and not any((out / name).is_file() for name in markers):
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ComcatError(f"{out} exists and is not a {what} folder (it holds {shown}): choose an empty or new --out")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ComcatError(f"cannot write to {out}: choose a folder you can write to")


def read_run_record(out: Path, name: str, fmt: str | tuple[str, ...], command: str) -> dict:
    """The JSON record `out/name` of a resumable run, checked to be of format `fmt` (or one of them)."""
    from .records import read_json

    check_unlocked(out)
    if not (out / name).exists():
        raise ComcatError(f"{out} has no {name}: --resume takes the --out folder of an earlier {command} run")
    record = read_json(out / name, f"a comcat {command} record", "start the run again with a new --out")
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
