"""Count subjects in renders of the toy model, the way a person would judge them.

The subject's colour is the palette colour (saturated, hue nearest among the palette) that covers the
most of the image; whether it is the prompt's colour is reported separately. A subject is a connected
region of that colour whose area is at least a fifth of the smallest creature the model was trained
on; smaller blobs and background smudges do not count. Eyes are the holes inside a subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from renderer.toy.scenes import COLOURS, DIAMETER_RANGE

ANALYSIS_TRAIN_PX = 128  # the training size is analysed at this many pixels
MIN_SUBJECT_FRACTION = 0.2  # of the smallest training subject's area
MIN_SATURATION, MIN_VALUE, MAX_HUE_DISTANCE = 0.45, 0.2, 20.0
RIM_MARGIN = 2  # analysis pixels around a subject that count as neither subject nor background


@dataclass(frozen=True)
class SubjectCount:
    colour: str  # the subject colour found in the image
    subjects: int
    eyes: tuple[int, ...]  # per subject, largest first
    largest_share: float  # the largest subject's area over the image area
    centre: tuple[float, float] | None  # the largest subject's centroid (y, x) as fractions of the height and width
    mask: np.ndarray  # the subjects, holes filled, at the analysis size (bool)


def hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float64)
    hue, saturation, value = hsv[..., 0] * 360.0 / 255.0, hsv[..., 1] / 255.0, hsv[..., 2] / 255.0
    distances = np.stack([hue_distance(hue, h) for h in COLOURS.values()])
    nearest = np.array(list(COLOURS))[distances.argmin(0)]
    return (nearest == colour) & (distances.min(0) <= MAX_HUE_DISTANCE) & (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)


def count_subjects(pixels: np.ndarray, train_px: int) -> SubjectCount:
    height, width = pixels.shape[:2]
    scale = ANALYSIS_TRAIN_PX / train_px
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    masks = {name: ndimage.binary_opening(colour_mask(small, name), structure=np.ones((3, 3))) for name in COLOURS}
    colour = max(masks, key=lambda name: masks[name].sum())
    mask = masks[colour]
    filled = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(filled)
    smallest_subject = np.pi * (DIAMETER_RANGE[0] * ANALYSIS_TRAIN_PX / 2) ** 2
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    kept = [label for label, area in zip(range(1, count + 1), areas) if area >= MIN_SUBJECT_FRACTION * smallest_subject]
    kept.sort(key=lambda label: -areas[label - 1])
    eyes = []
    for label in kept:
        region = labels == label
        holes, hole_count = ndimage.label(region & ~mask)
        hole_areas = ndimage.sum_labels(np.ones_like(holes), holes, index=np.arange(1, hole_count + 1))
        eyes.append(int(np.sum(hole_areas >= max(2.0, 0.004 * areas[label - 1]))))
    largest = float(areas[kept[0] - 1] / (size[0] * size[1])) if kept else 0.0
    centre = None
    if kept:  # pixel k covers [k, k + 1): its centre is k + 0.5
        y, x = ndimage.center_of_mass(labels == kept[0])
        centre = ((y + 0.5) / size[1], (x + 0.5) / size[0])
    return SubjectCount(colour=colour, subjects=len(kept), eyes=tuple(eyes), largest_share=largest, centre=centre,
                        mask=np.isin(labels, kept))


def background_flicker(frames: np.ndarray, counts: list[SubjectCount]) -> float:
    """Mean absolute difference between consecutive frames, in levels of 255, over the pixels that are background
    in both (outside every subject found in either, widened by RIM_MARGIN analysis pixels for the blurred rim)."""
    differences = []
    for (a, b), (count_a, count_b) in zip(zip(frames, frames[1:]), zip(counts, counts[1:])):
        subject = ndimage.binary_dilation(count_a.mask | count_b.mask, iterations=RIM_MARGIN)
        background = np.asarray(Image.fromarray(~subject).resize(a.shape[1::-1], Image.Resampling.NEAREST))
        difference = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(-1)
        differences.append(float(difference[background].mean()) if background.any() else 0.0)
    return float(np.mean(differences))
