"""Where a render's model work runs, chosen in one place; `render()` only talks to an `Executor`.

Every rank runs the same `renderer.cascade.worker.Worker`. `InProcessExecutor` is one rank in this process (the
default, `--workers 0`); `cluster.ray_executor.RayExecutor` is a gang of Ray actors in one placement group,
each with the model, the driver holding none. `executor_class` is the only place that names `cluster`.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from renderer.cascade.stage_loop import CheckpointSink, StageJob
from renderer.cascade.worker import ModelInfo, Worker
from renderer.executor.base import Executor, Outcome
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.models.lora import lora_identity
from renderer.plan.request import RenderRequest
from renderer.progress import Progress

log = logging.getLogger("freescale_poster")


def executor_class(request: RenderRequest) -> type[Executor]:
    if not request.workers:
        return InProcessExecutor
    from cluster.ray_executor import RayExecutor  # the one import of cluster/: only a gang needs Ray

    return RayExecutor


class InProcessExecutor(Executor):
    """One rank in this process: the model is loaded here (or the one given is used)."""

    def __init__(self, request: RenderRequest, metrics: RenderMetrics = NULL_METRICS, pipeline=None):
        self.metrics = metrics
        self.worker = Worker(request.model, request.device, request.dtype, request.model_config, pipeline=pipeline,
                             motion_adapter=request.motion_adapter, loras=request.loras)
        self.device = self.worker.device.type

    def model(self) -> ModelInfo:
        return self.worker.info()

    def free_memory(self) -> int:
        return self.worker.memory()

    def largest_share(self, size: tuple[int, int]) -> float:
        return 1.0

    def run(self, job: StageJob, progress: Progress, on_checkpoint: CheckpointSink | None) -> Outcome:
        return Outcome.of([self.worker.run(job, progress, on_checkpoint, self.metrics)])

    def pixel_rows(self) -> Iterator[np.ndarray]:
        return self.worker.final_rows()

    def written(self) -> None:
        self.metrics.peak_memory(0, *self.worker.peak())


class Executors:
    """Where renders get their executor, one render at a time. By default each render starts its own and frees
    it at its end; a batch's pool (`keep`) keeps it for the next poster while that asks for the same model,
    precision, device and gang, and starts another (freeing the first, and saying so) when it does not."""

    def __init__(self, metrics: RenderMetrics = NULL_METRICS, pipeline=None, keep: bool = False):
        self.metrics, self.pipeline, self.keep = metrics, pipeline, keep
        self.current: Executor | None = None
        self.key: tuple | None = None

    def __enter__(self) -> "Executors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def acquire(self, request: RenderRequest) -> Executor:
        key = executor_key(request)
        if self.current is not None and key == self.key:
            return self.current
        if self.current is not None:
            log.info("%s needs %s; freeing %s", request.out, describe(key), describe(self.key))
            self.discard()
        self.current, self.key = start_executor(request, self.metrics, self.pipeline), key
        return self.current

    def done(self, failed: bool) -> None:
        """The render is over: free its executor, unless this pool keeps it (a failed render's is never kept)."""
        if failed or not self.keep:
            self.discard()

    def discard(self) -> None:
        if self.current is not None:
            self.current.close()
        self.current = self.key = None


def executor_key(request: RenderRequest) -> tuple:
    """What an executor was started for: two requests with the same key can share it."""
    where = ("gang", request.workers, request.address, request.gpus_per_worker, request.collective_timeout_s) if request.workers \
        else ("in-process", request.device)
    return (request.model, request.model_config, request.dtype, *where, request.motion_adapter, lora_key(request.loras))


def lora_key(loras) -> tuple:
    """The LoRAs fused into the ranks' weights: each file's digest and scale, in order."""
    return tuple((entry["sha256"], entry["scale"]) for entry in lora_identity(loras))


def describe(key: tuple) -> str:
    model, _, dtype, kind, *rest = key
    return f"--model {model}{f' --dtype {dtype}' if dtype else ''} " + (f"on {rest[0]} workers" if kind == "gang" else f"in this process on {rest[0]}")


def start_executor(request: RenderRequest, metrics: RenderMetrics = NULL_METRICS, pipeline=None) -> Executor:
    """The request's executor, started (a gang reserved and checked against the plan's memory). `pipeline`, an
    already loaded model, serves an in-process render; a gang's workers load --model themselves."""
    if request.workers:
        return executor_class(request)(request, metrics)
    return InProcessExecutor(request, metrics, pipeline)
