"""FreeScale mode on a motion UNet (AnimateDiff's UNetMotionModel): the spatial layers change, the motion modules
do not, and the model is restored bit for bit (issue 26's groundwork)."""

from __future__ import annotations

import pytest
import torch
from diffusers import MotionAdapter, UNetMotionModel

from freescale_core import FreeScaleConfig, freescale_mode
from freescale_core.mode import self_attentions
from renderer.models.builtin import TINY, build_random_pipeline

FRAMES = 4


@pytest.fixture(scope="module")
def motion_unet() -> UNetMotionModel:
    unet = build_random_pipeline(TINY, seed=0).unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        adapter = MotionAdapter(block_out_channels=TINY.unet_channels, motion_layers_per_block=2, motion_num_attention_heads=2,
                                motion_norm_num_groups=TINY.unet_groups, motion_max_seq_length=32, use_motion_mid_block=True)
        # A fresh adapter's output projections are zero (AnimateDiff starts as the image model): give them weights.
        for name, parameter in adapter.named_parameters():
            if "proj_out" in name:
                parameter.data = torch.randn_like(parameter) * 0.1
    return UNetMotionModel.from_unet2d(unet, adapter).eval()


def call(unet: UNetMotionModel, latents: torch.Tensor) -> torch.Tensor:
    """A CFG-free call on (1, C, frames, h, w): the prompt's states repeated per frame, as diffusers' AnimateDiff
    pipelines do (UNetMotionModel repeats only the time embedding; without this the first cross-attention
    fails with "size of tensor a (1024) must match the size of tensor b (256)")."""
    frames = latents.shape[2]
    states = torch.linspace(-1, 1, 77 * 64).view(1, 77, 64).repeat_interleave(frames, dim=0)
    added = {"text_embeds": torch.linspace(-1, 1, 32).view(1, 32), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}
    return unet(latents, torch.tensor(500), encoder_hidden_states=states, added_cond_kwargs=added).sample


def structured_latents(frames: int, side: int) -> torch.Tensor:
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (4, frames, side, side)), indexing="ij")
    return (torch.sin(0.3 * grid[2] + 0.5 * grid[1]) + torch.cos(0.2 * grid[3]) + 0.1 * grid[0])[None]


def test_scale_fusion_replaces_the_spatial_self_attentions_only(motion_unet):
    spatial = self_attentions(motion_unet)
    temporal = [module for name, module in motion_unet.named_modules() if "motion_modules" in name and name.endswith("attn1")]
    assert len(spatial) == len(self_attentions(build_random_pipeline(TINY, seed=0).unet)) and temporal
    before = [module.processor for module in temporal]
    with freescale_mode(motion_unet, FreeScaleConfig(seed=3), size=(512, 512), step_index=0):
        assert all(type(module.processor).__name__ == "ScaleFusionProcessor" for module in spatial)
        assert [module.processor for module in temporal] == before


def test_motion_modules_compute_the_same_inside_the_mode(motion_unet):
    """Every motion module, given the same input, gives the same output with and without FreeScale mode."""
    modules = [module for block in (*motion_unet.down_blocks, *motion_unet.up_blocks) for module in block.motion_modules]
    inputs = {}
    for module in modules:
        channels = module.in_channels
        inputs[module] = torch.linspace(-2, 2, FRAMES * channels * 64).view(FRAMES, channels, 8, 8)
    with torch.no_grad():
        plain = {module: module(inputs[module], num_frames=FRAMES) for module in modules}
        with freescale_mode(motion_unet, FreeScaleConfig(seed=3), size=(512, 512), step_index=0):
            moded = {module: module(inputs[module], num_frames=FRAMES) for module in modules}
    assert all(torch.equal(plain[module], moded[module]) for module in modules)


def test_the_mode_changes_a_clip_call_and_restores_the_model_exactly(motion_unet):
    latents = structured_latents(FRAMES, 64)  # 512 px frames: a 2x stage of the 256 px tiny model
    with torch.no_grad():
        before = call(motion_unet, latents)
        with freescale_mode(motion_unet, FreeScaleConfig(seed=3), size=(512, 512), step_index=0):
            inside = call(motion_unet, latents)
        after = call(motion_unet, latents)
    assert torch.equal(before, after)
    assert (inside - before).abs().max() > 1e-3
    assert inside.shape == (1, 4, FRAMES, 64, 64)
