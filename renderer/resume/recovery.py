"""Going on after a lost rank: rebuild the executor (as many ranks as the cluster still hosts, up to the same
count) and resume from the newest checkpoint, at most --max-restarts times; the outputs are written again
(every file is written atomically, so a loss while they stream leaves none half-written)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, TypeVar

from renderer.errors import RenderError, WorkerLost
from renderer.executor.base import Executor
from renderer.executor.pool import Executors, executor_class
from renderer.executor.spec import ExecutorSpec
from renderer.messages import Outcome, StageJob
from renderer.plan.geometry import ModelGeometry
from renderer.plan.render_plan import RenderPlan, check_shardable, plan_render
from renderer.plan.request import RenderRequest
from renderer.plan.shape import model_shape
from renderer.progress import Progress
from renderer.resume.checkpoints import Checkpoint, CheckpointStore, CheckpointWriter

log = logging.getLogger("freescale_poster")
T = TypeVar("T")


def run_recovering(request: RenderRequest, executors: Executors, job: StageJob, store: CheckpointStore | None,
                   writer: CheckpointWriter | None, progress: Progress, restarts: list[dict], plan: RenderPlan,
                   finish: Callable[[Executor, Outcome], T]) -> T:
    """Run the job on the pool's current executor, then `finish(executor, outcome)` (the outputs, streamed from the
    ranks' final rows); when a rank is lost in either, replace the executor with a new one and go on. A rank is
    as easily lost after the job's last step as before it: its final rows live only on its worker until taken."""
    executor = executors.current
    while True:
        try:
            return finish(executor, executor.run(job, progress, writer))
        except WorkerLost as error:
            if len(restarts) >= request.max_restarts:
                raise RenderError(f"{error}; gave up after {len(restarts)} restarts (--max-restarts {request.max_restarts})") from error
            checkpoint = store.newest() if store is not None else None
            if checkpoint is not None and start_position(resume_job(job, checkpoint)) >= start_position(job):
                job = resume_job(job, checkpoint)
            before, hosts = executor.ranks, list(executor.nodes)
            executors.discard()
            workers = workers_for_restart(request, plan.geometry, job, before)
            restarts.append({"error": str(error), "workers_before": before, "workers_after": workers, "hosts_before": hosts,
                             "resumed_from": {"stage": job.first, "step": job.resume_step}})
            log.warning("%s; restarting with %d workers from stage %d%s (restart %d of at most %d)", error, workers, job.first,
                        f" step {job.resume_step}" if job.resume_step is not None else "", len(restarts), request.max_restarts)
            if writer is not None:
                writer.discard_partial()
            rebuilt = replace(request, workers=workers)
            executor = executors.acquire(rebuilt, restart_plan(rebuilt, plan.geometry))


def start_position(job: StageJob) -> tuple[int, int]:
    """Where a job starts: (its first stage, the step index it resumes at; 0: from the stage's transition)."""
    return (job.first, job.resume_step or 0)


def resume_job(job: StageJob, checkpoint: Checkpoint) -> StageJob:
    """The job that goes on from `checkpoint`: the next stage after a stage end, else the rest of its stage."""
    if checkpoint.step >= job.steps:
        return replace(job, first=checkpoint.stage + 1, latents=checkpoint.latents, resume_step=None, reference=None)
    return replace(job, first=checkpoint.stage, latents=checkpoint.latents, resume_step=checkpoint.step, reference=checkpoint.reference)


def workers_for_restart(request: RenderRequest, geometry: ModelGeometry, job: StageJob, before: int) -> int:
    """As many workers as before if the cluster still has room for them, else as many as fit (any count gives
    the same image up to rounding), but never more than every remaining stage can be split into."""
    spec = ExecutorSpec.of(request)
    count = max(1, min(before, executor_class(spec).ranks_that_fit(spec, before)))
    while count > 1:
        try:
            check_shardable(geometry, job.stages[job.first :], job.config, count)
            break
        except RenderError:
            count -= 1
    return count


def restart_plan(request: RenderRequest, geometry: ModelGeometry) -> RenderPlan:
    """The plan of the rebuilt gang, for its workers' memory check: fewer workers hold larger strips."""
    return plan_render(request, geometry, model_shape(request.model))
