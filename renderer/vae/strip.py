"""The VAE on row strips: a rank's rows of a decode, and of the re-encoded reference of the next stage.

`exact` runs the banded VAE (`renderer.parallel.banded_vae`) on the rank's rows, a group of one included;
`tiled` decodes diffusers' tile rows that meet the strip (a group of one: every tile row, streamed).
Either way a rank's rows equal the single-process result's.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterator

import torch

from freescale_core import FreeScaleConfig
from renderer.cascade.stages import sample_latents, unscaled
from renderer.parallel import ops
from renderer.parallel.banded_vae import BandedVAE, band_rows
from renderer.parallel.strips import RowGroup, Span, StripLayout
from renderer.plan.geometry import vae_scale_of
from renderer.vae.bands import VAE_MODES, decode_tiled, encode_tile_grid, encode_tiled, tile_grid


def banded(vae, rows: RowGroup, width_px: int) -> BandedVAE:
    """The banded VAE on this rank's rows of an image `width_px` wide, with the plan's band height."""
    return BandedVAE(vae, rows, band_rows(vae.config, width_px, vae.dtype.itemsize))


def tile_row_reads(layout: StripLayout, kept: int, stride: int, tile: int, height: int) -> tuple[list[range], list[Span]]:
    """For diffusers' tiling on row strips: per rank, the tile rows whose kept output (`kept` latent rows
    each) meets its latent rows in `layout`, and the input rows they read out of `height` (tile rows `stride`
    apart and `tile` long), the tile row above included for its blend."""
    tile_rows = [range(a // kept, (b - 1) // kept + 1) for a, b in (layout.span(r) for r in range(layout.ranks))]
    return tile_rows, [(max(0, (t.start - 1) * stride), min(height, (t.stop - 1) * stride + tile)) for t in tile_rows]


def decoded_bands(vae, rows: RowGroup, z: torch.Tensor, mode: str) -> Iterator[torch.Tensor]:
    """This rank's rows of the decode of `mode` of unscaled latents `z` (its latent rows), top to bottom in bands.

    `tiled` in a group of one streams diffusers' tile rows; on a strip it decodes the tile rows whose finished
    rows meet the strip, plus the tile row above for its blend, from the latent rows they cover."""
    scale = vae_scale_of(vae.config.block_out_channels)
    if mode == "exact":
        yield from banded(vae, rows, z.shape[3] * scale).decode(z)
        return
    if mode != "tiled":
        raise ValueError(f"vae mode {mode!r}: use one of {', '.join(VAE_MODES)}")
    z = z.to(vae.dtype)
    if rows.world == 1:
        yield from decode_tiled(vae, z)
        return
    layout = rows.layout_for(z.shape[2])
    start, stop = layout.span(rows.rank)
    tile, stride, _, finished = tile_grid(vae)
    if layout.height <= tile and z.shape[3] <= tile:
        whole = rows.fetch(z, 2, [(0, layout.height)] * rows.world, "vae")
        yield vae.decode(whole).sample[:, :, start * scale : stop * scale]
        return
    tile_rows, requests = tile_row_reads(layout, stride, stride, tile, layout.height)
    mine = tile_rows[rows.rank]
    slab = rows.fetch(z, 2, requests, "vae")
    pixels = torch.cat(list(decode_tiled(vae, slab, mine, offset=requests[rows.rank][0])), dim=2)
    first = mine.start * finished
    yield pixels[:, :, start * scale - first : stop * scale - first]


def decode_strip(pipeline, rows: RowGroup, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """This rank's rows of the decoded image (fp32, unclamped), equal to the single-process decode of `mode`."""
    return torch.cat([band.float() for band in decoded_bands(pipeline.vae, rows, unscaled(pipeline, latents), mode)], dim=2)


def stage_reference(pipeline, previous: RowGroup, latents: torch.Tensor, image: torch.Tensor | None, rows: RowGroup,
                    size: tuple[int, int], config: FreeScaleConfig, stage: int, mode: str = "exact") -> torch.Tensor:
    """This rank's rows of ẑ₀: the previous image resized in RGB and re-encoded (`mode`: exact, or tiled as
    diffusers tiles it), or, as the paper's ablation, the previous latents resized bicubically."""
    scale = pipeline.vae_scale_factor
    if config.upsample_space == "latent":
        return ops.resize(previous, latents, rows.layout, size[0] // scale)
    image = ops.resize(previous, image, rows.layout.scaled(Fraction(scale)), size[0])
    return encode_rows(pipeline, rows, image, config.seed, stage, mode)


def encode_rows(pipeline, rows: RowGroup, image: torch.Tensor, seed: int, stage: int, mode: str = "exact") -> torch.Tensor:
    """This rank's latent rows of the seeded encode of the image whose pixel strip it holds (`mode`: exact, or
    tiled as diffusers tiles it)."""
    if mode == "tiled":
        moments = encode_strip_tiled(pipeline.vae, rows, image)
    else:
        moments = banded(pipeline.vae, rows, image.shape[3]).encode(image)
    return sample_latents(pipeline, moments, seed, stage, rows=rows.layout.rows(rows.rank), latent_height=rows.layout.height)


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
