"""Peak memory of each device, and the output's and checkpoints' bytes, from the model's configs alone.

The working sets below are in activations of the op's own size; each says where it was measured."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from renderer.plan.geometry import Size, vae_scale_of
from renderer.plan.request import RenderRequest, guided
from renderer.plan.shape import ModelShape

GiB = 2**30
# Activations are tokens x width, or pixels x the VAE's full-resolution width, measured on the tiny model on CPU
# (bench/preflight_memory.py, docs/benchmarks.md).
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


def dtype_bytes(request: RenderRequest, device: str) -> int:
    name = request.dtype or ("float16" if device.startswith("cuda") else "float32")
    return torch.finfo(getattr(torch, name)).bits // 8


def unet_activation_bytes(unet: dict, latent_hw: tuple[float, float], itemsize: int, batch: int = 2) -> int:
    """One UNet call at latent_hw, of `batch` guidance branches (2 with CFG): every skip activation of the down path
    (held for the up path) plus the largest attention block's working set."""
    pixels = latent_hw[0] * latent_hw[1]
    channels = unet["block_out_channels"]
    skip = channels[0] * pixels  # conv_in
    workset = 0.0
    for level, (width, kind) in enumerate(zip(channels, unet["down_block_types"])):
        at_level = pixels / 4**level
        skip += unet["layers_per_block"] * width * at_level + (width * at_level / 4 if level + 1 < len(channels) else 0)
        if "CrossAttn" in kind:
            workset = max(workset, ATTENTION_WORKSET * width * at_level)
    return int(batch * itemsize * (skip + workset))


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
    scale = vae_scale_of(channels)
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
    scale = shape.vae_scale
    shares = [1.0 if index < sharded_from else share for index in range(len(stages))]
    branches = 2 if guided(request.guidance) else 1  # guidance off: the conditional branch alone
    unet = max(unet_activation_bytes(shape.unet, (size[1] / scale * part, size[0] / scale), itemsize, branches)
               for size, part in zip(stages, shares))
    mode = "tiled" if request.vae_mode == "tiled" else "exact"
    per_stage = [vae_bytes(shape.vae, size, mode, vae_itemsize, part, device) for size, part in zip(stages, shares)]
    vae, rows, _ = max(per_stage)
    frames = request.frames  # a clip's frames are the batch of every UNet call and every VAE pass
    return MemoryEstimate(baseline, weights, unet * frames, vae * frames, device, rows, max(host for _, _, host in per_stage) * frames)


def worker_device(request: RenderRequest) -> str:
    """Where a gang's workers run: a GPU each with --gpus-per-worker above 0, the CPU with 0; without it (a GPU
    each where the cluster has one per worker) as --device says."""
    if request.gpus_per_worker is not None:
        return "cuda" if request.gpus_per_worker > 0 else "cpu"
    return "cuda" if request.device.startswith("cuda") else "cpu"


def worker_estimate(request: RenderRequest, shape: ModelShape, stages: list[Size], first: int, baseline: int = 0) -> MemoryEstimate | None:
    """The peak of the busiest gang worker, on the device and dtype it will use: its share of the sharded stages,
    and for rank 0 the stages before them whole; None without a gang. `baseline`: a CPU worker's process."""
    if first >= len(stages):
        return None
    device = worker_device(request)
    return estimate(request, shape, stages, device, share=1 / request.workers, baseline=0 if device == "cuda" else baseline,
                    sharded_from=first)


def writing_bytes(size: Size, workers: int, frames: int = 1) -> int:
    """A gang's driver writing the output: a worker's strip of final pixels (uint8) as it arrives, the writer's
    copy of it and its tiles: 2.5 strips, measured on the 16384² render of docs/benchmarks.md."""
    return int(2.5 * 3 * size[0] * size[1] * frames / workers)


def pyramid_bytes(size: Size) -> int:
    return int(size[0] * size[1] * 3 * 4 / 3)


def checkpoint_bytes(stages: list[Size], shape: ModelShape) -> int:
    """Every stage end, plus one mid-stage checkpoint (latents and reference) of the largest stage, fp32."""
    scale = shape.vae_scale
    latent = [shape.unet["in_channels"] * (w // scale) * (h // scale) * 4 for w, h in stages]
    return sum(latent) + 2 * max(latent)
