"""What every executor is: one verb, `collective(method, *args)`, which calls a method of every rank's worker and
returns their results in rank order; everything `render()` asks of the ranks is a line over it. The in-process
executor (`renderer.executor.pool`) and the Ray gang (`cluster.gang`) each implement it once, over the same rank
methods (`renderer.cascade.worker.Worker`, wrapped per actor by `cluster.gang.GangWorker`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Iterator, Sequence

import numpy as np

from renderer.messages import CheckpointSink, ModelInfo, Outcome, StageJob
from renderer.executor.spec import ExecutorSpec
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.progress import Progress


class Executor(ABC):
    """A render's ranks, started when made and freed by `close` (an `Executors` pool decides when)."""

    ranks: int = 1
    device: str = "cpu"  # where the ranks run: "cpu" or "cuda"
    waited_s: float = 0.0  # how long the ranks waited for their place (a gang, for the cluster's resources)
    nodes: list[str] = []  # each rank's host: a gang's Ray node addresses (none in-process)
    metrics: RenderMetrics = NULL_METRICS
    frames: int = 1  # of the last job: how many frames `pixel_rows` takes from each rank

    @classmethod
    def connect(cls, spec: ExecutorSpec) -> None:
        """Join whatever the ranks will run on before anything records metrics there (nothing in-process)."""

    @classmethod
    def ranks_that_fit(cls, spec: ExecutorSpec, wanted: int) -> int:
        """How many of `wanted` ranks could be started now (to restart after a lost rank)."""
        return wanted

    def close(self) -> None:
        """Free the ranks (once; later calls do nothing)."""

    @abstractmethod
    def collective(self, method: str, *args, ranks: Sequence[int] | None = None) -> list:
        """`method(*args)` of the worker of each of `ranks` (every rank by default), their results in rank order.
        A rank lost meanwhile ends it with `renderer.errors.WorkerLost`."""

    @abstractmethod
    def reporting(self, progress: Progress, on_checkpoint: CheckpointSink | None) -> AbstractContextManager:
        """While open, what a job's run hands the ranks (`Worker.run`'s `report`), so that rank 0's steps show on
        `progress` and every rank's checkpoint rows reach `on_checkpoint`."""

    def model(self) -> ModelInfo:
        """The loaded model's shape, dtypes and device, as the ranks hold it."""
        return self.collective("info", ranks=[0])[0]

    def free_memory(self) -> int:
        """The least free memory of any rank's device, in bytes."""
        return min(free for _, free in self.collective("memory"))

    def largest_share(self, size: tuple[int, int]) -> float:
        """About the largest fraction of a sharded stage's rows one rank holds (strips are whole units, so a little
        more than 1/N)."""
        units = max(size[1] // 64, 1)  # 8-latent-row strip units at the usual VAE scale of 8
        return math.ceil(units / self.ranks) / units

    def run(self, job: StageJob, progress: Progress, on_checkpoint: CheckpointSink | None) -> Outcome:
        """Run the job on every rank; their results (without the final pixels, which wait on the ranks)."""
        self.frames = job.frames
        with self.reporting(progress, on_checkpoint) as report:
            return Outcome.of(self.collective("run", job, report))

    def pixel_rows(self) -> Iterator[np.ndarray]:
        """The final image of the last run, top to bottom in (rows, W, 3) uint8 bands, one rank's strip at a time
        (a clip's: frame after frame), so that the driver never holds more than one strip."""
        for frame in range(self.frames):
            for rank in range(self.ranks):
                yield from self.collective("final_rows", frame, ranks=[rank])[0]

    def written(self) -> None:
        """The final rows are all taken: record the ranks' peak memory where they do not record it themselves."""
