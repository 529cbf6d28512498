"""One reader for every JSON file comcat reads (comcat.json, job.json, rank files, text data) and the
bounds of every count a file or a flag gives: each failure is one line naming the file and the fix,
raised before anything is allocated from what the file says."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ComcatError

MAX_JSON_BYTES = 16 * 2**20  # a record or rank file larger than this is not one of ours
MAX_SEED = 2**32 - 1  # what every generator comcat seeds (torch, numpy, python) takes
MAX_STEPS = 1_000_000  # training steps of one phase
MAX_EPOCHS = 10_000
MAX_GENERATED_IMAGES = 50_000  # embedded shapes generated up front (about 0.6 GB as float32)
MAX_IMAGES = 10_000_000  # images a folder run may use
MAX_BATCH = 4096  # images or sentences per step
MAX_LINE_CHARS = 10_000  # one sentence or caption; a text encoder reads at most a few hundred tokens
MAX_TEXT_BYTES = 256 * 2**20  # a text data file
MAX_CAPTION_BYTES = 64 * 2**10


def read_json(path: str | Path, what: str, fix: str, kind: type = dict):
    """The JSON value of `path`, of type `kind`, checked for size, encoding, syntax and depth; one
    line naming `what` the file should be and `fix` on any failure."""
    path = Path(path)
    if path.is_dir():
        raise ComcatError(f"{path} is a folder, not {what}: {fix}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ComcatError(f"{path} does not exist: {fix}") from None
    if size > MAX_JSON_BYTES:
        raise ComcatError(f"{path} is {size / 2**20:.0f} MB, too large for {what}: {fix}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ComcatError(f"{path} is not UTF-8 text, so not {what}: {fix}") from None
    except OSError as e:
        raise ComcatError(f"{path} cannot be read ({e.strerror}): {fix}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ComcatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): {fix}") from None
    except (RecursionError, ValueError) as e:  # nested too deep; an integer of thousands of digits
        why = "nested too deeply" if isinstance(e, RecursionError) else "a number too long"
        raise ComcatError(f"{path} is not {what} ({why}): {fix}") from None
    if not isinstance(value, kind):
        raise ComcatError(f"{path} holds a JSON {type(value).__name__}, not {what}: {fix}")
    return value


def check_count(value, name: str, low: int, high: int) -> None:
    """`value` is an integer in [low, high] (not a bool); one line naming the flag and the bounds."""
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        huge = isinstance(value, int) and abs(value) >= 10**12
        shown = f"a number of {len(f'{abs(value):x}') * 4} bits" if huge else repr(value)
        raise ComcatError(f"{name} must be an integer in {low:,}..{high:,}, got {shown}")


def build(cls, d: dict, what: str, fix: str):
    """cls(**d) for a dataclass read from a file: unknown keys and wrong types are one line."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise ComcatError(f"{what} is a JSON {type(d).__name__}, not an object: {fix}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ComcatError(f"{what} has unknown settings ({', '.join(sorted(unknown)[:3])}): {fix}")
    try:
        return cls(**d)
    except ComcatError as e:
        raise ComcatError(f"{what}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ComcatError(f"{what} has invalid settings ({type(e).__name__}): {fix}") from None
