"""Peak memory of the final decode: `exact` banded decode against an untiled `vae.decode` of the same latent.

    python bench/vae_memory.py --model toy --latent 256

Each variant runs in its own process (peak RSS on CPU; peak CUDA memory with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(args: argparse.Namespace) -> dict:
    import torch

    from renderer.models import load_pipeline
    from renderer.vae_bands import decode_rows

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    vae = load_pipeline(args.model, args.device, dtype).vae
    z = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0)).to(args.device, vae.dtype)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.inference_mode():
        if args.variant == "untiled":
            vae.decode(z).sample.cpu()
        else:
            for rows in decode_rows(vae, z, args.variant, band_rows=args.band_rows):
                rows.cpu()
    row = {"variant": args.variant, "pixels": f"{8 * args.latent}x{8 * args.latent}", "seconds": round(time.perf_counter() - started, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rss_before_mb": round(baseline, 1)}
    if args.device.startswith("cuda"):
        row["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent", type=int, default=256, help="latent side (image side / 8)")
    parser.add_argument("--band-rows", type=int, default=16)
    parser.add_argument("--variant", choices=("untiled", "exact", "tiled"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    for variant in ("untiled", "exact", "tiled"):
        command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--latent", str(args.latent),
                   "--band-rows", str(args.band_rows), "--variant", variant]
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
