"""Guidance off (--guidance <= 1: Turbo, Lightning, LCM): the UNet runs the conditional branch alone, in one
process and on a gang (nothing to split there), and a model's training size comes from its config.

The reference is written here without the renderer: the tiny model's own text encoders, scheduler and UNet
called on the conditional embeddings only, step by step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import sharded_checks
from cluster.spawn import run_ranks
from freescale_core import FreeScaleConfig
from freescale_core.rng import normal
from renderer import RenderRequest, render
from renderer.cascade.stage_loop import run_stages
from renderer.cascade.stages import encode_prompts
from renderer.plan.render_plan import plan_render
from renderer.plan.shape import model_shape

PROMPT = "a red kite"


def conditional_only(pipeline, steps: int, seed: int) -> torch.Tensor:
    """The base stage by hand: prompt embeddings, Euler steps, one UNet call a step on the positive prompt alone."""
    embeds, _, pooled, _ = pipeline.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = normal((1, 4, 32, 32), seed, "base-noise") * scheduler.init_noise_sigma
    time_ids = torch.tensor([[256.0, 256, 0, 0, 256, 256]])
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            noise = pipeline.unet(scheduler.scale_model_input(latents, timestep), timestep, encoder_hidden_states=embeds,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            latents = scheduler.step(noise, timestep, latents).prev_sample
    return latents


def test_guidance_one_renders_the_conditional_branch_alone(tiny_pipeline, tmp_path):
    """Equal to the hand-written conditional-only loop (same ops, same order: float32 rounding at most), and
    every UNet call gets a batch of one."""
    batches = []
    hook = tiny_pipeline.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        result = render(RenderRequest(prompt=PROMPT, stages=((256, 256),), steps=3, guidance=1.0, seed=4,
                                      freescale=FreeScaleConfig(freeu=False), out=tmp_path / "a.png"),
                        pipeline=tiny_pipeline, progress=False, write=False)
    finally:
        hook.remove()
    assert batches == [1, 1, 1]
    expected = conditional_only(tiny_pipeline, 3, seed=4)
    assert float((result.latents - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_one_branch_equals_both_branches_combined_at_guidance_one(tiny_pipeline):
    """An upscaling stage (FreeScale on) with the conditional branch alone gives what the batch of two gives at
    guidance 1 (negative + 1 · (positive − negative)), up to the rounding of that sum."""
    job = sharded_checks.split_stage_job(tiny_pipeline)
    both = replace(job.cond, guidance=1.0)
    alone = encode_prompts(tiny_pipeline, PROMPT, "blurry", (256, 256), guidance=1.0)
    assert alone.prompt_embeds.shape[0] == 1 and torch.equal(alone.prompt_embeds, both.prompt_embeds[1:])
    two = run_stages(tiny_pipeline, replace(job, cond=both), local=True).latents
    one = run_stages(tiny_pipeline, replace(job, cond=alone), local=True).latents
    assert float((one - two).abs().max()) <= 1e-4 * float(two.abs().max())


def run_unguided_stage(rank: int, world: int) -> dict:
    """This rank's part of the split test's stage at guidance 1 (cfg_split asked for: nothing to split)."""
    from renderer.models import load_pipeline

    pipeline = load_pipeline("tiny")
    job = sharded_checks.split_stage_job(pipeline)
    job = replace(job, cond=encode_prompts(pipeline, PROMPT, "blurry", (256, 256), guidance=1.0))
    run = run_stages(pipeline, job)
    return {"latents": run.latents, "step_bytes": run.step_bytes[1]}


def test_a_gang_at_guidance_one_runs_one_branch_on_its_strips_unsplit(tiny_pipeline):
    """2 ranks: each denoises its own strip with the one branch (no guidance exchange) and together they give
    the single process's latents to float32 rounding."""
    job = sharded_checks.split_stage_job(tiny_pipeline)
    single = run_stages(tiny_pipeline, replace(job, cond=encode_prompts(tiny_pipeline, PROMPT, "blurry", (256, 256), 1.0)),
                        local=True).latents
    ranks = run_ranks(2, run_unguided_stage, timeout_s=600)
    assert all("guidance" not in rank["step_bytes"] for rank in ranks)
    gathered = torch.cat([rank["latents"] for rank in ranks], dim=2)
    assert float((gathered - single).abs().max()) <= 1e-4 * float(single.abs().max())


@pytest.mark.parametrize("sample_size, planned", [(32, ["256x256", "512x512", "1024x1024"]), (64, ["512x512", "1024x1024"])])
def test_the_training_size_comes_from_the_models_config(tiny_pipeline, tmp_path, sample_size, planned):
    """A 512² model (SDXL-Turbo's UNet says sample_size 64) plans its cascade from 512, read from its configs."""
    (tmp_path / "model_index.json").write_text("{}")
    for name in ("unet", "vae"):
        (tmp_path / name).mkdir()
        config = dict(getattr(tiny_pipeline, name).config)
        if name == "unet":
            config["sample_size"] = sample_size
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(tiny_pipeline.scheduler.config)))
    geometry = model_shape(str(tmp_path)).geometry
    assert geometry.train_px == 8 * sample_size
    stages = plan_render(RenderRequest(prompt=PROMPT, size=(1024, 1024)), geometry).stages
    assert [f"{w}x{h}" for w, h in stages] == planned


def test_dry_run_says_guidance_is_off(capsys, tmp_path):
    from renderer.cli import main

    assert main(["--prompt", PROMPT, "--size", "512x512", "--steps", "4", "--guidance", "1", "--dry-run", "--out", str(tmp_path / "a.tif")]) == 0
    assert "guidance off: the conditional branch alone" in capsys.readouterr().out
