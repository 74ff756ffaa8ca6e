"""Procedural training scenes: one large, shaded, coloured creature with two eyes on a muted background.

Everything is drawn from a seeded numpy generator, so scene k of a seed is the same on every machine.
The subject colours are saturated and the background is not, which is what lets `renderer.toy.metrics`
count subjects by colour in rendered images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Hue in degrees of each subject colour; the caption names the colour.
COLOURS: dict[str, float] = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 120.0, "blue": 220.0, "purple": 285.0}
SCENE_SIZE = 256
DIAMETER_RANGE = (0.25, 0.40)  # subject width as a fraction of the image width
BACKGROUND_MAX_SATURATION = 0.22


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    colour: str


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV to RGB; hue in degrees, saturation and value in [0, 1]; returns floats in [0, 1]."""
    sector = (hue % 360.0) / 60.0
    chroma = value * saturation
    x = chroma * (1.0 - np.abs(sector % 2.0 - 1.0))
    zeros = np.zeros_like(chroma)
    index = np.floor(sector).astype(int) % 6
    choices = [
        (chroma, x, zeros), (x, chroma, zeros), (zeros, chroma, x),
        (zeros, x, chroma), (x, zeros, chroma), (chroma, zeros, x),
    ]
    rgb = np.zeros(hue.shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        selected = index == k
        rgb[selected] = np.stack([r[selected], g[selected], b[selected]], axis=-1)
    return rgb + (value - chroma)[..., None]


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid: a smooth texture in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    coords = np.linspace(0, cells, size)
    i0 = np.minimum(np.floor(coords).astype(int), cells - 1)
    frac = coords - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def draw_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> Scene:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    base_hue = rng.uniform(0, 360)
    hue = base_hue + 40 * (smooth_noise(rng, size, 3) - 0.5)
    saturation = BACKGROUND_MAX_SATURATION * smooth_noise(rng, size, 4)
    value = 0.45 + 0.35 * smooth_noise(rng, size, 2) + 0.06 * smooth_noise(rng, size, 16)
    image = hsv_to_rgb(hue, saturation, np.clip(value, 0, 1))

    colour = str(rng.choice(list(COLOURS)))
    radius = 0.5 * size * rng.uniform(*DIAMETER_RANGE)
    cy, cx = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
    distance = np.hypot(yy - cy, xx - cx) / radius
    body = distance <= 1.0
    # Shading: a light from the upper left, darker towards the rim.
    light = np.clip(1.0 - 0.35 * np.hypot(yy - (cy - 0.4 * radius), xx - (cx - 0.4 * radius)) / radius, 0.55, 1.0)
    subject_hue = np.full_like(distance, COLOURS[colour] + rng.uniform(-6, 6))
    image[body] = hsv_to_rgb(subject_hue[body], np.full(body.sum(), 0.85), light[body])

    eye_radius = radius * rng.uniform(0.16, 0.22)
    eye_dy = -radius * rng.uniform(0.15, 0.35)
    eye_dx = radius * rng.uniform(0.3, 0.45)
    for side in (-1, 1):
        ey, ex = cy + eye_dy, cx + side * eye_dx
        eye_distance = np.hypot(yy - ey, xx - ex)
        image[eye_distance <= eye_radius] = (0.97, 0.97, 0.97)
        image[eye_distance <= 0.5 * eye_radius] = (0.05, 0.05, 0.07)

    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    article = "an" if colour[0] in "aeiou" else "a"
    return Scene(image=pixels, caption=f"{article} {colour} creature", colour=colour)


def draw_scenes(seed: int, count: int, size: int = SCENE_SIZE) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng, size) for _ in range(count)]
