"""The step-speed rewrites against what they replace (bench/step_profile.py measures them).

- The blur's shifted multiply-adds against the single-channel conv1d it replaces on fp32 CPU tensors, both within
  the rounding bound of a k-term sum of the exact result.
- FreeU's filter (mask ifftshifted once) against the spectrum shifted there and back.
"""

from __future__ import annotations

import pytest
import torch

from freescale_core.blur import blur_axis, blur_axis_conv, blur_axis_shifted, gaussian_kernel, uses_shifted_sum
from freescale_core.freeu import fourier_filter

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (2, 9, 11, 7), (1, 16, 16, 33), (2, 32, 48, 64), (1, 40, 20, 20)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [3, 7, 15, 31])
def test_shifted_blur_equals_the_conv_within_the_rounding_of_k_taps(shape, k):
    """Both the shifted multiply-adds and the conv1d sum k fp32 products: each is within γ_k·Σ|w·x| of the exact
    (float64) sum, γ_k = k·u/(1 − k·u) with u = 2⁻²⁴, whatever order a CPU's kernels add them in."""
    generator = torch.Generator().manual_seed(k)
    grid = torch.randn(shape, generator=generator) * 10
    strided = grid.transpose(1, 2).contiguous().transpose(1, 2)
    kernel = gaussian_kernel(k)
    gamma = k * 2**-24 / (1 - k * 2**-24)
    for x in (grid, strided):
        for axis in (1, 2, 3):
            exact = blur_axis_conv(x.double(), axis, kernel.double())
            magnitude = blur_axis_conv(x.double().abs(), axis, kernel.double().abs())
            for blurred in (blur_axis_shifted(x, axis, kernel), blur_axis_conv(x, axis, kernel)):
                assert blurred.dtype == torch.float32
                assert bool(((blurred.double() - exact).abs() <= gamma * magnitude + 1e-30).all())


def test_blur_axis_keeps_the_conv_elsewhere():
    grid = torch.randn(2, 9, 11, 7, dtype=torch.float64)
    kernel = gaussian_kernel(5)
    assert not uses_shifted_sum(grid) and uses_shifted_sum(grid.float())
    assert torch.equal(blur_axis(grid, 2, kernel), blur_axis_conv(grid, 2, kernel))


def shifted_spectrum_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FreeU's filter as the reference writes it: fftshift, scale the centre, ifftshift back."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.ones(height, width)
    mask[height // 2 - threshold : height // 2 + threshold, width // 2 - threshold : width // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 9), (2, 5, 16, 12), (1, 2, 3, 2)])
@pytest.mark.parametrize("scale", [0.6, 0.4])
def test_fourier_filter_is_bitwise_the_shifted_spectrum(shape, scale):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(fourier_filter(x, 1, scale), shifted_spectrum_filter(x, 1, scale))
