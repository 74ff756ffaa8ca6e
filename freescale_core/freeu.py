"""FreeU with the reference's channel-count rule (§7, decision 6).

Each up-block resnet receives cat(backbone, skip). A forward pre-hook splits that input again and, by
the backbone's channel count (the UNet's deepest width → b1/s1, the next → b2/s2), scales the first half
of the backbone channels and damps the skip's lowest frequencies. Going by channel count rather than
block index is what makes the first resnet of `up_blocks.1` follow b1/s1, as in the reference.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def fourier_filter(x: torch.Tensor, threshold: int, scale: float, first_row: int = 0, height: int | None = None,
                   sum_over_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Scale the central (2·threshold)² block of the fftshifted spectrum of (B, C, H, W) `x` by `scale`.

    That adds (scale − 1) times the inverse transform of just those few coefficients, each
    X[u, v] = Σ x·e^{−2πi(uy/H + vx/W)}; so they are computed directly (the sums over columns as one real
    fp32 matrix product, the rest in complex128) and no full-size spectrum exists. `x` may be the rows
    from `first_row` of an image `height` rows high: `sum_over_rows` then adds every strip's part of the
    coefficients (B, C, U, V), and each strip rebuilds its own rows."""
    height = x.shape[-2] if height is None else height
    width = x.shape[-1]

    def phases(size: int, positions: torch.Tensor) -> torch.Tensor:  # e^{−2πi·position·frequency/size}
        frequencies = torch.tensor(sorted({u % size for u in range(-threshold, threshold)}), dtype=torch.float64)
        return torch.exp(-2j * math.pi * positions[:, None].double() * frequencies[None] / size).to(x.device)

    row_phase = phases(height, torch.arange(first_row, first_row + x.shape[-2]))
    col_phase = phases(width, torch.arange(width))
    columns = torch.cat([col_phase.real, col_phase.imag], dim=1).float()  # (W, 2V): cos and sin
    by_column = x.float() @ columns  # (B, C, rows, 2V)
    by_column = torch.complex(*by_column.double().chunk(2, dim=-1))
    coefficients = torch.einsum("bchv,hu->bcuv", by_column, row_phase)
    if sum_over_rows is not None:
        coefficients = sum_over_rows(coefficients)
    per_row = torch.einsum("bcuv,hu->bchv", coefficients, row_phase.conj()) / (height * width)  # (B, C, rows, V)
    low = torch.cat([per_row.real, per_row.imag], dim=-1).float() @ columns.T
    return torch.add(x.float(), low, alpha=scale - 1).to(x.dtype)


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
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if backbone not in rule:
                return None
            backbone_scale, skip_scale = rule[backbone]
            x = args[0] if args else kwargs["input_tensor"]  # a motion UNet's up blocks pass it by name
            half = backbone // 2
            skip = skip_filter(x[:, backbone:], 1, skip_scale)
            x = torch.cat([x[:, :half] * backbone_scale, x[:, half:backbone], skip], dim=1)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input_tensor": x})

        return hook

    handles = [resnet.register_forward_pre_hook(make_hook(backbone), with_kwargs=True)
               for resnet, backbone in backbone_channels(unet).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
