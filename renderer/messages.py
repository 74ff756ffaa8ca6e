"""The messages between the driver and the ranks, in one module that both sides import: the job the driver hands
every rank (`StageJob`, with its `Prompt`), how a rank hands back a checkpoint's rows (`CheckpointSink`), what a
rank that loaded the model says of it (`ModelInfo`), what each rank's run gives (`RankResult`) and all of them put
together (`Outcome`). Nothing here computes; the driver never imports the ranks' code to speak to them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from freescale_core import FreeScaleConfig
from renderer.plan.geometry import ModelGeometry
from renderer.plan.request import guided

if TYPE_CHECKING:  # types only: the ranks' modules that build them
    from renderer.cascade.schedulers import SchedulerChoice
    from renderer.cascade.stages import Conditioning

@dataclass(frozen=True)
class Prompt:
    """What the text encoders turn into a `Conditioning`, on the rank that runs the stages."""

    text: str
    negative: str
    guidance: float


@dataclass
class StageJob:
    """Stages `first`..`last - 1` of a render, for one process (a group of one) or every rank of a gang.

    Everything the ranks need is sent once: no per-step traffic passes through the driver."""

    cond: Conditioning | None  # on the CPU; None: the rank encodes `prompt`
    latents: torch.Tensor  # (frames, 4, h, w) whole, on the CPU: stage `first - 1`'s, or stage `first`'s at `resume_step`
    stages: list[tuple[int, int]]  # (width, height) of every stage, base first
    first: int  # index of the first stage to run
    last: int  # one past the last stage to run
    steps: int
    config: FreeScaleConfig
    transition_modes: list[str]  # VAE mode of the decode before each stage 1.. (index 0: before stage 1)
    final_mode: str
    mask: torch.Tensor | None = None  # (1, 1, h, w) at the base size
    save_stages: bool = False
    resume_step: int | None = None  # stage `first` continues from this schedule index ...
    reference: torch.Tensor | None = None  # ... with its ẑ₀ (whole, CPU)
    checkpoint_steps: int = 0  # inside a stage: checkpoint every this many steps (0: not by count) ...
    checkpoint_seconds: float = math.inf  # ... or this many seconds
    cfg_split: bool = False  # an even gang splits classifier-free guidance between its halves (`renderer.parallel.guidance`)
    prompt: Prompt | None = None  # encoded by the rank when `cond` is None
    initial: torch.Tensor | None = None  # (1, 3, H, W) in [-1, 1] at the base size: the base stage encodes it (--image)
    first_restart: int | None = None  # schedule index stage 1 restarts at (--image's --strength); None: as every stage
    first_sharded: int | None = None  # stages before it run on rank 0 alone (None: every stage on every rank)
    stage_ends: dict[int, torch.Tensor] = field(default_factory=dict)  # with save_stages: latents of stages not run, to decode
    frames: int = 1  # a clip's frames: the latents' batch, denoised together by a motion UNet
    scheduler: SchedulerChoice | None = None  # --scheduler and its options (None: the model's own)

    @property
    def guided(self) -> bool:
        """Both guidance branches run (guidance above 1); else the conditional one alone, and nothing to split."""
        return guided(self.cond.guidance if self.cond is not None else self.prompt.guidance)


# Called with (stage, steps done, latent rows, latents strip, reference strip or None): hands a checkpoint's
# rows to whoever writes it.
CheckpointSink = Callable[[int, int, tuple[int, int], torch.Tensor, "torch.Tensor | None"], None]


@dataclass(frozen=True)
class ModelInfo:
    """What the driver plans with, asked of a rank that loaded the model (the driver loads none)."""

    geometry: ModelGeometry
    latent_channels: int
    vae_width: int  # channels of the VAE's full-resolution level
    dtype: str  # the UNet's and text encoders' ("float16", "float32", ...)
    vae_dtype: str
    device: str  # "cpu" or "cuda"
    max_frames: int = 0  # frames a motion UNet attends over at once; 0: an image model

    @property
    def vae_itemsize(self) -> int:
        return torch.finfo(getattr(torch, self.vae_dtype)).bits // 8


@dataclass
class RankResult:
    """One rank's rows of what a render returns (its final pixels are taken apart, with `final_rows`)."""

    rank: int
    rows: tuple[int, int]  # its latent rows of the final stage
    latents: torch.Tensor  # its rows of the final latents (fp32, CPU)
    stage_pixels: dict[int, np.ndarray]  # with save_stages: its rows of stage images (rank 0: whole ones it ran alone)
    seconds: dict[int, float]  # per stage it ran
    step_bytes: dict[int, dict[str, int]]  # per stage it ran: bytes received per step, by kind
    peak_bytes: int = 0


@dataclass
class Outcome:
    """What a job's run gives the driver: its ranks' results put together."""

    latents: torch.Tensor  # the final latents, whole (small: a 16K latent is 64 MiB in fp32)
    stage_images: dict[int, np.ndarray]  # with save_stages: the images of the stages decoded on the ranks
    stage_seconds: dict[int, float]  # per stage run, the slowest rank's
    ranks: list[RankResult]

    @classmethod
    def of(cls, results: list[RankResult]) -> "Outcome":
        stages = sorted({stage for result in results for stage in result.seconds})
        return cls(
            latents=torch.cat([result.latents for result in results], dim=2),
            stage_images={stage: np.concatenate([r.stage_pixels[stage] for r in results if stage in r.stage_pixels], axis=-3)
                          for stage in sorted({stage for r in results for stage in r.stage_pixels})},
            stage_seconds={stage: max(r.seconds[stage] for r in results if stage in r.seconds) for stage in stages},
            ranks=results,
        )

    def stage_ranks(self, count: int) -> list[list[int] | None]:
        """Per stage, the ranks that ran it (None: not run here, e.g. before a resume)."""
        ran = [[result.rank for result in self.ranks if stage in result.seconds] for stage in range(count)]
        return [ranks or None for ranks in ran]
