"""The exact VAE's memory per rank: a stage transition's decode and encode of each rank's strip, measured against
the preflight's VAE term (`renderer.plan.preflight.vae_bytes`).

    python bench/vae_memory.py --size 4096 --ranks 2              # tiny, CPU: peak RSS growth per rank
    python bench/vae_memory.py --model sdxl-random --device cuda --size 8192 --ranks 1 --share 0.125

Each rank loads the model, then decodes its strip of a latent of the size and encodes its strip of the
decoded image, as a stage transition does, and reports its peak above what it held before (peak RSS on the
CPU; peak CUDA allocation on a GPU, where the layers between bands wait in host memory). `--share` runs one
rank on that share of the rows (a GPU: one rank of a larger gang, without the others).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30


def measure(rank: int, world: int, model: str, device: str, size: int, share: float) -> dict:
    import torch

    from renderer.memory import peak_memory, process_memory
    from renderer.models import load_pipeline
    from renderer.parallel.strips import RowGroup, StripLayout, plan_strips
    from renderer.vae.strip import banded

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    vae = load_pipeline(model, device, dtype).vae
    latent_rows = size // 8
    if world > 1:
        rows = RowGroup(plan_strips(latent_rows, world, 8))
    else:
        rows = RowGroup(StripLayout((0, int(latent_rows * share))), local=True)
    start, stop = rows.span
    z = torch.randn(1, 4, stop - start, size // 8, generator=torch.Generator().manual_seed(rank)).to(device)
    before = torch.cuda.memory_allocated() if device.startswith("cuda") else process_memory()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    engine = banded(vae, rows, size)
    with torch.inference_mode():
        image = torch.cat([band.float() for band in engine.decode(z)], dim=2)
        moments = engine.encode(image)
    assert moments.shape[2] == stop - start
    return {"rank": rank, "rows": [start, stop], "band_rows": min(engine.band_rows, stop - start), "seconds": round(time.perf_counter() - started, 1),
            "vae_peak_gib": round((peak_memory(torch.device(device)) - before) / GiB, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=4096, help="the stage's side in pixels")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--share", type=float, default=1.0, help="with --ranks 1: the share of the rows it holds")
    args = parser.parse_args()

    from cluster.spawn import run_ranks
    from renderer.plan.memory import vae_bytes
    from renderer.plan.shape import model_shape

    shape = model_shape(args.model)
    itemsize = 2 if args.device.startswith("cuda") else 4
    share = 1 / args.ranks if args.ranks > 1 else args.share
    estimate, band, host = vae_bytes(shape.vae, (args.size, args.size), "exact", itemsize, share, args.device)
    work = functools.partial(measure, model=args.model, device=args.device, size=args.size, share=args.share)
    results = run_ranks(args.ranks, work, timeout_s=3600, threads=1) if args.ranks > 1 else [work(0, 1)]
    print(f"{args.model}, {args.size}², {args.device}, {args.ranks} rank(s): estimate {estimate / GiB:.3f} GiB on the device"
          f"{f', {host / GiB:.3f} GiB in host memory' if host else ''}, bands of {band} latent rows")
    for result in results:
        print(json.dumps(result), f"measured / estimate {result['vae_peak_gib'] * GiB / estimate:.2f}")


if __name__ == "__main__":
    main()
