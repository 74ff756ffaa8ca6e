"""What every executor is: the interface `render()` talks to, and the `Outcome` a job's run hands the driver.

The in-process executor (`renderer.executor.pool`) and the Ray gang (`cluster.gang`) both implement it; neither
side imports the other through here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from renderer.cascade.stage_loop import CheckpointSink, StageJob
from renderer.cascade.worker import ModelInfo, RankResult
from renderer.plan.request import RenderRequest
from renderer.progress import Progress


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


class Executor(ABC):
    """A render's ranks, started when made and freed by `close` (an `Executors` pool decides when)."""

    ranks: int = 1
    device: str = "cpu"  # where the ranks run: "cpu" or "cuda"
    waited_s: float = 0.0  # how long the ranks waited for their place (a gang, for the cluster's resources)
    nodes: list[str] = []  # each rank's host: a gang's Ray node addresses (none in-process)

    @classmethod
    def connect(cls, request: RenderRequest) -> None:
        """Join whatever the ranks will run on before anything records metrics there (nothing in-process)."""

    @classmethod
    def ranks_that_fit(cls, request: RenderRequest, wanted: int) -> int:
        """How many of `wanted` ranks could be started now (to restart after a lost rank)."""
        return wanted

    def close(self) -> None:
        """Free the ranks (once; later calls do nothing)."""

    @abstractmethod
    def model(self) -> ModelInfo:
        """The loaded model's shape, dtypes and device, as the ranks hold it."""

    @abstractmethod
    def free_memory(self) -> int:
        """The least free memory of any rank's device, in bytes."""

    @abstractmethod
    def largest_share(self, size: tuple[int, int]) -> float:
        """The largest fraction of a sharded stage's rows one rank holds."""

    @abstractmethod
    def run(self, job: StageJob, progress: Progress, on_checkpoint: CheckpointSink | None) -> Outcome:
        """Run the job on every rank; rank 0's steps show on `progress`, every checkpoint's rows go to `on_checkpoint`."""

    @abstractmethod
    def pixel_rows(self) -> Iterator[np.ndarray]:
        """The final image of the last run, top to bottom in (rows, W, 3) uint8 bands; a clip's frames one after
        another, each top to bottom."""

    def written(self) -> None:
        """The final rows are all taken: record the ranks' peak memory where they do not record it themselves."""
