"""The options of `freescale-render` and the request they make; `freescale-render batch` reads its lines
through the same parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from freescale_core import FreeScaleConfig
from freescale_core.config import FUSION_BLURS
from renderer.cascade.schedulers import parse_options
from renderer.errors import RenderError
from renderer.output.tiff import COMPRESSIONS
from renderer.plan.geometry import parse_scale, parse_size
from renderer.plan.request import RenderRequest
from renderer.vae.bands import VAE_MODES


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a `RenderError` (one line), not usage text and exit; and it keeps every
    option it was given (`options`, with those that may repeat in `repeatable`), which the batch reader and the
    command-word check read instead of argparse's private lists."""

    def __init__(self, *args, **kwargs):
        self.options: list[argparse.Action] = []  # before argparse's own __init__, which adds --help
        self.repeatable: set[str] = set()  # dests of options given once per value (action="append")
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            self.options.append(action)
        if kwargs.get("action") == "append":
            self.repeatable.add(action.dest)
        return action

    def error(self, message: str):
        raise RenderError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="freescale-render",
        description="Render a poster-scale image with FreeScale (tuning-free SDXL upscaling cascade).",
        epilog="Run `freescale-render batch FILE [OPTIONS]` to render many posters in one process (FILE: JSON Lines, one "
               "poster per line with these options as fields; OPTIONS: every poster's defaults), and "
               "`freescale-render inspect FILE` to check a written output.",
    )
    add = parser.add_argument
    add("--prompt", required=True, help="what to draw")
    add("--negative-prompt", default="", help="what to steer away from (default: empty)")
    add("--seed", type=int, default=0, help="seeds every random draw (default 0)")
    add("--size", help="final WIDTHxHEIGHT; stages are planned by halving to the training size (with --image: by doubling "
        "the picture's size; Nx, e.g. 4x, scales the picture)")
    add("--stages", help="explicit cascade, base first, e.g. 1024x1024,2048x2048,4096x4096")
    add("--steps", type=int, default=50, help="denoising steps per stage schedule (default 50)")
    add("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    defaults = FreeScaleConfig()
    add("--cosine-scale", type=float, default=defaults.cosine_scale, help="detail scale α of the skip residual (default 2.0; <=1 for 8K)")
    add("--dilate-tau", type=int, default=defaults.dilate_tau, help="dilate convs while step index < this (default 35)")
    add("--restart-fraction", type=float,
        help="upscaling stages restart at this fraction of the steps (default 0.3; 0.8 with --model toy)")
    add("--fusion-blur", choices=FUSION_BLURS, default=defaults.fusion_blur, help="axes of the scale-fusion Gaussian (default hw)")
    add("--no-window-jitter", action="store_true", help="do not jitter local attention windows")
    add("--fast-mode", action="store_true", help="global attention on strided sub-grids (faster, lower quality)")
    add("--no-freeu", action="store_true", help="turn FreeU off")
    add("--image", type=Path, help="upscale this picture: its size (on the model's grid, at least the training size) is the "
        "first stage, instead of generating a base")
    add("--strength", type=float, help="with --image: how much of the first upscaling stage is redone, in (0, 1] as diffusers' "
        "img2img strength (default 0.1); later stages keep --restart-fraction")
    add("--mask", type=Path, help="region mask: white regions use --cosine-scale, black ones --cosine-scale-bg")
    add("--cosine-scale-bg", type=float, default=defaults.cosine_scale_bg, help="detail scale outside the mask (default 1.0)")
    add("--model", default="tiny",
        help="tiny, toy, sdxl-random; toy-video, tiny-video, sdxl-random-video (clips); a diffusers folder, a .safetensors "
             "file or a hub id (default tiny)")
    add("--model-config", help="diffusers config folder or hub id for an original-format single-file checkpoint")
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add("--dtype", choices=("float16", "bfloat16", "float32"), help="default: float16 on CUDA, float32 on CPU")
    add("--out", type=Path, default=Path("poster.tif"),
        help="output: .tif (tiled pyramid, default poster.tif), .ome.tif (pyramid in SubIFDs), .png, or .mp4 for a clip; "
             "its sidecar OUT.json (every file beside it is named after OUT's full name) goes beside it")
    add("--compression", choices=COMPRESSIONS, default="deflate", help="TIFF tile compression (default deflate, lossless)")
    add("--dpi", type=float, default=300.0, help="print resolution stored in the TIFF (default 300)")
    add("--tile-size", type=int, default=512, help="TIFF tile side in pixels, a multiple of 16 (default 512)")
    add("--vae-mode", choices=("auto", *VAE_MODES), default="auto",
        help="final decode: exact (equals an untiled decode), tiled (diffusers-style tiles), auto: exact when it fits")
    add("--preview", action="store_true", help="also write a small PNG preview beside a TIFF")
    add("--save-stages", action="store_true", help="also write every intermediate stage as PNG")
    add("--workers", type=int, default=0,
        help="run the upscaling stages row-sharded on N Ray workers (GPU each if the cluster has them, else CPU); default 0: one process")
    add("--address", help="Ray cluster to join with --workers, e.g. ray://head:10001 or auto (default: start or join a local Ray)")
    add("--shard-from", help="with --workers: shard only stages with at least the pixels of this WxH (default: every upscaling stage)")
    add("--no-cfg-split", action="store_true",
        help="with an even --workers: keep both guidance branches on every worker (default: each half of the workers runs one)")
    add("--gpus-per-worker", type=float,
        help="GPUs each worker reserves: 1 (NCCL), a fraction to share a GPU (gloo), 0 for CPU workers (default: 1 if available)")
    add("--checkpoint-dir", type=Path, help="where checkpoints go (default: beside the output, OUT.checkpoints/)")
    add("--no-resume", action="store_true", help="start over even if checkpoints of this same request exist")
    add("--keep-checkpoints", action="store_true", help="keep the checkpoints after the output is complete")
    add("--checkpoint-every-steps", type=int, default=0, help="inside a stage, checkpoint every N steps (default 0: by time only)")
    add("--checkpoint-every-minutes", type=float, default=10.0, help="inside a stage, checkpoint at least this often (default 10)")
    add("--max-restarts", type=int, default=3, help="rebuild the gang at most this many times after lost workers (default 3)")
    add("--collective-timeout", type=float, default=1800.0,
        help="seconds a worker waits in one exchange before the gang counts as broken (default 1800)")
    add("--queue-timeout", type=float, metavar="SECONDS",
        help="with --workers: give up after waiting this long for the cluster to free the gang's resources "
             "(default: wait as long as it takes)")
    add("--metrics-port", type=int,
        help="without --workers: serve Prometheus metrics (freescale_*) at http://ADDR:PORT/metrics while rendering; "
             "with --workers they go to Ray's metrics export port (ray_freescale_*) instead")
    add("--metrics-addr", default="0.0.0.0", help="address the --metrics-port server listens on (default 0.0.0.0)")
    add("--metrics-linger", type=float, default=15.0, metavar="SECONDS",
        help="with --metrics-port: keep serving this long after the render ends (not after a stop), so that Prometheus "
             "scrapes the last values; set it above your scrape interval (default 15)")
    add("--frames", type=int, default=1, help="render a clip of N frames (a motion model: toy-video, tiny-video, sdxl-random-video or --motion-adapter); "
        "--out then names an .mp4 (default 1: a still image)")
    add("--fps", type=float, default=8.0, help="the clip's frames per second (default 8)")
    add("--crf", type=int, default=18, help="the clip's H.264 quality, 0 (lossless) to 51 (default 18)")
    add("--motion-adapter", help="AnimateDiff motion modules for --model: a diffusers MotionAdapter folder or hub id (with --frames)")
    add("--lora", action="append", metavar="PATH[:SCALE]",
        help="a LoRA (.safetensors; kohya/A1111 or diffusers keys) fused into the model at SCALE (default 1); repeatable")
    add("--scheduler", metavar="NAME",
        help="a diffusers scheduler class: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, "
             "UniPCMultistepScheduler, DDIMScheduler, LCMScheduler, TCDScheduler (default: the model's own)")
    add("--scheduler-option", action="append", metavar="KEY=VALUE",
        help="a config option of --scheduler, e.g. use_karras_sigmas=true or timestep_spacing=trailing (repeatable)")
    add("--dry-run", action="store_true", help="print the plan, memory estimate, UNet calls and output size, then exit")
    add("--quiet", action="store_true", help="no progress bars")
    return parser


def request_from_args(args: argparse.Namespace) -> RenderRequest:
    stages = tuple(parse_size(part, "--stages") for part in args.stages.split(",")) if args.stages else None
    scale = parse_scale(args.size) if args.size else None
    size = parse_size(args.size) if args.size and scale is None else None
    restart_fraction = args.restart_fraction
    if restart_fraction is None:
        from renderer.models import recommended_restart_fraction

        restart_fraction = recommended_restart_fraction(args.model)
    freescale = FreeScaleConfig(
        cosine_scale=args.cosine_scale, cosine_scale_bg=args.cosine_scale_bg, dilate_tau=args.dilate_tau,
        restart_fraction=restart_fraction, fusion_blur=args.fusion_blur, window_jitter=not args.no_window_jitter,
        fast_mode=args.fast_mode, freeu=not args.no_freeu, seed=args.seed,
    )
    return RenderRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, size=size, stages=stages,
        steps=args.steps, guidance=args.guidance, freescale=freescale, image=args.image, scale=scale,
        strength=args.strength, mask=args.mask,
        model=args.model, model_config=args.model_config, device=args.device, dtype=args.dtype, out=args.out,
        save_stages=args.save_stages, preview=args.preview, vae_mode=args.vae_mode, compression=args.compression,
        dpi=args.dpi, tile_size=args.tile_size, workers=args.workers, address=args.address,
        gpus_per_worker=args.gpus_per_worker, shard_from=parse_size(args.shard_from, "--shard-from") if args.shard_from else None,
        cfg_split=not args.no_cfg_split,
        checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume, keep_checkpoints=args.keep_checkpoints,
        checkpoint_every_steps=args.checkpoint_every_steps, checkpoint_every_minutes=args.checkpoint_every_minutes,
        max_restarts=args.max_restarts, collective_timeout_s=args.collective_timeout, queue_timeout_s=args.queue_timeout,
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, metrics_linger_s=args.metrics_linger,
        frames=args.frames, fps=args.fps, crf=args.crf, motion_adapter=args.motion_adapter,
        scheduler=args.scheduler, scheduler_options=parse_options(args.scheduler_option),
        loras=parse_loras(args.lora),
    )


def parse_loras(words: list[str] | None) -> tuple:
    if not words:
        return ()
    from renderer.models.lora import parse_lora  # loads diffusers: only when asked for

    return tuple(parse_lora(text) for text in words)
