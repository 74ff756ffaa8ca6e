"""The model's grid and the sizes a cascade may have: `--size` and `--stages` parsed, checked against the model's
training size and granularity, and planned by halving to the base stage."""

from __future__ import annotations

from dataclasses import dataclass

from renderer.errors import RenderError

Size = tuple[int, int]  # (width, height) in pixels, as users write it


def parse_scale(text: str) -> float | None:
    """The number of `--size 4x` (a scale of the --image), or None for a WIDTHxHEIGHT."""
    number = text.lower().removesuffix("x")
    try:
        return float(number) if text.lower().endswith("x") and number else None
    except ValueError:
        return None


def parse_size(text: str, option: str = "--size") -> Size:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isascii() and part.strip().isdigit() for part in parts):
        raise RenderError(f"{option} {text!r} is not WIDTHxHEIGHT, e.g. 2048x2048")
    width, height = (int(part) for part in parts)
    if width <= 0 or height <= 0:
        raise RenderError(f"{option} {text!r} must have positive sides")
    return width, height


def format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class ModelGeometry:
    """What stage planning needs to know of a model."""

    train_px: int  # e.g. 1024 for SDXL, 256 for the built-in models
    granularity: int  # stage sides must be multiples of this (VAE scale × UNet downsampling)
    vae_scale: int = 8  # pixels per latent row or column


def vae_scale_of(vae_channels) -> int:
    """Pixels per latent row or column: the VAE halves the image once between each pair of its levels."""
    return 2 ** (len(vae_channels) - 1)


def plan_stages(target: Size, geometry: ModelGeometry) -> list[Size]:
    """Halve the target until its long side is at most the training size: that is the base stage.

    Then every doubling whose short side reaches the training size is an upscaling stage, ending at the
    target (the reference's 1024 → 2048 → 4096 → 8192 for SDXL).
    """
    check_granular(target, geometry)
    halvings = 0
    while max(target) > geometry.train_px * 2**halvings:
        halvings += 1
    unit = geometry.granularity * 2**halvings
    if target[0] % unit or target[1] % unit:
        raise RenderError(
            f"--size {format_size(target)} cannot be halved down to the {geometry.train_px}px training size in "
            f"whole {geometry.granularity}px units; use sides that are multiples of {unit}, "
            f"e.g. {format_size(round_size(target, unit))}, or give --stages explicitly"
        )
    stages = [(target[0] >> k, target[1] >> k) for k in range(halvings, -1, -1)]
    base, upscales = stages[0], stages[1:]
    kept = [size for size in upscales[:-1] if min(size) >= geometry.train_px]
    return [base, *kept, target] if upscales else [base]


def round_size(size: Size, unit: int) -> Size:
    return tuple(max(unit, int(round(side / unit)) * unit) for side in size)  # type: ignore[return-value]


def check_granular(size: Size, geometry: ModelGeometry) -> None:
    if any(side % geometry.granularity for side in size):
        raise RenderError(
            f"size {format_size(size)} is not a multiple of {geometry.granularity}px on both sides; "
            f"try {format_size(round_size(size, geometry.granularity))}"
        )


def check_stages(stages: list[Size], geometry: ModelGeometry) -> None:
    if not stages:
        raise RenderError("--stages is empty; give at least one WIDTHxHEIGHT")
    for size in stages:
        check_granular(size, geometry)
    base = stages[0]
    for previous, size in zip(stages, stages[1:]):
        if size[0] * base[1] != size[1] * base[0]:
            raise RenderError(
                f"stage {format_size(size)} changes the aspect ratio of the base {format_size(base)}; "
                f"every stage must keep it, e.g. {format_size((base[0] * size[1] // base[1], size[1]))}"
            )
        if size[0] <= previous[0]:
            raise RenderError(f"--stages: stage {format_size(size)} is not larger than {format_size(previous)}; stages must grow")
        if min(size) < geometry.train_px:
            raise RenderError(
                f"upscaling stage {format_size(size)} has a side below the model's {geometry.train_px}px training "
                f"size; upscaling stages need both sides >= {geometry.train_px}"
            )


def check_fast_mode(size: Size, geometry: ModelGeometry) -> None:
    """Fast mode splits the coarsest attention grid into s_h × s_w strided sub-grids of equal size."""
    scale = [max(1, side // geometry.train_px) for side in size]
    coarsest = [side // geometry.granularity for side in size]
    if any(grid % s for grid, s in zip(coarsest, scale)):
        unit = geometry.granularity * max(scale)
        raise RenderError(
            f"--fast-mode cannot split stage {format_size(size)} into {scale[0]}x{scale[1]} equal sub-grids; "
            f"use sides that are multiples of {unit} px, or drop --fast-mode"
        )
