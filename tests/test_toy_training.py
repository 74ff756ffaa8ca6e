"""The toy model's training script: its VAE loss weights the subject, and one short run saves a loadable pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from renderer.models import load_pipeline
from renderer.toy.scenes import draw_scenes
from renderer.toy.train import SUBJECT_MARGIN, SUBJECT_SATURATION, SUBJECT_WEIGHT, draw_dataset, main, subject_weights, to_tensor


def test_subject_weights_cover_the_creature_with_its_eyes_and_nothing_far_from_it():
    size = 64
    scenes = draw_scenes(3, 6, size)
    weights = subject_weights(to_tensor(np.stack([s.image for s in scenes])))[:, 0].numpy()
    margin = round(SUBJECT_MARGIN * size)
    rows, cols = np.mgrid[0:size, 0:size]
    for scene, weight in zip(scenes, weights):
        assert set(np.unique(weight)) == {1.0, 1.0 + SUBJECT_WEIGHT}
        pixels = scene.image.astype(np.float64) / 255
        saturated = (pixels.max(-1) - pixels.min(-1)) / np.maximum(pixels.max(-1), 1e-3) > SUBJECT_SATURATION
        ys, xs = np.nonzero(saturated)
        assert len(ys) > 0.02 * size * size
        # Chebyshev distance of every pixel to the nearest saturated one: the max-pool's reach.
        reach = np.min(np.maximum(abs(rows[..., None] - ys), abs(cols[..., None] - xs)), axis=-1)
        np.testing.assert_array_equal(weight > 1, reach <= margin)
        eyes = (pixels.min(-1) > 0.9) | (pixels.max(-1) < 0.1)  # white and pupil, drawn inside the body
        assert eyes.any() and (weight[eyes] > 1).all()


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_short_run_saves_a_pipeline_with_the_requested_vae(tmp_path, keep_torch_threads):
    out = tmp_path / "toy"
    main(["--out", str(out), "--dataset", "64", "--vae-warmup-steps", "1", "--vae-steps", "1", "--unet-steps", "1",
          "--vae-groups", "8", "--vae-channels", "32,64,128,112", "--threads", "1", "--log-every", "1"])
    pipeline = load_pipeline(str(out), dtype=torch.float32)
    assert pipeline.vae.config.norm_num_groups == 8
    assert tuple(pipeline.vae.config.block_out_channels) == (32, 64, 128, 112)
    assert np.isfinite(pipeline.vae.config.scaling_factor)


def test_new_vae_widths_need_a_fresh_vae(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--init", str(tmp_path), "--vae-channels", "32,64,128,112"])
    assert "--fresh-vae" in capsys.readouterr().err


def test_the_dataset_is_the_same_drawn_in_process_or_by_a_pool():
    """Two chunks of 64 scenes, drawn in this process and by two spawned processes: the same pixels and captions."""
    alone, alone_captions = draw_dataset(128, 5, processes=1, size=32)
    pooled, pooled_captions = draw_dataset(128, 5, processes=2, size=32)
    assert alone.shape == (128, 32, 32, 3) and np.array_equal(alone, pooled) and alone_captions == pooled_captions
    assert not np.array_equal(alone[:64], alone[64:])  # each chunk from its own seed
