"""The exact VAE (decoder and encoder) on a rank's rows, band by band: memory set by the band height.

Every layer runs over this rank's rows in bands of `band_rows` latent rows (8× that at full resolution),
top to bottom. A 3×3 conv reads its halo rows from the neighbouring bands, and at the strip's edges from
the neighbouring ranks (one exchange per conv); the GroupNorm and SiLU before it are applied to the band
and its halo as it is read, so that no normalised copy of a layer is ever held. GroupNorm statistics are
taken per channel as each band is produced, merged over bands and ranks in float64 and grouped then. The
mid-block attention, at latent resolution, gives every band's queries the keys of all rows (the ranks'
blocks pass around the ring). A group of one (`RowGroup.single`) is the single-process banded decode.

Between layers the bands wait in the store: host memory when the VAE runs on a GPU, so that the GPU holds
one band's working set and the mid-block's keys; the VAE's device memory where that is the host. A
resnet holds its input and its hidden activation there, each band of the input freed as its output band
is written. Equal to an untiled `vae.decode` / `vae.encode` up to rounding, for any bands and strips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from freescale_core.attention import project
from renderer.parallel import ops
from renderer.parallel.strips import RowGroup
from renderer.plan.geometry import vae_scale_of
from renderer.vae.bands import group_moments, merged_moments, normalize_groups

# The widest full-resolution activation of one band holds at most this many bytes (`band_rows`).
BAND_BYTES = 256 * 2**20
Pointwise = Callable[[torch.Tensor], torch.Tensor]


def full_resolution_width(block_out_channels) -> int:
    """Channels of the widest full-resolution activation: the decoder's last level reads the level above's
    output, upsampled."""
    return max(block_out_channels[:2])


def band_rows(vae_config, width_px: int, itemsize: int) -> int:
    """Latent rows per band for an image `width_px` wide: as many as keep the widest full-resolution
    activation of a band within BAND_BYTES, at least one. A function of the plan only, so that a render's
    bands (and its rounding) never depend on the machine."""
    channels = vae_config["block_out_channels"]
    per_latent_row = vae_scale_of(channels) * width_px * full_resolution_width(channels) * itemsize
    return max(1, BAND_BYTES // per_latent_row)


@dataclass
class Activation:
    """One layer's activation of this rank's rows: bands top to bottom, in the store (None once consumed),
    and its per-channel moments (B, C, 3) over this rank's rows, if it is normalised next."""

    bands: list[torch.Tensor | None]
    moments: torch.Tensor | None = None


class BandedVAE:
    def __init__(self, vae: AutoencoderKL, rows: RowGroup, band_rows: int):
        self.vae, self.rows, self.band_rows = vae, rows, band_rows
        self.device, self.dtype = vae.device, vae.dtype
        self.store = torch.device("cpu") if self.device.type == "cuda" else self.device

    def split(self, x: torch.Tensor) -> Activation:
        """This rank's rows of an input (latents, or pixels at 8× the rows) as bands."""
        start, stop = self.rows.span
        scale = x.shape[2] // (stop - start)
        return Activation([band.to(self.store) for band in x.to(self.dtype).split(self.band_rows * scale, dim=2)])

    def statistics(self, groups: int, x: Activation) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (B, groups) over all ranks' rows: per-channel moments merged over the ranks,
        then over each group's channels."""
        slots = x.moments.new_zeros(self.rows.world, *x.moments.shape)
        slots[self.rows.rank] = x.moments
        channels = merged_moments(self.rows.sum(slots))  # (B, C, 3)
        count, mean, m2 = merged_moments(channels.unflatten(1, (groups, -1)).movedim(2, 0)).unbind(-1)
        return mean, m2 / count

    def norm_act(self, norm: nn.GroupNorm, x: Activation) -> Pointwise:
        """GroupNorm over all rows, then SiLU, as a function of any band of `x` (with its halo)."""
        mean, var = self.statistics(norm.num_groups, x)
        return lambda band: F.silu(normalize_groups(norm, band, mean, var))

    def outputs(self, conv: nn.Conv2d, x: Activation, pre: Pointwise | None = None, upsample: bool = False,
                pad_right: bool = False, consume: bool = False) -> Iterator[torch.Tensor]:
        """`conv` of every band of `x` (on the device, top to bottom), after `pre` and, with `upsample`, a nearest
        2× upsampling; `pad_right`: one zero column first (the encoder's downsamplers pad right and bottom).
        Rows beyond the image are zeros after `pre`, as the conv's padding; `consume` frees each input band
        once no later band reads it."""
        bands = x.bands
        stride, top = conv.stride[0], conv.padding[0]
        reach = conv.dilation[0] * (conv.kernel_size[0] - 1)
        above, below = (1, 1) if upsample else (top, reach + 1 - stride - top)
        last = bands[-1]
        edge_above, edge_below = self.rows.edges(bands[0][:, :, :below].to(self.device),
                                                 last[:, :, last.shape[2] - above :].to(self.device))
        for index, band in enumerate(bands):
            over = (bands[index - 1][:, :, -above:] if index else edge_above) if above else None
            under = (bands[index + 1][:, :, :below] if index + 1 < len(bands) else edge_below) if below else None
            slab = torch.cat([part.to(self.device) for part in (over, band, under) if part is not None], dim=2)
            if pre is not None:
                slab = pre(slab)
            zeros = [slab.new_zeros(*slab.shape[:2], rows, slab.shape[3]) if rows and part is None else None
                     for part, rows in ((over, above), (under, below))]
            slab = torch.cat([part for part in (zeros[0], slab, zeros[1]) if part is not None], dim=2)
            if upsample:
                slab = F.interpolate(slab, scale_factor=2.0, mode="nearest")
            if pad_right:
                slab = F.pad(slab, (0, 1, 0, 0))
            out = F.conv2d(slab, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)
            yield out[:, :, 1:-1] if upsample else out
            if consume and index:
                bands[index - 1] = None

    def kept(self, outputs: Iterable[torch.Tensor]) -> Activation:
        """Output bands (on the device) moved to the store, with their moments."""
        bands, moments = [], []
        for out in outputs:
            moments.append(group_moments(out, out.shape[1]))
            bands.append(out.to(self.store))
        return Activation(bands, merged_moments(torch.stack(moments)))

    def conv(self, conv: nn.Conv2d, x: Activation, pre: Pointwise | None = None,
             post: Callable[[int, torch.Tensor], torch.Tensor] | None = None, **options) -> Activation:
        """`outputs` kept in the store, each band passed through `post(index, band)` first."""
        outputs = self.outputs(conv, x, pre, **options)
        return self.kept(outputs if post is None else (post(index, out) for index, out in enumerate(outputs)))

    def resnet(self, block, x: Activation) -> Activation:
        """diffusers' ResnetBlock2D without a time embedding: each input band is freed as its output is written."""
        hidden = self.conv(block.conv1, x, self.norm_act(block.norm1, x))

        def add_input(index: int, out: torch.Tensor) -> torch.Tensor:
            skip = x.bands[index].to(self.device)
            x.bands[index] = None
            if block.conv_shortcut is not None:
                skip = block.conv_shortcut(skip)
            return (skip + out) / block.output_scale_factor

        return self.conv(block.conv2, hidden, self.norm_act(block.norm2, hidden), add_input, consume=True)

    def attention(self, attn, x: Activation) -> Activation:
        """The mid-block's self-attention: every band's queries against the keys and values of all rows."""
        mean, var = self.statistics(attn.group_norm.num_groups, x)
        projected = [project(attn, normalize_groups(attn.group_norm, band.to(self.device), mean, var).flatten(2).transpose(1, 2))
                     for band in x.bands]
        queries, keys, values = zip(*projected)
        del projected
        attended = ops.ring_attention_bands(self.rows, list(queries), torch.cat(keys, dim=1), torch.cat(values, dim=1))
        del queries, keys, values

        def outputs() -> Iterator[torch.Tensor]:
            for index, band in enumerate(x.bands):
                band = band.to(self.device)
                out = attn.to_out[1](attn.to_out[0](attended[index].to(band.dtype))).transpose(1, 2).reshape(band.shape)
                attended[index] = x.bands[index] = None
                yield (out + band if attn.residual_connection else out) / attn.rescale_output_factor

        return self.kept(outputs())

    def mid(self, block, x: Activation) -> Activation:
        x = self.resnet(block.resnets[0], x)
        for attn, resnet in zip(block.attentions, block.resnets[1:]):
            if attn is not None:
                x = self.attention(attn, x)
            x = self.resnet(resnet, x)
        return x

    def decode(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """This rank's rows of `vae.decode(z)` (z unscaled, this rank's latent rows), band by band on the device."""
        vae, decoder = self.vae, self.vae.decoder
        if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
            raise ValueError("the banded decode needs a decoder with a GroupNorm output (not a spatial norm)")
        z = z.to(self.device, self.dtype)
        if vae.config.use_post_quant_conv:
            z = vae.post_quant_conv(z)
        x = self.mid(decoder.mid_block, self.conv(decoder.conv_in, self.split(z)))
        for block in decoder.up_blocks:
            for resnet in block.resnets:
                x = self.resnet(resnet, x)
            for upsampler in block.upsamplers or []:
                x = self.conv(upsampler.conv, x, upsample=True, consume=True)
        yield from self.outputs(decoder.conv_out, x, self.norm_act(decoder.conv_norm_out, x), consume=True)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """This rank's latent rows of the posterior's moments (`vae.encode(image).latent_dist.parameters`) from
        this rank's pixel rows of `image`."""
        vae, encoder = self.vae, self.vae.encoder
        x = self.conv(encoder.conv_in, self.split(image.to(self.device)))
        for block in encoder.down_blocks:
            for resnet in block.resnets:
                x = self.resnet(resnet, x)
            for downsampler in block.downsamplers or []:
                x = self.conv(downsampler.conv, x, pad_right=downsampler.padding == 0, consume=True)
        x = self.mid(encoder.mid_block, x)
        moments = torch.cat(list(self.outputs(encoder.conv_out, x, self.norm_act(encoder.conv_norm_out, x), consume=True)), dim=2)
        return vae.quant_conv(moments) if vae.quant_conv is not None else moments
