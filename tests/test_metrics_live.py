"""The render's metrics end to end: a real Prometheus (tests/prometheus_server.py, on loopback) scrapes a tiny
render's own `--metrics-port` server, and the metrics export port of a real Ray head (tests/ray_head.py) on
which a 2-worker render ran; the values found through Prometheus' query API are the steps each rank ran.
Then what the render records on the ways it can end (succeeded, failed, stopped), the progress ratio and ETA,
and the options' one-line errors, without Prometheus.

Stages 256x256,512x512 with --steps 4 run 4 base steps and 4 - floor(0.3 * 4) = 3 steps of stage 1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from polling import wait_until
from prometheus_server import free_port, prometheus_server
from ray_head import ray_head  # noqa: F401  (the module's Ray head fixture, started only by the Ray test)
from renderer import RenderRequest, render
from renderer.cli.options import build_parser, request_from_args
from renderer.errors import RenderError
from renderer.metrics.recorder import RenderMetrics
from renderer.progress import Progress
from renderer.resume.stopping import RenderStopped

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--prompt", "a red kite", "--seed", "3", "--stages", "256x256,512x512", "--steps", "4", "--tile-size", "256"]
BASE_STEPS, UPSCALING_STEPS = 4, 3


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def scraped_once(prom, port: int) -> bool:
    """Whether Prometheus has tried to scrape 127.0.0.1:`port` (it reports a zero time before its first try)."""
    return any(target["labels"].get("instance") == f"127.0.0.1:{port}" and not target["lastScrape"].startswith("0001")
               for target in prom.targets())


def by_label(prom, expr: str, label: str) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in prom.query(expr)}


# --- a render without Ray serves its own metrics -------------------------------------------------------------

def test_prometheus_scrapes_a_single_process_render_on_its_metrics_port(tiny_pipeline, tmp_path):
    """--metrics-port on 127.0.0.1 with a short --metrics-linger: after render() returns, Prometheus has the
    last values (the server lived past the last scrape), and the port is closed."""
    port = free_port()
    args = [*ARGS, "--out", str(tmp_path / "poster.tif"), "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
            "--metrics-linger", "4"]
    request = request_from_args(build_parser().parse_args(args))
    job = {"job_name": "render", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
    with prometheus_server([job]) as prom:
        # Prometheus finds a target up to 5 s after its start (discovery updates are throttled): wait until its
        # scrape loop has run once (against a closed port), so that the 4 s linger spans about 4 scrapes.
        wait_until(lambda: scraped_once(prom, port), 30, lambda: f"targets {prom.targets()}")
        render(request, pipeline=tiny_pipeline, progress=False, metrics=True)

        def last(expr: str) -> str:  # the target is gone (its series are stale): read the last samples
            return f"last_over_time({expr}[5m])"

        steps = prom.wait_for(f"sum({last('freescale_steps_completed_total')})", lambda v: v is not None, timeout=10)
        assert steps == BASE_STEPS + UPSCALING_STEPS
        rank0 = last('freescale_steps_completed_total{rank="0"}')
        assert by_label(prom, f"sum by (stage) ({rank0})", "stage") == {"0": BASE_STEPS, "1": UPSCALING_STEPS}
        assert prom.query_value(last('freescale_renders_total{outcome="succeeded"}')) == 1
        assert prom.query_value(last('freescale_renders_total{outcome="failed"}')) == 0
        assert prom.query_value(last("freescale_renders_in_progress")) == 0
        assert prom.query_value(last("freescale_render_progress_ratio")) == 1
        assert prom.query_value(last("freescale_render_eta_seconds")) == 0
        assert by_label(prom, last("freescale_stage_duration_seconds_count"), "stage") == {"0": 1, "1": 1}
        assert prom.query_value(f"sum({last('freescale_step_duration_seconds_count')})") == BASE_STEPS + UPSCALING_STEPS
        assert prom.query_value(last("freescale_output_bytes_total")) == folder_bytes(tmp_path)  # poster.tif + .json
        assert prom.query_value(last("freescale_checkpoints_written_total")) == 2  # the end of each stage
        peak = prom.query_value(last('freescale_device_memory_peak_bytes{rank="0"}'))
        assert 0 < peak < prom.query_value(last('freescale_device_memory_limit_bytes{rank="0"}'))
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


# --- a render on Ray: the driver and every worker record through Ray's metrics agent ---------------------------

DRIVER = """
import sys
from renderer.cli.options import build_parser, request_from_args
from renderer.engine import render

render(request_from_args(build_parser().parse_args(sys.argv[1:])), progress=False, metrics=True)
"""


def test_prometheus_scrapes_a_two_worker_render_from_the_ray_heads_metrics_port(ray_head, tmp_path):  # noqa: F811
    """A driver joins the head (--address) and renders with 2 CPU workers. Ray's agent serves what every
    process recorded, with a ray_ prefix: each rank's steps of stage 1, the driver's base steps as rank 0, one
    render succeeded, bytes received and memory per worker rank, the output's size."""
    job = {"job_name": "ray", "scrape_interval": "2s", "scrape_timeout": "2s",
           "static_configs": [{"targets": [f"127.0.0.1:{ray_head.metrics_export_port}"]}]}
    with prometheus_server([job]) as prom:
        out = tmp_path / "poster.tif"
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, *ARGS, "--workers", "2", "--address", ray_head.gcs_address, "--out", str(out)],
            env=ray_head.env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert driver.returncode == 0, driver.stdout + driver.stderr

        def steps() -> dict[str, float]:
            return by_label(prom, 'sum by (rank) (ray_freescale_steps_completed_total{stage="1"})', "rank")

        wait_until(lambda: steps() == {"0": UPSCALING_STEPS, "1": UPSCALING_STEPS}, 60,
                   lambda: f"stage 1 steps by rank {steps()}; targets {prom.targets()}")
        wait_until(lambda: prom.query_value('sum(ray_freescale_renders_total{outcome="succeeded"})') == 1, 30,
                   lambda: prom.query("ray_freescale_renders_total"))
        assert by_label(prom, 'sum by (rank) (ray_freescale_steps_completed_total{stage="0"})', "rank") == {"0": BASE_STEPS}
        assert by_label(prom, "sum by (stage) (ray_freescale_stage_duration_seconds_count)", "stage") == {"0": 1, "1": 1}
        assert prom.query_value("sum(ray_freescale_output_bytes_total)") == folder_bytes(tmp_path)
        received = by_label(prom, "sum by (rank) (ray_freescale_exchange_received_bytes_total)", "rank")
        assert set(received) == {"0", "1"} and min(received.values()) > 0
        peak = by_label(prom, "max by (rank) (max_over_time(ray_freescale_device_memory_peak_bytes[5m]))", "rank")
        limit = by_label(prom, "max by (rank) (max_over_time(ray_freescale_device_memory_limit_bytes[5m]))", "rank")
        assert set(peak) == set(limit) == {"0", "1"}
        assert all(0 < peak[rank] < limit[rank] for rank in peak)
        assert prom.query("ray_freescale_worker_failures_total") == []  # a Ray counter appears at its first event


# --- how a render ends, progress, options (no Prometheus) ----------------------------------------------------

def samples(metrics: RenderMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(metrics: RenderMetrics, name: str, **labels) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


class Interrupting(Progress):
    """Silent progress that raises `error` at the first step of stage 1 (as a stop signal would there)."""

    def __init__(self, error: BaseException):
        super().__init__(enabled=False)
        self.error, self.current = error, ""

    def stage(self, label: str, steps: int) -> None:
        self.current = label

    def advance(self) -> None:
        if self.current.startswith("stage 1"):
            raise self.error


@pytest.mark.parametrize("error, outcome", [(RenderStopped("SIGTERM"), "stopped"), (RuntimeError("boom"), "failed")])
def test_a_stopped_or_failed_render_is_counted_by_outcome(tiny_pipeline, tmp_path, error, outcome):
    metrics = RenderMetrics.prometheus()
    request = RenderRequest(prompt="p", stages=((256, 256), (512, 512)), steps=4, out=tmp_path / "x.png")
    with pytest.raises(type(error)):
        render(request, pipeline=tiny_pipeline, progress=Interrupting(error), write=False, metrics=metrics)
    assert value(metrics, "freescale_renders_total", outcome=outcome) == 1
    assert sum(value(metrics, "freescale_renders_total", outcome=o) for o in ("succeeded", "failed", "stopped")) == 1
    assert value(metrics, "freescale_renders_in_progress") == 0
    assert value(metrics, "freescale_steps_completed_total", stage="0", rank="0") == BASE_STEPS
    assert value(metrics, "freescale_steps_completed_total", stage="1", rank="0") == 1
    assert value(metrics, "freescale_stage_duration_seconds_count", stage="0") == 1
    assert value(metrics, "freescale_stage_duration_seconds_count", stage="1") is None
    assert value(metrics, "freescale_render_progress_ratio") == pytest.approx(5 / 7)


class Gauges:
    """A backend that keeps what is set (the progress ratio and ETA)."""

    def __init__(self):
        self.values = {}

    def set(self, spec, labels, value):
        self.values[spec.name] = value

    def inc(self, spec, labels, value):
        pass

    add = observe = inc


def test_progress_ratio_and_eta_follow_stages_and_steps_weighted_by_pixels(monkeypatch):
    """Base 4 steps of 1 pixel-unit, stage 1 3 steps of 4 units: after the base (4 of 16 units in 4 s) 12 units
    are left at 1 unit/s. A gang restarted from a checkpoint announces stage 1 again: the ratio goes back."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    gauges = Gauges()
    progress = RenderMetrics(gauges).following(Progress(False), {0: (4, 256 * 256), 1: (3, 512 * 512)})
    ratio = lambda: gauges.values["freescale_render_progress_ratio"]  # noqa: E731
    eta = lambda: gauges.values.get("freescale_render_eta_seconds")  # noqa: E731
    progress.stage("stage 0 256x256", 4)
    assert ratio() == 0 and eta() is None
    for _ in range(4):
        now[0] += 1
        progress.advance()
    assert ratio() == pytest.approx(4 / 7) and eta() == pytest.approx(12.0)
    progress.stage("stage 1 512x512 on 2 workers", 3)
    now[0] += 4
    progress.advance()
    assert ratio() == pytest.approx(5 / 7) and eta() == pytest.approx(8 * 8 / 8)
    progress.stage("stage 1 512x512 on 1 workers", 3)  # restarted from the stage's start
    assert ratio() == pytest.approx(4 / 7)
    for _ in range(3):
        progress.advance()
    assert ratio() == 1 and eta() == 0
    assert RenderMetrics().following(progress, {}) is progress  # the no-op adds nothing


@pytest.mark.parametrize("args, message", [
    (["--metrics-port", "70000"], r"^--metrics-port 70000 must be a port number from 0 to 65535"),
    (["--metrics-port", "9100", "--workers", "2"], r"^--metrics-port 9100 serves a render without Ray; with --workers"),
    (["--metrics-linger", "-1"], r"^--metrics-linger -1.0 must be a number of seconds >= 0"),
    (["--metrics-linger", "nan"], r"^--metrics-linger nan must be"),
])
def test_metrics_options_are_one_line_errors(tmp_path, args, message):
    with pytest.raises(RenderError, match=message) as caught:
        request_from_args(build_parser().parse_args([*ARGS, "--out", str(tmp_path / "x.tif"), *args]))
    assert "\n" not in str(caught.value)


def test_a_taken_metrics_port_is_a_one_line_error(tiny_pipeline, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        request = RenderRequest(prompt="p", stages=((256, 256),), steps=1, out=tmp_path / "x.png", metrics_port=port,
                                metrics_addr="127.0.0.1")
        with pytest.raises(RenderError, match=rf"^--metrics-port {port}: cannot serve metrics on 127.0.0.1:{port} \(") as caught:
            render(request, pipeline=tiny_pipeline, progress=False, write=False, metrics=True)
    assert "\n" not in str(caught.value)


def test_without_metrics_a_render_records_nothing_and_serves_nothing(tiny_pipeline, tmp_path):
    """render()'s default, and metrics=True without --metrics-port or --workers: the no-op (no server, no wait)."""
    port = free_port()
    for metrics, changes in ((False, {"metrics_port": port, "metrics_addr": "127.0.0.1"}), (True, {})):
        request = RenderRequest(prompt="p", stages=((256, 256),), steps=1, out=tmp_path / "x.png", **changes)
        started = time.monotonic()
        render(request, pipeline=tiny_pipeline, progress=False, write=False, metrics=metrics)
        assert time.monotonic() - started < 10  # no --metrics-linger wait (15 s by default)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
