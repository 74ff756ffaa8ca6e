"""`RayExecutor`: a render's ranks as a Ray gang, what `renderer.executor.pool.executor_class` picks for --workers N."""

from __future__ import annotations

from cluster.gang import Gang, GangSpec
from cluster.placement import connect, workers_that_fit
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.plan.preflight import worker_need
from renderer.plan.request import RenderRequest


class RayExecutor(Gang):
    """The request's gang, reserved as one placement group and refused at once if its workers lack the memory
    the plan needs (before any stage runs)."""

    def __init__(self, request: RenderRequest, metrics: RenderMetrics = NULL_METRICS):
        super().__init__(GangSpec(
            workers=request.workers, model=request.model, model_config=request.model_config, dtype=request.dtype,
            address=request.address, gpus_per_worker=request.gpus_per_worker, collective_timeout_s=request.collective_timeout_s,
            queue_timeout_s=request.queue_timeout_s, motion_adapter=request.motion_adapter,
            loras=request.loras,
        ), metrics)
        try:
            if (need := worker_need(request)) is not None:
                self.check_memory(need)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, request: RenderRequest) -> None:
        connect(request.address, request.workers)

    @classmethod
    def ranks_that_fit(cls, request: RenderRequest, wanted: int) -> int:
        return workers_that_fit(request.gpus_per_worker, wanted)
