"""A gang: Ray actors in one placement group, each a `renderer.cascade.worker.Worker` of one rank.

Each actor loads the model once, and they form a torch.distributed group over an explicit TCP rendezvous at
rank 0's address: NCCL with one GPU per worker, gloo on CPU workers or when workers share a GPU. Rank 0 also
runs the stages too small to shard (the base stage first), so the driver holds no model.

Metrics: the gang carries the driver's `RenderMetrics`; it records placement and worker failures there, and
when it records anything, every worker records its own steps, bytes received and memory through Ray's.
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from cluster.placement import bundle_for, connect, workers_that_fit
from cluster.queue import wait_for_gang
from renderer.cascade.worker import Report, Worker
from renderer.errors import RenderError, WorkerLost
from renderer.executor.base import Executor
from renderer.executor.spec import ExecutorSpec
from renderer.messages import CheckpointSink, ModelInfo, RankResult, StageJob
from renderer.metrics.recorder import NULL_METRICS, RenderMetrics
from renderer.progress import Progress


def use_interface_of(host: str) -> str | None:
    """Make gloo and NCCL talk over the network interface that holds `host` (the node's address, which Ray and the
    rendezvous use), unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise. Without it gloo takes the
    address the machine's hostname resolves to, which on a multi-homed host (or a network namespace) may be an
    interface the other hosts cannot reach, or none this host has."""
    import os

    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == host for address in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return name
    return None


class GangWorker:
    """One worker process (a Ray actor): a `Worker` with its own threads and, on a shared GPU, its memory cap."""

    def __init__(self, spec: ExecutorSpec, threads: int, device: str, gpu_share: float):
        torch.set_num_threads(threads)
        if device == "cuda" and gpu_share < 1:
            torch.cuda.set_per_process_memory_fraction(gpu_share)  # Ray's fractional GPUs do not cap memory
        self.worker = Worker(spec.model, device, spec.dtype, spec.model_config, motion_adapter=spec.motion_adapter, loras=spec.loras)
        self.pixels: np.ndarray | None = None
        self.rank = 0

    def rendezvous_address(self) -> str:
        """host:port of a free port on this worker's node (called on rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind(("", 0))
            return f"{host}:{probe.getsockname()[1]}"

    def join(self, rank: int, world: int, address: str, backend: str, timeout_s: float) -> str:
        """Join the process group over the interface of this worker's Ray node address; returns that address."""
        import ray

        host = ray.util.get_node_ip_address()
        use_interface_of(host)
        self.worker.join(rank, world, address, backend, timeout_s)
        self.rank = rank
        return host

    def info(self) -> ModelInfo:
        return self.worker.info()

    def run(self, job: StageJob, report: QueueReport) -> RankResult:
        """Run the job and decode this rank's strip of the final image (kept here until `final_rows`); return the rest."""
        from renderer.cascade.stage_loop import received_since
        from renderer.parallel.strips import received_bytes

        metrics = RenderMetrics.ray() if report.record_metrics else NULL_METRICS
        result = self.worker.run(job, report.for_rank(self.rank, metrics))
        exchanged = dict(received_bytes)
        pixels = np.concatenate(list(self.worker.final_rows()))  # a clip's frames one after another
        self.pixels = pixels.reshape(job.frames, -1, *pixels.shape[1:])
        metrics.exchanged_all(result.rank, received_since(exchanged))
        peak, limit = self.worker.peak()
        metrics.peak_memory(result.rank, peak, limit)
        result.peak_bytes = peak
        return result

    def memory(self) -> tuple[str, int]:
        """What this worker's memory is shared with (its GPU, or for a CPU worker its node), and how many
        bytes of it are free."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        place = f"GPU {ray.get_gpu_ids()} of node {node}" if self.worker.device.type == "cuda" else f"node {node}"
        return place, self.worker.memory()[1]

    def final_rows(self, frame: int = 0) -> list[np.ndarray]:
        """This rank's rows of the final image (of a clip: of one frame), decoded by `run`; the last frame's take
        frees them all."""
        pixels = self.pixels[frame]
        if frame == len(self.pixels) - 1:
            self.pixels = None
        return [pixels]


@dataclass(frozen=True)
class QueueReport:
    """What a gang's ranks report through (`Executor.reporting`): a Ray queue on the driver's node, which the
    driver empties while it waits for them."""

    queue: object  # ray.util.queue.Queue
    record_metrics: bool  # each worker records its steps, bytes received and memory through `ray.util.metrics`
    checkpoints: bool  # checkpoint rows go to the driver

    def for_rank(self, rank: int, metrics: RenderMetrics) -> Report:
        """Rank 0 reports its stages and steps; every rank its checkpoint rows."""
        def hand_over(stage, step, span, latents, reference) -> None:
            self.queue.put(("checkpoint", stage, step, span, latents, reference))

        return Report(RelayProgress(self.queue) if rank == 0 else None, hand_over if self.checkpoints else None, metrics)


class RelayProgress(Progress):
    """Rank 0's progress and stage times, forwarded to the driver's bars and metrics through a Ray queue."""

    def __init__(self, queue):
        super().__init__(enabled=False)
        self.queue = queue

    def stage(self, label: str, steps: int) -> None:
        self.queue.put(("stage", label, steps))

    def advance(self) -> None:
        self.queue.put(("advance",))

    def finished(self, stage: int, seconds: float) -> None:
        self.queue.put(("finished", stage, seconds))


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


class Gang(Executor):
    """The request's ranks as Ray actors in one placement group, reserved (waiting for room up to the spec's queue
    timeout) and refused at once if its workers lack the `need` bytes each beyond the model that the plan says
    (before any stage runs); `close` frees the workers and their reservation.

    `metrics`: the driver's, where placement and worker failures are counted; unless it is the no-op,
    the workers record their own metrics through Ray's."""

    def __init__(self, spec: ExecutorSpec, metrics: RenderMetrics = NULL_METRICS, need: int | None = None):
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
        self.relaying: tuple | None = None  # (queue, progress, on_checkpoint) while a job runs
        try:
            self.waited_s = wait_for_gang(self.group, [bundle] * spec.workers, spec.queue_timeout_s, metrics)
            self.placed_at, self.bundle = time.time(), bundle
            try:
                self._start(spec, bundle, gpus)
            except ray.exceptions.RayError as error:
                metrics.worker_failed("error")
                raise RenderError(f"a worker failed to start: {failure(error)}") from error
            self.device = "cuda" if gpus else "cpu"
            self.ranks = spec.workers
            if need is not None:
                self.check_memory(need)
        except BaseException:  # also a stop (SIGTERM, Ctrl-C) while waiting: free what was reserved
            self.close()
            raise

    @classmethod
    def connect(cls, spec: ExecutorSpec) -> None:
        connect(spec.address, spec.workers)

    @classmethod
    def ranks_that_fit(cls, spec: ExecutorSpec, wanted: int) -> int:
        return workers_that_fit(spec.gpus_per_worker, wanted)

    def _start(self, spec: ExecutorSpec, bundle: dict, gpus: float) -> None:
        """One actor per bundle, each loading the model, then the process group (rank 0 hosts the rendezvous)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = ray.remote(GangWorker)
        self.workers = [
            actor.options(
                num_cpus=bundle["CPU"], num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote(spec, max(1, int(bundle["CPU"])), "cuda" if gpus else "cpu", gpus)
            for rank in range(spec.workers)
        ]
        self.backend = "nccl" if gpus >= 1 else "gloo"
        address = ray.get(self.workers[0].rendezvous_address.remote())
        self.nodes = ray.get([worker.join.remote(rank, spec.workers, address, self.backend, spec.collective_timeout_s)
                              for rank, worker in enumerate(self.workers)])

    def close(self) -> None:
        """Kill the workers and free their reservation (once; later calls do nothing)."""
        import ray

        if self.group is None:
            return
        for worker in self.workers:
            ray.kill(worker)
        self._remove(self.group)
        self.group = None

    def collective(self, method: str, *args, ranks: Sequence[int] | None = None) -> list:
        """The workers' results; while a job runs, what they report is relayed every half second. The first failure
        of any rank ends the call (a `WorkerLost` where a new gang could go on), without waiting for the others."""
        import ray

        chosen = range(len(self.workers)) if ranks is None else ranks
        pending = [getattr(self.workers[rank], method).remote(*args) for rank in chosen]
        order = {ref: index for index, ref in enumerate(pending)}
        results: dict[int, object] = {}
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                self.relay()
                for ref in ready:
                    results[order[ref]] = ray.get(ref)
            self.relay()
        except ray.exceptions.RayError as error:  # the gang is torn down by its pool; one rank's failure ends all
            raise self.failed(error) from error
        return [results[index] for index in range(len(order))]

    @contextmanager
    def reporting(self, progress: Progress, on_checkpoint: CheckpointSink | None) -> Iterator[QueueReport]:
        """A queue on the driver's own node, which needs no CPU for it, so that losing a worker's host never takes
        the queue with it."""
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.relaying = (queue, progress, on_checkpoint)
        try:
            yield QueueReport(queue, self.metrics.enabled, on_checkpoint is not None)
        finally:
            self.relaying = None
            queue.shutdown()

    def relay(self) -> None:
        """Replay what the workers reported: progress on the driver's bars, checkpoint rows to `on_checkpoint`."""
        if self.relaying is None:
            return
        queue, progress, on_checkpoint = self.relaying
        for event in queue.get_nowait_batch(queue.qsize()):
            if event[0] == "stage":
                progress.stage(*event[1:])
            elif event[0] == "advance":
                progress.advance()
            elif event[0] == "finished":
                progress.finished(*event[1:])
            else:
                on_checkpoint(*event[1:])

    def check_memory(self, need: int) -> None:
        """Refuse, before any stage runs, a gang whose workers would need more than the memory they share:
        `need` bytes each (the plan's estimate beyond the loaded model), against what their GPU or node has
        free, less the 5 % Ray's memory monitor keeps before it kills a worker."""
        places, free = zip(*self.collective("memory"))
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

    def failed(self, error: Exception) -> RenderError:
        """What a rank's failure ends the render with, counted: a `WorkerLost` where a new gang could go on."""
        import ray

        self.metrics.worker_failed(failure_reason(error))
        if lost_worker(error):
            return WorkerLost(f"a worker was lost: {failure(error)}")
        if isinstance(error, ray.exceptions.OutOfMemoryError):  # a restart would only run out again
            return RenderError("a worker ran out of memory (Ray's memory monitor stopped it); "
                               "spread the workers over more nodes, or try --vae-mode tiled, --fast-mode or a smaller "
                               "--size (--dry-run shows the estimate)")
        return RenderError(f"a worker failed: {failure(error)}")
