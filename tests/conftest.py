"""Shared fixtures: the built-in tiny SDXL-shaped pipeline (random seeded weights, 256 px training size)."""

from __future__ import annotations

import pytest
import torch

# Import the heavy modules once, up front, so that import-time warnings are not mixed into
# the stderr that CLI tests capture.
import renderer.cli  # noqa: F401
import renderer.engine  # noqa: F401
from renderer.models import load_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def tiny_unet(tiny_pipeline):
    return tiny_pipeline.unet
