"""Where metrics go: `prometheus_client` with its own registry, or `ray.util.metrics` (see `renderer.metrics.recorder`).
Each backend takes inc / set / add / observe on a spec with label values in the spec's order."""

from __future__ import annotations

import threading

from renderer.metrics.specs import BATCH_OUTCOMES, FAILURE_REASONS, OUTCOMES, RAY_GAUGE_REFRESH_S, SPEC, SPECS, MetricSpec, _BATCH_POSTERS, _RENDERS, _WORKER_FAILURES


class _WithoutCreated:
    """Collector over an inner registry that leaves out the ``*_created`` samples prometheus_client adds
    to counters and histograms (without touching the process-wide `disable_created_metrics` switch)."""

    def __init__(self, inner):
        self.inner = inner

    def collect(self):
        for family in self.inner.collect():
            family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family


class PrometheusBackend:
    def __init__(self):
        import prometheus_client as pc

        inner = pc.CollectorRegistry(auto_describe=True)
        self._metrics = {}
        for spec in SPECS:
            if spec.kind == "counter":
                metric = pc.Counter(spec.name, spec.help, spec.labels, registry=inner)
            elif spec.kind == "gauge":
                metric = pc.Gauge(spec.name, spec.help, spec.labels, registry=inner)
            else:
                metric = pc.Histogram(spec.name, spec.help, spec.labels, registry=inner, buckets=spec.buckets)
            self._metrics[spec.name] = metric
        # Series of known label values exist from the start at 0, so that rate() and increase() see the
        # first event of each.
        for outcome in OUTCOMES:
            self._metrics[_RENDERS.name].labels(outcome)
        for reason in FAILURE_REASONS:
            self._metrics[_WORKER_FAILURES.name].labels(reason)
        for outcome in BATCH_OUTCOMES:
            self._metrics[_BATCH_POSTERS.name].labels(outcome)
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.registry.register(_WithoutCreated(inner))
        self.server = None
        self.port: int | None = None

    def _child(self, spec: MetricSpec, labels: tuple[str, ...]):
        metric = self._metrics[spec.name]
        return metric.labels(*labels) if labels else metric

    def inc(self, spec, labels, value):
        self._child(spec, labels).inc(value)

    def set(self, spec, labels, value):
        self._child(spec, labels).set(value)

    def add(self, spec, labels, delta):
        self._child(spec, labels).inc(delta)

    def observe(self, spec, labels, value):
        self._child(spec, labels).observe(value)

    def serve(self, port: int, addr: str) -> int:
        import prometheus_client as pc

        self.server, _thread = pc.start_http_server(port, addr=addr, registry=self.registry)
        self.port = self.server.server_port
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class RayBackend:
    """ray.util.metrics, one set of metric objects per process; gauges are set again every
    `RAY_GAUGE_REFRESH_S` seconds so that the metrics agent keeps them while the process lives."""

    def __init__(self):
        from ray.util import metrics as rm

        self._metrics = {}
        for spec in SPECS:
            if spec.kind == "counter":
                metric = rm.Counter(spec.name, spec.help, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                metric = rm.Gauge(spec.name, spec.help, tag_keys=spec.labels)
            else:
                metric = rm.Histogram(spec.name, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels)
            self._metrics[spec.name] = metric
        self._gauges: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @staticmethod
    def _tags(spec, labels):
        return dict(zip(spec.labels, labels))

    def inc(self, spec, labels, value):
        if value > 0:  # Ray refuses 0
            self._metrics[spec.name].inc(value, tags=self._tags(spec, labels))

    def set(self, spec, labels, value):
        with self._lock:
            self._set(spec, labels, value)

    def add(self, spec, labels, delta):
        with self._lock:
            self._set(spec, labels, self._gauges.get((spec.name, labels), 0.0) + delta)

    def _set(self, spec, labels, value):
        self._gauges[(spec.name, labels)] = value
        self._metrics[spec.name].set(value, tags=self._tags(spec, labels))
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh, args=(self._stop,), name="freescale-metrics",
                                               daemon=True)
            self._refresher.start()

    def observe(self, spec, labels, value):
        self._metrics[spec.name].observe(value, tags=self._tags(spec, labels))

    def _refresh(self, stop: threading.Event) -> None:
        while not stop.wait(RAY_GAUGE_REFRESH_S):
            with self._lock:
                for (name, labels), value in self._gauges.items():
                    self._metrics[name].set(value, tags=self._tags(SPEC[name], labels))

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self._stop = threading.Event()
            self._refresher = None
