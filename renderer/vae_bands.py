"""VAE decoding in row bands, handed on as finished rows of pixels, and the tiled encode (decision 8).

Two modes:
- `tiled` reproduces diffusers' tiled decode (tiles of the VAE's sample size, ¼ overlap, linear blends,
  per-tile GroupNorm), one row of tiles at a time: only one tile row is ever held. Stage transitions in
  this mode also encode as diffusers' tiled encode does (`encode_tiled`), as the reference does.
- `exact` equals an untiled decode. It runs the decoder layer by layer over row bands: 3×3 convs read
  one-row halos from the neighbouring bands, GroupNorm moments of all bands are merged (float64)
  before any band is normalised, and the mid-block attention lets every band's queries see the keys of
  all bands. No op ever sees more than a band plus its halo, so peak memory is one layer's activation
  plus one band's temporaries, instead of the several full-size temporaries of an untiled decode.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

VAE_MODES = ("exact", "tiled")
Bands = list[torch.Tensor]  # (B, C, rows, W) pieces of one activation, top to bottom


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """(1, 3, rows, W) in [−1, 1] → (rows, W, 3) uint8."""
    return ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def conv_band(conv: nn.Conv2d, bands: Bands, index: int) -> torch.Tensor:
    """Band `index` of a stride-1 conv: its neighbours' rows are the halo, zeros at the image edges."""
    if conv.stride != (1, 1):
        raise ValueError("banded convs must have stride 1")
    band = bands[index]
    halo = conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
    if halo == 0:
        return conv(band)
    edge = band.new_zeros(*band.shape[:2], halo, band.shape[3])
    top = bands[index - 1][:, :, -halo:] if index > 0 else edge
    bottom = bands[index + 1][:, :, :halo] if index + 1 < len(bands) else edge
    padded = torch.cat([top, band, bottom], dim=2)
    return F.conv2d(padded, conv.weight, conv.bias, padding=(0, conv.padding[1]), dilation=conv.dilation)


def conv_bands(conv: nn.Conv2d, bands: Bands) -> Bands:
    return [conv_band(conv, bands, index) for index in range(len(bands))]


def group_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(count, mean, M2 = Σ(x − mean)²) per (batch, group) of a piece of an activation: (B, groups, 3), float64.

    Two passes in at least fp32 (one temporary of the piece's size), so no large cancelling sums."""
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    deviation = grouped - mean
    m2 = deviation.square_().sum(-1)
    return torch.stack([torch.full_like(m2, grouped.shape[-1]), mean[..., 0], m2], dim=-1).double()


def merge_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of the whole from the `group_moments` of its pieces, stacked on dim 0:
    var = [Σ M2_r + Σ n_r (mean_r − mean)²] / N, the between-piece term included."""
    count, mean, m2 = moments.unbind(-1)
    total = count.sum(0)
    overall = (count * mean).sum(0) / total
    return overall, (m2.sum(0) + (count * (mean - overall) ** 2).sum(0)) / total


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


def group_norm_bands(norm: nn.GroupNorm, bands: Bands) -> Bands:
    """GroupNorm with statistics over all bands (moments merged in float64)."""
    mean, var = merge_moments(torch.stack([group_moments(band, norm.num_groups) for band in bands]))
    return [normalize_groups(norm, band, mean, var) for band in bands]


def silu_bands(bands: Bands) -> Bands:
    return [F.silu(band) for band in bands]


def resnet_bands(resnet: ResnetBlock2D, bands: Bands) -> Bands:
    hidden = conv_bands(resnet.conv1, silu_bands(group_norm_bands(resnet.norm1, bands)))
    hidden = conv_bands(resnet.conv2, silu_bands(group_norm_bands(resnet.norm2, hidden)))
    shortcut = bands if resnet.conv_shortcut is None else conv_bands(resnet.conv_shortcut, bands)
    return [(x + h) / resnet.output_scale_factor for x, h in zip(shortcut, hidden)]


def attention_bands(attn: Attention, bands: Bands) -> Bands:
    """The VAE's mid-block self-attention: every band's queries against the keys and values of all bands."""
    normed = group_norm_bands(attn.group_norm, bands)
    tokens = [band.flatten(2).transpose(1, 2) for band in normed]  # (B, rows·W, C)
    heads = attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)

    keys = torch.cat([split(attn.to_k(t)) for t in tokens], dim=2)
    values = torch.cat([split(attn.to_v(t)) for t in tokens], dim=2)
    out = []
    for band, t in zip(bands, tokens):
        attended = F.scaled_dot_product_attention(split(attn.to_q(t)), keys, values).transpose(1, 2).flatten(2)
        projected = attn.to_out[1](attn.to_out[0](attended)).transpose(1, 2).reshape(band.shape)
        if attn.residual_connection:
            projected = projected + band
        out.append(projected / attn.rescale_output_factor)
    return out


def decode_exact(vae: AutoencoderKL, latents: torch.Tensor, band_rows: int) -> Iterator[torch.Tensor]:
    """Yield decoded rows (1, 3, rows, W) top to bottom, equal to `vae.decode` up to rounding."""
    z = latents.to(vae.dtype)
    if vae.config.use_post_quant_conv:
        z = vae.post_quant_conv(z)
    decoder = vae.decoder
    bands = conv_bands(decoder.conv_in, list(z.split(band_rows, dim=2)))
    mid = decoder.mid_block
    bands = resnet_bands(mid.resnets[0], bands)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            bands = attention_bands(attn, bands)
        bands = resnet_bands(resnet, bands)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            bands = resnet_bands(resnet, bands)
        for upsampler in block.upsamplers or []:
            bands = conv_bands(upsampler.conv, [F.interpolate(band, scale_factor=2.0, mode="nearest") for band in bands])
    bands = silu_bands(group_norm_bands(decoder.conv_norm_out, bands))
    for index in range(len(bands)):
        yield conv_band(decoder.conv_out, bands, index)
        if index > 0:
            bands[index - 1] = bands[index - 1][:, :, -1:]  # only the halo row is still needed


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


def decode_rows(vae: AutoencoderKL, latents: torch.Tensor, mode: str, band_rows: int = 16) -> Iterator[torch.Tensor]:
    """Decoded image rows (1, 3, rows, W), top to bottom, for `latents` already divided by the scaling factor."""
    if mode == "exact":
        yield from decode_exact(vae, latents, band_rows)
    elif mode == "tiled":
        yield from decode_tiled(vae, latents)
    else:
        raise ValueError(f"vae mode {mode!r}: use one of {', '.join(VAE_MODES)}")
