"""Preflight: everything about a request that can be known before any weight is loaded, checked once.

The plan (`renderer.plan.render_plan`), the scheduler's limits, the input images, free disk for the output and
checkpoints, and each device's peak memory against what it has. A plan that cannot work is refused with one line
that says what would.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from renderer.errors import RenderError
from renderer.memory import available_memory, process_memory
from renderer.plan.geometry import Size, format_size
from renderer.plan.memory import CPU_RUNTIME, GiB
from renderer.plan.render_plan import RenderPlan, plan_render
from renderer.plan.request import RenderRequest
from renderer.plan.shape import ModelShape, model_shape


def preflight(request: RenderRequest) -> RenderPlan | None:
    """The request's plan, checked; None where the model's configs cannot be read cheaply (a single file, a hub
    id: planned and checked once loaded)."""
    shape = model_shape(request.model)
    if shape is None:
        return None
    plan = plan_render(request, shape.geometry, shape, driver_bytes=process_memory() + CPU_RUNTIME)
    check_steps(request, shape.train_timesteps)
    if request.scheduler is not None:  # it builds on the model's scheduler config and takes --steps
        from renderer.cascade.schedulers import build, model_scheduler_config
        build(model_scheduler_config(request.model), None, request.scheduler_choice, request.steps)
    check_motion(request, shape)
    plan = replace(plan, conversions=check_inputs(request, plan.stages[0]))
    check_disk(request, plan)
    check_memory(request, plan)
    return plan


def check_steps(request: RenderRequest, train_timesteps: int) -> None:
    if request.steps > train_timesteps:
        raise RenderError(f"--steps {request.steps} exceeds the scheduler's {train_timesteps} training timesteps; use at most {train_timesteps} (50 is the reference)")


def check_motion(request: RenderRequest, shape: ModelShape) -> None:
    """A clip's motion adapter against the UNet and the frames, from its config (a hub id's once loaded)."""
    from renderer.models.motion import adapter_config, check_adapter

    config = adapter_config(request.model, request.motion_adapter) if request.frames > 1 else None
    if config is not None:
        check_adapter(config, shape.unet["block_out_channels"], request.frames, request.motion_adapter or request.model)


def check_inputs(request: RenderRequest, base: Size) -> list[str]:
    """Decode the input image and mask now, so that a bad file is one line before anything is loaded; how the
    picture's pixels are converted."""
    from renderer.plan.input_image import load_input
    from renderer.plan.input_mask import load_mask

    conversions = load_input(request.image, base)[1] if request.image is not None else []
    if request.mask is not None:
        load_mask(request.mask, base)
    return conversions


def check_disk(request: RenderRequest, plan: RenderPlan) -> None:
    out = Path(request.out)
    folder = out.parent if str(out.parent) else Path(".")
    needed = plan.output_bytes + (plan.checkpoint_bytes if Path(request.checkpoint_folder()).parent == folder else 0)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise RenderError(
            f"--size {format_size(plan.stages[-1])}: the output and checkpoints may need {needed / GiB:.2f} GiB, and the "
            f"folder of --out {out} has {free / GiB:.2f} GiB free; free space, write elsewhere or render smaller"
        )
    if request.checkpoint_dir is not None:
        existing = Path(request.checkpoint_dir)
        existing = existing if existing.exists() else existing.parent
        if plan.checkpoint_bytes > shutil.disk_usage(existing).free:
            raise RenderError(f"--checkpoint-dir {request.checkpoint_dir}: less than the {plan.checkpoint_bytes / 2**20:.0f} MiB of checkpoints is free there")


def check_memory(request: RenderRequest, plan: RenderPlan) -> None:
    """Refuse a single-process plan whose estimate exceeds the device's memory, saying what would fit."""
    if request.workers:
        return
    device = torch.device(request.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = available_memory(device) + process_memory()
    peak = plan.coordinator.peak
    if peak <= total:
        return
    options = []
    if request.frames > 1:
        per_frame = max(plan.coordinator.unet, plan.coordinator.vae) / request.frames
        options.append(f"--frames {max(1, int((total - peak + per_frame * request.frames) // per_frame))} or fewer "
                       f"(each frame needs about {per_frame / GiB:.1f} GiB)")
    if request.vae_mode != "tiled" and plan.coordinator.vae >= plan.coordinator.unet:
        options.append("--vae-mode tiled")
    if not request.freescale.fast_mode:
        options.append("--fast-mode")
    options.append(f"--workers {math.ceil(peak / total) + 1} on a Ray cluster")
    options.append("a smaller --size")
    raise RenderError(
        f"--size {format_size(plan.stages[-1])} needs about {peak / GiB:.1f} GiB on {request.device}, which has "
        f"{total / GiB:.1f} GiB; try {', '.join(options)}"
    )
