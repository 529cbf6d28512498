"""Compressed-model directories: model.safetensors + comcat.json, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from .compress import compress
from .cost import count_params, counted_flops
from .errors import ComcatError
from .models import COMPRESSED_META, COMPRESSED_WEIGHTS, Loaded, build_arch, load_state, read_meta
from .ranks import RankConfig

FORMAT = "comcat-compressed/1"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temp file in the same folder and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_compressed(loaded: Loaded, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `loaded.model` (compressed, with .comcat_ranks) to out_dir; replaces an existing one."""
    model, ranks = loaded.model, getattr(loaded.model, "comcat_ranks", None)
    if ranks is None:
        raise ComcatError("only compressed models can be saved as a comcat directory: run compress first")
    out = Path(out_dir)
    if out.exists() and not (out / COMPRESSED_META).is_file() and any(out.iterdir()):
        raise ComcatError(f"{out} exists and is not a comcat model directory: choose an empty or new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT, "arch": loaded.arch, "arch_kwargs": loaded.arch_kwargs, "source": loaded.source,
        "method": ranks.method, "ranks": ranks.to_dict(), "params": count_params(model),
        "flops": counted_flops(model),
        "pretrained_cfg": {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items()
                           if isinstance(v, (str, int, float, bool, list, tuple, type(None)))},
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / COMPRESSED_WEIGHTS), metadata={"format": FORMAT})
        (tmp / COMPRESSED_META).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_compressed(directory: str | Path) -> Loaded:
    """Rebuild a compressed model from its directory alone (no original checkpoint needed)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("format") != FORMAT:
        raise ComcatError(f"{directory} has format {meta.get('format')!r}, expected {FORMAT!r}: re-export it")
    model = build_arch(meta["arch"], **meta.get("arch_kwargs", {}))
    if meta.get("pretrained_cfg"):
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **meta["pretrained_cfg"]}
    compress(model, RankConfig.from_dict(meta["ranks"]), inplace=True)
    weights = directory / COMPRESSED_WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ComcatError(f"could not read {weights} ({type(e).__name__}): re-export the compressed model") from None
    load_state(model, state, f"{weights} does not match comcat.json", "re-export the compressed model")
    return Loaded(model.eval(), meta["arch"], meta.get("arch_kwargs", {}), str(directory), meta)
