"""Does the toy VAE keep what the UNet draws? Its round trip on held-out scenes, colour by colour.

    python bench/toy_vae.py [--model toy] [--scenes 48] [--size 256] [--sheet round_trip.png]

Every FreeScale stage re-encodes the upsampled image, so a colour the VAE's round trip (encode, posterior
mean, decode) loses is lost at every stage. For each palette colour this prints how many scenes keep it
(the dominant colour found by `renderer.toy.metrics`) and the mean hue of the creature's pixels before
and after.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderer.models import load_pipeline  # noqa: E402
from renderer.toy.metrics import count_subjects  # noqa: E402
from renderer.toy.scenes import COLOURS, draw_scenes  # noqa: E402
from renderer.toy.train import HELD_OUT_SEED, SUBJECT_SATURATION, round_trip, to_tensor  # noqa: E402


def circular_mean(degrees) -> float:
    return float(np.degrees(np.angle(np.exp(1j * np.radians(np.asarray(degrees))).mean())) % 360)


def mean_hue(pixels: np.ndarray, where: np.ndarray) -> float:
    """Mean HSV hue (degrees) over the selected pixels."""
    return circular_mean(np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float64)[..., 0][where] * 360 / 255)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--size", type=int, default=256, help="pixels a side of the scenes")
    parser.add_argument("--sheet", type=Path, help="also save the first 12 scenes (top row) over their round trips (PNG)")
    args = parser.parse_args()

    vae = load_pipeline(args.model).vae
    scenes = draw_scenes(HELD_OUT_SEED, args.scenes, args.size)
    images = np.stack([scene.image for scene in scenes])
    decoded = round_trip(vae, images)
    print(f"round-trip mean |error| on [-1, 1]: {float((decoded - to_tensor(images)).abs().mean()):.4f}")
    pixels = ((decoded.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    if args.sheet:
        shown = slice(0, min(12, len(scenes)))
        Image.fromarray(np.concatenate([np.concatenate(list(row[shown]), axis=1) for row in (images, pixels)])).save(args.sheet)

    rows: dict[str, list[tuple[bool, float, float]]] = defaultdict(list)
    for scene, after in zip(scenes, pixels):
        before = np.asarray(Image.fromarray(scene.image).convert("HSV"))[..., 1] / 255
        body = before > SUBJECT_SATURATION
        kept = count_subjects(after, args.size).colour == scene.colour
        rows[scene.colour].append((kept, mean_hue(scene.image, body), mean_hue(after, body)))
    print("| colour | scenes | kept | hue before | hue after |\n|---|---|---|---|---|")
    for colour in COLOURS:
        found = rows.get(colour, [])
        if found:
            kept, hue_before, hue_after = zip(*found)
            print(f"| {colour} | {len(found)} | {sum(kept)} | {circular_mean(hue_before):.0f} | {circular_mean(hue_after):.0f} |")
    print(f"kept the colour: {sum(k for found in rows.values() for k, _, _ in found)} of {len(scenes)}")


if __name__ == "__main__":
    main()
