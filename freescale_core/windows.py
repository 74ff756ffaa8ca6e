"""Geometry of scale fusion's local windows (§4 "Local branch"), relative to the training size.

A window covers the training size with the image's aspect ratio (its long side is the training size),
windows overlap by half, the last one is shifted back inside, and each is jittered by up to a window/8
into a zero-padded border: [−r, 0] at the start edge, [0, r] at the end edge, [−r, r] inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freescale_core.rng import stream


@dataclass(frozen=True)
class AxisWindows:
    """Windows along one axis of a token grid."""

    grid: int
    size: int
    stride: int
    jitter: int  # r: the padding on each side and the largest shift

    @property
    def count(self) -> int:
        if self.grid <= self.size:
            return 1
        return -(-(self.grid - self.size) // self.stride) + 1

    def starts(self) -> torch.Tensor:
        """Unjittered starts, in unpadded token coordinates."""
        index = torch.arange(self.count)
        return torch.clamp(index * self.stride, max=self.grid - self.size)

    def jitter_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts()
        at_start = starts == 0
        at_end = starts + self.size == self.grid
        low = torch.where(at_end, 0, -self.jitter)  # the start edge may move out into the padding
        high = torch.where(at_start, 0, self.jitter)  # the end edge likewise
        return low, high


def window_shape(grid: tuple[int, int], size_px: tuple[int, int], train_latent: int, downsample: int) -> tuple[int, int]:
    """Window (h, w) in tokens of a block whose grid is `downsample`× coarser than the latent."""
    height, width = size_px
    if height == width:
        latent = (train_latent, train_latent)
    elif height > width:
        latent = (train_latent, train_latent * width // height)
    else:
        latent = (train_latent * height // width, train_latent)
    return min(grid[0], max(1, latent[0] // downsample)), min(grid[1], max(1, latent[1] // downsample))


@dataclass(frozen=True)
class WindowPlan:
    """All windows of one attention call: padded start coordinates for every view (row-major)."""

    rows: AxisWindows
    cols: AxisWindows
    starts_h: torch.Tensor  # (V,) in padded coordinates
    starts_w: torch.Tensor  # (V,)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.rows.grid + 2 * self.rows.jitter, self.cols.grid + 2 * self.cols.jitter

    def groups(self) -> list[torch.Tensor]:
        """View indices split so that windows inside one group never overlap.

        With stride = size/2 and jitter ≤ size/8, windows four apart along an axis are always disjoint, so
        grouping by (row mod 4, col mod 4) makes every scatter inside a group write each token at most once:
        deterministic accumulation on any device, in at most 16 batched steps.
        """
        row = torch.arange(self.rows.count).repeat_interleave(self.cols.count)
        col = torch.arange(self.cols.count).repeat(self.rows.count)
        key = (row % 4) * 4 + (col % 4)
        order = torch.argsort(key, stable=True)  # views by group, ascending inside each
        sizes = torch.bincount(key, minlength=16)
        return list(order.split(sizes[sizes > 0].tolist()))


def plan_windows(
    grid: tuple[int, int], window: tuple[int, int], jitter: bool, seed: int, key: tuple[object, ...]
) -> WindowPlan:
    rows = AxisWindows(grid[0], window[0], max(1, window[0] // 2), window[0] // 8 if jitter else 0)
    cols = AxisWindows(grid[1], window[1], max(1, window[1] // 2), window[1] // 8 if jitter else 0)
    starts_h = rows.starts().repeat_interleave(cols.count) + rows.jitter
    starts_w = cols.starts().repeat(rows.count) + cols.jitter
    if jitter:
        generator = stream(seed, "window-jitter", *key)
        for axis, (starts, low, high) in enumerate(
            ((starts_h, *rows.jitter_bounds()), (starts_w, *cols.jitter_bounds()))
        ):
            if axis == 0:
                low, high = low.repeat_interleave(cols.count), high.repeat_interleave(cols.count)
            else:
                low, high = low.repeat(rows.count), high.repeat(rows.count)
            draw = torch.rand(starts.shape, generator=generator, dtype=torch.float64)
            starts += low + torch.floor(draw * (high - low + 1)).long()
    return WindowPlan(rows, cols, starts_h, starts_w)
