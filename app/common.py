"""What every tab shares: the app's private temp folder, upload checks, readable errors."""
from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from comcat.errors import ComcatError

WORK = Path(tempfile.mkdtemp(prefix="comcat-app-"))     # uploads and outputs live here only
MAX_UPLOAD_MB = 1024


def workdir(kind: str) -> Path:
    """A fresh folder under the app's temp folder, e.g. workdir('explore')."""
    d = WORK / kind / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    return d


def take_upload(path: str | None, suffixes: tuple[str, ...], what: str, max_mb: float = MAX_UPLOAD_MB) -> Path:
    """Copy an uploaded file into the app's temp folder after checking its type and size."""
    if not path:
        raise ComcatError(f"upload a {what} first")
    src = Path(path)
    if src.suffix.lower() not in suffixes:
        raise ComcatError(f"{src.name} is not a {what}: expected one of {', '.join(suffixes)}")
    size = src.stat().st_size / 2**20
    if size > max_mb:
        raise ComcatError(f"{src.name} is {size:.0f} MB, over the {max_mb:.0f} MB limit of the app")
    dst = workdir("uploads") / src.name
    shutil.copyfile(src, dst)
    return dst


def message(e: BaseException) -> str:
    """One readable line for the page: the library's own message, else the exception's first line."""
    if isinstance(e, ComcatError):
        return f"⚠️ {e}"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"⚠️ {type(e).__name__}: {first}" if first else f"⚠️ {type(e).__name__}"
