"""How long `freescale-render batch FILE --dry-run` takes to check every line of a large batch: each line parsed,
validated and planned (its stages, strips, bytes and memory) before anything renders.

    python bench/batch_check.py [--lines 1000] [--model sdxl-random] [--workers 4]

Lines vary the prompt, the size (2048², 4096², 3072x2048), the seed and --steps, all of one model; the outputs go to
a temporary folder. Prints the seconds in all and per line (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from renderer.cli import main

SIZES = ("2048x2048", "4096x4096", "3072x2048")


def write_batch(folder: Path, lines: int) -> Path:
    path = folder / "night.jsonl"
    with path.open("w") as file:
        for index in range(lines):
            poster = {"prompt": f"poster {index}: a lighthouse at dusk", "size": SIZES[index % len(SIZES)],
                      "seed": index, "steps": 20 + index % 3 * 5, "out": str(folder / f"p{index:05d}.tif")}
            file.write(json.dumps(poster) + "\n")
    return path


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--model", default="sdxl-random")
    parser.add_argument("--workers", type=int, default=4)  # a farm's gang: 4096² of sdxl-random fits no single CPU here
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        batch = write_batch(Path(folder), args.lines)
        options = ["--model", args.model, "--device", "cpu"] + (["--workers", str(args.workers)] if args.workers else [])
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = main(["batch", str(batch), *options, "--dry-run"])
        seconds = time.perf_counter() - started
    assert code == 0 and f"{args.lines} posters, every line checked" in printed.getvalue(), printed.getvalue()[-500:]
    print(f"| {args.lines} | {args.model} | {args.workers} | {seconds:.2f} | {seconds / args.lines * 1000:.1f} |")


if __name__ == "__main__":
    main_bench()
