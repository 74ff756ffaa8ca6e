"""Proof of scale: one whole poster-size render on CPU workers, streamed into its TIFF, with what it cost.

Runs `freescale-render --dry-run` for the preflight's estimate, then the same command for real in a fresh
process, and prints per-stage wall time, each worker's peak resident memory (from the sidecar) and the
driver's (wait4) against the estimate, and the TIFF's size. The defaults are the 8192² run of
docs/benchmarks.md: the tiny model, 2 CPU workers, 4 steps (3 per upscaling stage), fast mode (global
attention on strided sub-grids, as the method offers for 8K) and the diffusers-tiled VAE.

    python bench/scale_proof.py                          # 8192x8192 on 2 CPU workers
    python bench/scale_proof.py --size 8192x4096
    python bench/scale_proof.py --workers 0                # 8192x8192 in one process
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from renderer.output.files import sidecar_path

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8192x8192", help="WxH")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale-proof/poster.tif"))
    parser.add_argument("--extra", default="--fast-mode --vae-mode tiled", help="further render options")
    options = parser.parse_args()
    options.out.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "renderer.cli", "--model", options.model, "--prompt", "a red kite over a blue lake",
            "--seed", "1", "--size", options.size, "--steps", str(options.steps), "--workers",
            str(options.workers), "--quiet", "--no-resume", "--out", str(options.out), *options.extra.split()]
    where = f"{options.workers} CPU workers" if options.workers else "one process"
    print(" ".join(args[2:]), flush=True)
    plan = subprocess.run([*args, "--dry-run"], check=True, capture_output=True, text=True).stdout
    print(plan, flush=True)
    coordinator_estimate = float(re.search(r"peak memory, coordinator \(\S+\): ([\d.]+) GiB", plan).group(1))
    worker_estimate = re.search(r"peak memory, each worker \(.*?\): ([\d.]+) GiB", plan)

    started = time.perf_counter()
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"render failed ({status}): {process.stderr.read()}")
    sidecar = json.loads(sidecar_path(options.out).read_text())
    stages, seconds = sidecar["stages"], sidecar["seconds"]["stages"]
    workers = sidecar.get("workers", {"stage_ranks": [[0]] * len(stages), "peak_bytes": []})
    print(f"\n{options.size}, {options.model}, {where}, {options.steps} steps, "
          f"{options.extra}: {wall / 60:.1f} min in all, TIFF {options.out.stat().st_size / 2**20:.1f} MiB "
          f"(pyramid included)\n")
    print("| stage | where | seconds |")
    print("|---|---|---|")
    for index, (stage, duration) in enumerate(zip(stages, seconds)):
        ranks = workers["stage_ranks"][index]
        ran = "one process" if not options.workers else f"ranks {ranks}" if ranks else "not run (resumed)"
        print(f"| {stage} | {ran} | {duration:.0f} |")
    print(f"| writing (final decode streamed into the TIFF) | {'workers → driver' if options.workers else 'one process'} | "
          f"{sidecar['seconds']['total'] - sum(seconds):.0f} |")
    print("\n| process | peak RSS | preflight estimate |")
    print("|---|---|---|")
    print(f"| driver{'' if options.workers else ' (the one process)'} | {usage.ru_maxrss * 1024 / GiB:.2f} GiB | {coordinator_estimate:.2f} GiB |")
    for rank, peak in enumerate(workers["peak_bytes"]):
        print(f"| worker {rank} (rows {workers['strips'][rank]}) | {peak / GiB:.2f} GiB | {float(worker_estimate.group(1)):.2f} GiB |")


if __name__ == "__main__":
    main()
