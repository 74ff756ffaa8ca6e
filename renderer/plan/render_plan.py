"""The driver's plan of a render, from the request and the model's shape alone (no weights): the stages,
which of them a gang shards, each decode's VAE mode, and the steps the progress bar expects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freescale_core import FreeScaleConfig
from freescale_core.cascade import restart_index
from renderer.cascade.stage_loop import stage_layout
from renderer.cascade.worker import ModelInfo
from renderer.errors import RenderError
from renderer.plan.geometry import ModelGeometry, Size, format_size
from renderer.plan.request import RenderRequest, first_sharded_stage


@dataclass(frozen=True)
class StagePlan:
    stages: list[Size]
    first_sharded: int  # stages before it run on one rank; len(stages) in-process


def plan_stages(request: RenderRequest, geometry: ModelGeometry) -> StagePlan:
    """The request's stages, checked: every sharded stage must split into --workers strips of whole units."""
    stages = request.plan(geometry)
    first = first_sharded_stage(request, stages)
    check_shardable(geometry, stages[first:], request.freescale, request.workers)
    return StagePlan(stages, first)


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


def choose_vae_mode(request: RenderRequest, model: ModelInfo, size: Size, share: float = 1.0, available: int = 0) -> str:
    """`exact` when the banded VAE's layers (a resnet's input and hidden activation: about three activations of
    its full-resolution level) fit in 80 % of free memory.

    A sharded decode holds `share` of the rows, in the `available` memory of the tightest rank (on a GPU its
    free GPU memory, though the layers wait in host memory: the choice errs towards `tiled` there)."""
    if request.vae_mode != "auto":
        return request.vae_mode
    activation = size[0] * size[1] * share * model.vae_width * model.vae_itemsize
    return "exact" if 3 * activation < 0.8 * available else "tiled"


def decode_modes(request: RenderRequest, model: ModelInfo, plan: StagePlan, executor) -> list[str]:
    """The VAE mode of each stage's decode: before the next stage, and the final one for the last.

    A decode runs where the stage after it runs: one on a sharded stage is sized by a rank's strip, every
    one against the tightest rank's free memory (asked once, and only when the mode is `auto`)."""
    available = executor.free_memory() if request.vae_mode == "auto" else 0
    modes = []
    for index, size in enumerate(plan.stages):
        share = executor.largest_share(size) if index + 1 >= plan.first_sharded and executor.ranks > 1 else 1.0
        modes.append(choose_vae_mode(request, model, size, share=share, available=available))
    return modes


def denoising_plan(stages: list[Size], steps: int, restart_fraction: float, base: bool,
                   first_restart: int | None = None) -> dict[int, tuple[int, int]]:
    """(denoising steps, pixels) of every stage that denoises: the base unless it starts from an image, and every
    upscaling stage from its restart step (the first one's `first_restart` if given: --image's --strength)."""
    upscaling = steps - restart_index(steps, restart_fraction)
    plan = {index: (upscaling, size[0] * size[1]) for index, size in enumerate(stages) if index > 0}
    if first_restart is not None and 1 in plan:
        plan[1] = (steps - first_restart, plan[1][1])
    return {0: (steps, stages[0][0] * stages[0][1]), **plan} if base else plan

