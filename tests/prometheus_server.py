"""A real Prometheus server for tests, and where the tests find `prometheus` and `promtool`.

The binaries come from Debian's `prometheus` package unpacked into .venv/prometheus by
tools/fetch_prometheus.sh (nothing installed system-wide); PROMETHEUS_BIN_DIR overrides, and a
`promtool` and `prometheus` on PATH are taken last. Tests that need them fail (they do not skip: the metrics
would go unchecked) with the command to run when they are missing.

    with prometheus_server([{"job_name": "app", "static_configs": [{"targets": ["127.0.0.1:8000"]}]}]) as prom:
        prom.wait_for('up{job="app"}', lambda v: v == 1)
        prom.query("sum(rate(x_total[1m]))")   # the result list of /api/v1/query

The server listens on 127.0.0.1 on a free port, scrapes every second, keeps its data in a temporary folder,
and is stopped (and the folder removed) when the block ends, whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
FETCH_SCRIPT = REPO / "tools" / "fetch_prometheus.sh"
DEFAULT_BIN_DIR = REPO / ".venv" / "prometheus" / "usr" / "bin"


def find_binary(name: str) -> Path | None:
    """`prometheus` or `promtool`: PROMETHEUS_BIN_DIR, then .venv/prometheus/usr/bin, then PATH."""
    for folder in (os.environ.get("PROMETHEUS_BIN_DIR"), DEFAULT_BIN_DIR):
        if folder and (Path(folder) / name).is_file() and os.access(Path(folder) / name, os.X_OK):
            return Path(folder) / name
    found = shutil.which(name)
    return Path(found) if found else None


def require_binary(name: str) -> Path:
    """The binary, or fail the calling test with what to run."""
    import pytest

    path = find_binary(name)
    if path is None:
        pytest.fail(f"{name} not found: run `tools/fetch_prometheus.sh .venv/prometheus` (make install does), "
                    "or point PROMETHEUS_BIN_DIR at a folder holding prometheus and promtool", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.url = url
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _get(self, path: str, params: dict | None = None, timeout: float = 10) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=timeout) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> list[dict]:
        """Instant query through the HTTP API: the `result` list (vector: [{"metric": {...}, "value": [t, "v"]}])."""
        body = self._get("/api/v1/query", {"query": expr})
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def query_value(self, expr: str) -> float | None:
        """The value of a query that gives at most one series; None when it gives none."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{expr!r} gave {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["data"]["activeTargets"]

    def wait_for(self, expr: str, predicate: Callable[[float | None], bool], timeout: float = 30) -> float | None:
        """Polls `query_value(expr)` until `predicate` holds; fails with the last value, the targets and the log."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.query_value(expr)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} = {value} after {timeout} s; targets: {self.targets()}\n{self.log()}")
            time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(server: PrometheusServer, timeout: float) -> bool:
    """True when /-/ready answers 200; False when the process exited first (a port taken, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Prometheus not ready after {timeout} s:\n{server.log()}")


@contextmanager
def prometheus_server(scrape_configs: list[dict], ready_timeout: float = 60) -> Iterator[PrometheusServer]:
    """A Prometheus server on 127.0.0.1 (free port) with these scrape configs, scraping every second."""
    binary = require_binary("prometheus")
    folder = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
    process = None
    try:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        for attempt in range(3):  # the free port may be taken between free_port() and the bind
            port = free_port()
            log_path = folder / f"prometheus-{attempt}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [str(binary), f"--config.file={folder / 'prometheus.yml'}",
                     f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder)
            server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
            if _wait_ready(server, ready_timeout):
                break
            _stop(process)
        else:
            raise RuntimeError(f"Prometheus did not start:\n{server.log()}")
        yield server
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)
