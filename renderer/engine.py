"""`render(request) -> RenderResult`, a pipeline: plan → executor → stages → outputs.

The driver (this process) plans from the model's configs, starts an executor (`renderer.executor.pool`: one rank
here, or a Ray gang), hands its ranks one job with every stage, writes the checkpoints they hand back, and
streams the final rows into the TIFF; a rank lost before its rows are all taken is replaced, and the render
goes on from its newest checkpoint (`renderer.resume.recovery`). With a gang it loads no model at all.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from renderer.errors import RenderError
from renderer.executor.base import Executor
from renderer.executor.pool import Executors, executor_class
from renderer.executor.spec import ExecutorSpec
from renderer.jobs import submission_id
from renderer.messages import Outcome, Prompt, StageJob
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics, metrics_for
from renderer.models import model_geometry
from renderer.models.lora import lora_identity
from renderer.output.clip_files import write_clip
from renderer.output.files import sidecar_path
from renderer.output.writing import library_versions, tee_into, write_outputs
from renderer.plan.geometry import Size, format_size
from renderer.plan.identity import input_record, render_id
from renderer.plan.input_image import load_input
from renderer.plan.input_mask import load_mask
from renderer.plan.preflight import preflight
from renderer.plan.render_plan import RenderPlan, check_device, decode_modes, plan_render
from renderer.plan.request import RenderRequest, guided
from renderer.progress import Progress
from renderer.resume.checkpoints import CheckpointStore, CheckpointWriter
from renderer.resume.recovery import resume_job, run_recovering

log = logging.getLogger("freescale_poster")


@dataclass
class RenderResult:
    image: np.ndarray | None  # (H, W, 3) uint8; None when not kept (large TIFF renders)
    latents: torch.Tensor  # final latents, fp32, on CPU
    stages: list[Size]
    stage_images: list[np.ndarray] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def render(request: RenderRequest, pipeline=None, progress: bool | Progress = True, write: bool = True,
           keep_image: bool = True, metrics: bool | RenderMetrics = False, executors: Executors | None = None,
           skip_done: bool = False, plan: RenderPlan | None = None) -> RenderResult:
    """Render `request`. `pipeline` reuses an already loaded model for an in-process render (its device and dtype
    win); a gang's workers (--workers N) load the model themselves.

    With `write`, checkpoints are kept while rendering and the same request resumes from the newest valid
    one (see `renderer.resume.checkpoints`); they are removed once the output is complete.

    `metrics` (see `renderer.metrics.recorder`): False records nothing; True records what the CLI records, through Ray
    with --workers (driver and workers), else served on --metrics-port if given, and closes them at the end
    (after --metrics-linger, unless stopped); a `RenderMetrics` records there (the caller serves and closes it).
    The render counts as succeeded, failed (an exception) or stopped (a KeyboardInterrupt such as RenderStopped).

    `executors`: where the ranks come from (a batch passes its pool, which keeps them between posters); by
    default they are started for this render and freed at its end. `skip_done`: return at once, with
    `metadata["skipped"]`, when the output is already complete for this same request (a re-run batch). `plan`: the
    request's plan, where the caller made it already (a batch checks every poster's before the first renders)."""
    with opened_metrics(request, metrics) as recorder, recorder.rendering():
        return render_recorded(request, pipeline, progress, write, keep_image, recorder, executors, skip_done, plan)


@contextmanager
def opened_metrics(request: RenderRequest, metrics: bool | RenderMetrics) -> Iterator[RenderMetrics]:
    """The metrics a render records into (see `render`), closed at the end if opened here."""
    if isinstance(metrics, RenderMetrics) or not metrics or (not request.workers and request.metrics_port is None):
        yield metrics if isinstance(metrics, RenderMetrics) else NULL_METRICS
        return
    if request.workers:
        spec = ExecutorSpec.of(request)
        executor_class(spec).connect(spec)  # first, so that what the driver records reaches Ray's agent
        opened = metrics_for(on_ray=True)
    else:
        try:
            opened = metrics_for(request.metrics_port, addr=request.metrics_addr)
        except OSError as error:
            raise RenderError(f"--metrics-port {request.metrics_port}: cannot serve metrics on "
                              f"{request.metrics_addr}:{request.metrics_port} ({error.strerror or error})") from None
        log.info("serving metrics at http://%s:%d/metrics", request.metrics_addr, opened.port)
    stopped = False
    try:
        yield opened
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        # Ray keeps a process's counters after it exits (gauges end with it); a stop asks to end at once.
        opened.close(0.0 if stopped or request.workers else request.metrics_linger_s)


def render_recorded(request: RenderRequest, pipeline, progress: bool | Progress, write: bool, keep_image: bool,
                    metrics: RenderMetrics, executors: Executors | None, skip_done: bool, plan: RenderPlan | None) -> RenderResult:
    # Plan: everything knowable from the request and the model's configs, refused before any rank starts; made
    # once, here or by the caller (a single file or a hub id is planned once loaded, in `render_on`).
    if not request.workers:
        check_device(request.device)
    if plan is None:
        plan = plan_render(request, model_geometry(pipeline)) if pipeline is not None else preflight(request)
    started = time.perf_counter()
    # Executor: the ranks, each with the model (a batch's pool keeps them for the next poster).
    executors = executors if executors is not None else Executors(metrics, pipeline)
    executor = executors.acquire(request, plan)
    failed = True
    try:
        result = render_on(request, executor, executors, plan, progress, write, keep_image, metrics, skip_done, started)
        failed = False
    finally:
        executors.done(failed)
    return result


def render_on(request: RenderRequest, executor: Executor, executors: Executors, plan: RenderPlan | None,
              progress: bool | Progress, write: bool, keep_image: bool, metrics: RenderMetrics, skip_done: bool,
              started: float) -> RenderResult:
    model = executor.model()
    if request.frames > model.max_frames > 0:  # a hub adapter's positions are known once loaded
        raise RenderError(f"--frames {request.frames} exceeds the motion adapter's {model.max_frames} frame positions; "
                          f"use at most {model.max_frames}")
    plan = plan or plan_render(request, model.geometry)  # a single file's shape is known once loaded
    stages, base = plan.stages, plan.stages[0]
    identity = render_id(request, stages, model.dtype, model.device)
    if skip_done and write and (done := complete_output(request, identity)) is not None:
        log.info("%s is complete (render %s): skipped", request.out, identity)
        return RenderResult(image=None, latents=torch.empty(0), stages=stages, metadata={**done, "skipped": True})
    initial, picture = None, {}
    if request.image:
        initial, converted = load_input(request.image, base)
        picture = input_record(request, plan.notes + converted)
        for note in picture["notes"]:
            log.info("%s", note)
    config = replace(request.freescale, seed=request.seed)
    bar = metrics.following(progress if isinstance(progress, Progress) else Progress(progress), plan.denoising)
    store = CheckpointStore(request.checkpoint_folder(), identity, request.steps) if write else None
    if store is not None and not request.resume:
        store.clear()
    resumed = store.newest() if store is not None else None
    modes = decode_modes(request, model, plan, executor)
    job = StageJob(
        cond=None, prompt=Prompt(request.prompt, request.negative_prompt, request.guidance), latents=torch.empty(0),
        stages=stages, first=0, last=len(stages), steps=request.steps, config=config, transition_modes=modes[:-1],
        final_mode=modes[-1], mask=load_mask(request.mask, base) if request.mask else None, initial=initial,
        save_stages=request.save_stages, checkpoint_steps=request.checkpoint_every_steps,
        checkpoint_seconds=request.checkpoint_every_minutes * 60, cfg_split=request.cfg_split,
        first_sharded=plan.first_sharded, frames=request.frames, scheduler=request.scheduler_choice,
        first_restart=plan.first_restart,
    )
    history: dict = {"render_id": identity, "resumed_from": None, "restarts": []}
    if resumed is not None:
        job = resume_job(job, resumed)
        if request.save_stages:  # the images of stages whose transition will not run, from their stage ends
            skipped = range(job.first if job.resume_step is not None else job.first - 1)
            job.stage_ends = {stage: checkpoint.latents for stage in skipped if (checkpoint := store.stage_end(stage)) is not None}
        history["resumed_from"] = {"stage": resumed.stage, "step": resumed.step}
        log.info("resuming render %s from its checkpoint after step %d of stage %d (%s)", identity, resumed.step,
                 resumed.stage, format_size(stages[resumed.stage]))
    writer = None if store is None else CheckpointWriter(store, [h // model.geometry.vae_scale for _, h in stages], metrics.checkpoint_written)

    def finish(executor: Executor, outcome: Outcome) -> RenderResult:
        """The stages' result, and its outputs from the ranks' final rows."""
        bar.close()
        result = RenderResult(
            image=None, latents=outcome.latents, stages=stages,
            stage_images=[outcome.stage_images[k] for k in sorted(outcome.stage_images)],
            metadata={
                "request": request.to_dict(), "stages": [format_size(s) for s in stages], "freescale": config.to_dict(),
                "loras": lora_identity(request.loras),
                "device": model.device, "dtype": model.dtype, "vae_dtype": model.vae_dtype, "vae_mode": modes[-1],
                "transition_vae_modes": modes[:-1], "versions": library_versions(), **history,
                **({"input": picture} if picture else {}),
                "ray_job_submission_id": submission_id(),
                "seconds": {"stages": [outcome.stage_seconds.get(index) for index in range(len(stages))],
                            **({"waiting": executor.waited_s} if request.workers else {})},
                **({"workers": gang_summary(executor, plan, outcome, request.cfg_split and guided(request.guidance))} if request.workers else {}),
            },
        )
        stream_outputs(request, executor, result, write, keep_image, metrics, started, model.device)
        if store is not None and not request.keep_checkpoints:
            store.clear()
        return result

    # Stages, then outputs: on the executor's ranks, rebuilt from the newest checkpoint if a rank is lost (also
    # while the final rows stream from the ranks into the files).
    return run_recovering(request, executors, job, store, writer, bar, history["restarts"], plan, finish)


def stream_outputs(request: RenderRequest, executor: Executor, result: RenderResult, write: bool, keep_image: bool,
                   metrics: RenderMetrics, started: float, device: str) -> None:
    """The final rows streamed from the ranks into the files (with `write`), and into `result.image` (with
    `keep_image`, or when nothing is written)."""
    kept: list[np.ndarray] = []
    rows = executor.pixel_rows()
    if keep_image or not write:
        rows = tee_into(rows, kept)
    if write:
        here = torch.device(device if not request.workers else "cpu")  # the peak of this process's memory
        files = (write_clip if request.frames > 1 else write_outputs)(request, result, rows, started, here)
        metrics.output_written(sum(path.stat().st_size for path in files))
    else:
        for _ in rows:
            pass
        result.metadata["seconds"]["total"] = time.perf_counter() - started
    executor.written()
    if kept:
        image = np.concatenate(kept)  # (H, W, 3), or a clip's frames stacked along the rows
        result.image = image.reshape(request.frames, -1, *image.shape[1:]) if request.frames > 1 else image


def complete_output(request: RenderRequest, identity: str) -> dict | None:
    """The sidecar of an output that is complete and belongs to this very request (its render id), else None."""
    out, sidecar = Path(request.out), sidecar_path(request.out)
    try:
        written = json.loads(sidecar.read_text()) if out.is_file() else None
    except (OSError, ValueError):
        return None
    return written if isinstance(written, dict) and written.get("render_id") == identity else None


def gang_summary(executor: Executor, plan: RenderPlan, outcome, cfg_split: bool) -> dict:
    """For the sidecar: the gang, its strips, which ranks ran each stage, and per rank its times, bytes and peak."""
    ranks = outcome.ranks
    count = len(plan.stages)
    return {
        "count": executor.ranks, "backend": executor.backend, "device": executor.device, "first_stage": plan.first_sharded,
        "bundle": executor.bundle, "placed_at": executor.placed_at,  # each worker's reservation; when the gang got it (Unix s)
        "nodes": executor.nodes,  # each rank's host (its Ray node address)
        "strips": [result.rows for result in ranks], "cfg_split": cfg_split and executor.ranks % 2 == 0,
        "stage_ranks": outcome.stage_ranks(count), "peak_bytes": [result.peak_bytes for result in ranks],
        "stage_seconds": [[result.seconds.get(stage) for stage in range(count)] for result in ranks],
        "step_bytes": [[result.step_bytes.get(stage) for stage in range(count)] for result in ranks],
    }
