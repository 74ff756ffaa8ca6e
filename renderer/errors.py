"""The one error type users see: a one-line message that names the value and what would work."""


class RenderError(ValueError):
    pass
