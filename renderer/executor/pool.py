"""Where a render's model work runs, chosen in one place; `render()` only talks to an `Executor`.

Every rank runs the same `renderer.cascade.worker.Worker`. `InProcessExecutor` is one rank in this process (the
default, `--workers 0`); `cluster.gang.Gang` is a gang of Ray actors in one placement group, each with the model,
the driver holding none. `executor_class` is the only place that names `cluster`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Sequence

from renderer.cascade.worker import Report, Worker
from renderer.executor.base import Executor
from renderer.executor.spec import ExecutorSpec
from renderer.messages import CheckpointSink
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.plan.render_plan import RenderPlan
from renderer.plan.request import RenderRequest
from renderer.progress import Progress

log = logging.getLogger("freescale_poster")


def executor_class(spec: ExecutorSpec) -> type[Executor]:
    if not spec.workers:
        return InProcessExecutor
    from cluster.gang import Gang  # the one import of cluster/: only a gang needs Ray

    return Gang


class InProcessExecutor(Executor):
    """One rank in this process: the model is loaded here (or the one given is used)."""

    def __init__(self, spec: ExecutorSpec, metrics: RenderMetrics = NULL_METRICS, pipeline=None):
        self.metrics = metrics
        self.worker = Worker(spec.model, spec.device, spec.dtype, spec.model_config, pipeline=pipeline,
                             motion_adapter=spec.motion_adapter, loras=spec.loras)
        self.device = self.worker.device.type

    def collective(self, method: str, *args, ranks: Sequence[int] | None = None) -> list:
        return [getattr(self.worker, method)(*args)]

    @contextmanager
    def reporting(self, progress: Progress, on_checkpoint: CheckpointSink | None) -> Iterator[Report]:
        yield Report(progress, on_checkpoint, self.metrics)

    def written(self) -> None:
        self.metrics.peak_memory(0, *self.collective("peak")[0])


class Executors:
    """Where renders get their executor, one render at a time. By default each render starts its own and frees
    it at its end; a batch's pool (`keep`) keeps it for the next poster while that asks for the same model,
    precision, device and gang, and starts another (freeing the first, and saying so) when it does not."""

    def __init__(self, metrics: RenderMetrics = NULL_METRICS, pipeline=None, keep: bool = False):
        self.metrics, self.pipeline, self.keep = metrics, pipeline, keep
        self.current: Executor | None = None
        self.spec: ExecutorSpec | None = None

    def __enter__(self) -> "Executors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def acquire(self, request: RenderRequest, plan: RenderPlan | None = None) -> Executor:
        """The request's executor: the kept one if its spec is the same, else a new one (a gang checked against the
        memory `plan` says each worker needs)."""
        spec = ExecutorSpec.of(request)
        if self.current is not None and spec == self.spec:
            return self.current
        if self.current is not None:
            log.info("%s needs %s; freeing %s", request.out, spec.describe(), self.spec.describe())
            self.discard()
        self.current, self.spec = start_executor(spec, self.metrics, self.pipeline, plan.worker_need if plan else None), spec
        return self.current

    def done(self, failed: bool) -> None:
        """The render is over: free its executor, unless this pool keeps it (a failed render's is never kept)."""
        if failed or not self.keep:
            self.discard()

    def discard(self) -> None:
        if self.current is not None:
            self.current.close()
        self.current = self.spec = None


def start_executor(spec: ExecutorSpec, metrics: RenderMetrics = NULL_METRICS, pipeline=None, need: int | None = None) -> Executor:
    """The spec's executor, started: `pipeline`, an already loaded model, serves an in-process render; a gang's
    workers load the model themselves, and are refused at once if they lack the `need` bytes each beyond it."""
    if spec.workers:
        return executor_class(spec)(spec, metrics, need)
    return InProcessExecutor(spec, metrics, pipeline)
