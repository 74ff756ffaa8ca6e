"""What FreeScale fixes, measured with the shipped toy model: at 4× its training size, direct inference
repeats the creature, FreeScale keeps fewer (ideally one)."""

from __future__ import annotations

import pytest

from freescale_core import FreeScaleConfig
from renderer import RenderRequest, render
from renderer.models import load_pipeline
from renderer.toy.metrics import count_subjects

pytest.importorskip("scipy")

SEED, STEPS, TRAIN = 1, 8, 256


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy")


def subjects(pipeline, stages, config) -> int:
    request = RenderRequest(prompt="an orange creature", seed=SEED, stages=stages, steps=STEPS, freescale=config)
    return count_subjects(render(request, pipeline=pipeline, progress=False, write=False).image, TRAIN).subjects


def test_freescale_at_4x_draws_fewer_subjects_than_direct_inference(toy):
    direct = subjects(toy, ((4 * TRAIN, 4 * TRAIN),), FreeScaleConfig(freeu=False))
    freescale = subjects(toy, ((TRAIN, TRAIN), (2 * TRAIN, 2 * TRAIN), (4 * TRAIN, 4 * TRAIN)), FreeScaleConfig())
    assert direct >= 3, f"direct inference should repeat the subject, got {direct}"
    assert freescale < direct, f"FreeScale {freescale} vs direct {direct}"
