"""The step-speed rewrites against what they replace (bench/step_profile.py measures them), within bounds
that follow from fp32 arithmetic rather than from one machine.

- The blur's depthwise conv per axis against the exact (float64) zero-padded 1-D sums.
- FreeU's filter from the few Fourier coefficients it changes against the reference's fftshifted spectrum.
- The window batches: any batch size gives the very same sums as one group at a time.
- The windows gathered from the unpadded grid and one zero token: the very same sums as from the padded grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import freescale_core.attention as fs_attention
from freescale_core.attention import grid_then_zero_token, group_chunks, local_attention
from freescale_core.blur import blur_axis, gaussian_kernel
from freescale_core.freeu import fourier_filter
from freescale_core.windows import plan_windows

U = 2.0**-24  # fp32 unit roundoff

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (2, 9, 11, 7), (1, 16, 16, 33), (2, 32, 48, 64), (1, 40, 20, 20)]


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def exact_blur(x: np.ndarray, axis: int, weights: np.ndarray) -> np.ndarray:
    """Σ_t w_t · x[i + t − k//2] along `axis` with zeros outside, in float64 (numpy, no torch conv)."""
    half = len(weights) // 2
    padded = np.pad(x, [(half, half) if a == axis else (0, 0) for a in range(x.ndim)])
    size = x.shape[axis]
    return sum(w * np.take(padded, np.arange(t, t + size), axis=axis) for t, w in enumerate(weights))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [3, 7, 15, 31])
def test_blur_axis_is_within_the_rounding_of_k_taps(shape, k):
    """Each output is a sum of k fp32 products: within γ_k·Σ|w·x| of the exact sum, whatever order a
    device's kernels add them in. Also for a grid that is a strided view."""
    generator = torch.Generator().manual_seed(k)
    grid = torch.randn(shape, generator=generator) * 10
    strided = grid.transpose(1, 2).contiguous().transpose(1, 2)
    weights = gaussian_kernel(k)
    for x in (grid, strided):
        for axis in (1, 2, 3):
            blurred = blur_axis(x, axis, weights)
            assert blurred.dtype == torch.float32 and blurred.shape == x.shape
            exact = exact_blur(x.double().numpy(), axis, weights.numpy())
            magnitude = exact_blur(np.abs(x.double().numpy()), axis, weights.numpy())
            assert bool((np.abs(blurred.double().numpy() - exact) <= gamma(k) * magnitude + 1e-30).all())


def shifted_spectrum_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FreeU's filter as the reference writes it (fftshift, scale the centre, ifftshift back), in float64."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.ones(height, width, dtype=torch.float64)
    mask[height // 2 - threshold : height // 2 + threshold, width // 2 - threshold : width // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 9), (2, 5, 16, 12), (1, 2, 3, 2), (2, 8, 64, 48)])
@pytest.mark.parametrize("scale", [0.6, 0.4])
def test_fourier_filter_from_its_coefficients_equals_the_shifted_spectrum(shape, scale):
    """The coefficients' sums over columns are fp32 (error ≤ γ_{W+1}·Σ|x| each, cos and sin apart), the rest
    float64 until the rebuild, a fp32 sum of 2V products, and the final fp32 multiply-add; U·V ≤ 4 modes."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 5 + 3
    got = fourier_filter(x, 1, scale)
    exact = shifted_spectrum_filter(x, 1, scale)
    assert got.dtype == torch.float32
    height, width = shape[-2:]
    modes = min(2, height) * min(2, width)
    mean_magnitude = x.double().abs().mean(dim=(-2, -1), keepdim=True)
    low = (exact - x.double()) / (scale - 1)
    bound = (abs(scale - 1) * modes * (2 * gamma(width + 1) + gamma(2 * modes + 2) + U) * mean_magnitude
             + 2 * U * (x.double().abs() + abs(scale - 1) * low.abs()))
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert not torch.allclose(got.double(), x.double(), atol=1e-3)


def test_group_chunks_are_consecutive_and_within_the_budget():
    assert group_chunks([3, 3, 4, 2], per_view=10, budget=60) == [(0, 2), (2, 4)]
    assert group_chunks([3, 3, 4, 2], per_view=10, budget=1) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # one group at least
    assert group_chunks([3, 3, 4, 2], per_view=10, budget=10**6) == [(0, 4)]
    assert group_chunks([], per_view=10, budget=60) == []


@pytest.mark.parametrize("grid, window", [((24, 24), (8, 8)), ((20, 36), (6, 12))])
def test_window_batches_give_the_same_sums_as_one_group_at_a_time(monkeypatch, grid, window):
    """Batching groups changes which windows attend together, not what each computes or the order each
    token sums its windows in: bitwise the same for every batch size."""
    plan = plan_windows(grid, window, True, 3, ("test",))
    padded = plan.padded_shape[0] * plan.padded_shape[1]
    ramp = torch.linspace(-2, 2, padded)[None, :, None, None]
    q, k, v = (torch.randn(2, padded, 2, 8, generator=torch.Generator().manual_seed(i)) + i * ramp for i in range(3))
    results = []
    per_view = 2 * window[0] * window[1] * 16
    for budget in (1, 5 * per_view, 10**9):  # one group per batch, about five windows, all windows at once
        monkeypatch.setattr(fs_attention, "chunk_budget", lambda _q, budget=budget: budget)
        results.append(local_attention(q, k, v, plan, window))
    assert all(torch.equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("grid, window, jitter", [((24, 24), (8, 8), True), ((20, 36), (6, 12), True), ((16, 16), (8, 8), False)])
def test_windows_from_the_grid_and_a_zero_token_equal_windows_on_the_padded_grid(grid, window, jitter):
    """Every window attends over the very same q/k/v values either way (the padding's are the zero
    token's), and every interior token sums its windows in the same order: bitwise equal."""
    plan = plan_windows(grid, window, jitter, 5, ("test",))
    (rows, cols), (pad_h, pad_w) = grid, (plan.rows.jitter, plan.cols.jitter)
    ramp = torch.linspace(-1, 1, rows * cols)[None, :, None, None]
    unpadded = [torch.randn(2, rows * cols + 1, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, t in enumerate(unpadded):
        t[:, :-1] += (i + 1) * ramp  # structured: a per-token offset, and a zero token unlike any grid token
    padded = []
    for t in unpadded:
        grid_t = t[:, -1:, None].expand(2, plan.padded_shape[0], plan.padded_shape[1], 3, 8).clone()
        grid_t[:, pad_h : pad_h + rows, pad_w : pad_w + cols] = t[:, :-1].unflatten(1, grid)
        padded.append(grid_t.flatten(1, 2))
    expected = local_attention(*padded, plan, window).unflatten(1, plan.padded_shape)
    expected = expected[:, pad_h : pad_h + rows, pad_w : pad_w + cols].flatten(1, 2)
    got = local_attention(*unpadded, plan, window, token_of=grid_then_zero_token(plan))
    assert got.shape == (2, rows * cols + 1, 24)
    assert torch.equal(got[:, :-1], expected)
    if jitter:  # the padding took part: the zero token's values matter
        shifted = [t.clone() for t in unpadded]
        shifted[1][:, -1] += 1
        assert not torch.equal(local_attention(*shifted, plan, window, token_of=grid_then_zero_token(plan))[:, :-1], expected)
