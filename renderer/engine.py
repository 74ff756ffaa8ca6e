"""`render(request) -> RenderResult`: validate, load, run the cascade, stream the outputs."""

from __future__ import annotations

import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from freescale_core.cascade import restart_index
from renderer.errors import RenderError
from renderer.images import load_image, load_mask, mask_at
from renderer.models import load_pipeline, model_geometry, peek_geometry
from renderer.outputs import sidecar_path, stage_path, write_json, write_png
from renderer.progress import Progress
from renderer.request import RenderRequest, Size, format_size
from renderer.stages import encode, encode_prompts, generate_base, upsample, upscale_stage
from renderer.tiff import TiffOptions, write_pyramid, write_preview
from renderer.vae_bands import decode_rows, to_pixels

LIBRARIES = ("freescale-poster", "torch", "diffusers", "transformers", "numpy", "pillow", "tifffile")


@dataclass
class RenderResult:
    image: np.ndarray | None  # (H, W, 3) uint8; None when not kept (large TIFF renders)
    latents: torch.Tensor  # final latents, fp32, on CPU
    stages: list[Size]
    stage_images: list[np.ndarray] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def resolve_dtype(request: RenderRequest) -> torch.dtype:
    if request.dtype:
        return getattr(torch, request.dtype)
    return torch.float16 if request.device.startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise RenderError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RenderError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**34


def choose_vae_mode(request: RenderRequest, pipeline, size: Size, share: float = 1.0, available: int | None = None) -> str:
    """`exact` when one full-resolution decoder activation, three times over, fits in 80 % of free memory.

    A sharded decode holds `share` of the rows, in the `available` memory of the tightest worker."""
    if request.vae_mode != "auto":
        return request.vae_mode
    vae = pipeline.vae
    activation = size[0] * size[1] * share * vae.config.block_out_channels[0] * torch.finfo(vae.dtype).bits // 8
    return "exact" if 3 * activation < 0.8 * (available or available_memory(vae.device)) else "tiled"


def unscaled(pipeline, latents: torch.Tensor) -> torch.Tensor:
    vae = pipeline.vae
    return latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)


def decoded(pipeline, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """A stage transition's whole decoded image (fp32, unclamped: the reference re-encodes it as is)."""
    return torch.cat([rows.float() for rows in decode_rows(pipeline.vae, unscaled(pipeline, latents), mode)], dim=2)


def stage_reference(pipeline, latents: torch.Tensor, image: torch.Tensor | None, size_hw: tuple[int, int], config, stage: int) -> torch.Tensor:
    """ẑ₀ of an upscaling stage: the previous image resized in RGB and re-encoded (or, as the paper's
    ablation, the previous latents resized bicubically)."""
    if config.upsample_space == "latent":
        latent_hw = (size_hw[0] // pipeline.vae_scale_factor, size_hw[1] // pipeline.vae_scale_factor)
        return upsample(latents, latent_hw)
    return encode(pipeline, upsample(image, size_hw), config.seed, stage=stage)


def pixel_rows(pipeline, latents: torch.Tensor, mode: str) -> Iterator[np.ndarray]:
    """Final decode, streamed as (rows, W, 3) uint8 bands."""
    for rows in decode_rows(pipeline.vae, unscaled(pipeline, latents), mode):
        yield to_pixels(rows)


def render(request: RenderRequest, pipeline=None, progress: bool = True, write: bool = True, keep_image: bool = True) -> RenderResult:
    """Render `request`; `pipeline` reuses an already loaded model (its device and dtype win)."""
    check_device(request.device)
    if pipeline is None:
        geometry = peek_geometry(request.model)
        if geometry is not None:
            request.plan(geometry)  # refuse bad sizes before loading weights
        pipeline = load_pipeline(request.model, request.device, resolve_dtype(request), request.model_config)
    stages = request.plan(model_geometry(pipeline))
    base = stages[0]
    initial = load_image(request.image, base) if request.image else None
    mask = load_mask(request.mask, base) if request.mask else None
    config = replace(request.freescale, seed=request.seed)
    bar = Progress(progress)
    started = time.perf_counter()
    stage_times: list[float] = []
    stage_images: list[np.ndarray] = []
    first_sharded = first_sharded_stage(request, stages)
    if first_sharded < len(stages):
        check_shardable(pipeline, stages[first_sharded:], config, request.workers)
    device = pipeline.unet.device
    with ExitStack() as stack, torch.inference_mode():
        gang = stack.enter_context(start_gang(request)) if first_sharded < len(stages) else None
        modes = decode_modes(request, pipeline, stages, first_sharded, gang)
        transition_modes, vae_mode = modes[:-1], modes[-1]
        cond = encode_prompts(pipeline, request.prompt, request.negative_prompt, (base[1], base[0]), request.guidance)
        stage_start = time.perf_counter()
        if initial is None:
            bar.stage(f"stage 0 {format_size(base)}", request.steps)
            latents = generate_base(pipeline, cond, (base[1], base[0]), request.steps, config, bar)
        else:
            latents = encode(pipeline, initial.to(device), config.seed, stage=0)
        stage_times.append(time.perf_counter() - stage_start)
        for index, size in enumerate(stages[1:first_sharded], start=1):
            stage_start = time.perf_counter()
            size_hw = (size[1], size[0])
            transition_mode = transition_modes[index - 1]
            image = decoded(pipeline, latents, transition_mode) if request.save_stages or config.upsample_space == "rgb" else None
            if request.save_stages:
                stage_images.append(to_pixels(image))
            reference = stage_reference(pipeline, latents, image, size_hw, config, index)
            del image
            alpha = config.cosine_scale
            if mask is not None:
                region = mask_at(mask, tuple(reference.shape[-2:])).to(device)
                alpha = config.cosine_scale * region + config.cosine_scale_bg * (1 - region)
            bar.stage(f"stage {index} {format_size(size)}", request.steps - restart_index(request.steps, config.restart_fraction))
            latents = upscale_stage(pipeline, cond, reference, size_hw, index, request.steps, config, alpha, bar)
            stage_times.append(time.perf_counter() - stage_start)
        workers = {}
        if gang is not None:
            from cluster.gang import GangJob

            job = GangJob(cond=cond.to("cpu"), latents=latents.float().cpu(), stages=stages, first=first_sharded, steps=request.steps,
                          config=config, transition_modes=transition_modes, final_mode=vae_mode, mask=mask, save_stages=request.save_stages)
            outcome = gang.render(job, bar)
            latents, workers = outcome.latents, outcome.summary
            stage_images += outcome.stage_images
            stage_times += outcome.stage_seconds
        bar.close()
        result = RenderResult(
            image=None, latents=latents.float().cpu(), stages=stages, stage_images=stage_images,
            metadata={
                "request": request.to_dict(), "stages": [format_size(s) for s in stages], "freescale": config.to_dict(),
                "device": str(device), "dtype": str(pipeline.unet.dtype).removeprefix("torch."),
                "vae_dtype": str(pipeline.vae.dtype).removeprefix("torch."), "vae_mode": vae_mode,
                "transition_vae_modes": transition_modes, "seconds": {"stages": stage_times}, "versions": library_versions(),
                **({"workers": workers} if workers else {}),
            },
        )
        rows = pixel_rows(pipeline, latents, vae_mode) if gang is None else gang.pixel_rows()
        kept: list[np.ndarray] = []
        if keep_image or not write:
            rows = tee_into(rows, kept)
        if write:
            write_outputs(request, result, rows, started)
        else:
            for _ in rows:
                pass
            result.metadata["seconds"]["total"] = time.perf_counter() - started
    if kept:
        result.image = np.concatenate(kept, axis=0)
    return result


def decode_modes(request: RenderRequest, pipeline, stages: list[Size], first_sharded: int, gang) -> list[str]:
    """The VAE mode of each stage's decode: before the next stage, and the final one for the last.

    A decode runs where the stage after it runs; one on the workers is sized by a worker's strip against
    the tightest worker's free memory (asked once, and only when the mode is `auto`)."""
    worker_memory = gang.free_memory() if gang is not None and request.vae_mode == "auto" else None
    modes = []
    for index, size in enumerate(stages):
        if gang is not None and index + 1 >= first_sharded:
            modes.append(choose_vae_mode(request, pipeline, size, share=gang.largest_share(size), available=worker_memory))
        else:
            modes.append(choose_vae_mode(request, pipeline, size))
    return modes


def first_sharded_stage(request: RenderRequest, stages: list[Size]) -> int:
    """Index of the first stage the workers run: with --workers, the first upscaling stage with at least
    --shard-from's pixels (default: every upscaling stage); len(stages) when none is sharded."""
    if not request.workers:
        return len(stages)
    if request.shard_from is None:
        return 1 if len(stages) > 1 else len(stages)
    area = request.shard_from[0] * request.shard_from[1]
    first = next((index for index, size in enumerate(stages[1:], start=1) if size[0] * size[1] >= area), None)
    if first is None:
        raise RenderError(
            f"--shard-from {format_size(request.shard_from)} is larger than every upscaling stage "
            f"({', '.join(format_size(size) for size in stages[1:]) or 'none'}); nothing would run on the workers"
        )
    return first


def check_shardable(pipeline, stages: list[Size], config, workers: int) -> None:
    """Every sharded stage must split into `workers` strips of whole units (before anything is started)."""
    from cluster.gang import stage_layout

    for size in stages:
        try:
            stage_layout(pipeline, size, config, workers)
        except ValueError as error:
            raise RenderError(f"--workers {workers} at stage {format_size(size)}: {error}") from None


def start_gang(request: RenderRequest):
    """Reserve and start the workers (before any rendering, so a cluster that cannot host them fails fast)."""
    from cluster.coordinator import Gang, GangSpec

    return Gang(GangSpec(
        workers=request.workers, model=request.model, model_config=request.model_config, dtype=request.dtype,
        address=request.address, gpus_per_worker=request.gpus_per_worker,
    ))


def tee_into(rows: Iterable[np.ndarray], kept: list[np.ndarray]) -> Iterator[np.ndarray]:
    for band in rows:
        kept.append(band)
        yield band


def write_outputs(request: RenderRequest, result: RenderResult, rows: Iterable[np.ndarray], started: float) -> None:
    """Stage PNGs, then the image (streamed), then the sidecar, whose total time includes the writing."""
    out = Path(request.out)
    for index, (size, pixels) in enumerate(zip(result.stages, result.stage_images)):
        write_png(stage_path(out, index, size), pixels)
    if out.suffix.lower() == ".png":
        write_png(out, np.concatenate(list(rows), axis=0))
    else:
        options = TiffOptions(tile=request.tile_size, compression=request.compression, dpi=request.dpi, software=software_name())
        write_pyramid(out, rows, result.stages[-1], options, result.metadata, request.prompt, request.negative_prompt)
        if request.preview:
            write_preview(out, preview_path(out))
    result.metadata["seconds"]["total"] = time.perf_counter() - started
    write_json(sidecar_path(out), result.metadata)


def preview_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".preview.png")


def software_name() -> str:
    return f"freescale-poster {library_versions()['freescale-poster']}"
