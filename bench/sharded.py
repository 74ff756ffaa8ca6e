"""Sharded stages on 1, 2, 3 Ray workers: wall time, per-worker peak memory, bytes received per step.

The bytes are measured (`renderer.parallel.strips.received_bytes`) per worker and per purpose, and set against the
estimate of distributed-design.md §A.3 for the same UNet, stage size and strips. The estimate is built from
the shapes a single-process forward actually sees (forward hooks), with the design's per-op rules:
halo rows × width × channels for convs, the other strips' K/V for global attention, nothing for windows
(taken from gathered K/V in the design), 2 tensors × min(k//2, 5) halo rows for the blur, 4 complex
coefficients per channel for FreeU, 3 numbers per group for GroupNorm.

An even worker count runs twice: with every worker on both guidance branches, and with the guidance split
(`renderer.parallel.guidance`: halves of the gang on one branch each, partners swapping predictions).

    python bench/sharded.py --model tiny --stages 256x256,512x512,1024x1024 --steps 10 --workers 1,2,3
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from freescale_core import FreeScaleConfig, freescale_mode
from freescale_core.blur import kernel_size
from freescale_core.cascade import restart_index, scale_factors
from freescale_core.freeu import backbone_channels, freeu_rule
from renderer import RenderRequest, render
from renderer.models import load_pipeline
from renderer.plan.geometry import parse_size


@functools.cache
def traced_shapes(pipeline, size: tuple[int, int], step_index: int) -> list[tuple]:
    """(kind, module facts, input shape) of every cross-strip op of one CFG UNet forward at `size` (W, H);
    cached, since every rank's estimate reads the same trace."""
    unet = pipeline.unet
    seen: list[tuple] = []
    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d) and (module.kernel_size[0] > 1 or module.stride[0] > 1):
            upsampler = "upsamplers" in name
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, up=upsampler: seen.append(("conv", (m.dilation[0], m.stride[0], m.padding[0], up), tuple(args[0].shape)))))
        elif isinstance(module, nn.GroupNorm):
            hooks.append(module.register_forward_pre_hook(lambda m, args: seen.append(("groupnorm", m.num_groups, tuple(args[0].shape)))))
        elif isinstance(module, Attention) and not module.is_cross_attention:
            hooks.append(module.register_forward_pre_hook(lambda m, args: seen.append(("attention", None, tuple(args[0].shape)))))
    latent = torch.zeros(2, 4, size[1] // 8, size[0] // 8)
    embeds = torch.zeros(2, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.zeros(2, unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim),
             "time_ids": torch.zeros(2, 6)}
    try:
        with torch.inference_mode(), freescale_mode(unet, FreeScaleConfig(), size=(size[1], size[0]), step_index=step_index):
            unet(latent, 500, encoder_hidden_states=embeds, added_cond_kwargs=added)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def design_estimate(pipeline, size: tuple[int, int], strips: list[tuple[int, int]], rank: int, step_index: int,
                    split: bool = False) -> dict[str, int]:
    """Bytes rank `rank` receives in one UNet forward by the design's rules (fp32 activations here).

    With the guidance `split`, the rank works among its branch's ranks on two merged strips with a batch of
    1 (half of every traced shape's), and receives its partner's prediction of those rows once a step."""
    height = size[1] // 8
    batch_share = 1
    estimate = {"conv": 0, "ring": 0, "blur": 0, "sum": 0, "window": 0, "guidance": 0}
    if split:
        strips = [(strips[i][0], strips[i + 1][1]) for i in range(0, len(strips), 2)]
        rank, batch_share = rank // 2, 0.5
        start, stop = strips[rank]
        estimate["guidance"] = 4 * (stop - start) * (size[0] // 8) * 4
    start, stop = strips[rank]
    above, below = rank > 0, rank + 1 < len(strips)
    scale = scale_factors((size[1], size[0]), pipeline.unet.config.sample_size * 8)
    blur_halo = min(kernel_size(scale) // 2, 5)
    element = 4
    for kind, facts, shape in traced_shapes(pipeline, size, step_index):
        shape = (int(shape[0] * batch_share), *shape[1:])
        if kind == "conv":
            dilation, stride, padding, upsampler = facts
            batch, channels, rows, width = shape
            if upsampler:  # after nearest upsampling: the design moves one pre-upsample row per side
                rows_above = rows_below = 1
                width //= 2
            elif stride == 1:
                rows_above = rows_below = dilation
            else:
                rows_above, rows_below = padding, 2 * dilation - padding - 1
            estimate["conv"] += (rows_above * above + rows_below * below) * width * channels * batch * element
        elif kind == "groupnorm":
            estimate["sum"] += 3 * facts * shape[0] * 8
        else:
            batch, tokens, channels = shape
            downsample = int(round((height * (size[0] // 8) / tokens) ** 0.5))
            width = size[0] // 8 // downsample
            others = (height - (stop - start)) // downsample * width
            estimate["ring"] += others * 2 * channels * batch * element
            estimate["blur"] += 2 * blur_halo * (above + below) * width * channels * batch * element
    rule = freeu_rule(pipeline.unet, 1, 1, 1, 1)
    skip_channels = sum(resnet.conv1.in_channels - backbone for resnet, backbone in backbone_channels(pipeline.unet).items() if backbone in rule)
    estimate["sum"] += int(skip_channels * 2 * batch_share * 4 * 8)  # batch 2, 4 complex64 coefficients per channel
    if len(strips) == 1:  # a branch of one rank exchanges nothing inside the UNet
        estimate = {kind: value if kind == "guidance" else 0 for kind, value in estimate.items()}
    return estimate


def step_estimate(pipeline, size, strips, rank, steps: int, config: FreeScaleConfig, split: bool = False) -> dict[str, int]:
    """The design estimate averaged over the stage's steps (dilated while step < dilate_tau)."""
    indices = range(restart_index(steps, config.restart_fraction), steps)
    dilated = sum(index < config.dilate_tau for index in indices)
    with_dilation = design_estimate(pipeline, size, strips, rank, 0, split)
    without = design_estimate(pipeline, size, strips, rank, config.dilate_tau, split)
    return {kind: (with_dilation[kind] * dilated + without[kind] * (len(indices) - dilated)) // len(indices) for kind in with_dilation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--stages", default="256x256,512x512,1024x1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sharded.json"))
    args = parser.parse_args()
    stages = tuple(parse_size(part) for part in args.stages.split(","))
    request = RenderRequest(prompt="a red kite over a blue lake", seed=1, stages=stages, steps=args.steps,
                            vae_mode="exact", out=Path("/tmp/bench-sharded.png"))
    pipeline = load_pipeline(args.model)
    started = time.perf_counter()
    single = render(request, pipeline=pipeline, progress=False, write=False)
    rows = [{"workers": 0, "seconds": single.metadata["seconds"]["stages"][1:], "total": time.perf_counter() - started}]
    runs = [(workers, split) for workers in (int(n) for n in args.workers.split(",")) for split in (False, True)
            if not split or workers % 2 == 0]
    for workers, split in runs:
        started = time.perf_counter()
        sharded = render(request.with_(workers=workers, cfg_split=split), pipeline=pipeline, progress=False, write=False)
        info = sharded.metadata["workers"]
        strips = [tuple(s) for s in info["strips"]]
        final = stages[-1]
        rows.append({
            "workers": workers, "cfg_split": split, "seconds": sharded.metadata["seconds"]["stages"][1:],
            "total": time.perf_counter() - started,
            "peak_rss_mb": [round(b / 2**20) for b in info["peak_bytes"]], "strips": strips,
            "latent_max_abs_diff": float((sharded.latents - single.latents).abs().max()),
            "measured_step_bytes_final_stage": [stage_bytes[-1] for stage_bytes in info["step_bytes"]],
            "design_step_bytes_final_stage": [step_estimate(pipeline, final, strips, rank, args.steps, FreeScaleConfig(), split)
                                              for rank in range(workers)],
        })
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print_table(rows, stages)


def print_table(rows: list[dict], stages) -> None:
    print(f"\nstages {' -> '.join(f'{w}x{h}' for w, h in stages)}; seconds per sharded stage (max over workers)")
    print("| workers | stage seconds | total s | peak RSS per worker (MB) | latent max abs diff vs 1 process |")
    print("|---|---|---|---|---|")
    def label(row: dict) -> str:
        return f"{row['workers']}{' split' if row.get('cfg_split') else ''}" if row["workers"] else "1 process"

    for row in rows:
        print(f"| {label(row)} | {', '.join(f'{s:.1f}' for s in row['seconds'])} | {row['total']:.1f} | "
              f"{row.get('peak_rss_mb', '')} | {row.get('latent_max_abs_diff', 0):.1e} |")
    print("\nbytes received per denoising step at the final stage, per worker: measured / design estimate (MB)")
    kinds = ("conv", "ring", "blur", "window", "sum", "guidance")
    print("| workers | rank | conv halos | K/V ring | blur halos | window rows | sums | guidance | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows[1:]:
        for rank, (measured, design) in enumerate(zip(row["measured_step_bytes_final_stage"], row["design_step_bytes_final_stage"])):
            cells = [f"{measured.get(kind, 0) / 1e6:.2f} / {design[kind] / 1e6:.2f}" for kind in kinds]
            total = f"{sum(measured.get(kind, 0) for kind in kinds) / 1e6:.2f} / {sum(design.values()) / 1e6:.2f}"
            print(f"| {label(row)} | {rank} | " + " | ".join(cells) + f" | {total} |")


if __name__ == "__main__":
    main()
