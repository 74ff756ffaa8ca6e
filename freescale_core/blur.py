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
    if uses_shifted_sum(x):
        return blur_axis_shifted(x, axis, kernel)
    return blur_axis_conv(x, axis, kernel)


def uses_shifted_sum(x: torch.Tensor) -> bool:
    """Where `blur_axis` uses the shifted multiply-adds: fp32 on the CPU, where the single-channel conv1d is
    slow (on this machine's oneDNN both even give the same bits: taps in order, one fused multiply-add each,
    from zero). fp16 would round at every tap, and GPUs have fast convs: those keep the conv."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def blur_axis_shifted(x: torch.Tensor, axis: int, kernel: torch.Tensor) -> torch.Tensor:
    """The same 1-D convolution as k shifted multiply-adds in `x`'s own layout: no transposing copies,
    no single-channel conv (which is slow on the CPU). Taps that fall into the zero padding are skipped."""
    size, half = x.shape[axis], kernel.numel() // 2
    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
    for tap, weight in enumerate(kernel.to(x.dtype).tolist()):
        offset = tap - half  # out[i] += weight · x[i + offset]
        start, stop = max(0, -offset), min(size, size - offset)
        if stop > start:
            out.narrow(axis, start, stop - start).add_(x.narrow(axis, start + offset, stop - start), alpha=weight)
    return out


def blur_axis_conv(x: torch.Tensor, axis: int, kernel: torch.Tensor) -> torch.Tensor:
    """The 1-D convolution as a single-channel conv1d over every line along `axis`."""
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
