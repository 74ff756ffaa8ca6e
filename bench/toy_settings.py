"""Why do the toy model's upscaling stages multiply eyes and split bodies? FreeScale's knobs, one at a time.

For each seed, the 256² base alone and every variant's whole cascade are rendered (a variant's base equals
the plain base, except without FreeU, which the base stage uses too). Subjects and eyes are counted on the
final image (`renderer.toy.metrics`); a 256² thumbnail of each goes to --out-dir.

    python bench/toy_settings.py --seeds 8 --steps 20 --size 512          # the first 2x stage, where it starts
    python bench/toy_settings.py --seeds 8 --steps 30 --size 1024 --variants default,alpha=1,restart=0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freescale_core import FreeScaleConfig  # noqa: E402
from renderer import RenderRequest, render  # noqa: E402
from renderer.models import load_pipeline  # noqa: E402
from renderer.toy.metrics import count_subjects  # noqa: E402
from renderer.toy.scenes import COLOURS  # noqa: E402

VARIANTS = {
    "default": {},
    "alpha=1": {"cosine_scale": 1.0},
    "alpha=0.5": {"cosine_scale": 0.5},
    "alpha=3": {"cosine_scale": 3.0},
    "restart=0.5": {"restart_fraction": 0.5},
    "restart=0.7": {"restart_fraction": 0.7},
    "no dilation": {"dilate_tau": 0},
    "no FreeU": {"freeu": False},
    "no scale fusion": {"scale_fusion": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="final side; stages double from 256")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/toy-settings"))
    parser.add_argument("--round-trip", help="comma-separated seeds: write the VAE round-trip sheet instead")
    options = parser.parse_args()
    options.out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline("toy")
    if options.round_trip:
        round_trip_sheet(pipeline, [int(seed) for seed in options.round_trip.split(",")], options.steps, options.out_dir)
        return
    stages = [(256 * 2**k, 256 * 2**k) for k in range((options.size // 256).bit_length())]
    names = options.variants.split(",")
    counts: dict[str, list[tuple[int, tuple[int, ...]]]] = {name: [] for name in ["base 256", *names]}
    for seed in range(options.seeds):
        colour = list(COLOURS)[seed % len(COLOURS)]
        for name in ["base 256", *names]:
            config = FreeScaleConfig() if name == "base 256" else replace(FreeScaleConfig(), **VARIANTS[name])
            request = RenderRequest(prompt=f"a {colour} creature", seed=seed, steps=options.steps, freescale=config,
                                    stages=tuple(stages[:1] if name == "base 256" else stages), out=Path("/tmp/unused.png"))
            started = time.perf_counter()
            image = render(request, pipeline=pipeline, progress=False, write=False).image
            found = count_subjects(image, 256)
            counts[name].append((found.subjects, found.eyes))
            tag = name.replace("=", "").replace(" ", "-")
            Image.fromarray(image).resize((256, 256), Image.Resampling.BOX).save(options.out_dir / f"s{seed}-{tag}.png")
            print(f"seed {seed} {colour:>7} {name:>16}: {found.subjects} subjects, eyes {found.eyes} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\n{options.seeds} seeds, {options.steps} steps, 256 -> {options.size}\n")
    print("| variant | one subject | one subject with two eyes | mean subjects |")
    print("|---|---|---|---|")
    for name, found in counts.items():
        one = sum(subjects == 1 for subjects, _ in found)
        two_eyes = sum(subjects == 1 and eyes == (2,) for subjects, eyes in found)
        print(f"| {name} | {one}/{len(found)} | {two_eyes}/{len(found)} | {np.mean([s for s, _ in found]):.2f} |")


def round_trip_sheet(pipeline, seeds: list[int], steps: int, out_dir: Path) -> None:
    """Per seed, a row: the base decoded; decode(encode(base)) at 256²; the base upsampled to 512²;
    decode(encode(upsampled)); FreeScale at 512² with restart 0.9. No UNet step runs between encode and decode."""
    import torch

    from renderer.cascade.stages import encode, unscaled, upsample
    from renderer.vae.bands import to_pixels

    tiles = []
    for seed in seeds:
        colour = list(COLOURS)[seed % len(COLOURS)]
        request = RenderRequest(prompt=f"a {colour} creature", seed=seed, steps=steps, stages=((256, 256),), out=Path("/tmp/unused.png"))
        base = render(request, pipeline=pipeline, progress=False, write=False)
        with torch.inference_mode():
            def round_trip(x: torch.Tensor) -> torch.Tensor:
                return pipeline.vae.decode(unscaled(pipeline, encode(pipeline, x, seed, 1))).sample

            image = pipeline.vae.decode(unscaled(pipeline, base.latents)).sample
            larger = upsample(image, (512, 512))
            row = [image, round_trip(image), larger, round_trip(larger)]
        row = [Image.fromarray(to_pixels(x)).resize((256, 256)) for x in row]
        staged = request.with_(stages=((256, 256), (512, 512)), freescale=FreeScaleConfig(restart_fraction=0.9))
        row.append(Image.fromarray(render(staged, pipeline=pipeline, progress=False, write=False).image).resize((256, 256)))
        tiles.append(row)
    sheet = Image.new("RGB", (256 * 5, 256 * len(tiles)))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (256 * c, 256 * r))
    sheet.save(out_dir / "round_trip.png")
    print(f"wrote {out_dir / 'round_trip.png'}")


if __name__ == "__main__":
    main()
