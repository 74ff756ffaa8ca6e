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


@dataclass(frozen=True)
class Creature:
    """What a scene draws of its subject; `paint` puts it anywhere, eyes open or closing."""

    colour: str
    hue: float
    radius: float
    centre: tuple[float, float]  # (y, x) in pixels
    eye_radius: float
    eye_offset: tuple[float, float]  # (dy, dx) of the right eye from the centre; the left one mirrors dx


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, smoothly varying background, (H, W, 3) floats in [0, 1]."""
    base_hue = rng.uniform(0, 360)
    hue = base_hue + 40 * (smooth_noise(rng, size, 3) - 0.5)
    saturation = BACKGROUND_MAX_SATURATION * smooth_noise(rng, size, 4)
    value = 0.45 + 0.35 * smooth_noise(rng, size, 2) + 0.06 * smooth_noise(rng, size, 16)
    return hsv_to_rgb(hue, saturation, np.clip(value, 0, 1))


def draw_creature(rng: np.random.Generator, size: int) -> Creature:
    colour = str(rng.choice(list(COLOURS)))
    radius = 0.5 * size * rng.uniform(*DIAMETER_RANGE)
    cy, cx = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
    hue = COLOURS[colour] + rng.uniform(-6, 6)
    eye_radius = radius * rng.uniform(0.16, 0.22)
    eye_dy = -radius * rng.uniform(0.15, 0.35)
    eye_dx = radius * rng.uniform(0.3, 0.45)
    return Creature(colour, float(hue), float(radius), (float(cy), float(cx)), float(eye_radius), (float(eye_dy), float(eye_dx)))


def paint(image: np.ndarray, creature: Creature, centre: tuple[float, float] | None = None, eyes_open: float = 1.0) -> None:
    """Paint the shaded body and its eyes into `image` (floats, in place); `eyes_open` < 1 squints them (a blink)."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cy, cx = centre or creature.centre
    radius = creature.radius
    body = np.hypot(yy - cy, xx - cx) <= radius
    # Shading: a light from the upper left, darker towards the rim.
    light = np.clip(1.0 - 0.35 * np.hypot(yy - (cy - 0.4 * radius), xx - (cx - 0.4 * radius)) / radius, 0.55, 1.0)
    image[body] = hsv_to_rgb(np.full(body.sum(), creature.hue), np.full(body.sum(), 0.85), light[body])
    eye_dy, eye_dx = creature.eye_offset
    for side in (-1, 1):
        ey, ex = cy + eye_dy, cx + side * eye_dx
        eye_distance = np.hypot((yy - ey) / eyes_open, xx - ex)
        image[eye_distance <= creature.eye_radius] = (0.97, 0.97, 0.97)
        image[eye_distance <= 0.5 * creature.eye_radius] = (0.05, 0.05, 0.07)


def to_pixels(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def caption(colour: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} creature"


def draw_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> Scene:
    image = draw_background(rng, size)
    creature = draw_creature(rng, size)
    paint(image, creature)
    return Scene(image=to_pixels(image), caption=caption(creature.colour), colour=creature.colour)


def draw_scenes(seed: int, count: int, size: int = SCENE_SIZE) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng, size) for _ in range(count)]
