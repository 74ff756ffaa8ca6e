"""A render request, its validation, and its cascade stages (sizes by `renderer.plan.geometry`, a picture's by
`renderer.plan.input_image`).

Everything here is cheap and runs before any model is loaded, so bad input fails in milliseconds with
a one-line `RenderError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from freescale_core import FreeScaleConfig
from renderer.cascade.schedulers import SchedulerChoice, check_choice
from renderer.errors import RenderError
from renderer.output.tiff import TiffOptions
from renderer.plan.geometry import Size, format_size
from renderer.vae.bands import VAE_MODES

# At guidance <= 1 classifier-free guidance is off (diffusers' rule): the UNet runs the conditional branch alone.
GUIDED_ABOVE = 1.0


def guided(guidance: float) -> bool:
    """Whether a render at this guidance runs both classifier-free branches."""
    return guidance > GUIDED_ABOVE


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    size: Size | None = None  # final size; stages planned automatically
    stages: tuple[Size, ...] | None = None  # explicit cascade, base first
    steps: int = 50
    guidance: float = 7.5
    freescale: FreeScaleConfig = field(default_factory=FreeScaleConfig)
    image: Path | None = None  # start from this picture (its size is the first stage) instead of generating the base
    scale: float | None = None  # with image: the final size as a multiple of the picture's (--size 4x)
    strength: float | None = None  # with image: how much of the first upscaling stage is redone (None: the default)
    mask: Path | None = None  # region mask: white = cosine_scale, black = cosine_scale_bg
    model: str = "tiny"
    model_config: str | None = None  # diffusers config folder or hub id for original-format single files
    device: str = "cpu"
    dtype: str | None = None  # default: float16 on CUDA, float32 elsewhere
    out: Path = Path("poster.tif")  # .tif/.tiff (tiled pyramid; .ome.tif for SubIFDs) or .png
    save_stages: bool = False
    preview: bool = False  # a small PNG beside a TIFF
    vae_mode: str = "auto"  # exact, tiled, or auto (exact when it fits in memory)
    compression: str = "deflate"
    dpi: float = 300.0
    tile_size: int = 512
    workers: int = 0  # > 0: upscaling stages run row-sharded on this many Ray workers
    address: str | None = None  # Ray cluster to join with --workers (default: start or join a local one)
    gpus_per_worker: float | None = None  # default: 1 if the cluster has a GPU per worker, else CPU workers
    shard_from: Size | None = None  # with workers: shard stages with at least this many pixels (default: all upscaling stages)
    cfg_split: bool = True  # an even number of workers splits classifier-free guidance between its halves
    checkpoint_dir: Path | None = None  # default: beside the output, `<out>.checkpoints/`
    resume: bool = True  # continue from the newest valid checkpoint of the same request
    keep_checkpoints: bool = False  # keep them after the output is complete
    checkpoint_every_steps: int = 0  # inside a stage, also checkpoint every this many steps (0: by time only)
    checkpoint_every_minutes: float = 10.0  # inside a stage, checkpoint at least this often
    max_restarts: int = 3  # gang rebuilds after lost workers before giving up
    collective_timeout_s: float = 1800.0  # a collective that waits longer fails (and the gang is rebuilt)
    queue_timeout_s: float | None = None  # with workers: give up waiting for the cluster after this long (None: never)
    metrics_port: int | None = None  # without --workers: serve Prometheus metrics on this port (0: any free one)
    metrics_addr: str = "0.0.0.0"  # ... on this address
    metrics_linger_s: float = 15.0  # ... and keep serving them this long after the render, for the last scrape
    frames: int = 1  # above 1: a clip of this many frames, from a motion model (tiny-video, or --motion-adapter)
    fps: float = 8.0  # the clip's frame rate
    crf: int = 18  # the clip's H.264 quality (0 lossless .. 51 worst)
    motion_adapter: str | None = None  # AnimateDiff motion modules for --model: a diffusers folder or hub id
    scheduler: str | None = None  # a diffusers scheduler class (renderer.cascade.schedulers.SUPPORTED); None: the model's own
    scheduler_options: dict = field(default_factory=dict)  # its config options, set on top of the model's
    loras: tuple[tuple[str, float], ...] = ()  # (path, scale) of each LoRA, fused into the weights at load, in order

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise RenderError(f"--steps {self.steps} must be at least 1 (50 is the reference)")
        if not math.isfinite(self.guidance):
            raise RenderError(f"--guidance {self.guidance} is not a finite number; try 7.5")
        if self.size is None and not self.stages and self.scale is None:
            raise RenderError("give a final --size WIDTHxHEIGHT or explicit --stages")
        if self.scale is not None and (self.image is None or self.size or self.stages or not (math.isfinite(self.scale) and self.scale > 1)):
            raise RenderError(f"--size {self.scale:g}x scales your picture: give --image too, a scale above 1, and no other --size or --stages")
        if self.size is not None and self.stages and tuple(self.stages[-1]) != tuple(self.size):
            raise RenderError(f"--size {format_size(self.size)} differs from the last of --stages {format_size(self.stages[-1])}")
        if self.dtype not in (None, "float16", "bfloat16", "float32"):
            raise RenderError(f"--dtype {self.dtype!r}: use float16, bfloat16 or float32")
        if self.vae_mode not in ("auto", *VAE_MODES):
            raise RenderError(f"--vae-mode {self.vae_mode!r}: use auto, {', '.join(VAE_MODES)}")
        try:
            TiffOptions(tile=self.tile_size, compression=self.compression, dpi=self.dpi)
        except ValueError as error:
            raise RenderError(str(error)) from error
        check_codec(self.compression)
        for label, path in (("--image", self.image), ("--mask", self.mask)):
            if path is not None and not Path(path).is_file():
                raise RenderError(f"{label} {path} does not exist or is not a file")
        check_output_path(Path(self.out))
        if self.checkpoint_dir is not None:
            check_checkpoint_dir(Path(self.checkpoint_dir))
        if self.workers < 0:
            raise RenderError(f"--workers {self.workers} must be 0 (one process) or more")
        if self.address and not self.workers:
            raise RenderError(f"--address {self.address} joins a Ray cluster for sharded stages; give --workers N too")
        if self.shard_from and not self.workers:
            raise RenderError(f"--shard-from {format_size(self.shard_from)} chooses which stages run on workers; give --workers N too")
        if self.checkpoint_every_steps < 0:
            raise RenderError(f"--checkpoint-every-steps {self.checkpoint_every_steps} must be 0 (by time only) or more")
        if not self.checkpoint_every_minutes > 0:
            raise RenderError(f"--checkpoint-every-minutes {self.checkpoint_every_minutes} must be a positive number of minutes")
        if self.max_restarts < 0:
            raise RenderError(f"--max-restarts {self.max_restarts} must be 0 (fail at the first lost worker) or more")
        if not self.collective_timeout_s > 0 or not math.isfinite(self.collective_timeout_s):
            raise RenderError(f"--collective-timeout {self.collective_timeout_s} must be a positive number of seconds, e.g. 1800")
        if self.queue_timeout_s is not None and (not self.queue_timeout_s > 0 or not math.isfinite(self.queue_timeout_s)):
            raise RenderError(f"--queue-timeout {self.queue_timeout_s} must be a positive number of seconds, or left out to wait "
                              "as long as the cluster needs")
        if self.queue_timeout_s is not None and not self.workers:
            raise RenderError(f"--queue-timeout {self.queue_timeout_s:g} bounds the wait for a gang of workers; give --workers N too")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port <= 65535):
            raise RenderError(f"--metrics-port {self.metrics_port} must be a port number from 0 to 65535 (0: any free port)")
        if self.metrics_port is not None and self.workers:
            raise RenderError(f"--metrics-port {self.metrics_port} serves a render without Ray; with --workers the driver and "
                              "workers export through Ray's metrics export port (ray_freescale_*): drop --metrics-port")
        if not 0 <= self.metrics_linger_s < math.inf:
            raise RenderError(f"--metrics-linger {self.metrics_linger_s} must be a number of seconds >= 0 (default 15)")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker <= 1:
            raise RenderError(f"--gpus-per-worker {self.gpus_per_worker}: use 1, a fraction to share GPUs, or 0 for CPU workers")
        check_clip(self)
        check_choice(self.scheduler, self.scheduler_options)
        if self.loras:
            from renderer.models.lora import check_lora  # not at the top: renderer.models imports this module

            for path, scale in self.loras:
                check_lora(path, scale)
        from renderer.plan.input_image import check_strength

        check_strength(self)

    @property
    def scheduler_choice(self) -> SchedulerChoice | None:
        """What the stages build their schedulers from (None: the model's own)."""
        if self.scheduler is None:
            return None
        return SchedulerChoice(self.scheduler, tuple(sorted(self.scheduler_options.items())))

    def checkpoint_folder(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.with_name(out.name + ".checkpoints")

    def with_(self, **changes) -> "RenderRequest":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("image", "mask", "out", "checkpoint_dir"):
            data[key] = None if data[key] is None else str(data[key])
        return data


OUTPUT_SUFFIXES = (".tif", ".tiff", ".png")
CLIP_SUFFIX = ".mp4"


def check_clip(request: RenderRequest) -> None:
    """A clip needs a motion model and an .mp4 output; a still image none of the clip options."""
    from renderer.models.builtin import VIDEO_MODELS

    if isinstance(request.frames, bool) or not isinstance(request.frames, int) or request.frames < 1:
        raise RenderError(f"--frames {request.frames} must be a whole number of at least 1 (1: a still image)")
    if request.frames == 1:
        if request.motion_adapter:
            raise RenderError(f"--motion-adapter {request.motion_adapter} animates a clip; give --frames N (2 or more)")
        if Path(request.out).suffix.lower() == CLIP_SUFFIX:
            raise RenderError(f"--out {request.out} is a clip's name; give --frames N (2 or more), or name a .tif or .png")
        return
    if request.model not in VIDEO_MODELS and not request.motion_adapter:
        raise RenderError(f"--frames {request.frames}: --model {request.model} renders still images; use a motion model: "
                          f"--model {next(iter(VIDEO_MODELS))}, or --motion-adapter FOLDER_OR_ID with an SDXL-style --model")
    if Path(request.out).suffix.lower() != CLIP_SUFFIX:
        raise RenderError(f"--out {request.out}: a clip (--frames {request.frames}) is written as an H.264 video; name it *.mp4")
    if not (math.isfinite(request.fps) and request.fps > 0):
        raise RenderError(f"--fps {request.fps} must be a positive number of frames per second, e.g. 8")
    if isinstance(request.crf, bool) or not isinstance(request.crf, int) or not 0 <= request.crf <= 51:
        raise RenderError(f"--crf {request.crf}: use a whole number from 0 (lossless) to 51 (smallest); 18 looks lossless")
    if request.image:
        raise RenderError(f"--frames {request.frames} with --image {request.image}: clips start from the prompt, for now; "
                          "drop --image")


def check_codec(compression: str) -> None:
    if compression in ("jpeg", "webp", "zstd"):
        try:
            import imagecodecs  # noqa: F401
        except ImportError as error:
            raise RenderError(f"--compression {compression} needs the imagecodecs package; install it or use deflate") from error


def check_output_path(out: Path) -> None:
    if out.suffix.lower() not in (*OUTPUT_SUFFIXES, CLIP_SUFFIX):
        raise RenderError(f"--out {out}: use a name ending in {' or '.join(OUTPUT_SUFFIXES)} (or {CLIP_SUFFIX} for a clip)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise RenderError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RenderError(f"--out {out}: folder {folder} is not writable")
    if out.is_dir():
        raise RenderError(f"--out {out} is a directory; name a file in it, e.g. {out / 'poster.tif'}")


def check_checkpoint_dir(folder: Path) -> None:
    """An existing writable folder, or one that can be made in an existing writable folder."""
    existing = folder if folder.exists() else folder.parent
    if not existing.is_dir():
        raise RenderError(f"--checkpoint-dir {folder}: {existing} is not a folder; give a folder (it is created if its parent exists)")
    if not os.access(existing, os.W_OK):
        raise RenderError(f"--checkpoint-dir {folder}: {existing} is not writable")


def first_sharded_stage(request: RenderRequest, stages: list[Size]) -> int:
    """Index of the first stage the workers run: with --workers, the first upscaling stage with at least
    --shard-from's pixels (default: every upscaling stage); len(stages) when none is sharded."""
    if not request.workers:
        return len(stages)
    if request.shard_from is None:
        return 1 if len(stages) > 1 else len(stages)
    area = request.shard_from[0] * request.shard_from[1]
    first = next((index for index, size in enumerate(stages[1:], start=1) if size[0] * size[1] >= area), None)
    if first is None:
        raise RenderError(
            f"--shard-from {format_size(request.shard_from)} is larger than every upscaling stage "
            f"({', '.join(format_size(size) for size in stages[1:]) or 'none'}); nothing would run on the workers"
        )
    return first
