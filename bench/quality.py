"""Quality benchmark of the toy model: does FreeScale keep one subject where direct inference repeats it?

    python bench/quality.py --device cuda --seeds 8 --steps 50 --out-dir bench/results/quality
    python bench/quality.py --seeds 8 --steps 30 --variants "FreeScale 4x" --set restart_fraction=0.8

For each seed (prompt "a <colour> creature", colour cycling through the palette) it renders at the
training size, by direct inference at 4× and 8×, with FreeScale at 4× and 8×, and the paper's ablations
at 4×; it counts subjects and eyes (renderer.toy.metrics), prints a markdown table in the shape of the
paper's ablation table, and writes a contact sheet PNG and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freescale_core import FreeScaleConfig  # noqa: E402
from renderer import RenderRequest, render  # noqa: E402
from renderer.models import load_pipeline, model_geometry  # noqa: E402
from renderer.toy.metrics import count_subjects  # noqa: E402
from renderer.toy.scenes import COLOURS  # noqa: E402


def variants(train: int, with_8x: bool, fs: FreeScaleConfig) -> dict[str, tuple[list[tuple[int, int]], FreeScaleConfig]]:
    def cascade(scale: int) -> list[tuple[int, int]]:
        return [(train * 2**k, train * 2**k) for k in range(scale.bit_length())]

    direct = replace(fs, freeu=False)
    table = {
        "training size (1x)": ([(train, train)], fs),
        "direct 4x": ([(4 * train, 4 * train)], direct),
        "FreeScale 4x": (cascade(4), fs),
        "w/o scale fusion 4x": (cascade(4), replace(fs, scale_fusion=False)),
        "dilated up blocks 4x": (cascade(4), replace(fs, dilate_up_blocks=True)),
        "latent upsampling 4x": (cascade(4), replace(fs, upsample_space="latent")),
    }
    if with_8x:
        table["direct 8x"] = ([(8 * train, 8 * train)], direct)
        table["FreeScale 8x"] = (cascade(8), fs)
    return table


def labelled_row(label: str, row: np.ndarray) -> np.ndarray:
    """The row of thumbnails with its variant's name in a white margin on the left."""
    from PIL import ImageDraw

    canvas = Image.new("RGB", (row.shape[1] + 180, row.shape[0]), "white")
    canvas.paste(Image.fromarray(row), (180, 0))
    ImageDraw.Draw(canvas).text((6, row.shape[0] // 2 - 6), label, fill="black")
    return np.asarray(canvas)


def overrides(pairs: list[str]) -> dict[str, float]:
    """--set restart_fraction=0.7 --set freeu=0 → FreeScaleConfig fields; the numeric and on/off ones only."""
    numeric = {name: type(value) for name, value in FreeScaleConfig().to_dict().items() if not isinstance(value, str)}
    chosen = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            kind, number = numeric[name], float(value)
        except (KeyError, ValueError):
            raise SystemExit(f"--set {pair}: use NAME=NUMBER with NAME one of {', '.join(numeric)}") from None
        fits = kind is float or (number in (0, 1) if kind is bool else number.is_integer())
        if not fits:
            raise SystemExit(f"--set {pair}: {name} takes {'0 or 1' if kind is bool else 'a whole number'}")
        chosen[name] = kind(number)
    return chosen


def colour_for(seed: int) -> str:
    return list(COLOURS)[seed % len(COLOURS)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (to split a run over processes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-8x", action="store_true", help="skip the 8x renders (slow on CPU)")
    parser.add_argument("--variants", help="comma-separated subset of the variant names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=NUMBER",
                        help="override a FreeScaleConfig field in every row, e.g. restart_fraction=0.7 (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/quality"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipeline = load_pipeline(args.model, args.device, dtype)
    train = model_geometry(pipeline).train_px
    rows, sheet = {}, []
    chosen = variants(train, not args.no_8x, FreeScaleConfig(**overrides(args.set)))
    if args.variants:
        chosen = {name: chosen[name] for name in args.variants.split(",")}
    for name, (stages, config) in chosen.items():
        counts, seconds, thumbs, matches = [], [], [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            colour = colour_for(seed)
            request = RenderRequest(
                prompt=f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} creature", seed=seed, stages=tuple(stages),
                steps=args.steps, freescale=config, model=args.model, device=args.device,
            )
            started = time.perf_counter()
            result = render(request, pipeline=pipeline, progress=False, write=False)
            seconds.append(time.perf_counter() - started)
            counts.append(count_subjects(result.image, train))
            matches.append(counts[-1].colour == colour)
            thumbs.append(np.asarray(Image.fromarray(result.image).resize((192, 192), Image.Resampling.LANCZOS)))
        one = sum(c.subjects == 1 for c in counts) / len(counts)
        two_eyes = sum(c.subjects == 1 and c.eyes[0] == 2 for c in counts) / len(counts)
        rows[name] = {
            "size": f"{stages[-1][0]}x{stages[-1][1]}", "one_subject": one, "one_subject_two_eyes": two_eyes,
            "mean_subjects": float(np.mean([c.subjects for c in counts])),
            "largest_share": float(np.mean([c.largest_share for c in counts])),
            "seconds": float(np.mean(seconds)), "per_seed": [c.subjects for c in counts],
            "eyes_per_seed": [c.eyes[0] if c.subjects else 0 for c in counts],
            "prompt_colour": sum(matches) / len(matches),
        }
        sheet.append(labelled_row(name, np.concatenate(thumbs, axis=1)))
        print(f"{name}: {rows[name]}", flush=True)

    Image.fromarray(np.concatenate(sheet, axis=0)).save(args.out_dir / "contact_sheet.png")
    (args.out_dir / "quality.json").write_text(json.dumps({"args": vars(args) | {"out_dir": str(args.out_dir)}, "rows": rows}, indent=2))
    print(f"\n{args.seeds} seeds, {args.steps} steps, {args.model} on {args.device}\n")
    print("| variant | size | one subject | one subject, two eyes | mean subjects | largest subject share | prompt's colour | s/image | subjects per seed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['size']} | {row['one_subject']:.0%} | {row['one_subject_two_eyes']:.0%} | {row['mean_subjects']:.1f} | "
              f"{row['largest_share']:.1%} | {row['prompt_colour']:.0%} | {row['seconds']:.1f} | {row['per_seed']} |")


if __name__ == "__main__":
    main()
