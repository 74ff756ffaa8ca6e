"""The tailored self-cascade's schedule arithmetic (freescale-reference.md §2)."""

from __future__ import annotations

import math

import torch


def cosine_factor(timestep: float, num_train_timesteps: int = 1000) -> float:
    """cf(t) = ½(1 + cos(π (T − t) / T)): 1 at pure noise, falling to 0 at t = 0."""
    return 0.5 * (1.0 + math.cos(math.pi * (num_train_timesteps - float(timestep)) / num_train_timesteps))


def skip_residual_weight(
    timestep: float, alpha: float | torch.Tensor, num_train_timesteps: int = 1000
) -> float | torch.Tensor:
    """c1 = cf(t)^α, the pull toward the re-noised upsampled image; α may be a per-pixel tensor."""
    factor = cosine_factor(timestep, num_train_timesteps)
    if isinstance(alpha, torch.Tensor):
        return torch.pow(torch.tensor(factor, dtype=torch.float64), alpha.double()).to(alpha.dtype)
    return factor**alpha


def restart_index(num_steps: int, restart_fraction: float) -> int:
    return int(math.floor(restart_fraction * num_steps))


def dilation_factor(width_px: int, train_px: int) -> int:
    """d = W // train_px: the reference derives it from the width only (§3)."""
    return max(1, width_px // train_px)


def scale_factors(size_px: tuple[int, int], train_px: int) -> tuple[int, int]:
    """(s_h, s_w) = sides // train_px, at least 1: sets the blur size and the fast-mode sub-grids."""
    return max(1, size_px[0] // train_px), max(1, size_px[1] // train_px)
