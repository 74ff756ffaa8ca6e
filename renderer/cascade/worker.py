"""One rank of a render: it holds the model and does all of the render's model work on its rows.

The same `Worker` runs in the driver's process (`InProcessExecutor`, a world of one) and in every actor of a
Ray gang (`cluster.gang`, rank r of N). It encodes the prompt, runs the stages that are too small to shard on
rank 0 alone (the base stage, and any below --shard-from) and hands their latents to the other ranks, runs the
sharded stages on its strip, and decodes its rows of the final image. The driver never holds a model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from renderer.cascade.stage_loop import StageRun, previous_image, run_stages
from renderer.cascade.stages import encode_prompts, unscaled
from renderer.memory import available_memory, memory_limit, peak_memory
from renderer.messages import CheckpointSink, ModelInfo, RankResult, StageJob
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.models import load_pipeline, model_geometry
from renderer.models.lora import Lora, fuse_loras
from renderer.models.motion import max_frames
from renderer.parallel.strips import RowGroup, hand_over, init_process_group
from renderer.plan.input_image import conditioning_size
from renderer.progress import Progress
from renderer.vae.bands import to_pixels
from renderer.vae.strip import decoded_bands


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """--dtype, else float16 on a GPU and float32 on the CPU."""
    if dtype:
        return getattr(torch, dtype)
    return torch.float16 if device.startswith("cuda") else torch.float32


def model_info(pipeline) -> ModelInfo:
    return ModelInfo(
        geometry=model_geometry(pipeline), latent_channels=pipeline.unet.config.in_channels,
        vae_width=pipeline.vae.config.block_out_channels[0], dtype=dtype_name(pipeline.unet.dtype),
        vae_dtype=dtype_name(pipeline.vae.dtype), device=pipeline.unet.device.type, max_frames=max_frames(pipeline.unet),
    )


@dataclass
class Report:
    """Where a rank reports while it runs a job: its stages and steps (rank 0's show on the driver's bar), its
    checkpoint rows, its metrics."""

    progress: Progress | None = None
    checkpoint: CheckpointSink | None = None
    metrics: RenderMetrics = NULL_METRICS


class Worker:
    """A rank: the model, its place in the group, and the rows of the final image until they are taken."""

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, model_config: str | None = None,
                 pipeline=None, motion_adapter: str | None = None, loras: tuple[Lora, ...] = ()):
        if pipeline is None:
            pipeline = load_pipeline(model, device, resolve_dtype(dtype, device), model_config, motion_adapter, loras)
        elif loras:  # a caller's loaded model: fused into a copy, never into theirs
            pipeline = copy.deepcopy(pipeline)
            fuse_loras(pipeline, loras, model)
        self.pipeline = pipeline
        self.final: tuple[RowGroup, torch.Tensor, str] | None = None

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def info(self) -> ModelInfo:
        return model_info(self.pipeline)

    def join(self, rank: int, world: int, address: str, backend: str, timeout_s: float) -> None:
        """Join a gang's process group (rank 0 hosts the rendezvous at `address`)."""
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer becomes an error, not a hang
        init_process_group(rank, world, address, backend, timeout_s)

    def memory(self) -> tuple[str, int]:
        """What this rank's memory is shared with, and how many bytes of it are free (its GPU's, or its node's)."""
        return f"{self.device} of this process", available_memory(self.device)

    def run(self, job: StageJob, report: Report | None = None) -> RankResult:
        """This rank's part of the job; its rows of the final image wait for `final_rows`."""
        report = report or Report()
        pipeline, progress, checkpoint, metrics = self.pipeline, report.progress, report.checkpoint, report.metrics
        gang = dist.is_initialized()  # a rank of a process group (a Ray gang, or ranks spawned by the tests)
        rank = dist.get_rank() if gang else 0
        with torch.inference_mode():
            if job.cond is None:
                base = conditioning_size(job.stages[0], model_geometry(pipeline).train_px) if job.initial is not None else job.stages[0]
                job = replace(job, cond=encode_prompts(pipeline, job.prompt.text, job.prompt.negative, (base[1], base[0]),
                                                       job.prompt.guidance).to("cpu"))
            pixels = self.decode_stage_ends(job) if rank == 0 else {}
        split = len(job.stages) if job.first_sharded is None or not gang else job.first_sharded
        alone = job.first < min(job.last, split)  # stages rank 0 runs as a world of one
        runs: list[StageRun] = []
        if alone and rank == 0:
            runs.append(run_stages(pipeline, replace(job, last=min(job.last, split)), local=True, progress=progress,
                                   checkpoint=checkpoint, metrics=metrics))
        if gang and (job.last > split or not alone):
            if alone:
                width, height = job.stages[split - 1]
                scale = pipeline.vae_scale_factor
                shape = (job.frames, pipeline.unet.config.in_channels, height // scale, width // scale)
                handed = hand_over(runs[0].latents if runs else None, shape, self.device)
                job = replace(job, first=split, latents=handed.cpu(), resume_step=None, reference=None)
            runs.append(run_stages(pipeline, job, progress=progress, checkpoint=checkpoint, metrics=metrics))
        elif not runs:
            runs.append(run_stages(pipeline, replace(job, last=job.first), local=True))  # nothing left: the job's latents
        final = runs[-1]
        self.final = (final.rows, final.latents, job.final_mode)
        for run in runs:
            pixels.update(run.stage_pixels)
        return RankResult(
            rank=rank, rows=final.rows.span, latents=final.latents.float().cpu(), stage_pixels=pixels,
            seconds={stage: s for run in runs for stage, s in run.seconds.items()},
            step_bytes={stage: b for run in runs for stage, b in run.step_bytes.items()},
        )

    def decode_stage_ends(self, job: StageJob) -> dict[int, np.ndarray]:
        """Images of stages a resumed render did not run, as the run would have saved them (`previous_image`)."""
        return {stage: to_pixels(previous_image(self.pipeline, job, RowGroup.single(latents.shape[2]), latents.to(self.device),
                                                stage + 1))
                for stage, latents in job.stage_ends.items()}

    def final_rows(self, frame: int | None = None) -> Iterator[np.ndarray]:
        """This rank's rows of the final image as (rows, W, 3) uint8 bands, streamed as they are decoded: of one
        `frame` of a clip, or of every frame one after another (each decoded on its own, so that one frame is
        written while the next decodes). Taking the last frame frees them."""
        rows, latents, mode = self.final
        frames = range(len(latents)) if frame is None else range(frame, frame + 1)
        if frames[-1] == len(latents) - 1:
            self.final = None
        with torch.inference_mode():
            for index in frames:
                for band in decoded_bands(self.pipeline.vae, rows, unscaled(self.pipeline, latents[index : index + 1]), mode):
                    yield to_pixels(band)

    def peak(self) -> tuple[int, int]:
        """Peak bytes this rank allocated, and what its device has for it."""
        return peak_memory(self.device), memory_limit(self.device)
