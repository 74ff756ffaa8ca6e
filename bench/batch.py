"""Posters per hour: N posters as one `freescale-render batch` job against N `ray job submit` jobs in a row, on the
same private Ray head (tests/ray_head.py: loopback ports, its own token), CPU workers, the `tiny` model.

    python bench/batch.py [--posters 4] [--sizes 512,1024] [--steps 8] [--workers 2] [--cpus 2]

Rendering time is what the sidecars count as the posters' stages (denoising and stage transitions); the rest of
a job's wall time is Ray's job start, the driver's imports, the gang's reservation and model loads, the final
decode and the TIFF. Prints a Markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from renderer.output.files import sidecar_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ray_head import running_head  # noqa: E402


def stages_for(size: int) -> str:
    sides, side = [], 256  # tiny's training size, doubled up to the poster
    while side <= size:
        sides.append(side)
        side *= 2
    return ",".join(f"{s}x{s}" for s in sides)


def submit(head, *entrypoint: str) -> None:
    """One job, waited for (the CLI streams its log and exits 0 on success)."""
    sid = f"bench-{uuid.uuid4().hex[:8]}"
    head.ray("job", "submit", "--address", head.dashboard_url, "--submission-id", sid, "--entrypoint-num-cpus", "0",
             "--", "exec", *entrypoint, timeout=3600)


def sidecar_seconds(outs: list[Path]) -> tuple[float, float]:
    """Summed over the posters: their stages' seconds (rendering), and their whole time from the plan to the
    sidecar (the stages, each poster's final decode and TIFF, and the first poster's gang start and model load)."""
    sidecars = [json.loads(sidecar_path(out).read_text())["seconds"] for out in outs]
    return sum(sum(s for s in seconds["stages"] if s) for seconds in sidecars), sum(seconds["total"] for seconds in sidecars)


def measure(head, folder: Path, size: int, posters: int, steps: int, workers: int) -> dict:
    common = ["--stages", stages_for(size), "--steps", str(steps), "--workers", str(workers), "--quiet"]
    jobs = [folder / f"job{index}.tif" for index in range(posters)]
    started = time.perf_counter()
    for index, out in enumerate(jobs):
        submit(head, "freescale-render", "--prompt", "a red kite", "--seed", str(index), *common, "--out", str(out))
    jobs_s = time.perf_counter() - started

    batch = folder / "night.jsonl"
    outs = [folder / f"batch{index}.tif" for index in range(posters)]
    batch.write_text("".join(json.dumps({"prompt": "a red kite", "seed": index, "out": str(out)}) + "\n" for index, out in enumerate(outs)))
    started = time.perf_counter()
    submit(head, "freescale-render", "batch", str(batch), *common)
    batch_s = time.perf_counter() - started
    (jobs_rendering, jobs_total), (batch_rendering, batch_total) = sidecar_seconds(jobs), sidecar_seconds(outs)
    return {"size": size, "posters": posters, "jobs_s": jobs_s, "batch_s": batch_s, "jobs_rendering_s": jobs_rendering,
            "jobs_posters_s": jobs_total, "batch_rendering_s": batch_rendering, "batch_posters_s": batch_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=int, default=4)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the private Ray head")
    options = parser.parse_args()
    rows = []
    with running_head(num_cpus=options.cpus) as head, tempfile.TemporaryDirectory() as scratch:
        for size in (int(side) for side in options.sizes.split(",")):
            folder = Path(scratch) / str(size)
            folder.mkdir()
            rows.append(measure(head, folder, size, options.posters, options.steps, options.workers))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{options.posters} posters, tiny, {options.steps} steps, {options.workers} CPU workers, head with {options.cpus} CPUs\n")
    print("| size | N jobs: wall | posters/h | one batch: wall | posters/h | batch vs jobs | batch: stages | "
          "batch: posters' own time | batch wall / stages |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_hour = lambda seconds: row["posters"] * 3600 / seconds  # noqa: E731
        print(f"| {row['size']}² | {row['jobs_s']:.0f} s | {per_hour(row['jobs_s']):.0f} | {row['batch_s']:.0f} s | "
              f"{per_hour(row['batch_s']):.0f} | {row['jobs_s'] / row['batch_s']:.2f}× | {row['batch_rendering_s']:.0f} s | "
              f"{row['batch_posters_s']:.0f} s | {row['batch_s'] / row['batch_rendering_s']:.2f} |")


if __name__ == "__main__":
    main()
