"""The one error type users see: a one-line message that names the value and what would work."""


class RenderError(ValueError):
    pass


class WorkerLost(RenderError):
    """A rank died or a collective failed (a peer lost, a timeout): the gang must be rebuilt."""
