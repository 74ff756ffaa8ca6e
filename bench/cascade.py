"""Speed and memory of a FreeScale cascade against direct inference at the same final size.

    python bench/cascade.py --model tiny --stages 256x256,512x512,1024x1024 --steps 10
    python bench/cascade.py --model sdxl-random --device cuda --stages 1024x1024,2048x2048 --steps 50

Each variant runs in its own process so that peak RSS (and peak CUDA memory) are its own. Prints one
markdown row per variant and the overhead ratio FreeScale / direct.
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


def run_variant(args: argparse.Namespace, direct: bool) -> dict:
    import torch

    from freescale_core import FreeScaleConfig
    from renderer import RenderRequest, render
    from renderer.models import load_pipeline
    from renderer.plan.geometry import parse_size
    from renderer.cascade.worker import resolve_dtype

    stages = tuple(parse_size(s) for s in args.stages.split(","))
    request = RenderRequest(
        prompt="a green creature", seed=0, stages=stages[-1:] if direct else stages, steps=args.steps,
        freescale=FreeScaleConfig(freeu=not direct), model=args.model, device=args.device,
    )
    pipeline = load_pipeline(args.model, args.device, resolve_dtype(request.dtype, request.device))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = render(request, pipeline=pipeline, progress=False, write=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row = {
        "variant": "direct" if direct else "FreeScale", "stages": " -> ".join(f"{w}x{h}" for w, h in result.stages),
        "seconds": round(seconds, 2), "stage_seconds": [round(s, 2) for s in result.metadata["seconds"]["stages"]],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device.startswith("cuda"):
        row["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", default="256x256,512x512,1024x1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", choices=("direct", "freescale"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args, args.variant == "direct")))
        return
    rows = []
    for variant in ("freescale", "direct"):
        command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--stages", args.stages,
                   "--steps", str(args.steps), "--variant", variant]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    print(f"\nFreeScale / direct wall time: {rows[0]['seconds'] / rows[1]['seconds']:.2f}x "
          f"({args.model}, {args.steps} steps, {args.device})")


if __name__ == "__main__":
    main()
