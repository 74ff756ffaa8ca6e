"""What putting a UNet on a row strip costs (`renderer.parallel.sharding.sharding`): entering and leaving the
context on the tiny UNet, and one sharded CFG call at 512² with it, on 2 gloo ranks of this machine.

    python bench/sharding_hooks.py [--repeats 20]

Run it on two checkouts to compare two implementations (PYTHONPATH=OTHER python bench/sharding_hooks.py).
Prints medians in milliseconds (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from cluster.spawn import run_ranks


def timed(rank: int, world: int, repeats: int) -> dict[str, float]:
    from renderer.models import load_pipeline
    from renderer.parallel.sharding import sharding
    from renderer.parallel.strips import RowGroup, plan_strips

    torch.set_num_threads(1)
    unet = load_pipeline("tiny").unet
    rows = RowGroup(plan_strips(64, world, 8))
    start, stop = rows.span
    latent = torch.linspace(-1, 1, 2 * 4 * 64 * 64).view(2, 4, 64, 64)[:, :, start:stop].contiguous()
    embeds = torch.linspace(-1, 1, 2 * 77 * unet.config.cross_attention_dim).view(2, 77, -1)
    added = {"text_embeds": torch.linspace(-1, 1, 64).view(2, 32), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    enter, call = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            began = time.perf_counter()
            with sharding(unet, rows):
                entered = time.perf_counter()
                unet(latent, 500, encoder_hidden_states=embeds, added_cond_kwargs=added)
                called = time.perf_counter()
            enter.append((entered - began) + (time.perf_counter() - called))
            call.append(called - entered)
    return {"enter and leave": 1000 * statistics.median(enter), "sharded call": 1000 * statistics.median(call)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    reports = run_ranks(2, partial(timed, repeats=args.repeats), timeout_s=1200)
    for key in reports[0]:
        print(f"{key}: {max(report[key] for report in reports):.2f} ms")


if __name__ == "__main__":
    main()
