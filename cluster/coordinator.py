"""The coordinator's side: reserve a gang of Ray workers, hand them the job, stream their rows back.

Workers are reserved together in one placement group (PACK: on as few nodes as possible), each loads
the model once, and they form a torch.distributed group over an explicit TCP rendezvous at rank 0's
address: NCCL with one GPU per worker, gloo on CPU workers or when workers share a GPU.

Metrics: the gang carries the coordinator's `RenderMetrics`; it records placement and worker failures there,
and when it records anything, every worker records its own steps, bytes received and memory through Ray's.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cluster.gang import CheckpointSink, GangResult, StageJob, run_job
from cluster.strips import init_process_group
from renderer.errors import RenderError
from renderer.metrics import NULL_METRICS, RenderMetrics
from renderer.progress import Progress


@dataclass(frozen=True)
class GangSpec:
    """How to start the workers."""

    workers: int
    model: str
    model_config: str | None = None
    dtype: str | None = None  # default: float16 on GPU workers, float32 on CPU
    address: str | None = None  # a Ray cluster to join; None starts (or joins) a local one
    gpus_per_worker: float | None = None  # None: 1 if the cluster has a GPU per worker, else CPU workers
    placement_timeout_s: float = 300.0
    collective_timeout_s: float = 1800.0  # above the longest denoising step (16K: ~45 s)


class GangWorker:
    """One worker process (a Ray actor): holds the model, joins the group, runs `gang.run_job`."""

    def __init__(self, model: str, model_config: str | None, dtype: str | None, threads: int, device: str, gpu_share: float):
        from renderer.models import load_pipeline

        torch.set_num_threads(threads)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer becomes an error, not a hang
        if device == "cuda" and gpu_share < 1:
            torch.cuda.set_per_process_memory_fraction(gpu_share)  # Ray's fractional GPUs do not cap memory
        self.device = device
        dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device == "cuda" else torch.float32)
        self.pipeline = load_pipeline(model, self.device, dtype, model_config)

    def rendezvous_address(self) -> str:
        """host:port of a free port on this worker's node (called on rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind(("", 0))
            return f"{host}:{probe.getsockname()[1]}"

    def join(self, rank: int, world: int, address: str, backend: str, timeout_s: float) -> None:
        init_process_group(rank, world, address, backend, timeout_s)

    def run(self, job: StageJob, queue, report_progress: bool = False, record_metrics: bool = False,
            checkpoints: bool = False) -> GangResult:
        """Run the job; keep the final pixel strip here until `take_pixels`, return the rest.

        With `checkpoints`, checkpoint rows go to the coordinator through `queue`; the rank with `report_progress` also reports
        its stages and steps there. With `record_metrics`, this worker records its steps, bytes received and
        memory under its rank through `ray.util.metrics`."""

        def hand_over(stage, step, span, latents, reference) -> None:
            queue.put(("checkpoint", stage, step, span, latents, reference))

        progress = RelayProgress(queue) if report_progress else None
        metrics = RenderMetrics.ray() if record_metrics else NULL_METRICS
        result, self.pixels = run_job(self.pipeline, job, progress=progress, checkpoint=hand_over if checkpoints else None,
                                      metrics=metrics)
        return result

    def memory(self) -> tuple[str, int]:
        """What this worker's memory is shared with (its GPU, or for a CPU worker its node), and how many
        bytes of it are free."""
        import ray

        from renderer.memory import available_memory

        node = ray.get_runtime_context().get_node_id()
        place = f"GPU {ray.get_gpu_ids()} of node {node}" if self.device == "cuda" else f"node {node}"
        return place, available_memory(torch.device(self.device))

    def take_pixels(self) -> np.ndarray:
        pixels, self.pixels = self.pixels, None
        return pixels


@dataclass
class GangOutcome:
    latents: torch.Tensor  # the final latents, whole (small: a 16K latent is 64 MiB in fp32)
    stage_images: dict[int, np.ndarray]  # with --save-stages, the images of the stages decoded on the workers
    stage_seconds: list[float]  # per stage run, the slowest worker's
    summary: dict  # for the sidecar: workers, backend, strips, peak memory, bytes received per step


class WorkerLost(RenderError):
    """A worker died or a collective failed (a peer lost, a timeout): the gang must be rebuilt."""


def connect(address: str | None, workers: int) -> None:
    """Join `address`, else the cluster this process runs in (`ray job submit`, RAY_ADDRESS, a local `ray start`),
    else start a local Ray with at least one CPU per worker.

    Joining never passes resources (Ray only takes them when it starts a cluster). Under `ray job submit` the
    job's supervisor sets RAY_ADDRESS to the cluster's GCS address, so this process becomes the job's driver and
    the gang's actors and placement group belong to the job (they end with it). `ray.init` replaces the
    driver's SIGTERM handler with its own `sys.exit`; a handler the caller installed (the CLI's, which stops
    the render cleanly) is put back."""
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        joined = address or os.environ.get("RAY_ADDRESS")
        if joined:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as error:
                where = f"--address {address}" if address else f"RAY_ADDRESS={joined}"
                raise RenderError(f"{where}: no Ray cluster answers there ({error})") from None
            return
        try:
            ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), log_to_driver=False,
                     include_dashboard=False, logging_level=logging.WARNING)
    finally:
        if callable(handler) and signal.getsignal(signal.SIGTERM) is not handler:
            signal.signal(signal.SIGTERM, handler)


def cpu_share(workers: int) -> float:
    """CPUs per CPU worker: the cluster's free CPUs split evenly (fractions allowed, so 3 workers fit 2 cores;
    free, so that CPUs held by others, e.g. a job's --entrypoint-num-cpus, are not asked for), at most one
    node's worth so that the PACK group can still be placed."""
    import ray

    largest_node = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    free = ray.available_resources().get("CPU", 0)
    share = min(largest_node, (free or ray.cluster_resources().get("CPU", 1)) / workers)
    return math.floor(share * 10_000) / 10_000  # Ray counts resources in 1e-4 units: round down so all fit


def bundle_for(gpus_per_worker: float | None, workers: int) -> tuple[dict, float]:
    """One worker's reservation, and its GPUs: 1 GPU each if the cluster has one per worker (or as asked), else CPUs."""
    import ray

    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= workers else 0.0
    return {"CPU": 1 if gpus else cpu_share(workers), **({"GPU": gpus} if gpus else {})}, gpus


def workers_that_fit(gpus_per_worker: float | None, wanted: int, settle_s: float = 10.0) -> int:
    """How many of `wanted` workers the cluster's free resources host now (waiting up to `settle_s` for
    resources of a torn-down gang to come back)."""
    import time

    import ray

    deadline = time.monotonic() + settle_s
    while True:
        bundle, _ = bundle_for(gpus_per_worker, wanted)
        free = ray.available_resources()
        fit = min(int(free.get(name, 0) // amount) if amount else wanted for name, amount in bundle.items())
        if fit >= wanted or time.monotonic() > deadline:
            return min(fit, wanted)
        time.sleep(0.5)


class RelayProgress(Progress):
    """A worker's progress, forwarded to the coordinator's bars through a Ray queue."""

    def __init__(self, queue):
        super().__init__(enabled=False)
        self.queue = queue

    def stage(self, label: str, steps: int) -> None:
        self.queue.put(("stage", label, steps))

    def advance(self) -> None:
        self.queue.put(("advance",))


def relay(queue, progress: Progress, on_checkpoint: CheckpointSink | None) -> None:
    """Replay what the workers reported: progress on the coordinator's bars, checkpoint rows to `on_checkpoint`."""
    for event in queue.get_nowait_batch(queue.qsize()):
        if event[0] == "stage":
            progress.stage(*event[1:])
        elif event[0] == "advance":
            progress.advance()
        else:
            on_checkpoint(*event[1:])


def failure(error: Exception) -> str:
    """The last line of what went wrong inside a Ray actor (its own exception when Ray kept it)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    return text.splitlines()[-1] if text else type(cause).__name__


def failure_reason(error: Exception) -> str:
    """The `worker_failures_total` reason of a failure in the gang: timeout, lost or error."""
    if not lost_worker(error):
        return "error"
    cause = getattr(error, "cause", None)  # a collective's own error inside the worker; absent when it died
    text = str(cause).lower() if cause is not None else ""
    return "timeout" if "timed out" in text or "timeout" in text else "lost"


def lost_worker(error: Exception) -> bool:
    """A failure that rebuilding the gang can cure: an actor or its node died, or a collective broke
    (a peer vanished, a timeout); not an error of the job itself, which would only repeat."""
    import ray

    if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                          ray.exceptions.ObjectLostError)):
        return True
    cause = getattr(error, "cause", None)
    if isinstance(cause, torch.distributed.DistError):
        return True
    text = str(cause).lower()
    return isinstance(cause, RuntimeError) and any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout"))


class Gang:
    """A started gang of workers; use as a context manager so the workers and their reservation are freed.

    `metrics`: the coordinator's, where placement and worker failures are counted; unless it is the no-op,
    the workers record their own metrics through Ray's."""

    def __init__(self, spec: GangSpec, metrics: RenderMetrics = NULL_METRICS):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if spec.workers < 1:
            raise RenderError(f"--workers {spec.workers} must be at least 1")
        self.metrics = metrics
        connect(spec.address, spec.workers)
        bundle, gpus = bundle_for(spec.gpus_per_worker, spec.workers)
        self._remove = remove_placement_group
        self.group = placement_group([bundle] * spec.workers, strategy="PACK")
        self.workers = []
        try:
            try:
                ray.get(self.group.ready(), timeout=spec.placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                metrics.placement_failed()
                raise RenderError(
                    f"--workers {spec.workers}: the cluster could not reserve {spec.workers} x {bundle} within "
                    f"{spec.placement_timeout_s:.0f} s (it has {ray.cluster_resources()}); use fewer workers or add nodes"
                ) from None
            try:
                self._start(spec, bundle, gpus)
            except ray.exceptions.RayError as error:
                metrics.worker_failed("error")
                raise RenderError(f"a worker failed to start: {failure(error)}") from error
        except BaseException:  # also a stop (SIGTERM, Ctrl-C) while waiting: free what was reserved
            self.close()
            raise
        self.device = "cuda" if gpus else "cpu"

    def _start(self, spec: GangSpec, bundle: dict, gpus: float) -> None:
        """One actor per bundle, each loading the model, then the process group (rank 0 hosts the rendezvous)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = ray.remote(GangWorker)
        self.workers = [
            actor.options(
                num_cpus=bundle["CPU"], num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote(spec.model, spec.model_config, spec.dtype, max(1, int(bundle["CPU"])), "cuda" if gpus else "cpu", gpus)
            for rank in range(spec.workers)
        ]
        self.backend = "nccl" if gpus >= 1 else "gloo"
        address = ray.get(self.workers[0].rendezvous_address.remote())
        ray.get([worker.join.remote(rank, spec.workers, address, self.backend, spec.collective_timeout_s)
                 for rank, worker in enumerate(self.workers)])

    def __enter__(self) -> "Gang":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the workers and free their reservation (once; later calls do nothing)."""
        import ray

        if self.group is None:
            return
        for worker in self.workers:
            ray.kill(worker)
        self._remove(self.group)
        self.group = None

    def free_memory(self) -> int:
        """The least free memory of any worker (its GPU's, or its node's for CPU workers), in bytes."""
        import ray

        return min(free for _, free in ray.get([worker.memory.remote() for worker in self.workers]))

    def check_memory(self, need: int) -> None:
        """Refuse, before any stage runs, a gang whose workers would need more than the memory they share:
        `need` bytes each (the preflight's estimate beyond the loaded model), against what their GPU or
        node has free, less the 5 % Ray's memory monitor keeps before it kills a worker."""
        import ray

        places, free = zip(*ray.get([worker.memory.remote() for worker in self.workers]))
        for place in set(places):
            sharing = places.count(place)
            available = min(f for p, f in zip(places, free) if p == place) * 0.95
            if sharing * need > available:
                fits = f"{int(available // need)} fit" if available >= need else "not one fits"
                raise RenderError(
                    f"--workers {len(self.workers)}: {sharing} of them share one {'GPU' if self.device == 'cuda' else 'node'} "
                    f"and need about {sharing} x {need / 2**30:.1f} GiB beyond the model there, but it has "
                    f"{available / 2**30:.1f} GiB free ({fits}); spread the workers over more nodes, or try --vae-mode tiled, "
                    "--fast-mode or a smaller --size (--dry-run shows the estimate)")

    def largest_share(self, size: tuple[int, int]) -> float:
        """About the largest fraction of a stage's rows one worker holds (strips are whole units, so a little
        more than 1/N)."""
        units = size[1] // 64  # 8-latent-row strip units at the usual VAE scale of 8
        return math.ceil(max(units, 1) / len(self.workers)) / max(units, 1)

    def render(self, job: StageJob, progress: Progress, on_checkpoint: CheckpointSink | None) -> GangOutcome:
        """Run the job; the whole final latents, the stage images and timings, and a summary for the sidecar."""
        results = self.run(job, progress, on_checkpoint)
        return GangOutcome(
            latents=torch.cat([result.latents for result in results], dim=2),
            stage_images={stage: np.concatenate([result.stage_pixels[stage] for result in results], axis=0)
                          for stage in results[0].stage_pixels},
            stage_seconds=[max(seconds) for seconds in zip(*(result.seconds for result in results))],
            summary={
                "count": len(self.workers), "backend": self.backend, "device": self.device, "first_stage": job.first,
                "strips": [result.rows for result in results], "cfg_split": job.cfg_split and len(self.workers) % 2 == 0,
                "peak_bytes": [result.peak_bytes for result in results],
                "stage_seconds": [result.seconds for result in results], "step_bytes": [result.step_bytes for result in results],
            },
        )

    def run(self, job: StageJob, progress: Progress, on_checkpoint: CheckpointSink | None) -> list[GangResult]:
        """Run the job on every worker; their results (without the final pixels) in rank order.

        Rank 0's stages and steps are shown on `progress` while the workers run; checkpoint rows from every
        rank go to `on_checkpoint`. The first failure of any rank ends the run (a `WorkerLost` where a new
        gang could go on), without waiting for the others."""
        import ray
        from ray.util.queue import Queue

        queue = Queue()
        pending = [worker.run.remote(job, queue, rank == 0, self.metrics.enabled, on_checkpoint is not None)
                   for rank, worker in enumerate(self.workers)]
        order = {ref: rank for rank, ref in enumerate(pending)}
        results: dict[int, GangResult] = {}
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                relay(queue, progress, on_checkpoint)
                for ref in ready:
                    results[order[ref]] = ray.get(ref)
            relay(queue, progress, on_checkpoint)
            return [results[rank] for rank in range(len(self.workers))]
        except ray.exceptions.RayError as error:  # the gang is torn down by __exit__; one rank's failure ends all
            self.metrics.worker_failed(failure_reason(error))
            if lost_worker(error):
                raise WorkerLost(f"a worker was lost in the sharded stages: {failure(error)}") from error
            if isinstance(error, ray.exceptions.OutOfMemoryError):  # a restart would only run out again
                raise RenderError("a worker ran out of memory in the sharded stages (Ray's memory monitor stopped it); "
                                  "spread the workers over more nodes, or try --vae-mode tiled, --fast-mode or a smaller "
                                  "--size (--dry-run shows the estimate)") from error
            raise RenderError(f"a worker failed in the sharded stages: {failure(error)}") from error
        finally:
            queue.shutdown()

    def pixel_rows(self) -> Iterator[np.ndarray]:
        """The final image, one worker's strip at a time: the coordinator never holds more than one strip."""
        import ray

        for worker in self.workers:
            yield ray.get(worker.take_pixels.remote())
