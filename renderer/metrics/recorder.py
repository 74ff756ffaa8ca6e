"""Prometheus metrics of the renderer: defined once (`SPECS`), recorded through one small object
(`RenderMetrics`), exported one of three ways.

Choose the way with `metrics_for(port, on_ray)`:

* ``metrics_for(port=P)`` (a render without Ray, ``--metrics-port P``): `prometheus_client` with its own
  registry (never the global one, and without ``*_created`` series), served over HTTP on ``addr:P``
  (``/metrics``). The names are exactly those of `SPECS`: ``freescale_steps_completed_total{stage,rank}``.
* ``metrics_for(on_ray=True)`` (the Ray driver and every worker actor): `ray.util.metrics`. Every process
  records into its node's Ray metrics agent, which serves all of them on the node's metrics export port
  (``--metrics-export-port``; 8080, port name ``metrics``, under KubeRay) with a ``ray_`` prefix:
  ``ray_freescale_steps_completed_total{stage,rank}``. Ray adds the labels ``Component``, ``NodeAddress``,
  ``SessionName``, ``Version``, ``WorkerId`` (one series per process) and ``otel_scope_*``, so queries
  aggregate with ``sum by (...)``. Counters keep the ``_total`` of `SPECS` (Ray 2.60 exports no legacy
  gauge twin) and stay in the agent after the process exits; a gauge that is not set again within two
  report intervals (20 s) disappears, so this backend sets its gauges again every few seconds while the
  process lives, and they vanish shortly after it ends. Ray cannot add 0 to a counter: a counter series
  appears at its first event.
* ``metrics_for()`` (neither): a no-op; every method returns at once.

Values recorded just before a process exits reach Prometheus only if it lives until the next scrape
(prometheus_client) or the next report to the agent (Ray, every 10 s): `close(linger_s=...)` waits first.

Which process records what: the driver records the render (in progress, outcome, progress and ETA, stage
durations as rank 0 reports them, worker failures, gang placement failures, output bytes, checkpoints); each
rank records its steps, bytes received and device memory under its rank (a single-process render as rank 0).

Labels are bounded: ``stage`` (cascade stage index, base = 0), ``rank`` (the rank that ran the
step: 0 for the stages rank 0 runs alone, the base first), ``outcome`` (`OUTCOMES`),
``kind`` (`EXCHANGE_KINDS`, as counted in `renderer.parallel.strips.received_bytes`), ``reason`` (`FAILURE_REASONS`).
Never a prompt, path, seed or render id: those go to the sidecar and the logs.

Where the render records (see `renderer.engine.render(metrics=...)`): steps through `stepping`, a progress that
the step loops (`renderer.cascade.stage_loop.run_stages`, base stage included) advance; progress, ETA and stage durations
through `following`, the driver's progress, which sees a gang's rank 0 steps relayed; the rest at one call each.

Dashboards and alerts: ``deploy/monitoring/``.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

from renderer.metrics.specs import (  # noqa: F401 (the specs are part of this module's API)
    BATCH_OUTCOMES, DURATION_BUCKETS, WAIT_BUCKETS, EXCHANGE_KINDS, FAILURE_REASONS, OUTCOMES, PREFIX, RAY_GAUGE_REFRESH_S, RAY_PREFIX, SPEC, SPECS,
    MetricSpec, _BATCH_LEFT, _BATCH_POSTERS, _CHECKPOINTS, _ETA, _EXCHANGED, _IN_PROGRESS, _LIMIT, _OUTPUT_BYTES, _PEAK, _PLACEMENT_FAILURES, _PROGRESS,
    _RENDERS, _STAGE_SECONDS, _STEP_SECONDS, _STEPS, _WAIT_SECONDS, _WAITING, _WORKER_FAILURES, _amount, _index, _one_of,
)
from renderer.metrics.backends import PrometheusBackend, RayBackend
from renderer.progress import Progress


class _NullBackend:
    def inc(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        pass

    def set(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        pass

    def add(self, spec: MetricSpec, labels: tuple[str, ...], delta: float) -> None:
        pass

    def observe(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        pass

    def close(self) -> None:
        pass


_ray_backend: RayBackend | None = None  # the process's, made at its first use
_ray_lock = threading.Lock()


def _ray_backend_of_process() -> RayBackend:
    global _ray_backend
    with _ray_lock:
        if _ray_backend is None:
            _ray_backend = RayBackend()
        return _ray_backend


# --- the API -----------------------------------------------------------------------------------------

class RenderMetrics:
    """What the renderer records; every method is one line at its call site and never raises on a
    backend that exports nothing. Arguments are checked (bounded label values, amounts >= 0) on every
    backend, so that a wrong call fails in the tests rather than on the cluster."""

    def __init__(self, backend=None):
        self.backend = backend if backend is not None else _NullBackend()

    @classmethod
    def prometheus(cls) -> RenderMetrics:
        """prometheus_client backend, not yet served (see `serve`)."""
        return cls(PrometheusBackend())

    @classmethod
    def ray(cls) -> RenderMetrics:
        """ray.util.metrics backend (call after ray.init, or inside an actor)."""
        return cls(_ray_backend_of_process())

    @property
    def enabled(self) -> bool:
        """False for the no-op."""
        return not isinstance(self.backend, _NullBackend)

    # Progress that records what it sees (the step loops report through a `renderer.progress.Progress`).
    def stepping(self, progress: Progress, stage: int, rank: int) -> Progress:
        """`progress`, and every step of `stage` that advances it recorded as `step_finished(stage, rank, time
        since the previous step, or since this call for the first)`. The no-op gives `progress` itself."""
        return _Tap(progress, _StepClock(self, stage, rank)) if self.enabled else progress

    def following(self, progress: Progress, plan: Mapping[int, tuple[int, int]]) -> Progress:
        """`progress`, and from its stage and step events the render's progress ratio and ETA (`progress`).
        `plan`: stage index -> (denoising steps, pixels) of every stage of the render that denoises. The no-op
        gives `progress` itself."""
        return _Tap(progress, _RenderProgress(self, plan)) if self.enabled else progress

    # The render as a whole (the driver).
    def render_started(self) -> None:
        self.backend.add(_IN_PROGRESS, (), 1)
        self.backend.set(_PROGRESS, (), 0.0)

    def render_finished(self, outcome: str) -> None:
        """`outcome`: "succeeded", "failed" or "stopped"."""
        _one_of("outcome", outcome, OUTCOMES)
        self.backend.add(_IN_PROGRESS, (), -1)
        self.backend.inc(_RENDERS, (outcome,), 1)
        if outcome == "succeeded":
            self.progress(1.0, 0.0)

    @contextmanager
    def rendering(self, stopped_on: tuple[type[BaseException], ...] = (KeyboardInterrupt,)) -> Iterator[RenderMetrics]:
        """``with metrics.rendering(): ...``: render_started, then render_finished with "succeeded", "stopped"
        (an exception of `stopped_on` went through) or "failed" (any other exception went through)."""
        self.render_started()
        try:
            yield self
        except stopped_on:
            self.render_finished("stopped")
            raise
        except BaseException:
            self.render_finished("failed")
            raise
        self.render_finished("succeeded")

    def progress(self, ratio: float, eta_seconds: float | None = None) -> None:
        """Fraction of the render's steps done (clamped to [0, 1]) and, when known, the seconds left."""
        self.backend.set(_PROGRESS, (), min(1.0, _amount("progress ratio", ratio)))
        if eta_seconds is not None:
            self.backend.set(_ETA, (), _amount("eta_seconds", eta_seconds))

    def stage_finished(self, stage: int, seconds: float) -> None:
        self.backend.observe(_STAGE_SECONDS, (_index("stage", stage),), _amount("seconds", seconds))

    def step_finished(self, stage: int, rank: int, seconds: float) -> None:
        """One denoising step of `stage` done by `rank`."""
        labels = (_index("stage", stage), _index("rank", rank))
        self.backend.inc(_STEPS, labels, 1)
        self.backend.observe(_STEP_SECONDS, labels[:1], _amount("seconds", seconds))

    # Workers.
    def exchanged(self, kind: str, rank: int, nbytes: int) -> None:
        """`nbytes` received by `rank` in an exchange of `kind` (conv, window, blur, vae, ring, sum)."""
        labels = (_one_of("exchange kind", kind, EXCHANGE_KINDS), _index("rank", rank))
        self.backend.inc(_EXCHANGED, labels, _amount("nbytes", nbytes))

    def exchanged_all(self, rank: int, nbytes_by_kind: Mapping[str, int]) -> None:
        """`exchanged` for every kind of a mapping such as a difference of `renderer.parallel.strips.received_bytes`."""
        for kind, nbytes in nbytes_by_kind.items():
            self.exchanged(kind, rank, nbytes)

    def peak_memory(self, rank: int, nbytes: int, limit_bytes: int | None = None) -> None:
        """Peak device memory of `rank` and, when known, what the device has in all (the memory alert
        compares the two)."""
        labels = (_index("rank", rank),)
        self.backend.set(_PEAK, labels, _amount("nbytes", nbytes))
        if limit_bytes is not None:
            self.backend.set(_LIMIT, labels, _amount("limit_bytes", limit_bytes))

    # Failures and output (the driver).
    def worker_failed(self, reason: str = "lost") -> None:
        """`reason`: "lost" (actor or node died), "timeout" (a collective or rendezvous timed out), "error"."""
        self.backend.inc(_WORKER_FAILURES, (_one_of("failure reason", reason, FAILURE_REASONS),), 1)

    def placement_failed(self) -> None:
        self.backend.inc(_PLACEMENT_FAILURES, (), 1)

    def waiting(self, delta: int) -> None:
        """A render's gang starts (1) or stops (-1) waiting for the cluster."""
        self.backend.add(_WAITING, (), delta)

    def batch_left(self, posters: int) -> None:
        """A batch of `posters` starts."""
        self.backend.set(_BATCH_LEFT, (), float(_index("posters", posters)))

    def batch_poster(self, outcome: str) -> None:
        """One poster of the batch is finished (or skipped, failed, stopped)."""
        self.backend.inc(_BATCH_POSTERS, (_one_of("outcome", outcome, BATCH_OUTCOMES),), 1)
        self.backend.add(_BATCH_LEFT, (), -1)

    def gang_waited(self, seconds: float) -> None:
        self.backend.observe(_WAIT_SECONDS, (), _amount("seconds", seconds))

    def output_written(self, nbytes: int) -> None:
        self.backend.inc(_OUTPUT_BYTES, (), _amount("nbytes", nbytes))

    def checkpoint_written(self) -> None:
        self.backend.inc(_CHECKPOINTS, (), 1)

    # prometheus_client backend only.
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on addr:port (0: a free port); returns the port."""
        if not isinstance(self.backend, PrometheusBackend):
            raise TypeError("metrics: only the prometheus_client backend serves HTTP")
        return self.backend.serve(port, addr)

    @property
    def port(self) -> int | None:
        return getattr(self.backend, "port", None)

    def exposition(self) -> bytes:
        """The text exposition format, as served (prometheus_client backend only)."""
        if not isinstance(self.backend, PrometheusBackend):
            raise TypeError("metrics: only the prometheus_client backend has an exposition here")
        import prometheus_client as pc

        return pc.generate_latest(self.backend.registry)

    def close(self, linger_s: float = 0.0) -> None:
        """Waits `linger_s` seconds (so that the last values get scraped or reported), then stops the HTTP
        server (prometheus_client) or the gauge refresher (Ray)."""
        try:
            if linger_s > 0 and self.enabled:
                time.sleep(linger_s)
        finally:
            self.backend.close()


NULL_METRICS = RenderMetrics()


# --- following the step loops ---------------------------------------------------------------------------

class _Tap(Progress):
    """`inner`'s bars (and position), with every stage and step also told to `listener`."""

    def __init__(self, inner: Progress, listener):
        super().__init__(enabled=False)
        self.inner, self.listener = inner, listener
        self.enabled = True  # wants every event: a gang's rank 0 relays its steps to a progress that is enabled

    def stage(self, label: str, steps: int) -> None:
        self.listener.stage(label, steps)
        self.inner.stage(label, steps)

    def advance(self) -> None:  # the step is done: recorded even if the bar raises (a stop arriving there)
        self.listener.advance()
        self.inner.advance()

    def finished(self, stage: int, seconds: float) -> None:
        self.listener.finished(stage, seconds)
        self.inner.finished(stage, seconds)

    def position(self) -> str | None:
        return self.inner.position()

    def close(self) -> None:
        self.inner.close()


class _StepClock:
    def __init__(self, metrics: RenderMetrics, stage: int, rank: int):
        self.metrics, self.index, self.rank = metrics, stage, rank
        self.last = time.perf_counter()

    def stage(self, label: str, steps: int) -> None:
        self.last = time.perf_counter()

    def advance(self) -> None:
        now = time.perf_counter()
        self.metrics.step_finished(self.index, self.rank, now - self.last)
        self.last = now

    def finished(self, stage: int, seconds: float) -> None:
        pass


STAGE_LABEL = re.compile(r"stage (\d+)\b")  # progress labels: "stage 2 1024x1024[ on 4 workers]"


class _RenderProgress:
    """The fraction of the render's denoising steps done, and the seconds left at the rate so far, with each
    step weighted by its stage's pixels (a 4x larger stage's steps take about 4x as long).

    A stage event says which stage runs and how many of its steps are left: the stages before it are done, those
    after it not begun (so a gang restarted from a checkpoint moves the ratio back where it belongs)."""

    def __init__(self, metrics: RenderMetrics, plan: Mapping[int, tuple[int, int]]):
        self.metrics = metrics
        self.full = {stage: steps for stage, (steps, _) in plan.items()}
        self.cost = {stage: float(pixels) for stage, (_, pixels) in plan.items()}
        self.left = dict(self.full)
        self.total = sum(self.full.values())
        self.current: int | None = None
        self.started: float | None = None
        self.work = 0.0  # pixel-steps done since the first stage event

    def stage(self, label: str, steps: int) -> None:
        match = STAGE_LABEL.match(label)
        if match is None or int(match.group(1)) not in self.full:
            return
        self.current = int(match.group(1))
        for stage, full in self.full.items():
            self.left[stage] = 0 if stage < self.current else full if stage > self.current else min(steps, full)
        if self.started is None:
            self.started = time.perf_counter()
        self.report()

    def advance(self) -> None:
        if self.current is None:
            return
        self.left[self.current] = max(0, self.left[self.current] - 1)
        self.work += self.cost[self.current]
        self.report()

    def finished(self, stage: int, seconds: float) -> None:
        self.metrics.stage_finished(stage, seconds)

    def report(self) -> None:
        left = sum(self.left.values())
        eta = None
        if self.work > 0 and self.started is not None:
            rate = self.work / max(time.perf_counter() - self.started, 1e-9)
            eta = sum(self.left[stage] * self.cost[stage] for stage in self.left) / rate
        self.metrics.progress(1.0 - left / self.total if self.total else 0.0, eta)


def metrics_for(port: int | None = None, on_ray: bool = False, addr: str = "0.0.0.0") -> RenderMetrics:
    """The metrics of this process: Ray's (`on_ray`: the Ray driver and worker actors), prometheus_client
    served on addr:port (`port`, 0 for a free one: a render without Ray), or the no-op."""
    if on_ray:
        if port is not None:
            raise ValueError("metrics: a render on Ray exports through Ray's metrics export port; "
                             "a metrics port of our own is for renders without Ray")
        return RenderMetrics.ray()
    if port is not None:
        metrics = RenderMetrics.prometheus()
        metrics.serve(port, addr)
        return metrics
    return NULL_METRICS
