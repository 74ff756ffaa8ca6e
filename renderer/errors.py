"""The one error type users see: a one-line message that names the value and what would work."""


class RenderError(ValueError):
    pass


class WorkerLost(RenderError):
    """A rank died or a collective failed (a peer lost, a timeout): the gang must be rebuilt."""


def first_line(error: BaseException) -> str:
    """What a library's error says, in one line: its message's first line, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
