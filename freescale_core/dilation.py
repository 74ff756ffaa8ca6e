"""Restrained dilated convolution: exactly the reference's 9 encoder/mid 3×3 convs (§3)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

DILATED_CONVS = (
    "down_blocks.1.downsamplers.0.conv",
    "down_blocks.2.resnets.0.conv1",
    "down_blocks.2.resnets.0.conv2",
    "down_blocks.2.resnets.1.conv1",
    "down_blocks.2.resnets.1.conv2",
    "mid_block.resnets.0.conv1",
    "mid_block.resnets.0.conv2",
    "mid_block.resnets.1.conv1",
    "mid_block.resnets.1.conv2",
)


def dilated_convs(unet: nn.Module, up_blocks: bool = False) -> list[nn.Conv2d]:
    """The restrained 9; with `up_blocks`, also every up-block resnet conv (the paper's ablation)."""
    modules = dict(unet.named_modules())
    missing = [name for name in DILATED_CONVS if name not in modules]
    if missing:
        raise ValueError(f"the UNet lacks SDXL's convs {missing}; FreeScale needs SDXL's block layout")
    convs = [modules[name] for name in DILATED_CONVS]
    if up_blocks:
        convs += [conv for block in unet.up_blocks for resnet in block.resnets for conv in (resnet.conv1, resnet.conv2)]
    return convs


@contextmanager
def dilate(unet: nn.Module, factor: int, up_blocks: bool = False) -> Iterator[None]:
    """Set dilation = padding = factor on the chosen 3×3 convs (same output size), and restore on exit."""
    convs = dilated_convs(unet, up_blocks)
    saved = [(conv.dilation, conv.padding) for conv in convs]
    try:
        for conv in convs:
            conv.dilation, conv.padding = (factor, factor), (factor, factor)
        yield
    finally:
        for conv, (dilation, padding) in zip(convs, saved):
            conv.dilation, conv.padding = dilation, padding
