"""The Gaussian G that splits attention outputs into low and high frequencies (§4, decision 4).

Separable: one zero-padded 1-D pass per blurred axis, so a k=15 blur costs 15 MACs per element and
axis instead of k³ for the reference's dense 3-D kernel (same result). Each pass is a depthwise conv2d
on a view of the (B, H, W, C) grid, without copying it: the grid already is a channels-last (B, C, H, W)
image for the H and W passes, and a (B·H, W, C, 1) image for the C pass. That is one vectorised sweep
per axis on any device (k shifted multiply-adds or a single-channel conv1d are several times slower on
the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Axes of a (B, H, W, C) token grid blurred by each variant.
BLUR_AXES = {"hw": (1, 2), "hwc": (1, 2, 3), "wc": (2, 3)}


def kernel_size(scale: tuple[int, int]) -> int:
    return 2 * max(scale) - 1


def gaussian_kernel(size: int, sigma: float = 1.0) -> torch.Tensor:
    """Normalised 1-D weights exp(−(x − (k−1)/2)² / 2σ²); k = 3 gives 0.274, 0.452, 0.274."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(x**2) / (2 * sigma**2))
    return weights / weights.sum()


def blur_axis(x: torch.Tensor, axis: int, kernel: torch.Tensor) -> torch.Tensor:
    """Zero-padded 1-D convolution of a (B, H, W, C) grid along `axis` (borders are not renormalised, as in
    the reference)."""
    batch, height, width, channels = x.shape
    size = kernel.numel()
    if axis == 3:
        image, groups, taps = x.reshape(batch * height, width, channels, 1), width, (size, 1)
    else:
        image, groups, taps = x.permute(0, 3, 1, 2), channels, ((size, 1) if axis == 1 else (1, size))
    weight = kernel.to(device=x.device, dtype=x.dtype).view(1, 1, *taps).repeat(groups, 1, 1, 1)
    out = F.conv2d(image, weight, padding=(taps[0] // 2, taps[1] // 2), groups=groups)
    return out.reshape(x.shape) if axis == 3 else out.permute(0, 2, 3, 1)


def gaussian_blur(grid: torch.Tensor, variant: str, size: int) -> torch.Tensor:
    """Blur a (B, H, W, C) grid along the axes of `variant` ("hw", "hwc" or "wc") with a k=`size` Gaussian."""
    if size <= 1:
        return grid
    kernel = gaussian_kernel(size)
    for axis in BLUR_AXES[variant]:
        grid = blur_axis(grid, axis, kernel)
    return grid.contiguous()
