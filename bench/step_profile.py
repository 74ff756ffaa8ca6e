"""Where a FreeScale UNet step spends its time, against a plain step at the same size.

    python bench/step_profile.py                                   # tiny, CPU, 1024² and 2048², 1 thread
    python bench/step_profile.py --sizes 1024 --repeats 5 --profile --components
    python bench/step_profile.py --model sdxl-random --device cuda --sizes 2048,4096 --profile --components

For each size (a 4x and an 8x stage of the tiny model's 256 px training size), one CFG UNet call
(`renderer.cascade.stages.predict_noise`) is timed plain (no FreeScale, no FreeU) and under `freescale_mode` at a
dilated step (i < dilate_tau) and a plain-conv step (i = dilate_tau), all in one process, interleaved
round by round: warm-up, then `--repeats` rounds; the ratio to plain is the median of the rounds'
ratios. `--ablations` adds one row per component switched on alone (FreeU, dilation, scale fusion).
`--components` times the pieces of FreeScale inside one call (synchronising the device around each, so
their sum is not the step time); `--profile` prints torch.profiler tables of one plain
and one FreeScale call, and the per-op difference. Next to the measured times, a FLOP/byte model of each
part of the step (convs and linears, global attention, windows, blur, FreeU) from the UNet's modules and
the stage geometry.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

# bench/step_compare.py points this at another revision's tree, to time its code with these calls.
sys.path.insert(0, os.environ.get("STEP_PROFILE_TREE", str(Path(__file__).resolve().parents[1])))

import torch
from torch import nn

import freescale_core.attention as fs_attention
from freescale_core import FreeScaleConfig, freescale_mode
from freescale_core.attention import ScaleFusionProcessor
from freescale_core.blur import BLUR_AXES, kernel_size
from freescale_core.cascade import scale_factors
from freescale_core.dilation import dilated_convs
from freescale_core.freeu import fourier_filter
from freescale_core.mode import Backend, self_attentions, train_px
from freescale_core.windows import plan_windows, window_shape
from renderer.models import load_pipeline

try:
    from renderer.cascade.stages import encode_prompts, fresh_scheduler, predict_noise
except ModuleNotFoundError:  # a revision from before renderer/ had sub-packages, timed by bench/step_compare.py
    from renderer.cascade.stages import encode_prompts, fresh_scheduler, predict_noise

STEPS = 50


# ---------------------------------------------------------------- timing


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


@dataclass
class Bench:
    pipeline: object
    cond: object
    scheduler: object
    clock: Clock
    latents: dict = field(default_factory=dict)

    def latent(self, size: int) -> torch.Tensor:
        if size not in self.latents:
            scale = self.pipeline.vae_scale_factor
            generator = torch.Generator().manual_seed(size)
            shape = (1, self.pipeline.unet.config.in_channels, size // scale, size // scale)
            self.latents[size] = torch.randn(shape, generator=generator).to(self.pipeline.unet.device)
        return self.latents[size]

    def call(self, size: int, context, step_index: int) -> torch.Tensor:
        timestep = self.scheduler.timesteps[step_index]
        with context:
            return predict_noise(self.pipeline, self.scheduler, self.latent(size), timestep, self.cond)

    def time_rounds(self, size: int, rows: list[tuple[str, int, object]], repeats: int, warmup: int) -> dict[str, list[float]]:
        """Seconds of each row's call, the rows interleaved round by round, so that a drifting machine
        moves every row alike and each round's ratios stay comparable."""
        times = {name: [] for name, _, _ in rows}
        with torch.inference_mode():
            for round_ in range(warmup + repeats):
                for name, step_index, make_context in rows:
                    started = self.clock.now()
                    self.call(size, make_context(), step_index)
                    if round_ >= warmup:
                        times[name].append(self.clock.now() - started)
        return times


def variants(unet: nn.Module, size: int, config: FreeScaleConfig, ablations: bool) -> list[tuple[str, int, object]]:
    """(name, step index, context factory); the plain row first."""
    tau = config.dilate_tau
    rows = [
        ("plain", tau, nullcontext),
        ("FreeScale, dilated step (i=0)", 0, lambda: freescale_mode(unet, config, size=(size, size), step_index=0)),
        (f"FreeScale, plain-conv step (i={tau})", tau, lambda: freescale_mode(unet, config, size=(size, size), step_index=tau)),
    ]
    if ablations:
        alone = replace(config, scale_fusion=False, freeu=False)
        rows += [
            ("FreeU alone", tau, lambda: freescale_mode(unet, replace(alone, freeu=True), size=(size, size), step_index=tau)),
            ("dilation alone (i=0)", 0, lambda: freescale_mode(unet, alone, size=(size, size), step_index=0)),
            ("scale fusion alone", tau, lambda: freescale_mode(unet, replace(alone, scale_fusion=True), size=(size, size), step_index=tau)),
        ]
    return rows


# ---------------------------------------------------------------- components


class Components:
    """Accumulated seconds per FreeScale component over one call (device synchronised around each)."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def part(self, name: str):
        started = self.clock.now()
        with torch.profiler.record_function(f"fs::{name}"):
            yield
        self.seconds[name] += self.clock.now() - started
        self.calls[name] += 1


@contextmanager
def instrumented(unet: nn.Module, components: Components):
    """Time FreeScale's parts: processors (whole, local branch, its projection and windows, global, blur),
    the FreeU skip filter, the dilated convs, and the plain attn1 processors for comparison."""
    original = {name: getattr(fs_attention, name) for name in ("project", "local_attention")}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            with components.part(name):
                return function(*args, **kwargs)

        return wrapper

    class TimedProcessor(ScaleFusionProcessor):
        def __call__(self, *args, **kwargs):
            with components.part("attn1 FreeScale processor (total)"):
                return super().__call__(*args, **kwargs)

        def local_branch(self, *args):
            with components.part("  local branch (pad, q/k/v, windows, interior)"):
                return super().local_branch(*args)

        def global_branch(self, *args):
            with components.part("  global attention"):
                return super().global_branch(*args)

        def strided_global_branch(self, *args):
            with components.part("  global attention (fast mode)"):
                return super().strided_global_branch(*args)

        def blur(self, grid):
            with components.part("  blur"):
                return super().blur(grid)

    class TimedPlain:
        def __init__(self, processor):
            self.processor = processor

        def __call__(self, *args, **kwargs):
            with components.part("attn1 plain processor (total)"):
                return self.processor(*args, **kwargs)

    def filter_(x, threshold, scale):
        with components.part("FreeU skip filter"):
            return fourier_filter(x, threshold, scale)

    handles = []
    for conv in dilated_convs(unet):
        def pre(module, args):
            module._bench_started = components.clock.now()

        def post(module, args, output):
            name = f"9 restrained convs (dilation {module.dilation[0]})"
            components.seconds[name] += components.clock.now() - module._bench_started
            components.calls[name] += 1

        handles += [conv.register_forward_pre_hook(pre), conv.register_forward_hook(post)]
    fs_attention.project = timed("    q/k/v projection (grid + zero token)", original["project"])
    fs_attention.local_attention = timed("    window attention (gather, attend, scatter)", original["local_attention"])
    attentions = self_attentions(unet)
    saved = [module.processor for module in attentions]
    for module in attentions:
        module.processor = TimedPlain(module.processor)
    try:
        yield Backend(fusion_processor=TimedProcessor, skip_filter=filter_)
    finally:
        for name, function in original.items():
            setattr(fs_attention, name, function)
        for module, processor in zip(attentions, saved):
            module.processor = processor
        for handle in handles:
            handle.remove()


def component_table(bench: Bench, size: int, config: FreeScaleConfig) -> None:
    unet = bench.pipeline.unet
    print(f"\n#### Components inside one call, {size}x{size} (synchronised; seconds summed over all blocks)\n")
    print("| component | plain | FreeScale i=0 | FreeScale i=tau | calls |")
    print("|---|---|---|---|---|")
    results = {}
    for label, step, use in (("plain", config.dilate_tau, False), ("i=0", 0, True), ("i=tau", config.dilate_tau, True)):
        best = None
        for _ in range(2):  # warm-up + 1, keep the second
            components = Components(bench.clock)
            with torch.inference_mode(), instrumented(unet, components) as backend:
                context = freescale_mode(unet, config, size=(size, size), step_index=step, backend=backend) if use else nullcontext()
                started = bench.clock.now()
                bench.call(size, context, step)
                components.seconds["whole UNet call"] = bench.clock.now() - started
                components.calls["whole UNet call"] = 1
            best = components
        results[label] = best
    names = sorted({name for c in results.values() for name in c.seconds}, key=_component_order)
    for name in names:
        cells = [f"{results[k].seconds[name]:.3f}" if name in results[k].seconds else "" for k in ("plain", "i=0", "i=tau")]
        calls = max(results[k].calls.get(name, 0) for k in results)
        print(f"| {name} | {' | '.join(cells)} | {calls} |")


def _component_order(name: str) -> tuple[int, str]:
    order = ["whole UNet call", "attn1 plain", "attn1 FreeScale", "  local", "    q/k/v", "    window", "  global", "  blur", "FreeU", "9 restrained"]
    for index, prefix in enumerate(order):
        if name.startswith(prefix):
            return index, name
    return len(order), name


# ---------------------------------------------------------------- FLOP / byte model


@dataclass
class Census:
    """What one plain call does, recorded from the UNet's modules: conv/linear MACs, attn1 token grids."""

    conv_macs: int = 0
    linear_macs: int = 0
    attn1: list = field(default_factory=list)  # (batch, tokens, channels, heads) per self-attention call
    attn2: list = field(default_factory=list)  # (batch, tokens, context tokens, channels)
    skips: list = field(default_factory=list)  # shapes of FreeU skip tensors


def census(bench: Bench, size: int, config: FreeScaleConfig) -> Census:
    unet = bench.pipeline.unet
    record = Census()
    handles = []

    def conv_hook(module, args, output):
        kh, kw = module.kernel_size
        record.conv_macs += output.numel() * module.in_channels // module.groups * kh * kw

    def linear_hook(module, args, output):
        record.linear_macs += output.numel() * module.in_features

    def attention_hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None:
            record.attn1.append((hidden.shape[0], hidden.shape[1], hidden.shape[2], module.heads))
        else:
            record.attn2.append((hidden.shape[0], hidden.shape[1], context.shape[1], hidden.shape[2]))

    for module in unet.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif type(module).__name__ == "Attention":
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))

    def skip_filter(x, threshold, scale):
        record.skips.append(tuple(x.shape))
        return fourier_filter(x, threshold, scale)

    only_freeu = replace(config, scale_fusion=False, dilate_tau=0)
    try:
        with torch.inference_mode():
            bench.call(size, freescale_mode(unet, only_freeu, size=(size, size), step_index=0, backend=Backend(skip_filter=skip_filter)), 0)
    finally:
        for handle in handles:
            handle.remove()
    return record


def flop_model(record: Census, unet: nn.Module, size: int, config: FreeScaleConfig, element_bytes: int) -> dict[str, tuple[float, float]]:
    """part → (FLOPs, bytes moved at the least) of one CFG call; FLOPs = 2·MACs.

    Bytes are the unavoidable traffic (each operand read and each result written once); a part whose
    measured time is far above both FLOPs/peak and bytes/bandwidth is paying for something else."""
    vae_scale = 8
    train = train_px(unet, vae_scale)
    scale = scale_factors((size, size), train)
    parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(name, flops, moved):
        parts[name][0] += flops
        parts[name][1] += moved

    add("convs (all)", 2 * record.conv_macs, 0)
    add("linears (all, plain)", 2 * record.linear_macs, 0)
    latent = size // vae_scale
    for batch, tokens, channels, heads in record.attn1:
        add("global self-attention", 4 * batch * tokens * tokens * channels, 4 * batch * tokens * channels * element_bytes)
        downsample = 1
        h = w = latent
        while h * w > tokens:
            h, w, downsample = h // 2, w // 2, downsample * 2
        window = window_shape((h, w), (size, size), unet.config.sample_size, downsample)
        plan = plan_windows((h, w), window, config.window_jitter, 0, key=(0,))
        views, n = len(plan.starts_h), window[0] * window[1]
        add("FS: window attention", 4 * batch * views * n * n * channels,
            # gather q, k, v (read + write) and scatter-add the outputs (read out, read + write total)
            (6 + 3) * batch * views * n * channels * element_bytes)
        # the zero token's q/k/v (it stands for the padding; appending it copies the block's input once);
        # a second output projection only where G blurs channels (else fusion projects once)
        second_projection = tokens if 3 in BLUR_AXES[config.fusion_blur] else 0
        add("FS: zero token's q/k/v (+ 2nd out-proj if G blurs channels)",
            2 * batch * (3 + second_projection) * channels * channels,
            2 * batch * (tokens + second_projection) * channels * element_bytes)
        k = kernel_size(scale)
        axes = len(BLUR_AXES[config.fusion_blur])
        add("FS: blur + fusion", 2 * batch * tokens * channels * k * axes, (2 * axes + 4) * batch * tokens * channels * element_bytes)
    for batch, tokens, context, channels in record.attn2:
        add("cross-attention (plain)", 4 * batch * tokens * context * channels, 0)
    for shape in record.skips:
        height, width = shape[-2:]
        planes = math.prod(shape[:-2])
        # the filter's (≤ 2)² Fourier coefficients: sums over columns (x @ 2V real phases), the rebuild
        # (2V phases @ W columns) and the multiply-add; fp32 passes: read x, write the rebuild, read both, write
        columns = 2 * min(2, width)
        add("FS: FreeU filter (its Fourier coefficients)", planes * height * width * (2 * 2 * columns + 2),
            5 * 4 * planes * height * width)
    add("FS: dilation", 0, 0)
    return {name: (flops, moved) for name, (flops, moved) in parts.items()}


# ---------------------------------------------------------------- profiler


def profile(bench: Bench, size: int, config: FreeScaleConfig, rows: int) -> None:
    unet = bench.pipeline.unet
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = bench.clock.cuda
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    tables = {}
    for label, step, use in (("plain", config.dilate_tau, False), ("FreeScale i=0", 0, True)):
        with torch.inference_mode():
            bench.call(size, freescale_mode(unet, config, size=(size, size), step_index=step) if use else nullcontext(), step)
            components = Components(bench.clock)
            with torch.profiler.profile(activities=activities) as prof, instrumented(unet, components) as backend:
                context = freescale_mode(unet, config, size=(size, size), step_index=step, backend=backend) if use else nullcontext()
                bench.call(size, context, step)
                bench.clock.sync()
        averages = prof.key_averages()
        print(f"\n#### torch.profiler, {label}, {size}x{size} (top {rows} by {sort})\n")
        print(averages.table(sort_by=sort, row_limit=rows))
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        tables[label] = {event.key: (getattr(event, key, 0) or 0, event.count) for event in averages}
    plain, fused = tables["plain"], tables["FreeScale i=0"]
    diff = sorted(((fused.get(k, (0, 0))[0] - plain.get(k, (0, 0))[0], k) for k in set(plain) | set(fused)), reverse=True)
    print(f"\n#### Self time by op, FreeScale i=0 minus plain, {size}x{size} (ms; top {rows})\n")
    print("| op | plain ms (calls) | FreeScale ms (calls) | extra ms |")
    print("|---|---|---|---|")
    for extra, k in diff[:rows]:
        p, f = plain.get(k, (0, 0)), fused.get(k, (0, 0))
        print(f"| {k} | {p[0] / 1e3:.1f} ({p[1]}) | {f[0] / 1e3:.1f} ({f[1]}) | {extra / 1e3:+.1f} |")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 or float16 (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--sizes", default="1024,2048", help="square stage sides in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ablations", action="store_true", help="also time each component alone")
    parser.add_argument("--components", action="store_true", help="time FreeScale's parts inside one call")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of one plain and one FreeScale call")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time table")
    options = parser.parse_args()

    torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    dtype = getattr(torch, options.dtype) if options.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    pipeline = load_pipeline(options.model, options.device, dtype)
    cond = encode_prompts(pipeline, "a red kite over a harbour", "", (train_px(pipeline.unet),) * 2, 5.0)
    bench = Bench(pipeline, cond, fresh_scheduler(pipeline, STEPS), Clock(device))
    config = FreeScaleConfig()
    unet = pipeline.unet
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"model {options.model}, {dtype}, {machine}, torch {torch.__version__}, train {train_px(unet)} px, "
          f"median of {options.repeats} after {options.warmup} warm-up\n")

    for size in (int(side) for side in options.sizes.split(",")):
        stage = size // train_px(unet)
        if not options.no_timing:
            print(f"### {size}x{size} ({stage}x stage)\n")
            print("| variant | median s | min s | / plain, median of rounds | / plain, minima |")
            print("|---|---|---|---|---|")
            times = bench.time_rounds(size, variants(unet, size, config, options.ablations), options.repeats, options.warmup)
            plain = times["plain"]
            for name, seconds in times.items():
                ratio = statistics.median(t / p for t, p in zip(seconds, plain))
                print(f"| {name} | {statistics.median(seconds):.3f} | {min(seconds):.3f} | {ratio:.3f}x | "
                      f"{min(seconds) / min(plain):.3f}x |", flush=True)
        record = census(bench, size, config)
        model = flop_model(record, unet, size, config, torch.finfo(dtype).bits // 8)
        print(f"\n#### FLOP/byte model, {size}x{size} (one CFG call)\n")
        print("| part | GFLOP | MB moved (least) |")
        print("|---|---|---|")
        for name, (flops, moved) in model.items():
            print(f"| {name} | {flops / 1e9:.2f} | {moved / 1e6:.1f} |")
        base = sum(f for n, (f, _) in model.items() if not n.startswith("FS:"))
        extra = sum(f for n, (f, _) in model.items() if n.startswith("FS:"))
        print(f"\nFLOP ratio FreeScale / plain: {(base + extra) / base:.3f}")
        if options.components:
            component_table(bench, size, config)
        if options.profile:
            profile(bench, size, config, options.profile_rows)
        print(flush=True)


if __name__ == "__main__":
    main()
