"""`render(request) -> RenderResult`: validate, load, run the cascade, stream the outputs."""

from __future__ import annotations

import logging
import platform
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from cluster.jobs import submission_id
from cluster.gang import StageJob, decode_strip, run_stages, stage_layout
from cluster.strips import RowGroup
from freescale_core.cascade import restart_index
from renderer.checkpoints import Checkpoint, CheckpointStore, CheckpointWriter
from renderer.errors import RenderError
from renderer.identity import render_id
from renderer.images import load_image, load_mask
from renderer.metrics import NULL_METRICS, RenderMetrics, metrics_for
from renderer.models import load_pipeline, model_geometry
from renderer.outputs import sidecar_path, stage_path, write_json, write_png
from renderer.memory import available_memory, memory_limit, peak_memory
from renderer.preflight import preflight, worker_need
from renderer.progress import Progress
from renderer.request import RenderRequest, Size, first_sharded_stage, format_size
from renderer.stages import encode, encode_prompts, generate_base, unscaled
from renderer.tiff import TiffOptions, write_pyramid, write_preview
from renderer.vae_bands import decode_rows, to_pixels

log = logging.getLogger("freescale_poster")

LIBRARIES = ("freescale-poster", "torch", "diffusers", "transformers", "numpy", "pillow", "tifffile")


@dataclass
class RenderResult:
    image: np.ndarray | None  # (H, W, 3) uint8; None when not kept (large TIFF renders)
    latents: torch.Tensor  # final latents, fp32, on CPU
    stages: list[Size]
    stage_images: list[np.ndarray] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def resolve_dtype(request: RenderRequest) -> torch.dtype:
    if request.dtype:
        return getattr(torch, request.dtype)
    return torch.float16 if request.device.startswith("cuda") else torch.float32


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise RenderError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RenderError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def choose_vae_mode(request: RenderRequest, pipeline, size: Size, share: float = 1.0, available: int | None = None) -> str:
    """`exact` when one full-resolution decoder activation, three times over, fits in 80 % of free memory.

    A sharded decode holds `share` of the rows, in the `available` memory of the tightest worker."""
    if request.vae_mode != "auto":
        return request.vae_mode
    vae = pipeline.vae
    activation = size[0] * size[1] * share * vae.config.block_out_channels[0] * torch.finfo(vae.dtype).bits // 8
    return "exact" if 3 * activation < 0.8 * (available or available_memory(vae.device)) else "tiled"


def pixel_rows(pipeline, latents: torch.Tensor, mode: str) -> Iterator[np.ndarray]:
    """Final decode, streamed as (rows, W, 3) uint8 bands."""
    for rows in decode_rows(pipeline.vae, unscaled(pipeline, latents), mode):
        yield to_pixels(rows)


def render(request: RenderRequest, pipeline=None, progress: bool | Progress = True, write: bool = True,
           keep_image: bool = True, metrics: bool | RenderMetrics = False) -> RenderResult:
    """Render `request`; `pipeline` reuses an already loaded model (its device and dtype win).

    With `write`, checkpoints are kept while rendering and the same request resumes from the newest valid
    one (see `renderer.checkpoints`); they are removed once the output is complete.

    `metrics` (see `renderer.metrics`): False records nothing; True records what the CLI records, through Ray
    with --workers (driver and workers), else served on --metrics-port if given, and closes them at the end
    (after --metrics-linger, unless stopped); a `RenderMetrics` records there (the caller serves and closes it).
    The render counts as succeeded, failed (an exception) or stopped (a KeyboardInterrupt such as RenderStopped)."""
    with opened_metrics(request, metrics) as recorder, recorder.rendering():
        return render_recorded(request, pipeline, progress, write, keep_image, recorder)


@contextmanager
def opened_metrics(request: RenderRequest, metrics: bool | RenderMetrics) -> Iterator[RenderMetrics]:
    """The metrics a render records into (see `render`), closed at the end if opened here."""
    if isinstance(metrics, RenderMetrics) or not metrics or (not request.workers and request.metrics_port is None):
        yield metrics if isinstance(metrics, RenderMetrics) else NULL_METRICS
        return
    if request.workers:
        from cluster.coordinator import connect

        connect(request.address, request.workers)  # first, so that what the driver records reaches Ray's agent
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
                    metrics: RenderMetrics) -> RenderResult:
    check_device(request.device)
    if pipeline is None:
        preflight(request)  # refuse what cannot work before loading weights
        pipeline = load_pipeline(request.model, request.device, resolve_dtype(request), request.model_config)
    stages = request.plan(model_geometry(pipeline))
    base = stages[0]
    initial = load_image(request.image, base) if request.image else None
    mask = load_mask(request.mask, base) if request.mask else None
    config = replace(request.freescale, seed=request.seed)
    bar = metrics.following(progress if isinstance(progress, Progress) else Progress(progress),
                            denoising_plan(stages, request.steps, config.restart_fraction, base=initial is None))
    started = time.perf_counter()
    first_sharded = first_sharded_stage(request, stages)
    if first_sharded < len(stages):
        check_shardable(pipeline, stages[first_sharded:], config, request.workers)
    device = pipeline.unet.device
    identity = render_id(request, stages, dtype_name(pipeline.unet.dtype), device.type)
    store = CheckpointStore(request.checkpoint_folder(), identity, request.steps) if write else None
    if store is not None and not request.resume:
        store.clear()
    resumed = store.newest() if store is not None else None
    stage_times: dict[int, float] = {}
    stage_images: dict[int, np.ndarray] = {}
    history: dict = {"render_id": identity, "resumed_from": None, "restarts": []}

    scale = pipeline.vae_scale_factor
    writer = None if store is None else CheckpointWriter(store, [size[1] // scale for size in stages], metrics.checkpoint_written)

    def finished(seconds: dict[int, float]) -> None:
        stage_times.update(seconds)
        for stage, duration in seconds.items():
            metrics.stage_finished(stage, duration)

    with ExitStack() as stack, torch.inference_mode():
        gang = stack.enter_context(start_gang(request, metrics)) if first_sharded < len(stages) else None
        modes = decode_modes(request, pipeline, stages, first_sharded, gang)
        transition_modes, vae_mode = modes[:-1], modes[-1]
        cond = encode_prompts(pipeline, request.prompt, request.negative_prompt, (base[1], base[0]), request.guidance)
        job = StageJob(
            cond=cond.to("cpu"), latents=torch.empty(0), stages=stages, first=1, last=len(stages), steps=request.steps,
            config=config, transition_modes=transition_modes, final_mode=vae_mode, mask=mask, save_stages=request.save_stages,
            checkpoint_steps=request.checkpoint_every_steps, checkpoint_seconds=request.checkpoint_every_minutes * 60,
            cfg_split=request.cfg_split,
        )
        if resumed is None:
            stage_start = time.perf_counter()
            if initial is None:
                bar.stage(f"stage 0 {format_size(base)}", request.steps)
                latents = generate_base(pipeline, cond, (base[1], base[0]), request.steps, config, metrics.stepping(bar, 0, 0))
            else:
                latents = encode(pipeline, initial.to(device), config.seed, stage=0)
            if writer is not None:
                writer(0, request.steps, (0, latents.shape[2]), latents.float().cpu(), None)
            finished({0: time.perf_counter() - stage_start})
            job = replace(job, latents=latents.float().cpu())
        else:
            job = resume_job(job, resumed)
            history["resumed_from"] = {"stage": resumed.stage, "step": resumed.step}
            log.info("resuming render %s from its checkpoint after step %d of stage %d (%s)", identity, resumed.step,
                     resumed.stage, format_size(stages[resumed.stage]))
        latents = job.latents
        if job.first < first_sharded:
            run = run_stages(pipeline, replace(job, last=first_sharded), local=True, progress=bar, checkpoint=writer,
                             metrics=metrics)
            latents = run.latents.float().cpu()
            finished(dict(zip(range(job.first, first_sharded), run.seconds)))
            stage_images.update(run.stage_pixels)
            job = replace(job, first=first_sharded, latents=latents, resume_step=None, reference=None)
        workers = {}
        if gang is not None:
            gang, outcome = render_sharded(request, pipeline, job, gang, stack, store, writer, bar, history["restarts"], metrics)
            latents, workers = outcome.latents, outcome.summary
            stage_images.update(outcome.stage_images)
            finished(dict(zip(range(len(stages) - len(outcome.stage_seconds), len(stages)), outcome.stage_seconds)))
        bar.close()
        if request.save_stages:
            stage_images.update(missing_stage_images(pipeline, store, stage_images, len(stages), transition_modes))
        result = RenderResult(
            image=None, latents=latents.float().cpu(), stages=stages, stage_images=[stage_images[k] for k in sorted(stage_images)],
            metadata={
                "request": request.to_dict(), "stages": [format_size(s) for s in stages], "freescale": config.to_dict(),
                "device": str(device), "dtype": dtype_name(pipeline.unet.dtype),
                "vae_dtype": dtype_name(pipeline.vae.dtype), "vae_mode": vae_mode,
                "transition_vae_modes": transition_modes, "versions": library_versions(), **history,
                "ray_job_submission_id": submission_id(),
                "seconds": {"stages": [stage_times.get(index) for index in range(len(stages))]},
                **({"workers": workers} if workers else {}),
            },
        )
        rows = pixel_rows(pipeline, latents, vae_mode) if gang is None else gang.pixel_rows()
        kept: list[np.ndarray] = []
        if keep_image or not write:
            rows = tee_into(rows, kept)
        if write:
            metrics.output_written(sum(path.stat().st_size for path in write_outputs(request, result, rows, started)))
        else:
            for _ in rows:
                pass
            result.metadata["seconds"]["total"] = time.perf_counter() - started
        if gang is None:  # a gang's workers record their own devices' memory
            metrics.peak_memory(0, peak_memory(device), memory_limit(device))
    if store is not None and not request.keep_checkpoints:
        store.clear()
    if kept:
        result.image = np.concatenate(kept, axis=0)
    return result


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def missing_stage_images(pipeline, store: CheckpointStore | None, images: dict[int, np.ndarray], count: int,
                         modes: list[str]) -> dict[int, np.ndarray]:
    """Images of the stages a resumed render did not run, decoded from their stage-end checkpoints."""
    missing = {}
    for stage in range(count - 1):
        if stage not in images and store is not None and (checkpoint := store.stage_end(stage)) is not None:
            missing[stage] = to_pixels(decode_strip(pipeline, RowGroup.single(checkpoint.latents.shape[2]),
                                                    checkpoint.latents.to(pipeline.vae.device), modes[stage]))
    return missing


def render_sharded(request: RenderRequest, pipeline, job: StageJob, gang, stack: ExitStack, store: CheckpointStore | None,
                   writer: CheckpointWriter | None, progress: Progress, restarts: list[dict], metrics: RenderMetrics):
    """Run the job's stages on the gang; when a worker is lost, rebuild the gang (as many workers as the
    cluster still hosts, up to the same count) and go on from the newest checkpoint, at most
    --max-restarts times. Returns the gang that holds the final pixels, and its outcome."""
    from cluster.coordinator import WorkerLost

    while True:
        try:
            return gang, gang.render(job, progress, writer)
        except WorkerLost as error:
            gang.close()
            if len(restarts) >= request.max_restarts:
                raise RenderError(f"{error}; gave up after {len(restarts)} restarts (--max-restarts {request.max_restarts})") from error
            checkpoint = store.newest() if store is not None else None
            if checkpoint is not None and start_position(resume_job(job, checkpoint)) >= start_position(job):
                job = resume_job(job, checkpoint)
            workers = workers_for_restart(request, pipeline, job, len(gang.workers))
            restarts.append({"error": str(error), "workers_before": len(gang.workers), "workers_after": workers,
                             "resumed_from": {"stage": job.first, "step": job.resume_step}})
            log.warning("%s; restarting with %d workers from stage %d%s (restart %d of at most %d)", error, workers, job.first,
                        f" step {job.resume_step}" if job.resume_step is not None else "", len(restarts), request.max_restarts)
            if writer is not None:
                writer.discard_partial()
            gang = stack.enter_context(start_gang(replace(request, workers=workers), metrics))


def start_position(job: StageJob) -> tuple[int, int]:
    """Where a job starts: (its first stage, the step index it resumes at; 0: from the stage's transition)."""
    return (job.first, job.resume_step or 0)


def resume_job(job: StageJob, checkpoint: Checkpoint) -> StageJob:
    """The job that goes on from `checkpoint`: the next stage after a stage end, else the rest of its stage."""
    if checkpoint.step >= job.steps:
        return replace(job, first=checkpoint.stage + 1, latents=checkpoint.latents, resume_step=None, reference=None)
    return replace(job, first=checkpoint.stage, latents=checkpoint.latents, resume_step=checkpoint.step, reference=checkpoint.reference)


def workers_for_restart(request: RenderRequest, pipeline, job: StageJob, before: int) -> int:
    """As many workers as before if the cluster still has room for them, else as many as fit (any count gives
    the same image up to rounding), but never more than every remaining stage can be split into."""
    from cluster.coordinator import workers_that_fit

    count = max(1, min(before, workers_that_fit(request.gpus_per_worker, before)))
    while count > 1:
        try:
            check_shardable(pipeline, job.stages[job.first :], job.config, count)
            break
        except RenderError:
            count -= 1
    return count


def decode_modes(request: RenderRequest, pipeline, stages: list[Size], first_sharded: int, gang) -> list[str]:
    """The VAE mode of each stage's decode: before the next stage, and the final one for the last.

    A decode runs where the stage after it runs; one on the workers is sized by a worker's strip against
    the tightest worker's free memory (asked once, and only when the mode is `auto`)."""
    worker_memory = gang.free_memory() if gang is not None and request.vae_mode == "auto" else None
    modes = []
    for index, size in enumerate(stages):
        if gang is not None and index + 1 >= first_sharded:
            modes.append(choose_vae_mode(request, pipeline, size, share=gang.largest_share(size), available=worker_memory))
        else:
            modes.append(choose_vae_mode(request, pipeline, size))
    return modes


def check_shardable(pipeline, stages: list[Size], config, workers: int) -> None:
    """Every sharded stage must split into `workers` strips of whole units (before anything is started)."""
    for size in stages:
        try:
            stage_layout(pipeline, size, config, workers)
        except ValueError as error:
            raise RenderError(f"--workers {workers} at stage {format_size(size)}: {error}") from None


def start_gang(request: RenderRequest, metrics: RenderMetrics = NULL_METRICS):
    """Reserve and start the workers, and check that they have the memory the plan needs (before any
    rendering, so a cluster that cannot host them fails fast)."""
    from cluster.coordinator import Gang, GangSpec

    gang = Gang(GangSpec(
        workers=request.workers, model=request.model, model_config=request.model_config, dtype=request.dtype,
        address=request.address, gpus_per_worker=request.gpus_per_worker, collective_timeout_s=request.collective_timeout_s,
    ), metrics)
    try:
        if (need := worker_need(request)) is not None:
            gang.check_memory(need)
    except BaseException:
        gang.close()
        raise
    return gang


def denoising_plan(stages: list[Size], steps: int, restart_fraction: float, base: bool) -> dict[int, tuple[int, int]]:
    """(denoising steps, pixels) of every stage that denoises: the base unless it starts from an image, and every
    upscaling stage from its restart step."""
    upscaling = steps - restart_index(steps, restart_fraction)
    plan = {index: (upscaling, size[0] * size[1]) for index, size in enumerate(stages) if index > 0}
    return {0: (steps, stages[0][0] * stages[0][1]), **plan} if base else plan


def tee_into(rows: Iterable[np.ndarray], kept: list[np.ndarray]) -> Iterator[np.ndarray]:
    for band in rows:
        kept.append(band)
        yield band


def write_outputs(request: RenderRequest, result: RenderResult, rows: Iterable[np.ndarray], started: float) -> list[Path]:
    """Stage PNGs, then the image (streamed), then the sidecar, whose total time includes the writing.
    Returns the files written."""
    out = Path(request.out)
    written = []
    for index, (size, pixels) in enumerate(zip(result.stages, result.stage_images)):
        written.append(stage_path(out, index, size))
        write_png(written[-1], pixels)
    if out.suffix.lower() == ".png":
        write_png(out, np.concatenate(list(rows), axis=0))
    else:
        options = TiffOptions(tile=request.tile_size, compression=request.compression, dpi=request.dpi, software=software_name())
        write_pyramid(out, rows, result.stages[-1], options, result.metadata, request.prompt, request.negative_prompt)
        if request.preview:
            written.append(preview_path(out))
            write_preview(out, written[-1])
    result.metadata["seconds"]["total"] = time.perf_counter() - started
    result.metadata["peak_bytes"] = peak_memory(torch.device(result.metadata["device"]))  # this process's, the writing included
    write_json(sidecar_path(out), result.metadata)
    return [*written, out, sidecar_path(out)]


def preview_path(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".preview.png")


def software_name() -> str:
    return f"freescale-poster {library_versions()['freescale-poster']}"
