"""FreeU with the reference's channel-count rule (§7, decision 6).

Each up-block resnet receives cat(backbone, skip). A forward pre-hook splits that input again and, by
the backbone's channel count (the UNet's deepest width → b1/s1, the next → b2/s2), scales the first half
of the backbone channels and damps the skip's lowest frequencies. Going by channel count rather than
block index is what makes the first resnet of `up_blocks.1` follow b1/s1, as in the reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the central (2·threshold)² block of the fftshifted spectrum by `scale` (in fp32)."""
    dtype = x.dtype
    height, width = x.shape[-2:]
    mask = torch.ones(height, width, device=x.device)
    row, col = height // 2, width // 2
    mask[row - threshold : row + threshold, col - threshold : col + threshold] = scale
    # ifftshift(fftshift(S) · mask) = S · ifftshift(mask): the same products, without two permuting
    # copies of the whole complex spectrum.
    spectrum = torch.fft.fftn(x.float(), dim=(-2, -1)) * torch.fft.ifftshift(mask)
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(dtype)


def freeu_rule(unet: nn.Module, b1: float, b2: float, s1: float, s2: float) -> dict[int, tuple[float, float]]:
    """Backbone channel count → (backbone scale, skip scale)."""
    channels = unet.config.block_out_channels
    return {channels[-1]: (b1, s1), channels[-2]: (b2, s2)}


def backbone_channels(unet: nn.Module) -> dict[nn.Module, int]:
    """For each up-block resnet, how many of its input channels come from the backbone (the rest is the skip).

    diffusers builds up block i so that its first resnet takes the previous block's width and the others
    the block's own width (`reversed(block_out_channels)`).
    """
    widths = list(reversed(unet.config.block_out_channels))
    split = {}
    for position, block in enumerate(unet.up_blocks):
        for index, resnet in enumerate(block.resnets):
            split[resnet] = widths[max(position - 1, 0)] if index == 0 else widths[position]
    return split


SkipFilter = Callable[[torch.Tensor, int, float], torch.Tensor]  # (skip, threshold, scale) → filtered skip


@contextmanager
def freeu(unet: nn.Module, b1: float, b2: float, s1: float, s2: float, skip_filter: SkipFilter = fourier_filter) -> Iterator[None]:
    """`skip_filter` is the Fourier filter; a row-sharded run passes one that reduces over all strips."""
    rule = freeu_rule(unet, b1, b2, s1, s2)

    def make_hook(backbone: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if backbone not in rule:
                return None
            backbone_scale, skip_scale = rule[backbone]
            x = args[0]
            half = backbone // 2
            skip = skip_filter(x[:, backbone:], 1, skip_scale)
            return (torch.cat([x[:, :half] * backbone_scale, x[:, half:backbone], skip], dim=1), *args[1:])

        return hook

    handles = [resnet.register_forward_pre_hook(make_hook(backbone)) for resnet, backbone in backbone_channels(unet).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
