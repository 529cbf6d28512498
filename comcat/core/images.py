"""Image files shared by both sides: listing a folder (bounded walk) and reading RGB."""

from __future__ import annotations

from pathlib import Path

from .errors import ComcatError

NO_LABEL = -1  # the label of an image without one


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_rgb(path: str):
    """PIL loader that turns an unreadable or oversized image into a one-line ComcatError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ComcatError(f"cannot read image {path} ({type(e).__name__}): remove or replace it") from None


MAX_ENTRIES = 500_000  # files and folders a data folder may hold (a walk stops there)


MAX_WALK_S = 60.0  # and the time listing it may take (a slow or network file system)


def _images(folder: Path) -> list[Path]:
    """The image files under `folder`, hidden names skipped; symlinked folders are not entered (no
    loops), and a walk over more than MAX_ENTRIES entries is refused."""
    import os
    import time

    found, seen, deadline = [], 0, time.monotonic() + MAX_WALK_S
    for top, dirs, files in os.walk(folder, followlinks=False):
        if time.monotonic() > deadline:
            raise ComcatError(
                f"listing the data folder {folder.name!r} took over {MAX_WALK_S:.0f} s: point it at a "
                "smaller folder of images"
            )
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        seen += len(dirs) + len(files)
        if seen > MAX_ENTRIES:
            raise ComcatError(
                f"the data folder {folder.name!r} holds more than {MAX_ENTRIES:,} files and folders: "
                "point it at a folder of images"
            )
        found += [
            Path(top) / f
            for f in files
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES and (Path(top) / f).is_file()
        ]
    return sorted(found)


def scan(root: str | Path) -> tuple[list[Path], list[int], list[str] | None]:
    """(files, class index per file, class names) of DIR/<class>/... (sorted class names, as
    torchvision's ImageFolder), or (files, [-1, ...], None) of a flat folder of images."""
    root = Path(root)
    if not root.is_dir():
        raise ComcatError(
            f"data folder {root} does not exist: give a folder of images (DIR/<image> or DIR/<class>/<image>)"
        )
    here = root.resolve()
    per_class = {
        d.name: _images(d)
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and not here.is_relative_to(d.resolve())
    }  # no link back up (a loop)
    classes = sorted(c for c, found in per_class.items() if found)
    if classes:
        files, labels = [], []
        for i, c in enumerate(classes):
            files += per_class[c]
            labels += [i] * len(per_class[c])
        return files, labels, classes
    files = _images(root)
    if not files:
        raise ComcatError(
            f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}): give a folder of images "
            "(DIR/<image> or DIR/<class>/<image>)"
        )
    return files, [NO_LABEL] * len(files), None
