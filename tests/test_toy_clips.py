"""The procedural clips `toy-video` learns from, and the clip measures of the quality benchmark, against what was drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from renderer.models import load_pipeline
from renderer.output.clip_files import frames_of
from renderer.toy.clips import BLINK, MAX_STEP, draw_clips
from renderer.toy.metrics import ANALYSIS_TRAIN_PX, background_flicker, count_subjects
from renderer.toy.scenes import SCENE_SIZE, draw_scenes
from renderer.toy.train_motion import draw_clip_dataset, main

SIZE = SCENE_SIZE


@pytest.fixture(scope="module")
def clips():
    return draw_clips(11, 12)


def test_a_creature_moves_at_most_max_step_and_stays_inside(clips):
    moved = 0
    for clip in clips:
        assert clip.frames.shape == (16, SIZE, SIZE, 3)
        steps = np.hypot(*np.diff(clip.centres, axis=0).T)
        assert steps.max() <= MAX_STEP * SIZE + 1e-9
        moved += steps.max() > 0.25 * MAX_STEP * SIZE
        count = count_subjects(clip.frames[0], SIZE)
        radius = np.sqrt(count.largest_share * SIZE * SIZE / np.pi)
        assert (clip.centres.min() >= 0.8 * radius) and (clip.centres.max() <= SIZE - 0.8 * radius)
    assert moved == len(clips)  # every clip moves: a still clip would teach no motion


def test_the_measured_centre_follows_the_drawn_one(clips):
    """The metrics' centroid, at 128 analysis pixels a side, within one analysis pixel of the drawn centre."""
    for clip in clips:
        for frame, centre in zip(clip.frames, clip.centres):
            count = count_subjects(frame, SIZE)
            assert count.subjects == 1 and count.colour == clip.colour
            assert np.abs(np.array(count.centre) - centre / SIZE).max() <= 1 / ANALYSIS_TRAIN_PX


def test_only_the_creature_changes_between_frames(clips):
    """The background is still: its flicker is exactly zero; a frame made lighter shows as that many levels."""
    for clip in clips:
        counts = [count_subjects(frame, SIZE) for frame in clip.frames]
        assert background_flicker(clip.frames, counts) == 0.0
    noisy = clips[0].frames.copy()
    noisy[1::2] = np.clip(noisy[1::2].astype(int) + 4, 0, 255).astype(np.uint8)  # every other frame 4 levels lighter
    counts = [count_subjects(frame, SIZE) for frame in noisy]
    assert background_flicker(noisy, counts) == pytest.approx(4.0, abs=0.05)
    blinking = [clip for clip in clips if clip.eyes_open.min() < 1]
    assert blinking and all(count_subjects(clip.frames[clip.eyes_open.argmin()], SIZE).subjects == 1 for clip in blinking)
    assert all(sorted(set(clip.eyes_open)) in ([1.0], sorted(set(BLINK) | {1.0})) for clip in clips)


def test_scenes_are_drawn_as_before_the_clips_shared_their_code():
    """draw_scene kept its random draws in order: the same first pixels and captions as before the refactor."""
    scenes = draw_scenes(3, 3)
    assert [s.caption for s in scenes] == ["a yellow creature", "a purple creature", "an orange creature"]
    assert [s.image[0, 0].tolist() for s in scenes] == [[178, 161, 153], [152, 166, 145], [151, 147, 144]]


def test_frames_of_puts_bands_that_cross_frames_back_together():
    frames = np.arange(3 * 5 * 2 * 3, dtype=np.int64).reshape(3, 5, 2, 3)
    rows = frames.reshape(15, 2, 3)
    bands = [rows[a:b] for a, b in ((0, 2), (2, 7), (7, 8), (8, 15))]
    assert all(np.array_equal(got, want) for got, want in zip(frames_of(bands, 5), frames, strict=True))


def test_the_clip_dataset_is_the_same_drawn_in_process_or_by_a_pool():
    alone, alone_captions = draw_clip_dataset(32, 4, processes=1)
    pooled, pooled_captions = draw_clip_dataset(32, 4, processes=2)
    assert alone.shape == (32, 16, SIZE, SIZE, 3) and np.array_equal(alone, pooled) and alone_captions == pooled_captions


def test_a_short_motion_training_run_changes_only_the_motion_modules(tmp_path):
    threads = torch.get_num_threads()
    try:
        main(["--out", str(tmp_path / "adapter"), "--clips", "16", "--steps", "2", "--threads", "1", "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    image = load_pipeline("toy").unet.state_dict()
    motion = load_pipeline("toy", motion_adapter=str(tmp_path / "adapter")).unet.state_dict()
    trained = [name for name in motion if "motion_modules" in name and "proj_out" in name and motion[name].abs().max() > 0]
    assert trained  # a new adapter's output projections are zero; two steps moved them
    assert all(torch.equal(motion[name], value) for name, value in image.items())
