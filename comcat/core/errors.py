class ComcatError(Exception):
    """A user-facing failure: the message is one line that says what to do."""
