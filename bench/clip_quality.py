"""Clip quality benchmark of `toy-video`: does FreeScale keep one moving creature where direct inference repeats it?

    python bench/clip_quality.py --seeds 8 --frames 16 --steps 8 --out-dir bench/results/clip_quality
    OMP_NUM_THREADS=1 python bench/clip_quality.py --first-seed 1 --stride 2 --seeds 4 ...   # split over processes
    python bench/clip_quality.py --table --out-dir bench/results/clip_quality      # the table and the sheet

For each seed (prompt "a <colour> creature", colour cycling through the palette) it renders a clip at 4× the
training size with FreeScale (its base stage is the 1× clip), by direct inference, and with the paper's video
ablations (dilated up blocks, latent instead of RGB upsampling). Every frame is counted
(`renderer.toy.metrics`): a clip keeps one subject when every frame has exactly one; its motion is the
largest step of the subject's centre between consecutive frames that have one, against the most the model saw in training
(`renderer.toy.clips.MAX_STEP`); flicker is the mean absolute difference of consecutive frames outside the
subject; and, frame by frame, whether a variant keeps one subject where the 1× clip (FreeScale's base stage, of
the same seed) has one. The base clip upsampled bicubically to 4× is the flicker reference. Each (variant, seed) is saved
as JSON and a strip of frames; `--table` puts all of them together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freescale_core import FreeScaleConfig  # noqa: E402
from renderer import RenderRequest, render  # noqa: E402
from renderer.models import load_pipeline, model_geometry, recommended_restart_fraction  # noqa: E402
from renderer.toy.clips import MAX_STEP  # noqa: E402
from renderer.toy.metrics import background_flicker, count_subjects  # noqa: E402
from renderer.toy.scenes import COLOURS, caption  # noqa: E402
from quality import labelled_row, variants  # noqa: E402  (bench/quality.py: the image benchmark's rows and sheet)

VARIANTS = ("FreeScale 4x", "direct 4x", "dilated up blocks 4x", "latent upsampling 4x")
DERIVED = ("base 1x", "base upsampled 4x")  # from FreeScale's base stage, at no extra render
SHEET_FRAMES = (0, 5, 10, 15)
THUMB = 160


def measure(frames: np.ndarray, train: int) -> dict:
    counts = [count_subjects(frame, train) for frame in frames]
    subjects = [c.subjects for c in counts]
    centres = np.array([c.centre if c.subjects == 1 else (np.nan, np.nan) for c in counts])
    steps = np.hypot(*np.diff(centres, axis=0).T)
    return {"subjects": subjects, "one_subject": all(s == 1 for s in subjects), "stable": len(set(subjects)) == 1,
            "largest_step": float(np.nanmax(steps)) if np.isfinite(steps).any() else None,
            "flicker": background_flicker(frames, counts), "colour": counts[0].colour}


def strip(frames: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(Image.fromarray(frames[k]).resize((THUMB, THUMB), Image.Resampling.LANCZOS))
                           for k in SHEET_FRAMES if k < len(frames)], axis=1)


def save(out_dir: Path, name: str, seed: int, frames: np.ndarray, record: dict) -> None:
    stem = out_dir / f"{name.replace(' ', '_')}_seed{seed}"
    Image.fromarray(strip(frames)).save(stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps({"variant": name, "seed": seed, **record}))


def run(args) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(args.model, args.device, motion_adapter=args.motion_adapter)
    train = model_geometry(pipeline).train_px
    fs = FreeScaleConfig(restart_fraction=recommended_restart_fraction(args.model))
    for seed in range(args.first_seed, args.first_seed + args.seeds * args.stride, args.stride):  # every variant of a seed
        for name in args.variants.split(","):  # before the next seed, so that a cut run leaves whole seeds
            stages, config = variants(train, False, fs)[name]
            colour = list(COLOURS)[seed % len(COLOURS)]
            request = RenderRequest(prompt=caption(colour), seed=seed, stages=tuple(stages), steps=args.steps, freescale=config,
                                    model=args.model, motion_adapter=args.motion_adapter, device=args.device,
                                    frames=args.frames, save_stages=name == "FreeScale 4x", out=Path("clip.mp4"))
            started = time.perf_counter()
            result = render(request, pipeline=pipeline, progress=False, write=False)
            seconds = time.perf_counter() - started
            record = measure(result.image, train) | {"seconds": seconds, "prompt": colour}
            save(args.out_dir, name, seed, result.image, record)
            if name == "FreeScale 4x":
                base = result.stage_images[0]
                save(args.out_dir, "base 1x", seed, base, measure(base, train) | {"prompt": colour})
                size = (result.image.shape[2], result.image.shape[1])
                upsampled = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in base])
                save(args.out_dir, "base upsampled 4x", seed, upsampled, measure(upsampled, train) | {"prompt": colour})
            print(f"{name} seed {seed}: {record}", flush=True)


def table(out_dir: Path) -> None:
    records: dict[str, list[dict]] = {}
    for path in sorted(out_dir.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        records.setdefault(record["variant"], []).append(record)
    print(f"largest step allowed (training): {MAX_STEP:.3f} of the width\n")
    base = {r["seed"]: r["subjects"] for r in records.get("base 1x", [])}
    print("| variant | clips | one subject in every frame | same count in every frame | mean subjects a frame | "
          "one subject where the 1x clip has one | largest centre step (median, max) | steps ≤ training's | "
          "flicker (levels) | prompt's colour | s/clip |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sheet = []
    for name in (*DERIVED[:1], VARIANTS[0], DERIVED[1], *VARIANTS[1:]):
        rows = sorted(records.get(name, []), key=lambda r: r["seed"])
        if not rows:
            continue
        steps = [r["largest_step"] for r in rows if r["largest_step"] is not None]  # between frames of one subject
        within = sum(s <= MAX_STEP for s in steps)
        seconds = [r["seconds"] for r in rows if "seconds" in r]
        kept = [s == 1 for r in rows for s, b in zip(r["subjects"], base.get(r["seed"], [])) if b == 1]
        print(f"| {name} | {len(rows)} | {np.mean([r['one_subject'] for r in rows]):.0%} | {np.mean([r['stable'] for r in rows]):.0%} | "
              f"{np.mean([np.mean(r['subjects']) for r in rows]):.2f} | {sum(kept)}/{len(kept)} frames | "
              f"{(f'{np.median(steps):.3f}, {max(steps):.3f}' if steps else '–')} | {within}/{len(steps)} | "
              f"{np.mean([r['flicker'] for r in rows]):.2f} | {np.mean([r['colour'] == r['prompt'] for r in rows]):.0%} | "
              f"{(f'{np.mean(seconds):.0f}' if seconds else '–')} |")
        if name == "base upsampled 4x":  # the base's frames again, larger: only its numbers
            continue
        images = [np.asarray(Image.open(out_dir / f"{name.replace(' ', '_')}_seed{r['seed']}.png")) for r in rows]
        sheet.extend(labelled_row(f"{name}, seed {r['seed']}", image) for r, image in zip(rows, images))
    width = max(s.shape[1] for s in sheet)
    padded = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in sheet]
    Image.fromarray(np.concatenate(padded, axis=0)).save(out_dir / "contact_sheet.png")
    print("\nper seed (subjects in each frame):")
    for name, rows in records.items():
        for r in sorted(rows, key=lambda r: r["seed"]):
            print(f"  {name} seed {r['seed']}: {''.join(str(min(s, 9)) for s in r['subjects'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-video")
    parser.add_argument("--motion-adapter", help="a MotionAdapter folder (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (to split a run over processes)")
    parser.add_argument("--stride", type=int, default=1, help="seeds this far apart (2: every other seed, for two processes)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/clip_quality"))
    parser.add_argument("--table", action="store_true", help="only put the saved results together")
    args = parser.parse_args(argv)
    if args.table:
        table(args.out_dir)
    else:
        run(args)


if __name__ == "__main__":
    main()
