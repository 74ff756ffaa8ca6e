"""Procedural training clips for `toy-video`: one toy creature moving over a still background.

Each clip draws a scene as `renderer.toy.scenes` does, then moves its creature along a path that mixes a
straight slide with a vertical bob, and maybe blinks it once. The creature's centre never moves more than
`MAX_STEP` of the width between frames, and its body stays inside the image: that bound is what the clip
quality benchmark holds rendered motion to. Seeded, so clip k of a seed is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from renderer.toy.scenes import SCENE_SIZE, caption, draw_background, draw_creature, paint, to_pixels

FRAMES = 16
MAX_STEP = 0.025  # of the width: the most the creature's centre moves between two frames
BOB_PERIOD = (8.0, 16.0)  # frames
BLINK_CHANCE = 0.5
BLINK = (0.5, 0.12, 0.5)  # eye openness over the three frames of a blink


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # (F, H, W, 3) uint8
    caption: str
    colour: str
    centres: np.ndarray  # (F, 2): the creature's (y, x) in each frame, in pixels
    eyes_open: np.ndarray  # (F,): 1 open, less while it blinks


def path(rng: np.random.Generator, start: tuple[float, float], frames: int, size: int) -> np.ndarray:
    """(F, 2) centres: a slide and a bob sharing the per-frame budget, centred on `start`."""
    budget = MAX_STEP * size * rng.uniform(0.3, 1.0)
    slide_share = rng.uniform(0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    period = rng.uniform(*BOB_PERIOD)
    phase = rng.uniform(0, 2 * np.pi)
    amplitude = (1 - slide_share) * budget * period / (2 * np.pi)  # the bob's steepest step is amplitude·2π/period
    t = np.arange(frames, dtype=np.float64)
    slide = slide_share * budget * (t - (frames - 1) / 2)[:, None] * np.array([np.sin(angle), np.cos(angle)])
    bob = amplitude * np.sin(2 * np.pi * t / period + phase)
    return np.asarray(start) + slide + np.stack([bob, np.zeros_like(bob)], axis=1)


def draw_clip(rng: np.random.Generator, frames: int = FRAMES, size: int = SCENE_SIZE) -> Clip:
    background = draw_background(rng, size)
    creature = draw_creature(rng, size)
    centres = path(rng, creature.centre, frames, size)
    # Keep the body inside the image: shift the whole path, which leaves every step as it was.
    low, high = creature.radius, size - creature.radius
    centres += np.clip(centres.min(0), low, None) - centres.min(0)
    centres -= np.clip(centres.max(0) - high, 0, None)
    openness = np.ones(frames)
    if rng.uniform() < BLINK_CHANCE and frames >= len(BLINK):
        first = int(rng.integers(0, frames - len(BLINK) + 1))
        openness[first : first + len(BLINK)] = BLINK
    pixels = []
    for centre, eyes_open in zip(centres, openness):
        image = background.copy()
        paint(image, creature, tuple(centre), eyes_open)
        pixels.append(to_pixels(image))
    return Clip(frames=np.stack(pixels), caption=caption(creature.colour), colour=creature.colour, centres=centres,
                eyes_open=openness)


def draw_clips(seed: int, count: int, frames: int = FRAMES, size: int = SCENE_SIZE) -> list[Clip]:
    rng = np.random.default_rng(seed)
    return [draw_clip(rng, frames, size) for _ in range(count)]
