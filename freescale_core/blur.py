"""The Gaussian G that splits attention outputs into low and high frequencies (§4, decision 4).

Separable: one zero-padded 1-D pass per blurred axis, so a k=15 blur costs 15 MACs per element and
axis instead of k³ for the reference's dense 3-D kernel (same result).
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
    """Zero-padded 1-D convolution of `x` along `axis` (borders are not renormalised, as in the reference)."""
    moved = x.movedim(axis, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    weight = kernel.to(device=x.device, dtype=x.dtype).view(1, 1, -1)
    out = F.conv1d(flat, weight, padding=kernel.numel() // 2)
    return out.reshape(shape).movedim(-1, axis)


def gaussian_blur(grid: torch.Tensor, variant: str, size: int) -> torch.Tensor:
    """Blur a (B, H, W, C) grid along the axes of `variant` ("hw", "hwc" or "wc") with a k=`size` Gaussian."""
    if size <= 1:
        return grid
    kernel = gaussian_kernel(size)
    for axis in BLUR_AXES[variant]:
        grid = blur_axis(grid, axis, kernel)
    return grid
