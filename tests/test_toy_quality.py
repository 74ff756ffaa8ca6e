"""What FreeScale fixes, measured with the shipped toy model: at 4× its training size, direct inference
repeats the creature; FreeScale, with the toy's recommended restart (`make demo`), keeps one, with its two eyes."""

from __future__ import annotations

import pytest

from freescale_core import FreeScaleConfig
from renderer import RenderRequest, render
from renderer.models import load_pipeline, recommended_restart_fraction
from renderer.toy.metrics import SubjectCount, count_subjects

pytest.importorskip("scipy")

STEPS, TRAIN = 8, 256
TOY_SETTINGS = FreeScaleConfig(restart_fraction=recommended_restart_fraction("toy"))  # the CLI's default for the toy: 0.8
CASCADE_4X = ((TRAIN, TRAIN), (2 * TRAIN, 2 * TRAIN), (4 * TRAIN, 4 * TRAIN))


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy")


def counted(pipeline, seed: int, prompt: str, stages, config) -> SubjectCount:
    request = RenderRequest(prompt=prompt, seed=seed, stages=stages, steps=STEPS, freescale=config)
    return count_subjects(render(request, pipeline=pipeline, progress=False, write=False).image, TRAIN)


def test_direct_inference_at_4x_repeats_the_creature(toy):
    direct = counted(toy, 1, "an orange creature", ((4 * TRAIN, 4 * TRAIN),), FreeScaleConfig(freeu=False))
    assert direct.subjects >= 3, f"direct inference should repeat the subject, got {direct}"


def test_freescale_at_4x_keeps_one_creature_with_two_eyes(toy):
    # At these 8 steps, with the toy's settings, FreeScale kept one creature in 11 of seeds 0–11 and both eyes
    # in 7 of them, 7 and 8 among them (at 30 steps: 15 of 16 and 9 of 16, docs/benchmarks.md); seed 7 is the
    # demo's. Each must stay one creature of the prompt's colour with its two eyes.
    prompts = {7: "an orange creature", 8: "a yellow creature"}
    found = [counted(toy, seed, prompt, CASCADE_4X, TOY_SETTINGS) for seed, prompt in prompts.items()]
    assert [c.subjects for c in found] == [1, 1], found
    assert [c.colour for c in found] == ["orange", "yellow"], found
    assert [c.eyes for c in found] == [(2,), (2,)], found
