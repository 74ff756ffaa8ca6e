"""Per-operation checks run inside each rank of a gloo group (see `distributed.py`).

Every check builds the same whole input on every rank (ramps, sines and a different offset per strip),
runs the plain op on the whole tensor and the sharded op on this rank's strip, and reports the largest
difference on this rank's rows relative to the largest reference value there.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.upsampling import Upsample2D
from torch import nn

from renderer.parallel import ops
from renderer.parallel.banded_vae import BandedVAE
from renderer.parallel.sharding import ShardedScaleFusion, sharded_backend, sharding
from renderer.parallel.strips import RowGroup, StripLayout, plan_strips
from renderer.vae.strip import decode_strip
from freescale_core import FreeScaleConfig, freescale_mode
from freescale_core.attention import ScaleFusionProcessor, StageGeometry
from freescale_core.blur import gaussian_blur
from freescale_core.windows import plan_windows, window_shape
from freescale_core.freeu import fourier_filter
from renderer.vae.bands import decode_tiled

Errors = dict[str, float]

# Uneven strips: 8 + 16 rows for 2 ranks, 16 + 8 + 16 for 3.
LAYOUTS = {2: StripLayout((0, 8, 24)), 3: StripLayout((0, 16, 24, 40))}
UNET_LAYOUTS = {2: StripLayout((0, 48, 128)), 3: StripLayout((0, 56, 88, 128))}  # 128 latent rows, 8-row units


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().double() - expected.detach().double()).abs().max() / expected.double().abs().max().clamp(min=1e-30))


def structured(shape: tuple[int, ...], layout: StripLayout, row_dim: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth ramps and sines over every axis, plus a different constant on each strip's rows."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    x = sum((0.3 + 0.1 * axis) * torch.sin(0.37 * (axis + 1) * g + seed) for axis, g in enumerate(grids))
    x = x + 0.05 * grids[row_dim] - 0.03 * grids[-1]
    scale = shape[row_dim] / layout.height
    owner = torch.bucketize(grids[row_dim].contiguous(), torch.tensor([b * scale for b in layout.bounds[1:-1]], dtype=torch.float64), right=True)
    return x + 0.7 * owner


def strip(rows: RowGroup, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """This rank's rows of a whole tensor (at any scale of the layout)."""
    factor = Fraction(x.shape[dim], rows.layout.height)
    start, stop = rows.layout.span(rows.rank)
    return x.narrow(dim, int(start * factor), int((stop - start) * factor))


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return module.double().eval()


def check_convs(rows: RowGroup) -> Errors:
    height = rows.layout.height
    x = structured((2, 3, height, 12), rows.layout)
    cases = {
        "conv 3x3": nn.Conv2d(3, 5, 3, padding=1),
        "conv dilated 3": nn.Conv2d(3, 5, 3, padding=3, dilation=3),
        "conv dilated 12 (halo wider than a strip)": nn.Conv2d(3, 5, 3, padding=12, dilation=12),
        "conv stride 2": nn.Conv2d(3, 5, 3, stride=2, padding=1),
        "conv dilated 2 stride 2": nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2),
        "upsample then conv": Upsample2D(3, use_conv=True),
    }
    errors = {}
    for name, module in cases.items():
        module = seeded(module)
        expected = module(x)
        with sharding(module, rows):
            got = module(strip(rows, x))
        errors[name] = relative(got, strip(rows, expected))
    return errors


def check_group_norm(rows: RowGroup) -> Errors:
    x = structured((2, 8, rows.layout.height, 10), rows.layout) * 3 + 5
    norm = nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
        norm.bias.copy_(torch.linspace(-1, 1, 8))
    expected = strip(rows, F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    with sharding(norm, rows):
        got = norm(strip(rows, x))
    strip_only = F.group_norm(strip(rows, x), 4, norm.weight, norm.bias, norm.eps)  # what tiled VAEs do
    return {"group norm": relative(got, expected), "group norm from one strip's statistics (must differ)": relative(strip_only, expected)}


def check_ring_attention(rows: RowGroup) -> Errors:
    token_rows = rows.with_layout(rows.layout.scaled(Fraction(6)))  # 6 tokens per row
    q, k, v = (structured((2, token_rows.layout.height, 3, 4), token_rows.layout, row_dim=1, seed=s) for s in range(3))
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).flatten(2)
    got = ops.ring_attention(token_rows, *(strip(token_rows, t, 1) for t in (q, k, v)))
    return {"ring attention": relative(got, strip(token_rows, expected, 1))}


def fusion_geometry(latent: tuple[int, int], train_latent: int, **changes) -> StageGeometry:
    size_px = (latent[0] * 8, latent[1] * 8)
    scale = (max(1, latent[0] // train_latent), max(1, latent[1] // train_latent))
    geometry = StageGeometry(size_px=size_px, vae_scale=8, train_latent=train_latent, scale=scale, step_index=3, seed=7,
                             fusion_blur="hw", window_jitter=True, fast_mode=False)
    return replace(geometry, **changes)


def check_scale_fusion(rows: RowGroup) -> Errors:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).double().eval()
    width = 12
    cases = {
        "scale fusion hw, jitter": ({}, 1),
        "scale fusion hwc": ({"fusion_blur": "hwc"}, 1),
        "scale fusion wc, no jitter": ({"fusion_blur": "wc", "window_jitter": False}, 1),
        "scale fusion at the 1/2 grid": ({}, 2),
        "scale fusion fast mode": ({"fast_mode": True}, 1),
    }
    errors = {}
    for name, (changes, downsample) in cases.items():
        geometry = fusion_geometry((rows.layout.height, width), train_latent=8, **changes)
        if geometry.fast_mode:
            geometry = replace(geometry, scale=(2, 2))
        grid = (rows.layout.height // downsample, width // downsample)
        hidden = structured((2, *grid, 16), rows.layout, row_dim=1).flatten(1, 2)
        attn.set_processor(ScaleFusionProcessor(geometry, block_index=4))
        expected = attn(hidden)
        attn.set_processor(ShardedScaleFusion(geometry, 4, rows))
        token_rows = rows.with_layout(rows.layout.scaled(Fraction(grid[1], downsample)))
        got = attn(strip(token_rows, hidden, 1))
        errors[name] = relative(got, strip(token_rows, expected, 1))
    return errors


def check_windows(rows: RowGroup) -> Errors:
    """The local branch alone: every window with zero-padded borders and seeded jitter, at both grids."""
    torch.manual_seed(1)
    attn = Attention(query_dim=16, heads=2, dim_head=8).double().eval()
    errors = {}
    for downsample in (1, 2):
        geometry = fusion_geometry((rows.layout.height, 12), train_latent=16)
        grid = (rows.layout.height // downsample, 12 // downsample)
        window = window_shape(grid, geometry.size_px, geometry.train_latent, downsample)
        plan = plan_windows(grid, window, True, geometry.seed, key=("windows", downsample))
        assert plan.rows.jitter > 0 and plan.rows.count >= 2  # windows overlap strip borders and the padding
        hidden = structured((2, *grid, 16), rows.layout, row_dim=1)
        expected, _ = ScaleFusionProcessor(geometry, 0).local_branch(attn, hidden, plan, window)
        got, _ = ShardedScaleFusion(geometry, 0, rows).local_branch(attn, strip(rows, hidden, 1), plan, window)
        token_rows = rows.with_layout(rows.layout.scaled(Fraction(grid[1], downsample)))
        errors[f"local windows, padded and jittered, 1/{downsample} grid"] = relative(got, strip(token_rows, expected, 1))
    return errors


def check_blur(rows: RowGroup) -> Errors:
    grid = structured((2, rows.layout.height, 9, 6), rows.layout, row_dim=1)
    errors = {}
    for variant in ("hw", "hwc", "wc"):
        for size in (5, 15):
            got = ops.blur(rows, strip(rows, grid, 1), variant, size)
            errors[f"blur {variant} k={size}"] = relative(got, strip(rows, gaussian_blur(grid, variant, size), 1))
    return errors


def check_fourier(rows: RowGroup) -> Errors:
    x = structured((2, 6, rows.layout.height, 10), rows.layout)
    return {
        f"freeu fourier filter s={scale}": relative(ops.fourier_filter(rows, strip(rows, x), 1, scale), strip(rows, fourier_filter(x, 1, scale)))
        for scale in (0.6, 0.4)
    }


def check_resize(rows: RowGroup) -> Errors:
    errors = {}
    for source_height, target_height in ((20, 40), (20, 30), (24, 72)):
        source = rows.with_layout(plan_strips(source_height, rows.world, 1))
        target = plan_strips(target_height, rows.world, 1)
        x = structured((1, 3, source_height, 7), source.layout)
        expected = F.interpolate(x, size=(target_height, 11), mode="bicubic", align_corners=False)
        got = ops.resize(source, strip(source, x), target, 11)
        start, stop = target.span(rows.rank)
        errors[f"bicubic resize {source_height}->{target_height}"] = relative(got, expected[:, :, start:stop])
    return errors


def check_vae(rows: RowGroup, pipeline) -> Errors:
    """The banded VAE on uneven strips, with the plan's bands (one per strip here) and with bands of a few rows
    (halos between bands and between ranks, moments merged over both)."""
    vae = pipeline.vae
    latent = (structured((1, 4, rows.layout.height, 16), rows.layout) * 2).float()
    scaling = vae.config.scaling_factor
    errors = {}
    with torch.inference_mode():
        expected = vae.decode(latent / scaling).sample
        errors["vae decode exact"] = relative(decode_strip(pipeline, rows, strip(rows, latent), "exact"), strip(rows, expected))
        banded = torch.cat(list(BandedVAE(vae, rows, 3).decode(strip(rows, latent) / scaling)), dim=2)
        errors["vae decode exact, 3-row bands"] = relative(banded, strip(rows, expected))
        expected = torch.cat(list(decode_tiled(vae, latent / scaling)), dim=2)
        errors["vae decode tiled"] = relative(decode_strip(pipeline, rows, strip(rows, latent), "tiled"), strip(rows, expected))
        image = (structured((1, 3, rows.layout.height * 8, 40), rows.layout) * 0.3).float()
        expected = vae.encode(image).latent_dist.parameters
        for band_rows, name in ((2, "vae encode, 2-row bands"), (64, "vae encode, a band per strip")):
            errors[name] = relative(BandedVAE(vae, rows, band_rows).encode(strip(rows, image)), strip(rows, expected))
        errors["vae encode tiled"] = check_tiled_encode(rows, vae)
    return errors


def check_tiled_encode(rows: RowGroup, vae) -> float:
    """diffusers' tiled encode with 64 px tiles (48 px stride, 6 latent rows kept per tile row) of an image
    whose tile rows straddle the strips: this rank's rows against the whole image's."""
    from renderer.vae.strip import encode_strip_tiled
    from renderer.vae.bands import encode_tiled

    image = (structured((1, 3, rows.layout.height * 8, 136), rows.layout) * 0.3).float()
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    try:
        expected = encode_tiled(vae, image)
        got = encode_strip_tiled(vae, rows, strip(rows, image))
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    return relative(got, strip(rows, expected))


def check_unet(rank: int, world: int, pipeline) -> Errors:
    """A whole tiny-UNet CFG forward in FreeScale mode at a 4x stage (1024 px) on uneven strips: a dilated step, a
    plain one, and with scale fusion off (plain self-attention over all strips)."""
    config = FreeScaleConfig(seed=5)
    size = (1024, 1024)
    rows = RowGroup(UNET_LAYOUTS[world])
    unet = pipeline.unet
    latent = (structured((2, 4, 128, 128), rows.layout) * 0.5).float()
    embeds = torch.linspace(-1, 1, 2 * 77 * unet.config.cross_attention_dim).view(2, 77, -1)
    added = {"text_embeds": torch.linspace(-1, 1, 2 * 32).view(2, 32), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    errors = {}
    cases = {"step 0": (config, 0), "step 40": (config, 40), "no scale fusion, step 0": (replace(config, scale_fusion=False), 0)}
    with torch.inference_mode():
        for name, (case, step) in cases.items():
            with freescale_mode(unet, case, size=size, step_index=step):
                expected = unet(latent, 500, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            with sharding(unet, rows), freescale_mode(unet, case, size=size, step_index=step, backend=sharded_backend(rows)):
                got = unet(strip(rows, latent), 500, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            errors[f"tiny unet forward, {name}"] = relative(got, strip(rows, expected))
    return errors


def run_all(rank: int, world: int) -> Errors:
    """Every per-op check on this rank (the UNet and VAE ones use the built-in tiny model)."""
    from renderer.models import load_pipeline

    rows = RowGroup(LAYOUTS[world])
    errors: Errors = {}
    for check in (check_convs, check_group_norm, check_ring_attention, check_windows, check_scale_fusion, check_blur, check_fourier, check_resize):
        errors.update(check(rows))
    pipeline = load_pipeline("tiny")
    errors.update(check_vae(rows, pipeline))
    errors.update(check_unet(rank, world, pipeline))
    return errors


def split_stage_job(pipeline):
    """A 256 -> 512 stage of the tiny model with a region mask and a checkpoint after every step: the job both
    the guidance-split gang and the single process run."""
    from renderer.messages import StageJob
    from renderer.cascade.stages import encode_prompts

    cond = encode_prompts(pipeline, "a red kite", "blurry", (256, 256), guidance=7.5)
    layout = StripLayout((0, 8, 16, 24, 32))
    latents = (structured((1, 4, 32, 32), layout) * 0.5).float()
    mask = torch.zeros(1, 1, 256, 256)
    mask[:, :, 40:200, 90:170] = 1
    return StageJob(cond=cond, latents=latents, stages=[(256, 256), (512, 512)], first=1, last=2, steps=4,
                    config=FreeScaleConfig(seed=5, cosine_scale_bg=0.5), transition_modes=["exact"], final_mode="exact",
                    mask=mask, checkpoint_steps=1, cfg_split=True)


def run_split_stage(rank: int, world: int) -> dict:
    """This rank's part of `split_stage_job` with the guidance split: its rows, final latents, the checkpoint
    rows it handed over and the bytes it received per step by kind."""
    from renderer.cascade.stage_loop import run_stages
    from renderer.models import load_pipeline

    pipeline = load_pipeline("tiny")
    handed = []
    run = run_stages(pipeline, split_stage_job(pipeline), checkpoint=lambda *args: handed.append(args))
    return {"span": run.rows.span, "latents": run.latents, "checkpoints": handed, "step_bytes": run.step_bytes[1]}
