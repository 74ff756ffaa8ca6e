"""What both VAE modes share: GroupNorm moments that merge across pieces, pixels out, and diffusers' tiling.

- `exact` (`renderer.parallel.banded_vae`) equals an untiled decode or encode: it runs each layer over row
  bands, with GroupNorm moments of all bands merged (float64, `merged_moments`) before any band is normalised.
- `tiled` reproduces diffusers' tiled decode (tiles of the VAE's sample size, ¼ overlap, linear blends,
  per-tile GroupNorm), one row of tiles at a time: only one tile row is ever held. Stage transitions in
  this mode also encode as diffusers' tiled encode does (`encode_tiled`), as the reference does (decision 8).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn

VAE_MODES = ("exact", "tiled")


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """(1, 3, rows, W) in [−1, 1] → (rows, W, 3) uint8; a clip's (frames, 3, rows, W) → (frames, rows, W, 3)."""
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return pixels[0] if len(pixels) == 1 else pixels


def group_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(count, mean, M2 = Σ(x − mean)²) per (batch, group) of a piece of an activation: (B, groups, 3), float64.

    Two passes in at least fp32 (one temporary of the piece's size), so no large cancelling sums."""
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    deviation = grouped - mean
    m2 = deviation.square_().sum(-1)
    return torch.stack([torch.full_like(m2, grouped.shape[-1]), mean[..., 0], m2], dim=-1).double()


def merged_moments(moments: torch.Tensor) -> torch.Tensor:
    """The (count, mean, M2) of the whole from those of its pieces, stacked on dim 0, with the between-piece
    term: M2 = Σ M2_r + Σ n_r (mean_r − mean)²."""
    count, mean, m2 = moments.unbind(-1)
    total = count.sum(0)
    overall = (count * mean).sum(0) / total
    return torch.stack([total, overall, m2.sum(0) + (count * (mean - overall) ** 2).sum(0)], dim=-1)


def merge_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of the whole from the `group_moments` of its pieces, stacked on dim 0."""
    count, mean, m2 = merged_moments(moments).unbind(-1)
    return mean, m2 / count


def normalize_groups(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of a piece `x` with the mean and variance (B, groups) of the whole activation."""
    inv_std = torch.rsqrt(var + norm.eps)
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, norm.num_groups, -1)
    normed = ((grouped - mean[..., None].to(x.dtype)) * inv_std[..., None].to(x.dtype)).reshape(x.shape)
    if norm.affine:
        affine_shape = (1, channels) + (1,) * (x.ndim - 2)
        normed = normed * norm.weight.view(affine_shape) + norm.bias.view(affine_shape)
    return normed


def tile_grid(vae: AutoencoderKL) -> tuple[int, int, int, int]:
    """diffusers' tiling in latent rows and pixels: (tile, stride, blend_px, finished_px per tile row)."""
    tile = vae.tile_latent_min_size
    blend = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    return tile, int(tile * (1 - vae.tile_overlap_factor)), blend, vae.tile_sample_min_size - blend


def blended_tile_rows(vae: AutoencoderKL, x: torch.Tensor, run_tile, tile: int, stride: int, blend: int, limit: int,
                      tile_rows: range | None = None, offset: int = 0) -> Iterator[torch.Tensor]:
    """diffusers' tiling, as its tiled decode and encode both do it: tiles of `tile` input rows and columns every
    `stride`, each run by `run_tile`, blended with the tile above and the one to the left over `blend` output
    rows or columns, `limit` of each kept. Yields the kept output of each of `tile_rows` (default: all), one tile
    row at a time, from `x` holding the input rows from `offset` on; the tile row above the first is run too,
    for its blend."""
    tile_rows = tile_rows or range(len(range(0, x.shape[2], stride)))
    previous: list[torch.Tensor] | None = None
    for i in range(max(tile_rows.start - 1, 0), tile_rows.stop):
        row = [run_tile(x[:, :, i * stride - offset : i * stride - offset + tile, j : j + tile]) for j in range(0, x.shape[3], stride)]
        finished = []
        for j, done in enumerate(row):
            if previous is not None:
                done = vae.blend_v(previous[j], done, blend)
            if j > 0:
                done = vae.blend_h(row[j - 1], done, blend)
            row[j] = done
            finished.append(done[:, :, :limit, :limit])
        previous = row
        if i in tile_rows:
            yield torch.cat(finished, dim=3)


def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile_rows: range | None = None, offset: int = 0) -> Iterator[torch.Tensor]:
    """diffusers' tiled decode, one tile row at a time; yields the finished rows of each tile row.

    Like diffusers, a latent that fits in one tile is decoded whole. A row strip decodes only `tile_rows`
    (plus the row above, for its blend) from `latents` holding the latent rows from `offset` on."""
    tile, stride, blend, limit = tile_grid(vae)
    if tile_rows is None and latents.shape[2] <= tile and latents.shape[3] <= tile:
        yield vae.decode(latents.to(vae.dtype)).sample
        return

    def decode_tile(piece: torch.Tensor) -> torch.Tensor:
        return vae.decoder(vae.post_quant_conv(piece) if vae.config.use_post_quant_conv else piece)

    yield from blended_tile_rows(vae, latents.to(vae.dtype), decode_tile, tile, stride, blend, limit, tile_rows, offset)


def encode_tile_grid(vae: AutoencoderKL) -> tuple[int, int, int, int]:
    """diffusers' tiled encode: (tile px, stride px, blend latent rows, kept latent rows per tile row)."""
    tile = vae.tile_sample_min_size
    blend = int(vae.tile_latent_min_size * vae.tile_overlap_factor)
    return tile, int(tile * (1 - vae.tile_overlap_factor)), blend, vae.tile_latent_min_size - blend


def encode_tiled(vae: AutoencoderKL, image: torch.Tensor, tile_rows: range | None = None, offset: int = 0) -> torch.Tensor:
    """diffusers' tiled encode: the posterior's moments (mean and log-variance), blended between tiles.

    Like diffusers, an image that fits in one tile is encoded whole. A row strip encodes only `tile_rows`
    (plus the row above, for its blend) from `image` holding the pixel rows from `offset` on, and gets the
    kept latent rows of those tile rows."""
    tile, stride, blend, limit = encode_tile_grid(vae)
    x = image.to(vae.dtype)

    def moments(piece: torch.Tensor) -> torch.Tensor:
        encoded = vae.encoder(piece)
        return vae.quant_conv(encoded) if vae.quant_conv is not None else encoded

    if tile_rows is None and x.shape[2] <= tile and x.shape[3] <= tile:
        return moments(x)
    return torch.cat(list(blended_tile_rows(vae, x, moments, tile, stride, blend, limit, tile_rows, offset)), dim=2)
