"""Shared fixtures: the built-in tiny SDXL-shaped pipeline (random seeded weights, 256 px training size)."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread by default: on this 2-core machine other processes often hold the CPU, and OpenMP
# worker threads that wait for a descheduled sibling make small ops 10-20x slower (test_attention: 70 s with
# 2 threads under load, 3 s with 1). FREESCALE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FREESCALE_TEST_THREADS", "1")))

# Import the heavy modules once, up front, so that import-time warnings are not mixed into
# the stderr that CLI tests capture.
import renderer.cli  # noqa: F401
import renderer.engine  # noqa: F401
from renderer.models import load_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline():
    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def tiny_unet(tiny_pipeline):
    return tiny_pipeline.unet


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of this test module's own: never a head that another test (or a user) started on this
    machine, which a plain `ray.init()` would join."""
    import logging

    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
