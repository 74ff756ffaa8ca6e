"""The built-in clip models: `toy-video`'s shipped motion modules, and `sdxl-random-video`'s true SDXL adapter shapes."""

from __future__ import annotations

import json

import torch
from diffusers import MotionAdapter, UNetMotionModel

from renderer import RenderRequest, render
from renderer.models import load_pipeline
from renderer.models.builtin import MOTION_SPECS, TOY, TOY_MOTION_WEIGHTS, motion_adapter
from renderer.models.motion import adapter_config
from renderer.toy.metrics import background_flicker, count_subjects

TRAIN = 256


def test_the_shipped_motion_modules_fit_their_budget_and_the_toy():
    """At most 16 MB (decimal, every file), made for the toy's widths, with the spec's heads and positions."""
    files = [path for path in TOY_MOTION_WEIGHTS.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 16_000_000
    config = json.loads((TOY_MOTION_WEIGHTS / "config.json").read_text())
    assert tuple(config["block_out_channels"]) == TOY.unet_channels
    assert config["motion_num_attention_heads"] == MOTION_SPECS["toy"].heads
    assert config["motion_max_seq_length"] == MOTION_SPECS["toy"].positions
    assert adapter_config("toy-video", None) == config


def test_toy_video_is_the_toy_with_the_shipped_motion_modules():
    image = load_pipeline("toy").unet.state_dict()
    motion = load_pipeline("toy-video").unet
    assert isinstance(motion, UNetMotionModel)
    weights = motion.state_dict()
    adapter = MotionAdapter.from_pretrained(TOY_MOTION_WEIGHTS).state_dict()
    assert all(torch.equal(weights[name], value) for name, value in image.items())
    assert all(torch.equal(weights[name], value.float()) for name, value in adapter.items())
    assert any(value.abs().max() > 0 for name, value in adapter.items() if "proj_out" in name)  # trained, not new


def test_sdxl_random_video_has_the_public_sdxl_adapters_shapes():
    """animatediff-motion-adapter-sdxl-beta's config: SDXL's widths, 8 heads, 32 positions, no mid-block motion module."""
    config = adapter_config("sdxl-random-video", None)
    assert tuple(config["block_out_channels"]) == (320, 640, 1280)
    assert (config["motion_num_attention_heads"], config["motion_max_seq_length"], config["use_motion_mid_block"],
            config["motion_layers_per_block"], config["motion_norm_num_groups"]) == (8, 32, False, 2, 32)


def test_the_trained_motion_modules_hold_the_background_still(tmp_path):
    """A toy-video clip against the same toy with new (zero-output) motion modules, whose frames are independent
    images: one green creature in every frame of both, and a background at least twice as steady with the
    trained modules (8 frames, 8 steps, seed 3: 4.3 levels against 12.4 on the 2-core CPU; docs/benchmarks.md)."""
    new = tmp_path / "new_adapter"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        motion_adapter(TOY, MOTION_SPECS["toy"]).save_pretrained(new)
    flicker = {}
    for model, adapter in (("toy-video", None), ("toy", str(new))):
        request = RenderRequest(prompt="a green creature", seed=3, stages=((TRAIN, TRAIN),), steps=8, model=model,
                                motion_adapter=adapter, frames=8, out=tmp_path / "clip.mp4")
        frames = render(request, progress=False, write=False).image
        counts = [count_subjects(frame, TRAIN) for frame in frames]
        assert [(c.subjects, c.colour) for c in counts] == [(1, "green")] * 8
        flicker[model] = background_flicker(frames, counts)
    assert flicker["toy-video"] < 0.5 * flicker["toy"]
