"""What every worker of a gang runs (SPMD): the sharded stages of a render, start to finish.

The coordinator hands each worker the same `GangJob` once: the prompt embeddings, the latents of the
last stage it ran itself, and the plan. The workers then decode, resize and re-encode at each stage
transition, run every denoising step, and decode the final image, all on their own row strips and
exchanging only what `cluster.ops` needs. Nothing per step passes through the coordinator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from cluster import ops
from cluster.sharding import sharded_backend, sharding
from cluster.strips import RowGroup, StripLayout, plan_strips, received_bytes
from freescale_core import FreeScaleConfig
from freescale_core.cascade import restart_index, scale_factors
from renderer.engine import unscaled
from renderer.images import mask_at
from renderer.progress import Progress
from renderer.stages import Conditioning, encode, upscale_stage
from renderer.vae_bands import decode_tiled, tile_grid, to_pixels

STRIP_UNIT = 8  # latent rows: whole rows at the UNet's ¼ grid, even rows at its ½ grid (design §A.1)


@dataclass
class GangJob:
    """Everything the workers need, sent once: no per-step traffic passes through the coordinator."""

    cond: Conditioning  # on the CPU
    latents: torch.Tensor  # (1, 4, h, w) of stage `first - 1`, whole, on the CPU
    stages: list[tuple[int, int]]  # (width, height) of every stage, base first
    first: int  # index of the first stage the gang runs
    steps: int
    config: FreeScaleConfig
    transition_modes: list[str]  # VAE mode of the decode before each stage 1.. (index 0: before stage 1)
    final_mode: str
    mask: torch.Tensor | None = None  # (1, 1, h, w) at the base size
    save_stages: bool = False


@dataclass
class GangResult:
    """One worker's rows of everything the render returns."""

    rank: int
    rows: tuple[int, int]  # its latent rows of the final stage
    latents: torch.Tensor  # its rows of the final latents (fp32, CPU)
    pixels: np.ndarray  # its rows of the final image, uint8
    stage_pixels: list[np.ndarray]  # with save_stages, its rows of each stage image from `first - 1` on
    seconds: list[float]  # per sharded stage
    step_bytes: list[dict[str, int]]  # bytes received per denoising step, per stage
    peak_bytes: int


def strip_unit(config: FreeScaleConfig, size: tuple[int, int], train_px: int) -> int:
    """Fast mode splits the ¼ grid into s_h-row sub-grid cells, so strips hold whole cells there."""
    if not config.fast_mode:
        return STRIP_UNIT
    return math.lcm(STRIP_UNIT, 4 * scale_factors((size[1], size[0]), train_px)[0])


def stage_layout(pipeline, size: tuple[int, int], config: FreeScaleConfig, ranks: int) -> StripLayout:
    train_px = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return plan_strips(size[1] // pipeline.vae_scale_factor, ranks, strip_unit(config, size, train_px))


def decode_strip(pipeline, rows: RowGroup, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """This rank's rows of the decoded image (fp32, unclamped), equal to the single-process decode of `mode`.

    `exact` runs the whole decoder on the strip. `tiled` decodes the diffusers tile rows whose finished
    rows meet the strip, plus the tile row above for its blend, from the latent rows they cover."""
    vae = pipeline.vae
    z = unscaled(pipeline, latents).to(vae.dtype)
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
    tile_rows = [range(a // stride, (b - 1) // stride + 1) for a, b in (layout.span(r) for r in range(rows.world))]
    requests = [(max(0, (t.start - 1) * stride), min(layout.height, (t.stop - 1) * stride + tile)) for t in tile_rows]
    mine = tile_rows[rows.rank]
    slab = rows.fetch(z, 2, requests, "vae")
    pixels = torch.cat([band.float() for band in decode_tiled(vae, slab, mine, offset=requests[rows.rank][0])], dim=2)
    first = mine.start * finished
    return pixels[:, :, start * scale - first : stop * scale - first]


def stage_reference(pipeline, previous: RowGroup, latents: torch.Tensor, image: torch.Tensor | None, rows: RowGroup,
                    size: tuple[int, int], config: FreeScaleConfig, stage: int) -> torch.Tensor:
    """This rank's rows of ẑ₀ (see `renderer.engine.stage_reference`)."""
    scale = pipeline.vae_scale_factor
    if config.upsample_space == "latent":
        return ops.resize(previous, latents, rows.layout, size[0] // scale)
    image = ops.resize(previous, image, rows.layout.scaled(Fraction(scale)), size[0])
    with sharding(pipeline.vae, rows):
        return encode(pipeline, image, config.seed, stage, rows=rows.layout.rows(rows.rank), latent_height=rows.layout.height)


def run_job(pipeline, job: GangJob, group=None, progress: Progress | None = None) -> GangResult:
    """Run the job's sharded stages on this rank (every rank of `group` calls this with the same job)."""
    progress = progress or Progress(False)
    device = pipeline.unet.device
    cond = job.cond.to(device)
    config = job.config
    world = torch.distributed.get_world_size(group)
    previous = RowGroup(plan_strips(job.latents.shape[2], world, 1), group)
    latents = job.latents[:, :, previous.layout.rows(previous.rank)].to(device)
    stage_pixels: list[np.ndarray] = []
    seconds: list[float] = []
    step_bytes: list[dict[str, int]] = []
    with torch.inference_mode():
        for index in range(job.first, len(job.stages)):
            started = time.perf_counter()
            size = job.stages[index]
            rows = RowGroup(stage_layout(pipeline, size, config, world), group)
            image = None
            if config.upsample_space == "rgb" or job.save_stages:
                image = decode_strip(pipeline, previous, latents, job.transition_modes[index - 1])
            if job.save_stages:
                stage_pixels.append(to_pixels(image))
            reference = stage_reference(pipeline, previous, latents, image, rows, size, config, index)
            del image
            alpha = config.cosine_scale
            if job.mask is not None:
                region = mask_at(job.mask, (rows.layout.height, size[0] // pipeline.vae_scale_factor))
                region = region[:, :, rows.layout.rows(rows.rank)].to(device)
                alpha = config.cosine_scale * region + config.cosine_scale_bg * (1 - region)
            steps = job.steps - restart_index(job.steps, config.restart_fraction)
            progress.stage(f"stage {index} {size[0]}x{size[1]} on {world} workers", steps)
            before = dict(received_bytes)
            with sharding(pipeline.unet, rows):
                latents = upscale_stage(
                    pipeline, cond, reference, (size[1], size[0]), index, job.steps, config, alpha, progress,
                    backend=sharded_backend(rows), rows=rows.layout.rows(rows.rank),
                )
            step_bytes.append({kind: (total - before.get(kind, 0)) // steps for kind, total in received_bytes.items()})
            previous = rows
            seconds.append(time.perf_counter() - started)
        pixels = to_pixels(decode_strip(pipeline, previous, latents, job.final_mode))
    return GangResult(
        rank=previous.rank, rows=previous.span, latents=latents.float().cpu(), pixels=pixels, stage_pixels=stage_pixels,
        seconds=seconds, step_bytes=step_bytes, peak_bytes=peak_memory(device),
    )


def peak_memory(device: torch.device) -> int:
    """Peak CUDA allocation on a GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
