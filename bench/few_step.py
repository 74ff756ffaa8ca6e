"""Few-step sampling on the toy model, and what guidance off saves: does a 4-step schedule keep FreeScale's one
subject at 4x, and how much of a render is the second guidance branch?

    python bench/few_step.py --seeds 4                       # the quality table and the contact sheet
    python bench/few_step.py --seeds 0 --timing-steps 10     # only the one-branch timing (tiny and toy, 1024²)
    python bench/few_step.py --device cuda --seeds 8 --timing-models sdxl-random --timing-size 2048

Quality: for each seed (prompt "a <colour> creature") the toy renders at its training size (1x) and with FreeScale at
4x, with its own 30-step Euler schedule and with 4 steps of trailing Euler and of LCM (`renderer.cascade.schedulers`); it
counts subjects and eyes (renderer.toy.metrics, as bench/quality.py does). Timing: a 256 -> 512 -> 1024 cascade at
guidance 7.5 (both branches) and 1 (the conditional branch alone), on tiny and toy (--timing-models, --timing-size),
the best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freescale_core import FreeScaleConfig  # noqa: E402
from renderer import RenderRequest, render  # noqa: E402
from renderer.models import load_pipeline, model_geometry, recommended_restart_fraction  # noqa: E402
from renderer.toy.metrics import count_subjects  # noqa: E402
from quality import colour_for, labelled_row  # noqa: E402  (bench/quality.py: the prompts' colours and the sheet's rows)

# label -> (steps, --scheduler, its options)
SCHEDULES = {
    "30 steps, the toy's Euler": (30, None, {}),
    "4 steps, trailing Euler": (4, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "4 steps, LCM": (4, "LCMScheduler", {}),
}


def quality(pipeline, args) -> dict:
    train = model_geometry(pipeline).train_px
    config = FreeScaleConfig(restart_fraction=recommended_restart_fraction("toy"))
    rows, sheet = {}, []
    for scale in (1, 4):
        stages = tuple((train * 2**k, train * 2**k) for k in range(scale.bit_length()))
        for label, (steps, scheduler, options) in SCHEDULES.items():
            name = f"{label}, {scale}x"
            counts, seconds, thumbs = [], [], []
            for seed in range(args.seeds):
                colour = colour_for(seed)
                request = RenderRequest(prompt=f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} creature", seed=seed, stages=stages,
                                        steps=steps, freescale=config, model="toy", scheduler=scheduler, scheduler_options=options,
                                        device=args.device)
                started = time.perf_counter()
                image = render(request, pipeline=pipeline, progress=False, write=False).image
                seconds.append(time.perf_counter() - started)
                counts.append(count_subjects(image, train))
                thumbs.append(np.asarray(Image.fromarray(image).resize((192, 192), Image.Resampling.LANCZOS)))
            rows[name] = {
                "size": f"{stages[-1][0]}x{stages[-1][1]}", "one_subject": sum(c.subjects == 1 for c in counts) / len(counts),
                "one_subject_two_eyes": sum(c.subjects == 1 and c.eyes[0] == 2 for c in counts) / len(counts),
                "mean_subjects": float(np.mean([c.subjects for c in counts])), "seconds": float(np.mean(seconds)),
                "per_seed": [c.subjects for c in counts],
            }
            sheet.append(labelled_row(name, np.concatenate(thumbs, axis=1)))
            print(f"{name}: {rows[name]}", flush=True)
            (args.out_dir / "few_step_rows.json").write_text(json.dumps(rows, indent=2))  # kept if a long run is cut short
    Image.fromarray(np.concatenate(sheet, axis=0)).save(args.out_dir / "few_step_sheet.png")
    return rows


def one_branch_timing(args) -> dict:
    """Seconds of a cascade with both guidance branches and with the conditional one alone."""
    timings, size = {}, args.timing_size
    for model in args.timing_models.split(","):
        pipeline = load_pipeline(model, args.device, dtype(args.device))
        for guidance in (7.5, 1.0):
            request = RenderRequest(prompt="a green creature", size=(size, size), steps=args.timing_steps, guidance=guidance, model=model,
                                    freescale=FreeScaleConfig(restart_fraction=recommended_restart_fraction(model)), device=args.device)
            best = min(timed(request, pipeline) for _ in range(args.repeats))
            timings[f"{model}, guidance {guidance:g}"] = best
            print(f"{model} {size}x{size}, {args.timing_steps} steps, guidance {guidance:g}: {best:.1f} s", flush=True)
    return timings


def dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def timed(request: RenderRequest, pipeline) -> float:
    started = time.perf_counter()
    render(request, pipeline=pipeline, progress=False, write=False)
    if request.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds of the quality table (0: skip it)")
    parser.add_argument("--timing-steps", type=int, default=10, help="steps of the one-branch timing (0: skip it)")
    parser.add_argument("--timing-models", default="tiny,toy")
    parser.add_argument("--timing-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/few_step"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results = {"args": vars(args) | {"out_dir": str(args.out_dir)}}
    if args.seeds:
        results["quality"] = quality(load_pipeline("toy", args.device, dtype(args.device)), args)
        print(f"\n{args.seeds} seeds, toy on {args.device}\n\n| schedule | size | one subject | one subject, two eyes | mean subjects | s/image | subjects per seed |")
        print("|---|---|---|---|---|---|---|")
        for name, row in results["quality"].items():
            print(f"| {name} | {row['size']} | {row['one_subject']:.0%} | {row['one_subject_two_eyes']:.0%} | {row['mean_subjects']:.1f} | "
                  f"{row['seconds']:.1f} | {row['per_seed']} |")
    if args.timing_steps:
        results["one_branch_seconds"] = one_branch_timing(args)
    (args.out_dir / "few_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
