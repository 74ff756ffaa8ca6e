"""Tailored self-cascade arithmetic (reference §2): c1 = cf(t)^α and the restart index."""

from __future__ import annotations

import math

import pytest
import torch

from freescale_core.cascade import cosine_factor, dilation_factor, restart_index, scale_factors, skip_residual_weight

# Reference §2, "Values of c1 at selected steps (t_i = 981 − 20 i)", written out literally.
STEPS = (15, 20, 25, 30, 35, 40, 45)
C1_TABLE = {
    0.5: (0.877, 0.791, 0.686, 0.563, 0.427, 0.280, 0.127),
    1.0: (0.769, 0.626, 0.470, 0.317, 0.182, 0.079, 0.016),
    2.0: (0.592, 0.392, 0.221, 0.101, 0.033, 0.006, 0.000),
    3.0: (0.455, 0.245, 0.104, 0.032, 0.006, 0.000, 0.000),
}


def timestep(i: int) -> int:
    return 981 - 20 * i


@pytest.mark.parametrize("alpha", sorted(C1_TABLE))
def test_c1_matches_reference_table(alpha):
    for i, expected in zip(STEPS, C1_TABLE[alpha]):
        got = skip_residual_weight(timestep(i), alpha)
        assert abs(got - expected) <= 0.0015, (alpha, i, got, expected)


def test_c1_independent_formula_and_edges():
    # Independent closed form: cf(t) = cos²(π (T − t) / 2T) (half-angle identity).
    for t in (1, 281, 500, 681, 981, 999):
        expected_cf = math.cos(math.pi * (1000 - t) / 2000) ** 2
        assert cosine_factor(t) == pytest.approx(expected_cf, abs=1e-12)
        assert skip_residual_weight(t, 2.0) == pytest.approx(expected_cf**2, abs=1e-12)
    assert cosine_factor(1000) == pytest.approx(1.0)
    assert cosine_factor(0) == pytest.approx(0.0, abs=1e-15)
    # larger α → smaller pull toward the reference (more new detail)
    values = [skip_residual_weight(681, a) for a in (0.5, 1.0, 2.0, 3.0)]
    assert values == sorted(values, reverse=True)
    # α = 0 gives 1: the latent is replaced by the re-noised reference
    assert skip_residual_weight(681, 0.0) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_pixel_alpha_equals_scalar_per_element(dtype):
    # A region map: a ramp of α over columns, plus an offset in the bottom-right quadrant.
    alpha = torch.linspace(0.0, 3.0, 8, dtype=dtype).repeat(6, 1)
    alpha[3:, 4:] += 0.25
    for i in (15, 25, 35, 45):
        t = timestep(i)
        got = skip_residual_weight(t, alpha)
        assert isinstance(got, torch.Tensor)
        assert got.shape == alpha.shape and got.dtype == dtype
        expected = torch.tensor([[skip_residual_weight(t, float(a)) for a in row] for row in alpha.tolist()], dtype=torch.float64)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)


def test_mask_alpha_mixture_matches_table():
    # c1(x, y) = cf(t)^(α_fg M + α_bg (1 − M)): the foreground uses the α=3 row, the background the α=0.5 row.
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0
    alpha = 3.0 * mask + 0.5 * (1 - mask)
    for column, i in enumerate(STEPS):
        got = skip_residual_weight(timestep(i), alpha)
        assert torch.all((got[:2] - C1_TABLE[3.0][column]).abs() <= 0.0015)
        assert torch.all((got[2:] - C1_TABLE[0.5][column]).abs() <= 0.0015)


def test_restart_index():
    assert restart_index(50, 0.3) == 15
    assert restart_index(4, 0.5) == 2  # turbo
    assert restart_index(10, 0.3) == 3
    assert restart_index(4, 0.3) == 1
    assert restart_index(50, 0.0) == 0


def test_dilation_and_scale_factors_are_relative_to_training_size():
    assert [dilation_factor(w, 1024) for w in (1024, 2048, 3072, 4096, 8192)] == [1, 2, 3, 4, 8]
    assert [dilation_factor(w, 256) for w in (256, 512, 1024, 2048)] == [1, 2, 4, 8]
    assert dilation_factor(128, 256) == 1
    assert scale_factors((1024, 2048), 1024) == (1, 2)
    assert scale_factors((512, 256), 256) == (2, 1)
