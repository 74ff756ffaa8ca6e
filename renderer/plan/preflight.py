"""Preflight: everything about a request that can be known before any weight is loaded.

The plan, the scheduler's limits, the input images, free disk for the output and checkpoints, and an
estimate of each device's peak memory, from the model's configs alone (models built on the meta device:
no weights). A plan that cannot work is refused with one line that says what would.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from freescale_core.cascade import restart_index
from renderer.errors import RenderError
from renderer.memory import available_memory, process_memory
from renderer.plan.geometry import Size, format_size
from renderer.plan.input_image import effective_strength, input_plan, load_input, strength_restart
from renderer.plan.request import RenderRequest, first_sharded_stage, guided

GiB = 2**30
# The working sets below are in activations of the op's own size (tokens x width, or pixels x the VAE's
# full-resolution width), measured on the tiny model on CPU (bench/preflight_memory.py, docs/benchmarks.md).
# One attention level of a CFG UNet call beyond the held skips: FreeScale's global and windowed q, k, v and
# outputs, the blur, the GEGLU feed-forward (8x then 4x wide) and the convs around them.
ATTENTION_WORKSET = 28
# The banded exact VAE on the device: one band's slab with its halo, normalised, upsampled, convolved and added
# to its input, in bands of the widest full-resolution activation (2.8 measured with bench/vae_memory.py on the
# tiny model, 4096², 2 ranks: docs/benchmarks.md).
BAND_WORKSET = 3
# Its mid-block attention at latent resolution, in activations of the strip's tokens x the mid width: queries,
# keys and values, the keys and values packed for the ring, the block in flight and the outputs.
MID_ATTENTION_WORKSET = 9
# A tile of diffusers' tiled encode or decode: the first block's input, output and temporaries at full size.
ENCODE_WORKSET = 4.5
# A CPU process holds this much more once it runs than when the preflight measures it (loaded pipeline
# objects, allocator caches, kernel workspaces; measured as above). CUDA's own context is not counted,
# as the GPU figures compare with torch's peak allocation.
CPU_RUNTIME = int(0.2 * GiB)

@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model: its configs and its parameter counts."""

    unet: dict
    vae: dict
    unet_params: int
    vae_params: int
    text_params: int
    train_timesteps: int


def model_shape(model: str) -> ModelShape | None:
    """The shape of a built-in model or a diffusers folder, built on the meta device; None for a single file
    or a hub id (those are checked once loaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from renderer.models.builtin import build_text_encoders, build_unet, build_vae, builtin_spec

    spec, folder = builtin_spec(model), Path(model)
    with torch.device("meta"):
        if spec is not None:
            unet, vae, encoders = build_unet(spec), build_vae(spec), build_text_encoders(spec)
            timesteps = 1000
        elif (folder / "model_index.json").is_file():
            try:
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
                timesteps = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("num_train_timesteps", 1000)
            except (OSError, ValueError) as error:
                raise RenderError(f"--model {model}: its configs cannot be read ({error})") from None
            encoders = ()
        else:
            return None
    count = lambda module: sum(parameter.numel() for parameter in module.parameters())  # noqa: E731
    text = sum(count(encoder) for encoder in encoders) or text_params_from_files(folder)
    return ModelShape(dict(unet.config), dict(vae.config), count(unet), count(vae), text, timesteps)


def text_params_from_files(folder: Path) -> int:
    """Text encoders' parameters of a diffusers folder, from their weight files' sizes (2 bytes each in fp16)."""
    total = 0
    for name in ("text_encoder", "text_encoder_2"):
        for weights in (folder / name).glob("*.safetensors"):
            total += weights.stat().st_size // (2 if ".fp16." in weights.name else 4)
    return total


@dataclass
class MemoryEstimate:
    """Peak bytes of one device, by what holds them."""

    baseline: int  # the process before the model (interpreter, libraries); 0 on a GPU
    weights: int
    unet: int  # one CFG UNet call's activations at the largest stage
    vae: int  # the largest VAE decode or encode on the device
    device: str
    band_rows: int = 0  # latent rows per band of the exact VAE at the largest stage (0: tiled)
    host: int = 0  # a GPU's exact VAE keeps its layers between bands in host memory

    @property
    def peak(self) -> int:
        return self.baseline + self.weights + max(self.unet, self.vae)


@dataclass
class Plan:
    stages: list[Size]
    unet_calls: int
    output_bytes: int  # uncompressed pixels of the pyramid: an upper bound for deflate
    checkpoint_bytes: int
    coordinator: MemoryEstimate
    worker: MemoryEstimate | None = None
    vae_scale: int = 8
    frames: int = 1
    guided: bool = True  # both guidance branches in every UNet call
    notes: list[str] = field(default_factory=list)  # what --image goes through, one line each

    def lines(self) -> list[str]:
        final = format_size(self.stages[-1])
        output = (f"output: {final}, at most {self.output_bytes / GiB:.2f} GiB uncompressed with its pyramid" if self.frames == 1 else
                  f"output: {self.frames} frames of {final} (an H.264 MP4, and every frame losslessly in a {self.output_bytes / GiB:.2f} GiB "
                  "TIFF at most)")
        lines = [
            *self.notes,
            f"stages: {' -> '.join(format_size(size) for size in self.stages)}",
            f"UNet calls: {self.unet_calls} ({'CFG batch of 2' if self.guided else 'guidance off: the conditional branch alone'}"
            f"{f' x {self.frames} frames' if self.frames > 1 else ''} each)",
            output,
            f"checkpoints: at most {self.checkpoint_bytes / 2**20:.0f} MiB",
        ]
        for label, estimate in (("coordinator", self.coordinator), ("each worker", self.worker)):
            if estimate is not None and not estimate.weights:
                lines.append(f"peak memory, {label} ({estimate.device}): {estimate.peak / GiB:.2f} GiB (the process and "
                             "the final rows it writes; no model: the workers hold it and run every stage)")
            elif estimate is not None:
                lines.append(
                    f"peak memory, {label} ({estimate.device}): {estimate.peak / GiB:.2f} GiB "
                    f"(process {estimate.baseline / GiB:.2f}, weights {estimate.weights / GiB:.2f}, "
                    f"UNet step {estimate.unet / GiB:.2f}, VAE {estimate.vae / GiB:.2f})"
                )
                if estimate.band_rows:
                    host = f"; its layers wait in {estimate.host / GiB:.2f} GiB of host memory" if estimate.host else ""
                    lines.append(f"exact VAE, {label}: bands of {estimate.band_rows} latent rows "
                                 f"({estimate.band_rows * self.vae_scale} px){host}")
        return lines


def dtype_bytes(request: RenderRequest, device: str) -> int:
    name = request.dtype or ("float16" if device.startswith("cuda") else "float32")
    return torch.finfo(getattr(torch, name)).bits // 8


def unet_activation_bytes(unet: dict, latent_hw: tuple[float, float], itemsize: int) -> int:
    """One CFG UNet call at latent_hw: every skip activation of the down path (held for the up path) plus the
    largest attention block's working set."""
    pixels = latent_hw[0] * latent_hw[1]
    channels = unet["block_out_channels"]
    skip = channels[0] * pixels  # conv_in
    workset = 0.0
    for level, (width, kind) in enumerate(zip(channels, unet["down_block_types"])):
        at_level = pixels / 4**level
        skip += unet["layers_per_block"] * width * at_level + (width * at_level / 4 if level + 1 < len(channels) else 0)
        if "CrossAttn" in kind:
            workset = max(workset, ATTENTION_WORKSET * width * at_level)
    return int(2 * itemsize * (skip + workset))


def vae_store_bytes(vae: dict, pixels: float, itemsize: int) -> float:
    """The banded VAE's store at its fullest: a resnet's input and hidden activation, or an upsampler's or
    downsampler's input and output, of `pixels` full-resolution pixels."""
    channels = vae["block_out_channels"]
    levels = len(channels)
    held = []
    for level, width in enumerate(channels):  # the encoder, from full resolution down
        at = pixels / 4**level
        held.append(((channels[level - 1] if level else channels[0]) + width) * at)
        held.append(width * at * 1.25 if level + 1 < levels else 0)
    reverse = channels[::-1]
    for level, width in enumerate(reverse):  # the decoder, from latent resolution up
        at = pixels / 4 ** (levels - 1 - level)
        held.append(((reverse[level - 1] if level else reverse[0]) + width) * at)
        held.append(width * at * 5 if level + 1 < levels else 0)
    return max(held) * itemsize


def vae_bytes(vae: dict, size: Size, mode: str, itemsize: int, share: float = 1.0, device: str = "cpu") -> tuple[int, int, int]:
    """Device bytes of the larger of the stage's encode and decode, the exact VAE's band height and the bytes of
    its layers kept in host memory (on a GPU; on the CPU they count on the device)."""
    pixels = size[0] * size[1] * share
    # fp32 images: the decoded one and its upsampled version, and in tiled mode the strip fetched with its tiles' rows
    images = 4 * 3 * pixels * (3 if mode == "tiled" else 2)
    if mode == "tiled":  # one tile at a time, both ways
        tile = vae.get("sample_size", 512)
        tile = tile[0] if isinstance(tile, (list, tuple)) else tile
        return int(ENCODE_WORKSET * tile * tile * vae["block_out_channels"][0] * itemsize + 12 * pixels + images), 0, 0
    from renderer.parallel.banded_vae import band_rows, full_resolution_width

    channels = vae["block_out_channels"]
    scale = 2 ** (len(channels) - 1)
    rows = min(band_rows(vae, size[0], itemsize), max(1, round(size[1] * share / scale)))
    band = BAND_WORKSET * rows * scale * size[0] * full_resolution_width(channels) * itemsize
    attention = MID_ATTENTION_WORKSET * pixels / scale**2 * channels[-1] * itemsize
    store = vae_store_bytes(vae, pixels, itemsize)
    on_device = band + attention + images
    if device.startswith("cuda"):
        return int(on_device), rows, int(store)
    return int(on_device + store), rows, 0


def estimate(request: RenderRequest, shape: ModelShape, stages: list[Size], device: str, share: float = 1.0,
             baseline: int = 0, sharded_from: int = 0) -> MemoryEstimate:
    """One device's peak over `stages`: those from `sharded_from` on hold `share` of their rows, the ones
    before it all of them (a gang's rank 0 runs those alone)."""
    itemsize = dtype_bytes(request, device)
    vae_itemsize = 4 if shape.vae.get("force_upcast") else itemsize
    weights = (shape.unet_params + shape.text_params) * itemsize + shape.vae_params * vae_itemsize
    scale = 2 ** (len(shape.vae["block_out_channels"]) - 1)
    shares = [1.0 if index < sharded_from else share for index in range(len(stages))]
    unet = max(unet_activation_bytes(shape.unet, (size[1] / scale * part, size[0] / scale), itemsize)
               for size, part in zip(stages, shares))
    mode = "tiled" if request.vae_mode == "tiled" else "exact"
    per_stage = [vae_bytes(shape.vae, size, mode, vae_itemsize, part, device) for size, part in zip(stages, shares)]
    vae, rows, _ = max(per_stage)
    frames = request.frames  # a clip's frames are the batch of every UNet call and every VAE pass
    return MemoryEstimate(baseline, weights, unet * frames, vae * frames, device, rows, max(host for _, _, host in per_stage) * frames)


def preflight(request: RenderRequest) -> Plan | None:
    """Check everything knowable without weights; the plan, or None where the model's configs cannot be
    read cheaply (a single file, a hub id: checked once loaded)."""
    shape = model_shape(request.model)
    if shape is None:
        return None
    stages = planned_stages(request, shape)
    check_steps(request, shape.train_timesteps)
    if request.scheduler is not None:  # it builds on the model's scheduler config and takes --steps
        from renderer.cascade.schedulers import build, model_scheduler_config
        build(model_scheduler_config(request.model), None, request.scheduler_choice, request.steps)
    check_motion(request, shape)
    notes = check_inputs(request, shape, stages[0])
    driver = process_memory() + CPU_RUNTIME
    if request.workers:  # the driver loads no model: it plans, writes checkpoints and streams the TIFF
        coordinator = MemoryEstimate(driver + writing_bytes(stages[-1], request.workers, request.frames), 0, 0, 0, "cpu")
    else:
        coordinator = estimate(request, shape, stages, request.device, baseline=0 if request.device.startswith("cuda") else driver)
    plan = Plan(
        stages=stages, unet_calls=unet_calls(request, len(stages)), output_bytes=pyramid_bytes(stages[-1]) * request.frames,
        checkpoint_bytes=checkpoint_bytes(stages, shape) * request.frames, coordinator=coordinator, frames=request.frames,
        guided=guided(request.guidance),
        worker=worker_estimate(request, shape, stages, driver), vae_scale=2 ** (len(shape.vae["block_out_channels"]) - 1),
        notes=notes,
    )
    check_disk(request, plan)
    check_memory(request, plan)
    return plan


def planned_stages(request: RenderRequest, shape: ModelShape) -> list[Size]:
    return request.plan(shape_geometry(shape))


def shape_geometry(shape: ModelShape):
    from renderer.models.loading import geometry_from_config

    return geometry_from_config(shape.unet["sample_size"], shape.vae["block_out_channels"], shape.unet["block_out_channels"])


def worker_device(request: RenderRequest) -> str:
    """Where a gang's workers run: a GPU each with --gpus-per-worker above 0, the CPU with 0; without it (a GPU
    each where the cluster has one per worker) as --device says."""
    if request.gpus_per_worker is not None:
        return "cuda" if request.gpus_per_worker > 0 else "cpu"
    return "cuda" if request.device.startswith("cuda") else "cpu"


def worker_estimate(request: RenderRequest, shape: ModelShape, stages: list[Size], baseline: int = 0) -> MemoryEstimate | None:
    """The peak of the busiest gang worker, on the device and dtype it will use: its share of the sharded stages,
    and for rank 0 the stages before them whole; None without a gang. `baseline`: a CPU worker's process."""
    first = first_sharded_stage(request, stages)
    if first >= len(stages):
        return None
    device = worker_device(request)
    return estimate(request, shape, stages, device, share=1 / request.workers, baseline=0 if device == "cuda" else baseline,
                    sharded_from=first)


def worker_need(request: RenderRequest) -> int | None:
    """Bytes each gang worker allocates beyond its loaded model at its largest step or VAE op, or None where
    the model's configs cannot be read cheaply."""
    shape = model_shape(request.model)
    worker = None if shape is None else worker_estimate(request, shape, planned_stages(request, shape))
    if worker is None:
        return None
    return max(worker.unet, worker.vae) + (0 if worker.device == "cuda" else CPU_RUNTIME)


def unet_calls(request: RenderRequest, stages: int) -> int:
    upscaling = request.steps - restart_index(request.steps, request.freescale.restart_fraction)
    if not request.image:
        return request.steps + (stages - 1) * upscaling
    first = request.steps - strength_restart(request.steps, effective_strength(request)) if stages > 1 else 0
    return first + (stages - 2) * upscaling if stages > 1 else 0


def writing_bytes(size: Size, workers: int, frames: int = 1) -> int:
    """A gang's driver writing the output: a worker's strip of final pixels (uint8) as it arrives, the writer's
    copy of it and its tiles: 2.5 strips, measured on the 16384² render of docs/benchmarks.md."""
    return int(2.5 * 3 * size[0] * size[1] * frames / workers)


def pyramid_bytes(size: Size) -> int:
    return int(size[0] * size[1] * 3 * 4 / 3)


def checkpoint_bytes(stages: list[Size], shape: ModelShape) -> int:
    """Every stage end, plus one mid-stage checkpoint (latents and reference) of the largest stage, fp32."""
    scale = 2 ** (len(shape.vae["block_out_channels"]) - 1)
    latent = [shape.unet["in_channels"] * (w // scale) * (h // scale) * 4 for w, h in stages]
    return sum(latent) + 2 * max(latent)


def check_steps(request: RenderRequest, train_timesteps: int) -> None:
    if request.steps > train_timesteps:
        raise RenderError(f"--steps {request.steps} exceeds the scheduler's {train_timesteps} training timesteps; use at most {train_timesteps} (50 is the reference)")


def check_motion(request: RenderRequest, shape: ModelShape) -> None:
    """A clip's motion adapter against the UNet and the frames, from its config (a hub id's once loaded)."""
    from renderer.models.motion import adapter_config, check_adapter

    config = adapter_config(request.model, request.motion_adapter) if request.frames > 1 else None
    if config is not None:
        check_adapter(config, shape.unet["block_out_channels"], request.frames, request.motion_adapter or request.model)


def check_inputs(request: RenderRequest, shape: ModelShape, base: Size) -> list[str]:
    """Read the input image and mask now, so that a bad file is one line before anything is loaded; the notes on
    what the picture goes through."""
    from renderer.plan.input_mask import load_mask

    notes = []
    if request.image is not None:
        notes = input_plan(request, shape_geometry(shape)).notes + load_input(request.image, base)[1]
    if request.mask is not None:
        load_mask(request.mask, base)
    return notes


def check_disk(request: RenderRequest, plan: Plan) -> None:
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


def check_memory(request: RenderRequest, plan: Plan) -> None:
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
