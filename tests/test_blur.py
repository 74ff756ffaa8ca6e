"""The scale-fusion Gaussian G (reference §4, decision 4) against dense convolutions built independently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from freescale_core.blur import gaussian_blur, gaussian_kernel, kernel_size


def dense_weights(k: int) -> torch.Tensor:
    """1-D σ = 1 Gaussian computed with math (not the package): exp(−(x − (k−1)/2)²/2), normalised."""
    values = [math.exp(-((x - (k - 1) / 2) ** 2) / 2) for x in range(k)]
    total = sum(values)
    return torch.tensor([v / total for v in values], dtype=torch.float64)


def structured_grid(b=2, h=9, w=11, c=7) -> torch.Tensor:
    """(B, H, W, C) float64: a ramp over every axis plus a checkerboard and a per-batch offset."""
    bi, hi, wi, ci = torch.meshgrid(
        torch.arange(b, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
        torch.arange(w, dtype=torch.float64), torch.arange(c, dtype=torch.float64), indexing="ij",
    )
    ramp = 0.3 * hi - 0.2 * wi + 0.11 * ci + 1.7 * bi
    checker = ((hi + wi + ci) % 2) * 2 - 1
    return ramp + 0.8 * checker


def dense_blur(grid: torch.Tensor, variant: str, k: int) -> torch.Tensor:
    g = dense_weights(k)
    pad = k // 2
    b, h, w, c = grid.shape
    if variant == "hw":
        kernel = torch.einsum("i,j->ij", g, g)[None, None]
        x = grid.permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
        out = F.conv2d(x, kernel, padding=pad)
        return out.reshape(b, c, h, w).permute(0, 2, 3, 1)
    if variant == "wc":
        kernel = torch.einsum("i,j->ij", g, g)[None, None]
        x = grid.reshape(b * h, 1, w, c)
        return F.conv2d(x, kernel, padding=pad).reshape(b, h, w, c)
    if variant == "hwc":
        kernel = torch.einsum("i,j,l->ijl", g, g, g)[None, None]
        x = grid[:, None]  # (B, 1, H, W, C)
        return F.conv3d(x, kernel, padding=pad)[:, 0]
    raise AssertionError(variant)


def test_gaussian_kernel_k3():
    kernel = gaussian_kernel(3)
    assert kernel.shape == (3,)
    for got, expected in zip(kernel.tolist(), (0.274, 0.452, 0.274)):
        assert abs(got - expected) <= 0.001
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 15])
def test_gaussian_kernel_matches_math(k):
    torch.testing.assert_close(gaussian_kernel(k).double(), dense_weights(k), atol=1e-12, rtol=0)


def test_kernel_size_rule():
    assert kernel_size((2, 2)) == 3
    assert kernel_size((4, 4)) == 7
    assert kernel_size((8, 8)) == 15
    assert kernel_size((1, 2)) == 3
    assert kernel_size((3, 3)) == 5
    assert kernel_size((1, 1)) == 1


@pytest.mark.parametrize("variant", ["hw", "hwc", "wc"])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_blur_equals_dense_convolution(variant, k):
    grid = structured_grid()
    got = gaussian_blur(grid.clone(), variant, k)
    expected = dense_blur(grid, variant, k)
    assert got.shape == grid.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["hw", "hwc", "wc"])
def test_blur_float32_equals_dense(variant):
    grid = structured_grid(b=1, h=12, w=8, c=6)
    got = gaussian_blur(grid.float(), variant, 5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense_blur(grid, variant, 5), atol=1e-5, rtol=0)


def test_variants_blur_the_right_axes():
    # A grid constant along one axis: blurring only along that axis changes it only at the zero-padded border.
    grid = structured_grid(b=1, h=10, w=10, c=10)
    hw, wc, hwc = (gaussian_blur(grid, v, 3) for v in ("hw", "wc", "hwc"))
    # hw never mixes channels: a single-channel impulse stays in its channel
    impulse = torch.zeros(1, 9, 9, 5, dtype=torch.float64)
    impulse[0, 4, 4, 2] = 1.0
    out = gaussian_blur(impulse, "hw", 3)
    assert torch.count_nonzero(out[..., [0, 1, 3, 4]]) == 0
    assert torch.count_nonzero(out[..., 2]) == 9
    # wc never mixes rows
    out = gaussian_blur(impulse, "wc", 3)
    assert torch.count_nonzero(out[:, [0, 1, 2, 3, 5, 6, 7, 8]]) == 0
    assert torch.count_nonzero(out[:, 4]) == 9
    # hwc touches the 3×3×3 neighbourhood
    assert torch.count_nonzero(gaussian_blur(impulse, "hwc", 3)) == 27
    assert not torch.allclose(hw, wc) and not torch.allclose(hw, hwc)


def test_zero_padding_not_renormalised():
    ones = torch.ones(1, 5, 5, 1, dtype=torch.float64)
    out = gaussian_blur(ones, "hw", 3)
    g = dense_weights(3)
    assert float(out[0, 2, 2, 0]) == pytest.approx(1.0)
    assert float(out[0, 0, 2, 0]) == pytest.approx(float(g[1] + g[2]))  # one tap falls on the zero padding
    assert float(out[0, 0, 0, 0]) == pytest.approx(float((g[1] + g[2]) ** 2))


def test_k1_is_identity():
    grid = structured_grid()
    for variant in ("hw", "hwc", "wc"):
        assert torch.equal(gaussian_blur(grid, variant, 1), grid)
