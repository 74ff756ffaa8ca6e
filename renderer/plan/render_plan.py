"""`RenderPlan`: everything the driver knows of a render before any rank starts, made once per poster from the
request and the model's shape (configs only, no weights) and handed to the engine, the executor, the progress
bar and the batch, so that none of them derives it again.

It holds the stages, which of them a gang shards, the steps each stage denoises, what the picture goes through,
and, where the model's configs could be read (`renderer.plan.shape`), the output's and checkpoints' bytes and each
device's peak memory. Each decode's VAE mode is chosen from it once the ranks can say how much memory they have
(`decode_modes`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from freescale_core import FreeScaleConfig
from freescale_core.cascade import restart_index
from renderer.cascade.stage_loop import stage_layout
from renderer.errors import RenderError
from renderer.messages import ModelInfo
from renderer.plan.geometry import ModelGeometry, Size, check_fast_mode, check_stages, format_size, plan_stages
from renderer.plan.input_image import effective_strength, input_plan, strength_restart
from renderer.plan.memory import (CPU_RUNTIME, GiB, MemoryEstimate, checkpoint_bytes, estimate, pyramid_bytes,
                                  worker_estimate, writing_bytes)
from renderer.plan.request import RenderRequest, first_sharded_stage, guided
from renderer.plan.shape import ModelShape


@dataclass(frozen=True)
class RenderPlan:
    stages: list[Size]
    first_sharded: int  # stages before it run on one rank; len(stages) in-process
    geometry: ModelGeometry
    denoising: dict[int, tuple[int, int]]  # (steps, pixels) of every stage that denoises, for the progress bar
    first_restart: int | None  # --image: the schedule index its first upscaling stage restarts at (--strength)
    unet_calls: int
    guided: bool  # both guidance branches in every UNet call
    frames: int = 1
    notes: list[str] = field(default_factory=list)  # how --image is sized to the model's grid, one line each
    conversions: list[str] = field(default_factory=list)  # how its pixels are converted, once the preflight decoded it
    output_bytes: int = 0  # uncompressed pixels of the pyramid: an upper bound for deflate
    checkpoint_bytes: int = 0
    coordinator: MemoryEstimate | None = None  # None: the model's configs were not read (a single file, a hub id)
    worker: MemoryEstimate | None = None  # the busiest gang worker's; None without a gang

    @property
    def worker_need(self) -> int | None:
        """Bytes each gang worker allocates beyond its loaded model at its largest step or VAE op (None: unknown)."""
        if self.worker is None:
            return None
        return max(self.worker.unet, self.worker.vae) + (0 if self.worker.device == "cuda" else CPU_RUNTIME)

    def lines(self) -> list[str]:
        """What `--dry-run` prints."""
        final = format_size(self.stages[-1])
        output = (f"output: {final}, at most {self.output_bytes / GiB:.2f} GiB uncompressed with its pyramid" if self.frames == 1 else
                  f"output: {self.frames} frames of {final} (an H.264 MP4, and every frame losslessly in a {self.output_bytes / GiB:.2f} GiB "
                  "TIFF at most)")
        lines = [
            *self.notes, *self.conversions,
            f"stages: {' -> '.join(format_size(size) for size in self.stages)}",
            f"UNet calls: {self.unet_calls} ({'CFG batch of 2' if self.guided else 'guidance off: the conditional branch alone'}"
            f"{f' x {self.frames} frames' if self.frames > 1 else ''} each)",
            output,
            f"checkpoints: at most {self.checkpoint_bytes / 2**20:.0f} MiB",
        ]
        for label, memory in (("coordinator", self.coordinator), ("each worker", self.worker)):
            if memory is not None and not memory.weights:
                lines.append(f"peak memory, {label} ({memory.device}): {memory.peak / GiB:.2f} GiB (the process and "
                             "the final rows it writes; no model: the workers hold it and run every stage)")
            elif memory is not None:
                lines.append(
                    f"peak memory, {label} ({memory.device}): {memory.peak / GiB:.2f} GiB "
                    f"(process {memory.baseline / GiB:.2f}, weights {memory.weights / GiB:.2f}, "
                    f"UNet step {memory.unet / GiB:.2f}, VAE {memory.vae / GiB:.2f})"
                )
                if memory.band_rows:
                    host = f"; its layers wait in {memory.host / GiB:.2f} GiB of host memory" if memory.host else ""
                    lines.append(f"exact VAE, {label}: bands of {memory.band_rows} latent rows "
                                 f"({memory.band_rows * self.geometry.vae_scale} px){host}")
        return lines


def plan_render(request: RenderRequest, geometry: ModelGeometry, shape: ModelShape | None = None,
                driver_bytes: int = 0) -> RenderPlan:
    """The request's plan, checked (every sharded stage splits into --workers strips of whole units). With the
    model's `shape`, also its bytes and peak memory; `driver_bytes`: this process before the model."""
    stages, notes = planned_stages(request, geometry)
    first = first_sharded_stage(request, stages)
    check_shardable(geometry, stages[first:], request.freescale, request.workers)
    first_restart = strength_restart(request.steps, effective_strength(request)) if request.image else None
    plan = RenderPlan(
        stages=stages, first_sharded=first, geometry=geometry,
        denoising=denoising_plan(stages, request.steps, request.freescale.restart_fraction, base=request.image is None,
                                 first_restart=first_restart),
        first_restart=first_restart, unet_calls=unet_calls(request, len(stages)), guided=guided(request.guidance),
        frames=request.frames, notes=notes, output_bytes=pyramid_bytes(stages[-1]) * request.frames,
    )
    if shape is None:
        return plan
    if request.workers:  # the driver loads no model: it plans, writes checkpoints and streams the TIFF
        coordinator = MemoryEstimate(driver_bytes + writing_bytes(stages[-1], request.workers, request.frames), 0, 0, 0, "cpu")
    else:
        coordinator = estimate(request, shape, stages, request.device,
                               baseline=0 if request.device.startswith("cuda") else driver_bytes)
    return replace(plan, checkpoint_bytes=checkpoint_bytes(stages, shape) * request.frames, coordinator=coordinator,
                   worker=worker_estimate(request, shape, stages, first, driver_bytes))


def planned_stages(request: RenderRequest, geometry: ModelGeometry) -> tuple[list[Size], list[str]]:
    """The stages: from the picture's size (--image), as --stages gives them, or halved down from --size; and what
    the picture goes through."""
    notes: list[str] = []
    if request.image is not None:
        picture = input_plan(request, geometry)
        stages, notes = picture.stages, picture.notes
    elif request.stages:
        stages = [tuple(size) for size in request.stages]
        check_stages(stages, geometry)
    else:
        stages = plan_stages(request.size, geometry)
    if request.freescale.fast_mode:
        for size in stages[1:]:
            check_fast_mode(size, geometry)
    return stages, notes


def check_shardable(geometry: ModelGeometry, stages: list[Size], config: FreeScaleConfig, workers: int) -> None:
    """Every sharded stage must split into `workers` strips of whole units (before anything is started)."""
    for size in stages:
        try:
            stage_layout(geometry, size, config, workers)
        except ValueError as error:
            raise RenderError(f"--workers {workers} at stage {format_size(size)}: {error}") from None


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise RenderError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RenderError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def unet_calls(request: RenderRequest, stages: int) -> int:
    upscaling = request.steps - restart_index(request.steps, request.freescale.restart_fraction)
    if not request.image:
        return request.steps + (stages - 1) * upscaling
    first = request.steps - strength_restart(request.steps, effective_strength(request)) if stages > 1 else 0
    return first + (stages - 2) * upscaling if stages > 1 else 0


def denoising_plan(stages: list[Size], steps: int, restart_fraction: float, base: bool,
                   first_restart: int | None = None) -> dict[int, tuple[int, int]]:
    """(denoising steps, pixels) of every stage that denoises: the base unless it starts from an image, and every
    upscaling stage from its restart step (the first one's `first_restart` if given: --image's --strength)."""
    upscaling = steps - restart_index(steps, restart_fraction)
    plan = {index: (upscaling, size[0] * size[1]) for index, size in enumerate(stages) if index > 0}
    if first_restart is not None and 1 in plan:
        plan[1] = (steps - first_restart, plan[1][1])
    return {0: (steps, stages[0][0] * stages[0][1]), **plan} if base else plan


def choose_vae_mode(request: RenderRequest, model: ModelInfo, size: Size, share: float = 1.0, available: int = 0) -> str:
    """`exact` when the banded VAE's layers (a resnet's input and hidden activation: about three activations of
    its full-resolution level) fit in 80 % of free memory.

    A sharded decode holds `share` of the rows, in the `available` memory of the tightest rank (on a GPU its
    free GPU memory, though the layers wait in host memory: the choice errs towards `tiled` there)."""
    if request.vae_mode != "auto":
        return request.vae_mode
    activation = size[0] * size[1] * share * model.vae_width * model.vae_itemsize
    return "exact" if 3 * activation < 0.8 * available else "tiled"


def decode_modes(request: RenderRequest, model: ModelInfo, plan: RenderPlan, executor) -> list[str]:
    """The VAE mode of each stage's decode: before the next stage, and the final one for the last.

    A decode runs where the stage after it runs: one on a sharded stage is sized by a rank's strip, every
    one against the tightest rank's free memory (asked once, and only when the mode is `auto`)."""
    available = executor.free_memory() if request.vae_mode == "auto" else 0
    modes = []
    for index, size in enumerate(plan.stages):
        share = executor.largest_share(size) if index + 1 >= plan.first_sharded and executor.ranks > 1 else 1.0
        modes.append(choose_vae_mode(request, model, size, share=share, available=available))
    return modes
