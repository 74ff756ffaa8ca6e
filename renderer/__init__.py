"""Poster-scale rendering with FreeScale: requests, the cascade, outputs and the CLI.

The names below load lazily, so that light modules (the TIFF writer, `inspect`) do not import torch.
"""

import os
from importlib import import_module

# transformers warns at import about optional image processors this project never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_EXPORTS = {
    "RenderError": "renderer.errors", "RenderRequest": "renderer.plan.request",
    "RenderResult": "renderer.engine", "render": "renderer.engine",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'renderer' has no attribute {name!r}")
