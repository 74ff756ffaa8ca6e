"""Stream a synthetic poster through the pyramidal TIFF writer and report wall time and peak RSS.

    python bench/tiff_stream.py --size 16384 --compression deflate

Rows are generated band by band (as the decoder hands them on), so peak RSS is the writer's own:
the goal is under 450 MB at 16384².
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderer.output.tiff import TiffOptions, write_pyramid  # noqa: E402


def synthetic_bands(size: int, band: int):
    cols = np.arange(size)
    for start in range(0, size, band):
        rows = np.arange(start, min(size, start + band))[:, None]
        yield np.stack([(rows + cols) % 256, (rows * 3 + (cols >> 4)) % 256, ((rows ^ cols) >> 3) % 256], axis=-1).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--band", type=int, default=128, help="rows per band handed to the writer")
    parser.add_argument("--compression", default="deflate")
    parser.add_argument("--out", type=Path, help="default: a temporary file, removed afterwards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = args.out or Path(folder) / "poster.tif"
        started = time.perf_counter()
        write_pyramid(out, synthetic_bands(args.size, args.band), (args.size, args.size),
                      TiffOptions(compression=args.compression), {"benchmark": True}, "synthetic")
        seconds = time.perf_counter() - started
        megabytes = out.stat().st_size / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {args.size}x{args.size} | {args.compression} | {seconds:.1f} s | {peak:.0f} MB peak RSS | {megabytes:.0f} MB file |")


if __name__ == "__main__":
    main()
