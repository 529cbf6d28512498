class ComcatError(Exception):
    """A user-facing failure: the message is one line that says what to do."""


def require(ok: bool, message: str) -> None:
    """Raise ComcatError(message) unless `ok` (the configs' validation)."""
    if not ok:
        raise ComcatError(message)


def is_int(x, low: int = 0) -> bool:
    """An integer >= low (JSON true / false are not)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def is_positive(x) -> bool:
    """A finite number > 0."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
