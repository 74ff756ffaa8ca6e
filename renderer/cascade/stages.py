"""The self-cascade: base generation, then RGB-upsampled, re-noised, FreeScale-denoised stages (§2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline, UNetMotionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from freescale_core import FreeScaleConfig, freescale_mode, freeu_mode
from freescale_core.cascade import restart_index, skip_residual_weight
from freescale_core.mode import LOCAL, Backend
from freescale_core.rng import normal
from renderer.cascade.schedulers import SchedulerChoice, build, keeps_history, noised, seeded_step_noise
from renderer.plan.request import guided
from renderer.progress import Progress


@dataclass
class Conditioning:
    """Prompt embeddings for the CFG batch [negative, positive] (guidance off: [positive] alone) and the fixed
    base-size micro-conditioning."""

    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    guidance: float

    def to(self, device) -> "Conditioning":
        return Conditioning(self.prompt_embeds.to(device), self.text_embeds.to(device), self.time_ids.to(device), self.guidance)

    def branch(self, index: int) -> "Conditioning":
        """One branch of the CFG batch (0: negative, 1: positive), for a rank of a guidance split."""
        pick = slice(index, index + 1)
        return Conditioning(self.prompt_embeds[pick], self.text_embeds[pick], self.time_ids[pick], self.guidance)


def encode_prompts(pipeline: StableDiffusionXLPipeline, prompt: str, negative_prompt: str, base_hw: tuple[int, int], guidance: float) -> Conditioning:
    device, dtype = pipeline.unet.device, pipeline.unet.dtype
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompt, device=device, do_classifier_free_guidance=True, negative_prompt=negative_prompt
    )
    height, width = base_hw
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).repeat(2, 1)
    cond = Conditioning(
        prompt_embeds=torch.cat([negative, embeds]).to(dtype), text_embeds=torch.cat([negative_pooled, pooled]).to(dtype),
        time_ids=time_ids, guidance=guidance,
    )
    return cond if guided(guidance) else cond.branch(1)


BothBranches = Callable[[torch.Tensor], torch.Tensor]  # one branch's prediction -> [negative, positive]


def predict_noise(pipeline: StableDiffusionXLPipeline, scheduler, latents: torch.Tensor, timestep, cond: Conditioning,
                  both_branches: BothBranches | None = None) -> torch.Tensor:
    """One CFG UNet call; latents are fp32, the UNet runs in its own dtype. With `both_branches` (a rank of a
    guidance split, `renderer.parallel.guidance`), `cond` is one branch and the other comes from the partner.
    Without it, a one-branch `cond` is guidance off: the conditional prediction is the noise."""
    batch = cond.prompt_embeds.shape[0]
    model_input = scheduler.scale_model_input(torch.cat([latents] * batch), timestep).to(pipeline.unet.dtype)
    states = cond.prompt_embeds
    frames = latents.shape[0]  # a clip's frames are its batch; a motion UNet takes them as (batch, C, frames, h, w)
    if isinstance(pipeline.unet, UNetMotionModel):
        model_input = model_input.unflatten(0, (batch, frames)).transpose(1, 2)
        states = states.repeat_interleave(frames, dim=0)  # per frame, as AnimateDiff's pipelines pass them
    noise = pipeline.unet(
        model_input, timestep, encoder_hidden_states=states,
        added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids},
    ).sample.float()
    if noise.ndim == 5:
        noise = noise.transpose(1, 2).flatten(0, 1)
    if both_branches is not None:
        noise = both_branches(noise)
    elif batch == 1:
        return noise
    negative, positive = noise.chunk(2)
    return negative + cond.guidance * (positive - negative)


def fresh_scheduler(pipeline: StableDiffusionXLPipeline, steps: int, choice: SchedulerChoice | None = None):
    """A stage's own scheduler (no state carried over from another stage): `choice`, else the model's."""
    return build(pipeline.scheduler.config, type(pipeline.scheduler), choice, steps, pipeline.unet.device)


def generate_base(pipeline, cond: Conditioning, size_hw: tuple[int, int], steps: int, config: FreeScaleConfig, progress: Progress,
                  frames: int = 1, choice: SchedulerChoice | None = None) -> torch.Tensor:
    """The base stage's latents (frames, C, h, w): one per frame of a clip, denoised together."""
    scheduler = fresh_scheduler(pipeline, steps, choice)
    latent_hw = (size_hw[0] // pipeline.vae_scale_factor, size_hw[1] // pipeline.vae_scale_factor)
    noise = normal((frames, pipeline.unet.config.in_channels, *latent_hw), config.seed, "base-noise")
    latents = noise.to(pipeline.unet.device) * scheduler.init_noise_sigma
    with freeu_mode(pipeline.unet, config):
        for index, timestep in enumerate(scheduler.timesteps):
            prediction = predict_noise(pipeline, scheduler, latents, timestep, cond)
            with seeded_step_noise(scheduler, config.seed, (0, index), latent_hw[0]):
                latents = scheduler.step(prediction, timestep, latents).prev_sample
            progress.advance()
    return latents


def upscale_stage(
    pipeline, cond: Conditioning, reference: torch.Tensor, size_hw: tuple[int, int], stage: int, steps: int,
    config: FreeScaleConfig, alpha: float | torch.Tensor, progress: Progress, backend: Backend = LOCAL,
    rows: slice = slice(None), start: int | None = None, resume: tuple[int, torch.Tensor] | None = None,
    after_step: Callable[[int, torch.Tensor], None] | None = None, both_branches: BothBranches | None = None,
    choice: SchedulerChoice | None = None,
) -> torch.Tensor:
    """Denoise from the restart step toward `reference` (the encoded, upsampled previous stage).

    A row-sharded worker passes the latent `rows` it holds (reference and alpha are already those rows)
    and a sharded `backend`; the noise is drawn whole and sliced, so it never depends on the sharding.
    `start`: the restart index (default: the config's restart fraction). `resume` = (step index, latents after the
    step before it) continues a checkpointed stage (a one-step update depends on the step index alone);
    `after_step(steps done, latents)` follows every step, not given the latents of a multistep solver's steps (its
    history is not in a checkpoint); `both_branches`: see `predict_noise`; `choice`: the scheduler
    (`renderer.cascade.schedulers`), else the model's.
    """
    scheduler = fresh_scheduler(pipeline, steps, choice)
    if keeps_history(scheduler):
        after_step = None
    latent_shape = (reference.shape[0], reference.shape[1], size_hw[0] // pipeline.vae_scale_factor, size_hw[1] // pipeline.vae_scale_factor)
    noise = normal(latent_shape, config.seed, "restart-noise", stage)[:, :, rows].to(reference.device)
    start = restart_index(steps, config.restart_fraction) if start is None else start
    if resume is None:
        latents = noised(scheduler, reference, noise, start)
    else:
        start, latents = resume[0], resume[1].to(reference.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    train_timesteps = scheduler.config.num_train_timesteps
    for index in range(start, steps):
        timestep = scheduler.timesteps[index]
        weight = skip_residual_weight(float(timestep), alpha, train_timesteps)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(latents.device, latents.dtype)
        latents = (1 - weight) * latents + weight * noised(scheduler, reference, noise, index)
        with freescale_mode(pipeline.unet, config, size=size_hw, step_index=index, vae_scale=pipeline.vae_scale_factor, backend=backend):
            prediction = predict_noise(pipeline, scheduler, latents, timestep, cond, both_branches)
        with seeded_step_noise(scheduler, config.seed, (stage, index), latent_shape[2], rows):
            latents = scheduler.step(prediction, timestep, latents).prev_sample
        if after_step is not None:
            after_step(index + 1, latents)
        progress.advance()
    return latents


def unscaled(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the VAE decoder takes them."""
    vae = pipeline.vae
    return latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)


def encode(pipeline, image: torch.Tensor, seed: int, stage: int, rows: slice = slice(None), latent_height: int | None = None) -> torch.Tensor:
    """Image → latents with a seeded posterior sample (the tiled encode: `renderer.vae.strip.encode_strip_tiled`).

    A row-sharded worker encodes its image strip (under `renderer.parallel.sharding`) and passes the latent `rows`
    it holds of a latent `latent_height` rows high; the posterior noise is drawn whole and sliced."""
    vae = pipeline.vae
    moments = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.parameters
    return sample_latents(pipeline, moments, seed, stage, rows, latent_height)


def sample_latents(pipeline, moments: torch.Tensor, seed: int, stage: int, rows: slice = slice(None),
                   latent_height: int | None = None) -> torch.Tensor:
    """Scaled latents drawn from the posterior of `moments` (rows `rows` of a latent `latent_height` high)."""
    vae = pipeline.vae
    posterior = DiagonalGaussianDistribution(moments)
    whole = list(posterior.mean.shape)
    whole[2] = latent_height or whole[2]
    noise = normal(tuple(whole), seed, "vae-posterior", stage)[:, :, rows].to(vae.device)
    sample = posterior.mean.float() + posterior.std.float() * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor


def upsample(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic RGB resize, no clamp (the reference re-encodes the raw decode)."""
    return F.interpolate(image, size=size_hw, mode="bicubic", align_corners=False)
