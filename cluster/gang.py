"""The stage loop of every render (SPMD): the upscaling stages, start to finish, on row strips.

A single-process render runs it as a group of one (`local`: every exchange is a no-op and the model runs
unchanged). A gang's coordinator hands each worker the same `StageJob` once: the prompt embeddings, the
latents of the last stage it ran itself (or of a checkpoint), and the plan. Every rank then decodes,
resizes and re-encodes at each stage transition, runs every denoising step, and decodes the final
image, all on its own row strip and exchanging only what `cluster.ops` needs. Nothing per step passes
through the coordinator except checkpoints, handed to whoever writes them.

Each rank records its own steps (stage, rank), the bytes it received by kind and, in a gang, its device memory
into the `RenderMetrics` it is given (a worker's: Ray's; the coordinator's own stages: rank 0).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Callable

import numpy as np
import torch

from cluster import ops
from cluster.guidance import GuidanceSplit, guidance_split
from cluster.sharding import sharded_backend, sharding
from cluster.strips import RowGroup, Span, StripLayout, plan_strips, received_bytes
from freescale_core import FreeScaleConfig
from freescale_core.cascade import restart_index, scale_factors
from renderer.checkpoints import Cadence
from renderer.images import mask_at
from renderer.memory import memory_limit, peak_memory
from renderer.metrics import NULL_METRICS, RenderMetrics
from renderer.progress import Progress
from renderer.stages import Conditioning, encode, sample_latents, unscaled, upscale_stage
from renderer.vae_bands import decode_rows, decode_tiled, encode_tile_grid, encode_tiled, tile_grid, to_pixels

STRIP_UNIT = 8  # latent rows: whole rows at the UNet's ¼ grid, even rows at its ½ grid (design §A.1)


@dataclass
class StageJob:
    """Stages `first`..`last - 1` of a render, for one process (a group of one) or every rank of a gang.

    Everything the ranks need is sent once: no per-step traffic passes through the coordinator."""

    cond: Conditioning  # on the CPU
    latents: torch.Tensor  # (1, 4, h, w) whole, on the CPU: stage `first - 1`'s, or stage `first`'s at `resume_step`
    stages: list[tuple[int, int]]  # (width, height) of every stage, base first
    first: int  # index of the first stage to run
    last: int  # one past the last stage to run
    steps: int
    config: FreeScaleConfig
    transition_modes: list[str]  # VAE mode of the decode before each stage 1.. (index 0: before stage 1)
    final_mode: str
    mask: torch.Tensor | None = None  # (1, 1, h, w) at the base size
    save_stages: bool = False
    resume_step: int | None = None  # stage `first` continues from this schedule index ...
    reference: torch.Tensor | None = None  # ... with its ẑ₀ (whole, CPU)
    checkpoint_steps: int = 0  # inside a stage: checkpoint every this many steps (0: not by count) ...
    checkpoint_seconds: float = math.inf  # ... or this many seconds
    cfg_split: bool = False  # an even gang splits classifier-free guidance between its halves (`cluster.guidance`)


@dataclass
class StageRun:
    """One rank's share of what running a job's stages gives."""

    rows: RowGroup  # its rows of the last stage run
    latents: torch.Tensor  # its rows of the last stage's latents (on the device)
    stage_pixels: dict[int, np.ndarray]  # with save_stages: its rows of each stage image decoded at a transition
    seconds: list[float]  # per stage run
    step_bytes: list[dict[str, int]]  # bytes received per denoising step, per stage


@dataclass
class GangResult:
    """One worker's rows of everything the render returns (its final pixel strip stays on the worker)."""

    rank: int
    rows: tuple[int, int]  # its latent rows of the final stage
    latents: torch.Tensor  # its rows of the final latents (fp32, CPU)
    stage_pixels: dict[int, np.ndarray]
    seconds: list[float]
    step_bytes: list[dict[str, int]]
    peak_bytes: int


# Called with (stage, steps done, latent rows, latents strip, reference strip or None): hands a checkpoint's
# rows to whoever writes it.
CheckpointSink = Callable[[int, int, tuple[int, int], torch.Tensor, "torch.Tensor | None"], None]


def strip_unit(config: FreeScaleConfig, size: tuple[int, int], train_px: int) -> int:
    """Fast mode splits the ¼ grid into s_h-row sub-grid cells, so strips hold whole cells there."""
    if not config.fast_mode:
        return STRIP_UNIT
    return math.lcm(STRIP_UNIT, 4 * scale_factors((size[1], size[0]), train_px)[0])


def stage_layout(pipeline, size: tuple[int, int], config: FreeScaleConfig, ranks: int) -> StripLayout:
    if ranks == 1:
        return plan_strips(size[1] // pipeline.vae_scale_factor, 1, 1)
    train_px = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return plan_strips(size[1] // pipeline.vae_scale_factor, ranks, strip_unit(config, size, train_px))


def tile_row_reads(layout: StripLayout, kept: int, stride: int, tile: int, height: int) -> tuple[list[range], list[Span]]:
    """For diffusers' tiling on row strips: per rank, the tile rows whose kept output (`kept` latent rows
    each) meets its latent rows in `layout`, and the input rows they read out of `height` (tile rows `stride`
    apart and `tile` long), the tile row above included for its blend."""
    tile_rows = [range(a // kept, (b - 1) // kept + 1) for a, b in (layout.span(r) for r in range(layout.ranks))]
    return tile_rows, [(max(0, (t.start - 1) * stride), min(height, (t.stop - 1) * stride + tile)) for t in tile_rows]


def decode_strip(pipeline, rows: RowGroup, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """This rank's rows of the decoded image (fp32, unclamped), equal to the single-process decode of `mode`.

    A group of one decodes in row bands (`renderer.vae_bands`). Otherwise `exact` runs the whole decoder on
    the strip, and `tiled` decodes the diffusers tile rows whose finished rows meet the strip, plus the tile
    row above for its blend, from the latent rows they cover."""
    vae = pipeline.vae
    z = unscaled(pipeline, latents)
    if rows.world == 1:
        return torch.cat([band.float() for band in decode_rows(vae, z, mode)], dim=2)
    z = z.to(vae.dtype)
    if mode == "exact":
        with sharding(vae, rows):
            return vae.decode(z).sample.float()
    scale = pipeline.vae_scale_factor
    layout = rows.layout_for(z.shape[2])
    start, stop = layout.span(rows.rank)
    tile, stride, _, finished = tile_grid(vae)
    if layout.height <= tile and z.shape[3] <= tile:
        whole = rows.fetch(z, 2, [(0, layout.height)] * rows.world, "vae")
        return vae.decode(whole).sample.float()[:, :, start * scale : stop * scale]
    tile_rows, requests = tile_row_reads(layout, stride, stride, tile, layout.height)
    mine = tile_rows[rows.rank]
    slab = rows.fetch(z, 2, requests, "vae")
    pixels = torch.cat([band.float() for band in decode_tiled(vae, slab, mine, offset=requests[rows.rank][0])], dim=2)
    first = mine.start * finished
    return pixels[:, :, start * scale - first : stop * scale - first]


def stage_reference(pipeline, previous: RowGroup, latents: torch.Tensor, image: torch.Tensor | None, rows: RowGroup,
                    size: tuple[int, int], config: FreeScaleConfig, stage: int, mode: str = "exact") -> torch.Tensor:
    """This rank's rows of ẑ₀: the previous image resized in RGB and re-encoded (`mode`: exact, or tiled as
    diffusers tiles it), or, as the paper's ablation, the previous latents resized bicubically."""
    scale = pipeline.vae_scale_factor
    if config.upsample_space == "latent":
        return ops.resize(previous, latents, rows.layout, size[0] // scale)
    image = ops.resize(previous, image, rows.layout.scaled(Fraction(scale)), size[0])
    span = rows.layout.rows(rows.rank)
    if mode == "tiled":
        moments = encode_strip_tiled(pipeline.vae, rows, image)
        return sample_latents(pipeline, moments, config.seed, stage, rows=span, latent_height=rows.layout.height)
    with sharding(pipeline.vae, rows):
        return encode(pipeline, image, config.seed, stage, rows=span, latent_height=rows.layout.height)


def encode_strip_tiled(vae, rows: RowGroup, image: torch.Tensor) -> torch.Tensor:
    """This rank's latent rows of diffusers' tiled encode (the moments) of the image whose pixel strip it holds:
    the tile rows whose kept latent rows meet the strip, plus the tile row above for its blend, encoded from
    the pixel rows they read (fetched from their owners)."""
    tile, stride, _, kept = encode_tile_grid(vae)
    pixels = rows.layout_for(image.shape[2])
    start, stop = rows.span
    if pixels.height <= tile and image.shape[3] <= tile:
        whole = rows.fetch(image, 2, [(0, pixels.height)] * rows.world, "vae")
        return encode_tiled(vae, whole)[:, :, start:stop]
    tile_rows, requests = tile_row_reads(rows.layout, kept, stride, tile, pixels.height)
    mine = tile_rows[rows.rank]
    slab = rows.fetch(image.to(vae.dtype), 2, requests, "vae")
    moments = encode_tiled(vae, slab, mine, offset=requests[rows.rank][0])
    first = mine.start * kept
    return moments[:, :, start - first : stop - first]


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
    gang splits classifier-free guidance between its halves if the job asks (`cluster.guidance`)."""
    world = 1 if local else torch.distributed.get_world_size(group)
    split = guidance_split(group) if job.cfg_split and world % 2 == 0 else nullcontext()
    with split as guide, torch.inference_mode():
        return stage_loop(pipeline, job, group, local, world, guide, progress or Progress(False), checkpoint, metrics)


def stage_loop(pipeline, job: StageJob, group, local: bool, world: int, guide: GuidanceSplit | None, progress: Progress,
               checkpoint: CheckpointSink | None, metrics: RenderMetrics) -> StageRun:
    device = pipeline.unet.device
    cond = job.cond.to(device)
    config = job.config

    def row_group(layout: StripLayout) -> RowGroup:
        return RowGroup(layout, group, local)

    resuming = job.resume_step is not None
    layout = stage_layout(pipeline, job.stages[job.first], config, world) if resuming else plan_strips(job.latents.shape[2], world, 1)
    rows = row_group(layout)
    latents = job.latents[:, :, rows.layout.rows(rows.rank)].to(device)
    run = StageRun(rows, latents, {}, [], [])
    cadence = Cadence(job.checkpoint_steps, job.checkpoint_seconds)
    for index in range(job.first, job.last):
        started, exchanged = time.perf_counter(), dict(received_bytes)
        size = job.stages[index]
        if resuming and index == job.first:
            reference = job.reference[:, :, rows.layout.rows(rows.rank)].to(device)
            resume = (job.resume_step, latents)
        else:
            target = row_group(stage_layout(pipeline, size, config, world))
            image = None
            if config.upsample_space == "rgb" or job.save_stages:
                image = decode_strip(pipeline, rows, latents, job.transition_modes[index - 1])
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
        alpha = detail_scale(config, job.mask, denoised, size[0] // pipeline.vae_scale_factor, device)
        begin = resume[0] if resume else restart_index(job.steps, config.restart_fraction)
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
                rows=denoised.layout.rows(denoised.rank), resume=None if resume is None else (resume[0], into(resume[1])),
                after_step=after_step, both_branches=both_branches,
            ))
        run.step_bytes.append({kind: (total - before.get(kind, 0)) // (job.steps - begin) for kind, total in received_bytes.items()})
        metrics.exchanged_all(rows.rank, received_since(exchanged))
        if checkpoint is not None:
            checkpoint(index, job.steps, rows.span, latents.float().cpu(), None)
        run.seconds.append(time.perf_counter() - started)
    run.rows, run.latents = rows, latents
    return run


def run_job(pipeline, job: StageJob, group=None, progress: Progress | None = None,
            checkpoint: CheckpointSink | None = None, metrics: RenderMetrics = NULL_METRICS) -> tuple[GangResult, np.ndarray]:
    """A gang rank's whole part: the job's stages, then its strip of the final image (kept apart, as it is
    handed over separately)."""
    run = run_stages(pipeline, job, group, progress=progress, checkpoint=checkpoint, metrics=metrics)
    exchanged = dict(received_bytes)
    with torch.inference_mode():
        pixels = to_pixels(decode_strip(pipeline, run.rows, run.latents, job.final_mode))
    device = pipeline.unet.device
    peak = peak_memory(device)
    metrics.exchanged_all(run.rows.rank, received_since(exchanged))
    metrics.peak_memory(run.rows.rank, peak, memory_limit(device))
    return GangResult(
        rank=run.rows.rank, rows=run.rows.span, latents=run.latents.float().cpu(), stage_pixels=run.stage_pixels,
        seconds=run.seconds, step_bytes=run.step_bytes, peak_bytes=peak,
    ), pixels


def received_since(before: dict[str, int]) -> dict[str, int]:
    """Bytes received by kind since `before` (a copy of `received_bytes`); kinds without any left out."""
    return {kind: total - before.get(kind, 0) for kind, total in received_bytes.items() if total > before.get(kind, 0)}
