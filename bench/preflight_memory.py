"""The preflight's peak-memory estimate against the measured peak of the same render.

For each plan, `freescale-render --dry-run` prints the estimate (computed in that process, before any
weight is loaded), then the same command renders in a fresh process whose peak resident memory
(ru_maxrss, CPU) is measured with wait4. On a GPU (`--device cuda`), the render's sidecar gives the
peak CUDA allocation instead.

    python bench/preflight_memory.py                                  # tiny, CPU: 512², 1024², 2048²
    python bench/preflight_memory.py --model sdxl-random --device cuda --sizes 2048,4096
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

GiB = 2**30


def command(model: str, device: str, size: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "renderer.cli", "--model", model, "--device", device, "--prompt", "a red kite",
            "--size", f"{size}x{size}", "--steps", "3", "--vae-mode", "exact", "--quiet", "--out", str(out)]


def estimate(args: list[str]) -> float:
    printed = subprocess.run([*args, "--dry-run"], check=True, capture_output=True, text=True).stdout
    return float(re.search(r"peak memory, coordinator \(\S+\): ([\d.]+) GiB", printed).group(1)) * GiB


def measured_peak(args: list[str]) -> float:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"render failed: {process.stderr.read().decode()}")
    return usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="512,1024,2048")
    options = parser.parse_args()
    print(f"| plan ({options.model}, {options.device}, 3 steps) | estimate | measured peak | estimate / measured |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in (int(side) for side in options.sizes.split(",")):
            args = command(options.model, options.device, size, Path(folder) / f"p{size}.tif")
            expected = estimate(args)
            if options.device.startswith("cuda"):
                import json

                measured_peak(args)
                peak = json.loads((Path(folder) / f"p{size}.tif.json").read_text())["peak_bytes"]
            else:
                peak = measured_peak(args)
            print(f"| {size}x{size} | {expected / GiB:.2f} GiB | {peak / GiB:.2f} GiB | {expected / peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
