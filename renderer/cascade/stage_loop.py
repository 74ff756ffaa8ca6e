"""The stage loop of every render (SPMD): stages `first`..`last - 1`, base included, on row strips.

One process runs it as a group of one (`local`: every exchange is a no-op and the model runs unchanged); a
gang's ranks each run it with the same `StageJob`. At each stage transition every rank decodes, resizes and
re-encodes its own rows, then runs every denoising step on its strip, exchanging only what
`renderer.parallel.ops` needs. The base stage is never sharded: a job that contains it runs on one rank.

Each rank records its own steps (stage, rank) and the bytes it received by kind into the `RenderMetrics` it is
given, and hands its rows of every checkpoint to the `CheckpointSink`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from freescale_core import FreeScaleConfig
from freescale_core.cascade import restart_index, scale_factors
from renderer.cascade.stages import Conditioning, generate_base, upscale_stage
from renderer.messages import CheckpointSink, StageJob
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.models import model_geometry
from renderer.parallel.guidance import GuidanceSplit, guidance_split
from renderer.parallel.sharding import sharded_backend, sharding
from renderer.parallel.strips import RowGroup, StripLayout, plan_strips, received_bytes
from renderer.plan.geometry import ModelGeometry
from renderer.plan.input_mask import mask_at
from renderer.progress import Progress
from renderer.resume.checkpoints import Cadence
from renderer.vae.bands import to_pixels
from renderer.vae.strip import decode_strip, encode_rows, stage_reference

STRIP_UNIT = 8  # latent rows: whole rows at the UNet's ¼ grid, even rows at its ½ grid (design §A.1)


@dataclass
class StageRun:
    """One rank's share of what running a job's stages gives."""

    rows: RowGroup  # its rows of the last stage run
    latents: torch.Tensor  # its rows of the last stage's latents (on the device)
    stage_pixels: dict[int, np.ndarray]  # with save_stages: its rows of each stage image decoded at a transition
    seconds: dict[int, float]  # per stage run
    step_bytes: dict[int, dict[str, int]]  # bytes received per denoising step, per stage run


def strip_unit(config: FreeScaleConfig, size: tuple[int, int], train_px: int) -> int:
    """Fast mode splits the ¼ grid into s_h-row sub-grid cells, so strips hold whole cells there."""
    if not config.fast_mode:
        return STRIP_UNIT
    return math.lcm(STRIP_UNIT, 4 * scale_factors((size[1], size[0]), train_px)[0])


def stage_layout(geometry: ModelGeometry, size: tuple[int, int], config: FreeScaleConfig, ranks: int) -> StripLayout:
    if ranks == 1:
        return plan_strips(size[1] // geometry.vae_scale, 1, 1)
    return plan_strips(size[1] // geometry.vae_scale, ranks, strip_unit(config, size, geometry.train_px))


def detail_scale(config: FreeScaleConfig, mask: torch.Tensor | None, rows: RowGroup, latent_width: int,
                 device: torch.device) -> float | torch.Tensor:
    """α of the skip residual: the cosine scale, or per latent pixel of this rank's rows with a region mask
    (foreground: cosine_scale, background: cosine_scale_bg)."""
    if mask is None:
        return config.cosine_scale
    region = mask_at(mask, (rows.layout.height, latent_width))[:, :, rows.layout.rows(rows.rank)].to(device)
    return config.cosine_scale * region + config.cosine_scale_bg * (1 - region)


def run_stages(pipeline, job: StageJob, group=None, local: bool = False, progress: Progress | None = None,
               checkpoint: CheckpointSink | None = None, metrics: RenderMetrics = NULL_METRICS) -> StageRun:
    """Run the job's stages on this rank: `local` for one process holding every row (a group of one, whose
    exchanges are no-ops), else as one rank of `group` (every rank calls this with the same job). An even
    gang splits classifier-free guidance between its halves if the job asks and guidance is on
    (`renderer.parallel.guidance`)."""
    world = 1 if local else torch.distributed.get_world_size(group)
    if job.first == 0 and world > 1:
        raise ValueError("the base stage runs on one rank: give it a group of one")
    split = guidance_split(group) if job.cfg_split and world % 2 == 0 and job.guided else nullcontext()
    with split as guide, torch.inference_mode():
        return stage_loop(pipeline, job, group, local, world, guide, progress or Progress(False), checkpoint, metrics)


def base_latents(pipeline, job: StageJob, cond: Conditioning, progress: Progress, metrics: RenderMetrics) -> torch.Tensor:
    """Stage 0, whole: generated from the seed's noise, or the --image encoded."""
    width, height = job.stages[0]
    if job.initial is not None:  # in the mode of stage 0's decode: both hold the whole picture
        rows = RowGroup.single(height // pipeline.vae_scale_factor)
        mode = (job.transition_modes or [job.final_mode])[0]
        return encode_rows(pipeline, rows, job.initial.to(pipeline.unet.device), job.config.seed, 0, mode).float()
    progress.stage(f"stage 0 {width}x{height}", job.steps)
    return generate_base(pipeline, cond, (height, width), job.steps, job.config, metrics.stepping(progress, 0, 0), job.frames,
                         job.scheduler).float()


def previous_image(pipeline, job: StageJob, rows: RowGroup, latents: torch.Tensor, index: int) -> torch.Tensor | None:
    """This rank's pixel rows of stage `index - 1`'s image, where the RGB upsample or --save-stages needs them: an
    --image render's picture itself after stage 0 (its VAE round trip at the picture's size would blur the
    small details the upsample is to keep), else the stage's latents decoded."""
    if index == 1 and job.initial is not None:
        scale = pipeline.vae_scale_factor
        start, stop = rows.span
        return job.initial[:, :, start * scale : stop * scale].to(latents.device, torch.float32)
    if job.config.upsample_space == "rgb" or job.save_stages:
        return decode_strip(pipeline, rows, latents, job.transition_modes[index - 1])
    return None


def restart_step(job: StageJob, index: int) -> int:
    """The schedule index upscaling stage `index` restarts at."""
    if index == 1 and job.first_restart is not None:
        return job.first_restart
    return restart_index(job.steps, job.config.restart_fraction)


def stage_loop(pipeline, job: StageJob, group, local: bool, world: int, guide: GuidanceSplit | None, progress: Progress,
               checkpoint: CheckpointSink | None, metrics: RenderMetrics) -> StageRun:
    device = pipeline.unet.device
    cond = job.cond.to(device)
    config = job.config
    geometry = model_geometry(pipeline)

    def row_group(layout: StripLayout) -> RowGroup:
        return RowGroup(layout, group, local)

    resuming = job.resume_step is not None
    if job.first == 0:
        rows, latents = RowGroup.single(job.stages[0][1] // geometry.vae_scale), None
    else:
        layout = stage_layout(geometry, job.stages[job.first], config, world) if resuming else plan_strips(job.latents.shape[2], world, 1)
        rows = row_group(layout)
        latents = job.latents[:, :, rows.layout.rows(rows.rank)].to(device)
    run = StageRun(rows, latents, {}, {}, {})
    cadence = Cadence(job.checkpoint_steps, job.checkpoint_seconds)
    for index in range(job.first, job.last):
        started, exchanged = time.perf_counter(), dict(received_bytes)
        size = job.stages[index]
        if index == 0:
            latents = base_latents(pipeline, job, cond, progress, metrics)
            if checkpoint is not None:
                checkpoint(0, job.steps, rows.span, latents.cpu(), None)
            run.seconds[0] = time.perf_counter() - started
            progress.finished(0, run.seconds[0])
            continue
        if resuming and index == job.first:
            reference = job.reference[:, :, rows.layout.rows(rows.rank)].to(device)
            resume = (job.resume_step, latents)
        else:
            target = row_group(stage_layout(geometry, size, config, world))
            image = previous_image(pipeline, job, rows, latents, index)
            if job.save_stages:
                run.stage_pixels[index - 1] = to_pixels(image)
            reference = stage_reference(pipeline, rows, latents, image, target, size, config, index, job.transition_modes[index - 1])
            del image
            rows, resume = target, None
        # The rows this rank denoises, and how its strip is taken from and given back to them.
        if guide is None:
            denoised, stage_cond, both_branches = rows, cond, None
            into, back = (lambda x: x), (lambda x: x)
        else:
            denoised, stage_cond, both_branches = guide.branch_rows(rows), cond.branch(guide.branch), guide.both_branches
            into = partial(guide.to_branch, rows)
            back = partial(guide.to_strip, rows, denoised)
        alpha = detail_scale(config, job.mask, denoised, size[0] // geometry.vae_scale, device)
        begin = resume[0] if resume else restart_step(job, index)
        progress.stage(f"stage {index} {size[0]}x{size[1]}" + (f" on {world} workers" if world > 1 else ""), job.steps - begin)
        cadence.start(begin)

        def after_step(done: int, current: torch.Tensor, index=index, reference=reference, rows=rows, back=back) -> None:
            if checkpoint is None or done == job.steps:
                return
            due = torch.tensor([float(cadence.due(done) if rows.rank == 0 else 0.0)])
            if rows.sum(due).item() > 0:  # rank 0 decides, so every rank checkpoints the same steps
                checkpoint(index, done, rows.span, back(current).float().cpu(), reference.float().cpu())
                cadence.start(done)

        before = dict(received_bytes)
        with sharding(pipeline.unet, denoised):
            latents = back(upscale_stage(
                pipeline, stage_cond, into(reference), (size[1], size[0]), index, job.steps, config, alpha,
                metrics.stepping(progress, index, rows.rank), backend=sharded_backend(denoised),
                rows=denoised.layout.rows(denoised.rank), start=begin, resume=None if resume is None else (resume[0], into(resume[1])),
                after_step=after_step, both_branches=both_branches, choice=job.scheduler,
            ))
        run.step_bytes[index] = {kind: (total - before.get(kind, 0)) // (job.steps - begin) for kind, total in received_bytes.items()}
        metrics.exchanged_all(rows.rank, received_since(exchanged))
        if checkpoint is not None:
            checkpoint(index, job.steps, rows.span, latents.float().cpu(), None)
        run.seconds[index] = time.perf_counter() - started
        progress.finished(index, run.seconds[index])
    run.rows, run.latents = rows, latents
    return run


def received_since(before: dict[str, int]) -> dict[str, int]:
    """Bytes received by kind since `before` (a copy of `received_bytes`); kinds without any left out."""
    return {kind: total - before.get(kind, 0) for kind, total in received_bytes.items() if total > before.get(kind, 0)}
