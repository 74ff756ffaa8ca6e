"""The renderer's metrics, defined once: names, kinds, help, labels and buckets (`SPECS`), and the checks every
recorded value passes (bounded label values, amounts >= 0). `renderer.metrics.recorder` records them."""

from __future__ import annotations

import math
from dataclasses import dataclass

PREFIX = "freescale_"
RAY_PREFIX = "ray_"  # what Ray's metrics agent puts before every application metric

OUTCOMES = ("succeeded", "failed", "stopped")
BATCH_OUTCOMES = ("succeeded", "skipped", "failed", "stopped")
EXCHANGE_KINDS = ("conv", "window", "blur", "vae", "resize", "ring", "sum", "guidance", "handoff")
FAILURE_REASONS = ("lost", "timeout", "error")

# From a 50 ms step of the tiny model on a GPU up to a four-hour 16K stage.
# From a gang placed at once on a free cluster to a poster that waited behind a night of others.
WAIT_BUCKETS = (0.05, 0.5, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)

# Ray drops a gauge observation it has not received for 2 report intervals (2 x 10 s by default).
RAY_GAUGE_REFRESH_S = 5.0


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exported by prometheus_client; Ray exports "ray_" + name
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms only


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("freescale_renders_in_progress", "gauge", "Renders started and not yet finished."),
    MetricSpec("freescale_renders_total", "counter", "Renders finished, by outcome (succeeded, failed, stopped).",
               ("outcome",)),
    MetricSpec("freescale_stage_duration_seconds", "histogram",
               "Wall time of one cascade stage (base = stage 0), transitions and decode included.",
               ("stage",), DURATION_BUCKETS),
    MetricSpec("freescale_step_duration_seconds", "histogram",
               "Wall time of one denoising step (both guidance halves), as each rank saw it.",
               ("stage",), DURATION_BUCKETS),
    MetricSpec("freescale_steps_completed_total", "counter",
               "Denoising steps completed, by stage and the rank that ran them.",
               ("stage", "rank")),
    MetricSpec("freescale_render_progress_ratio", "gauge",
               "Fraction of the current render's denoising steps done, 0 to 1."),
    MetricSpec("freescale_render_eta_seconds", "gauge", "Estimated seconds until the current render is done."),
    MetricSpec("freescale_exchange_received_bytes_total", "counter",
               "Bytes a worker received from the other workers of its gang, by kind of exchange.",
               ("kind", "rank")),
    MetricSpec("freescale_device_memory_peak_bytes", "gauge",
               "Peak memory of a worker's device (CUDA allocator peak; peak resident memory on CPU).", ("rank",)),
    MetricSpec("freescale_device_memory_limit_bytes", "gauge",
               "Memory a worker's device has (CUDA total memory; the bound set for a CPU worker).", ("rank",)),
    MetricSpec("freescale_worker_failures_total", "counter",
               "Workers that failed during a render, by reason (lost, timeout, error).", ("reason",)),
    MetricSpec("freescale_gang_placement_failures_total", "counter",
               "Gangs of workers that the cluster could not place in time."),
    MetricSpec("freescale_renders_waiting", "gauge",
               "Renders whose gang of workers waits for the cluster to free its resources."),
    MetricSpec("freescale_gang_wait_seconds", "histogram",
               "Seconds a render's gang of workers waited for the cluster before it was placed.", (), WAIT_BUCKETS),
    MetricSpec("freescale_batch_posters_total", "counter",
               "Posters of a batch finished, by outcome (succeeded, skipped: already complete, failed, stopped).", ("outcome",)),
    MetricSpec("freescale_batch_posters_left", "gauge", "Posters of the running batch not yet finished."),
    MetricSpec("freescale_output_bytes_total", "counter", "Bytes written to output files."),
    MetricSpec("freescale_checkpoints_written_total", "counter", "Checkpoints written."),
)
SPEC: dict[str, MetricSpec] = {spec.name: spec for spec in SPECS}


def _spec(short: str) -> MetricSpec:
    return SPEC[PREFIX + short]


_IN_PROGRESS = _spec("renders_in_progress")
_RENDERS = _spec("renders_total")
_STAGE_SECONDS = _spec("stage_duration_seconds")
_STEP_SECONDS = _spec("step_duration_seconds")
_STEPS = _spec("steps_completed_total")
_PROGRESS = _spec("render_progress_ratio")
_ETA = _spec("render_eta_seconds")
_EXCHANGED = _spec("exchange_received_bytes_total")
_PEAK = _spec("device_memory_peak_bytes")
_LIMIT = _spec("device_memory_limit_bytes")
_WORKER_FAILURES = _spec("worker_failures_total")
_PLACEMENT_FAILURES = _spec("gang_placement_failures_total")
_WAITING = _spec("renders_waiting")
_BATCH_POSTERS = _spec("batch_posters_total")
_BATCH_LEFT = _spec("batch_posters_left")
_WAIT_SECONDS = _spec("gang_wait_seconds")
_OUTPUT_BYTES = _spec("output_bytes_total")
_CHECKPOINTS = _spec("checkpoints_written_total")


def _index(what: str, value: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"metrics: {what} must be an int >= 0, got {value!r}")
    return str(value)


def _one_of(what: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"metrics: {what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _amount(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"metrics: {what} must be a finite number >= 0, got {value!r}")
    return value
