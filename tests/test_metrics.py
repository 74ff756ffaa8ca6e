"""renderer.metrics.recorder: the spec table follows Prometheus' naming rules, every method reaches its metric on the
prometheus_client backend (exposition checked by promtool and parsed back), the Ray backend's bookkeeping
(with a stand-in for ray.util.metrics), and a real Prometheus server scraping the HTTP endpoint."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prometheus_server import prometheus_server, require_binary
import renderer.metrics.backends
from renderer.metrics import recorder as m
from renderer.metrics.recorder import SPECS, RenderMetrics, metrics_for

BOUNDED_LABELS = {"stage", "rank", "outcome", "kind", "reason"}
UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio")


def exercise_all(metrics: RenderMetrics) -> None:
    """Every recording method once or more, with every value of every bounded label set."""
    for outcome in m.OUTCOMES:
        with pytest.raises(KeyboardInterrupt) if outcome == "stopped" else (
                pytest.raises(RuntimeError) if outcome == "failed" else _nothing()):
            with metrics.rendering():
                metrics.progress(0.25, eta_seconds=600)
                metrics.step_finished(0, 0, 0.2)
                metrics.stage_finished(0, 30.0)
                if outcome == "stopped":
                    raise KeyboardInterrupt
                if outcome == "failed":
                    raise RuntimeError("boom")
    metrics.render_started()
    for rank in range(2):
        metrics.step_finished(1, rank, 1.5)
        metrics.exchanged_all(rank, {kind: 1000 * (rank + 1) for kind in m.EXCHANGE_KINDS})
        metrics.peak_memory(rank, 3 << 30, limit_bytes=80 << 30)
    metrics.exchanged("ring", 0, 4096)
    metrics.stage_finished(1, 95.0)
    metrics.progress(0.75, 120.0)
    for reason in m.FAILURE_REASONS:
        metrics.worker_failed(reason)
    metrics.placement_failed()
    metrics.waiting(1)
    metrics.gang_waited(42.0)
    metrics.batch_left(len(m.BATCH_OUTCOMES))
    for outcome in m.BATCH_OUTCOMES:
        metrics.batch_poster(outcome)
    metrics.waiting(-1)
    metrics.output_written(123456)
    metrics.checkpoint_written()
    metrics.render_finished("succeeded")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def exposition_after_exercise() -> str:
    metrics = RenderMetrics.prometheus()
    exercise_all(metrics)
    return metrics.exposition().decode()


def sample_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


# --- the spec table -----------------------------------------------------------------------------------

def test_specs_follow_naming_rules():
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))
    for spec in SPECS:
        assert spec.name.startswith(m.PREFIX), spec.name
        assert spec.name == spec.name.lower() and " " not in spec.name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert set(spec.labels) <= BOUNDED_LABELS, spec.name
        assert spec.help and spec.help.endswith(".")
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds")
            assert list(spec.buckets) == sorted(set(spec.buckets))
            assert spec.buckets[0] <= 0.05 and spec.buckets[-1] >= 3600
        else:
            assert spec.buckets is None
    # base units where a quantity has one
    for short in ("render_eta_seconds", "render_progress_ratio", "device_memory_peak_bytes",
                  "device_memory_limit_bytes", "exchange_received_bytes_total", "output_bytes_total"):
        assert any(unit in short for unit in UNIT_SUFFIXES) and m.PREFIX + short in m.SPEC


# --- the prometheus_client backend ----------------------------------------------------------------------

def test_exposition_passes_promtool():
    promtool = require_binary("promtool")
    text = exposition_after_exercise()
    result = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "_created" not in text


def test_exposition_parses_back_to_the_specs():
    families = {family.name: family for family in text_string_to_metric_families(exposition_after_exercise())}
    expected = {spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name: spec for spec in SPECS}
    assert set(families) == set(expected)
    for name, spec in expected.items():
        family = families[name]
        assert family.type == spec.kind, name
        assert family.documentation == spec.help
        assert family.samples, f"{name}: no sample after exercising every method"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(spec.labels), (name, sample)
        if spec.kind == "histogram":
            bounds = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
            assert bounds == sorted([*map(float, spec.buckets), float("inf")])


def test_values_after_exercise():
    metrics = RenderMetrics.prometheus()
    exercise_all(metrics)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}

    def value(name, **labels):
        return values[(name, tuple(sorted(labels.items())))]

    assert value("freescale_renders_in_progress") == 0
    for outcome in m.OUTCOMES:
        assert value("freescale_renders_total", outcome=outcome) == (2 if outcome == "succeeded" else 1)
    assert value("freescale_steps_completed_total", stage="0", rank="0") == 3
    assert value("freescale_steps_completed_total", stage="1", rank="1") == 1
    assert value("freescale_step_duration_seconds_count", stage="1") == 2
    assert value("freescale_stage_duration_seconds_sum", stage="1") == 95.0
    assert value("freescale_exchange_received_bytes_total", kind="ring", rank="0") == 1000 + 4096
    assert value("freescale_exchange_received_bytes_total", kind="conv", rank="1") == 2000
    assert value("freescale_device_memory_peak_bytes", rank="1") == 3 << 30
    assert value("freescale_device_memory_limit_bytes", rank="1") == 80 << 30
    assert value("freescale_render_progress_ratio") == 1.0  # the last render succeeded
    assert value("freescale_render_eta_seconds") == 0.0
    assert value("freescale_worker_failures_total", reason="timeout") == 1
    assert value("freescale_gang_placement_failures_total") == 1
    assert value("freescale_output_bytes_total") == 123456
    assert value("freescale_checkpoints_written_total") == 1


def test_known_label_values_start_at_zero():
    """A failure counter exists at 0 before the first failure, so that increase() sees the first one."""
    text = RenderMetrics.prometheus().exposition().decode()
    for outcome in m.OUTCOMES:
        assert f'freescale_renders_total{{outcome="{outcome}"}} 0.0' in text
    for reason in m.FAILURE_REASONS:
        assert f'freescale_worker_failures_total{{reason="{reason}"}} 0.0' in text


@pytest.mark.parametrize("metrics", [RenderMetrics(), RenderMetrics.prometheus()], ids=["null", "prometheus"])
def test_unbounded_or_wrong_values_are_refused(metrics):
    with pytest.raises(ValueError, match="outcome"):
        metrics.render_finished("ok")
    with pytest.raises(ValueError, match="exchange kind"):
        metrics.exchanged("halo", 0, 10)
    with pytest.raises(ValueError, match="failure reason"):
        metrics.worker_failed("oom-on-node-10.0.0.7")
    with pytest.raises(ValueError, match="rank"):
        metrics.step_finished(1, -1, 0.5)
    with pytest.raises(ValueError, match="stage"):
        metrics.stage_finished("a lighthouse at dusk", 3.0)
    with pytest.raises(ValueError, match="nbytes"):
        metrics.output_written(-5)
    with pytest.raises(ValueError, match="seconds"):
        metrics.step_finished(1, 0, float("nan"))


def test_null_backend_and_backend_choice():
    assert metrics_for() is m.NULL_METRICS
    exercise_all(metrics_for())  # records nothing, raises nothing
    metrics_for().close(linger_s=60)  # and has nothing to wait for
    with pytest.raises(TypeError):
        metrics_for().exposition()
    with pytest.raises(ValueError, match="metrics export port"):
        metrics_for(9100, on_ray=True)


def test_served_over_http():
    metrics = metrics_for(0, addr="127.0.0.1")
    try:
        assert metrics.port
        metrics.step_finished(2, 1, 0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'freescale_steps_completed_total{rank="1",stage="2"} 1.0' in text
        assert "_created" not in text
        assert "python_gc" not in text  # our registry, not the global one
    finally:
        metrics.close()


# --- the Ray backend, with a stand-in for ray.util.metrics ---------------------------------------------

class _FakeRayMetric:
    def __init__(self, name, description="", tag_keys=None, boundaries=None):
        self.name, self.tag_keys, self.boundaries = name, tag_keys or (), boundaries
        self.records: list[tuple[str, float, dict]] = []
        self.lock = threading.Lock()

    def _check(self, tags):
        assert set(tags) == set(self.tag_keys) and all(isinstance(v, str) for v in tags.values()), tags

    def inc(self, value=1.0, tags=None):
        assert value > 0, "Ray refuses a counter increment <= 0"
        self._check(tags)
        self.records.append(("inc", value, tags))

    def set(self, value, tags=None):
        self._check(tags)
        with self.lock:
            self.records.append(("set", value, tags))

    def observe(self, value, tags=None):
        self._check(tags)
        self.records.append(("observe", value, tags))


@pytest.fixture
def fake_ray(monkeypatch):
    import ray.util

    fake = types.SimpleNamespace(Counter=_FakeRayMetric, Gauge=_FakeRayMetric, Histogram=_FakeRayMetric)
    monkeypatch.setitem(sys.modules, "ray.util.metrics", fake)
    monkeypatch.setattr(ray.util, "metrics", fake, raising=False)
    monkeypatch.setattr(m, "_ray_backend", None)
    monkeypatch.setattr(renderer.metrics.backends, "RAY_GAUGE_REFRESH_S", 0.05)  # read where the Ray backend refreshes
    yield
    if m._ray_backend is not None:
        m._ray_backend.close()


def test_ray_backend(fake_ray):
    metrics = metrics_for(on_ray=True)
    assert metrics_for(on_ray=True).backend is metrics.backend  # one set of Ray metric objects per process
    exercise_all(metrics)
    objects = metrics.backend._metrics
    assert set(objects) == {spec.name for spec in SPECS}  # Ray exports "ray_" + these names
    for spec in SPECS:
        assert objects[spec.name].tag_keys == spec.labels
        if spec.kind == "histogram":
            assert objects[spec.name].boundaries == list(spec.buckets)
    steps = objects["freescale_steps_completed_total"].records
    assert ("inc", 1, {"stage": "1", "rank": "0"}) in steps
    in_progress = [value for op, value, _ in objects["freescale_renders_in_progress"].records]
    assert in_progress[:2] == [1, 0] and in_progress[-1] == 0
    metrics.exchanged("conv", 3, 0)  # nothing to add: no call (Ray refuses 0)

    # Gauges are set again while the process lives, so that Ray's agent keeps them.
    peak = objects["freescale_device_memory_peak_bytes"]
    before = len(peak.records)
    time.sleep(0.5)
    with peak.lock:
        again = peak.records[before:]
    assert again and all(record == ("set", 3 << 30, {"rank": record[2]["rank"]}) for record in again)
    metrics.close()
    time.sleep(0.2)
    stopped = len(peak.records)
    time.sleep(0.3)
    assert len(peak.records) == stopped


# --- a real Prometheus server scrapes the served endpoint ------------------------------------------------

def test_prometheus_scrapes_the_steps_counter():
    require_binary("prometheus")
    metrics = metrics_for(0, addr="127.0.0.1")
    steps = 7
    try:
        for _ in range(steps):
            metrics.step_finished(1, 0, 0.4)
        job = {"job_name": "freescale", "static_configs": [{"targets": [f"127.0.0.1:{metrics.port}"]}]}
        with prometheus_server([job]) as prom:
            prom.wait_for('up{job="freescale"}', lambda v: v == 1)
            value = prom.wait_for('freescale_steps_completed_total{job="freescale",stage="1",rank="0"}',
                                  lambda v: v is not None)
            assert value == steps
            assert prom.query_value('sum(freescale_step_duration_seconds_count{job="freescale"})') == steps
            assert prom.query('freescale_renders_total_created') == []
    finally:
        metrics.close()
