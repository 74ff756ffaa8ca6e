"""GPU checks of the sharded path (issue 4), one table at the end.

Two ranks share the one GPU over gloo (NCCL refuses two ranks on one device); every tensor they compute
with is a CUDA tensor, messages are staged through host memory. Ray is not on the GPU image, so the ranks
are spawned with `cluster.spawn` and run exactly what a Ray worker runs (`renderer.cascade.worker.Worker`: the base stage
on rank 0, handed to both, then the sharded stages).

    python bench/gpu_sharded.py [--parts attention,tiny,sdxl]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch

from cluster.spawn import run_ranks
from renderer.parallel import ops
from renderer.parallel.sharding import sharded_backend, sharding
from renderer.parallel.strips import RowGroup, plan_strips
from freescale_core import FreeScaleConfig, freescale_mode
from renderer import RenderRequest, render
from renderer.messages import Prompt, StageJob
from renderer.cascade.worker import Worker
from renderer.models import load_pipeline

ROWS: list[tuple[str, str, str]] = []
DEVICE = "cuda"  # --device cpu dry-runs the script's plumbing here


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def report(check: str, value: str, note: str = "") -> None:
    ROWS.append((check, value, note))
    print(f"{check}: {value} {note}", flush=True)


def attention_part() -> None:
    """`attention_with_lse` on CUDA (the memory-efficient kernel) against the float64 math on the CPU."""
    for dtype in (torch.float32, torch.float16):
        for head_dim in (64, 512):
            generator = torch.Generator().manual_seed(head_dim)
            q, k, v = (torch.randn(2, 2, 300, head_dim, generator=generator) for _ in range(3))
            out, lse = ops.attention_with_lse(*(t.to("cuda", dtype) for t in (q, k, v)))
            expected, expected_lse = ops.attention_with_lse(q.double(), k.double(), v.double())
            error = float((out.double().cpu() - expected).abs().max())
            lse_error = float((lse.double().cpu() - expected_lse).abs().max())
            report(f"attention_with_lse cuda {str(dtype)[6:]} d={head_dim}", f"out {error:.1e}, lse {lse_error:.1e}")


def strict_fp32() -> None:
    """cuDNN convs default to TF32 (10-bit mantissa) on CUDA; that rounding, amplified over the denoising loop,
    would hide what is being compared."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def tiny_rank(rank: int, world: int, job: StageJob, device: str) -> dict:
    global DEVICE
    DEVICE = device
    strict_fp32()
    worker = Worker("tiny", pipeline=load_pipeline("tiny", device, torch.float32))
    started = time.perf_counter()
    result = worker.run(job)
    pixels = np.concatenate(list(worker.final_rows()), axis=0)
    return {"latents": result.latents, "pixels": pixels, "seconds": time.perf_counter() - started,
            "peak": peak_memory(), "bytes": result.step_bytes}


def tiny_part(mode: str, split: bool) -> None:
    """A whole tiny render 256 → 512 → 1024 on CUDA: one process against 2 ranks (with `split`, one guidance
    branch each)."""
    stages = ((256, 256), (512, 512), (1024, 1024))
    request = RenderRequest(prompt="a red kite", seed=4, stages=stages, steps=10, vae_mode=mode, device=DEVICE,
                            dtype="float32", out="/tmp/unused.png")
    strict_fp32()
    pipeline = load_pipeline("tiny", DEVICE, torch.float32)
    started = time.perf_counter()
    single = render(request, pipeline=pipeline, progress=False, write=False)
    single_seconds = time.perf_counter() - started
    job = StageJob(cond=None, prompt=Prompt(request.prompt, "", request.guidance), latents=torch.empty(0), stages=list(stages),
                   first=0, last=len(stages), steps=request.steps, config=FreeScaleConfig(seed=request.seed),
                   transition_modes=[mode, mode], final_mode=mode, cfg_split=split, first_sharded=1)
    results = run_ranks(2, partial(tiny_rank, job=job, device=DEVICE), threads=4)
    latents = torch.cat([r["latents"] for r in results], dim=2)
    pixels = np.concatenate([r["pixels"] for r in results], axis=0)
    label = f"{mode} VAE{', guidance split' if split else ''}"
    report(f"tiny render 1024 ({label}), 2 ranks vs 1 process, latents", f"max abs diff {float((latents - single.latents).abs().max()):.2e}",
           f"(max abs latent {float(single.latents.abs().max()):.1f})")
    report(f"tiny render 1024 ({label}), pixels", f"max diff {int(abs(pixels.astype(int) - single.image).max())} levels")
    report(f"tiny render 1024 ({label}), seconds", f"1 process {single_seconds:.1f} s, 2 ranks {max(r['seconds'] for r in results):.1f} s",
           "(gloo through host memory)")


def sdxl_unet(device: str = "cuda"):
    from renderer.models.builtin import SDXL, build_unet

    with torch.device(device):
        torch.manual_seed(0)
        unet = build_unet(SDXL)
    return unet.half().eval()


def sdxl_inputs(size: int):
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    latent += torch.linspace(-1, 1, size // 8)[None, None, :, None]  # a vertical ramp across the strips
    embeds = torch.randn(2, 77, 2048, generator=generator) * 0.5
    added = {"text_embeds": torch.randn(2, 1280, generator=generator) * 0.5,
             "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    return latent, embeds, added


def sdxl_forward(unet, latent, embeds, added, size, rows=None):
    config = FreeScaleConfig(seed=3)
    args = dict(size=(size, size), step_index=0)
    cuda = lambda t: t.to("cuda", unet.dtype)  # noqa: E731
    added = {key: cuda(value) for key, value in added.items()}
    with torch.inference_mode():
        if rows is None:
            with freescale_mode(unet, config, **args):
                return unet(cuda(latent), 600, encoder_hidden_states=cuda(embeds), added_cond_kwargs=added).sample.float().cpu()
        with sharding(unet, rows), freescale_mode(unet, config, **args, backend=sharded_backend(rows)):
            return unet(cuda(latent), 600, encoder_hidden_states=cuda(embeds), added_cond_kwargs=added).sample.float().cpu()


def sdxl_rank(rank: int, world: int, size: int) -> dict:
    unet = sdxl_unet()
    latent, embeds, added = sdxl_inputs(size)
    rows = RowGroup(plan_strips(size // 8, world, 8))
    sdxl_forward(unet, latent[:, :, rows.layout.rows(rank)], embeds, added, size, rows)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = sdxl_forward(unet, latent[:, :, rows.layout.rows(rank)], embeds, added, size, rows)
    return {"out": out, "seconds": time.perf_counter() - started, "peak": torch.cuda.max_memory_allocated()}


def sdxl_part(size: int) -> None:
    """The SDXL-architecture UNet (random weights, fp16) in FreeScale mode at a dilated step: 1 process vs 2 ranks."""
    unet = sdxl_unet()
    latent, embeds, added = sdxl_inputs(size)
    sdxl_forward(unet, latent, embeds, added, size)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    expected = sdxl_forward(unet, latent, embeds, added, size)
    single_seconds, single_peak = time.perf_counter() - started, torch.cuda.max_memory_allocated()
    strict_fp32()
    fp32 = sdxl_forward(unet.float(), latent, embeds, added, size)  # the yardstick for fp16 rounding
    del unet
    torch.cuda.empty_cache()
    results = run_ranks(2, partial(sdxl_rank, size=size), threads=4)
    got = torch.cat([r["out"] for r in results], dim=2)
    relative = float((got - expected).abs().max() / expected.abs().max())
    rounding = float((fp32 - expected).abs().max() / expected.abs().max())
    report(f"sdxl-random UNet fp16 {size}px, 2 ranks vs 1 process", f"max rel diff {relative:.1e}",
           f"(1 process fp16 vs fp32: {rounding:.1e}; nan: {bool(torch.isnan(got).any())})")
    report(f"sdxl-random UNet fp16 {size}px, one CFG forward",
           f"1 process {single_seconds:.2f} s / {single_peak / 2**30:.1f} GiB; 2 ranks {max(r['seconds'] for r in results):.2f} s / "
           f"{max(r['peak'] for r in results) / 2**30:.1f} GiB per rank", "(gloo through host memory)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="attention,tiny,sdxl")
    parser.add_argument("--sdxl-size", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    global DEVICE
    DEVICE = parser.parse_args().device
    parts = parser.parse_args().parts.split(",")
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, flush=True)
    for part, run in (("attention", attention_part), ("tiny", lambda: (tiny_part("exact", False), tiny_part("tiled", True))),
                      ("sdxl", lambda: sdxl_part(parser.parse_args().sdxl_size))):
        if part in parts:
            try:
                run()
            except Exception as error:  # keep going: one table with whatever ran
                report(f"{part} FAILED", f"{type(error).__name__}: {str(error)[:300]}")
    print("\n| check | result | note |\n|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
