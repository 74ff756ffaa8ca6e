"""A real, private Ray head for tests: `ray start --head` from the project venv, on free ports, stopped exactly.

    from ray_head import running_head           # tests/ is on sys.path under pytest
    with running_head() as head:
        head.ray("job", "submit", "--address", head.dashboard_url, "--", "freescale-render", ...)
        head.gcs_address          # "127.0.0.1:PORT": RAY_ADDRESS, ray.init(address=...)
        head.dashboard_url        # "http://127.0.0.1:PORT": Jobs API, state API (`ray list ... --address`), dashboard
        head.metrics_export_port  # the node's Prometheus endpoint: http://127.0.0.1:PORT/metrics
        head.env                  # environment for client processes: this head's token, RAY_ADDRESS and
                                  # RAY_API_SERVER_ADDRESS, the venv's bin first on PATH
        head.api("/api/jobs/")    # GET on the dashboard's REST API (with the token), parsed JSON

or the module-scoped pytest fixture `ray_head` (import it into a test module or conftest:
`from ray_head import ray_head  # noqa: F401`, then take `ray_head` as an argument).

Clients run in subprocesses with `head.env`: the test process itself keeps no Ray state. (To call
`ray.init(address=head.gcs_address)` in-process, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from `head.env`
in os.environ before Ray first reads its token; Ray caches it.)

Isolation from other Ray instances on the same machine:
* every port Ray would otherwise take from a fixed default (GCS 6379, dashboard 8265, client server 10001,
  dashboard agent 52365, worker ports 10002-19999, ...) is pinned to a port found free;
* its own `--temp-dir` (so `address="auto"` elsewhere never finds it, and it never finds theirs);
* its own authentication token, passed through the environment (not ~/.ray/auth_token, which other
  processes on the machine share and may replace);
* loopback only: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-node mode) the node's address is
  127.0.0.1 and every server of the head (GCS, raylet, object manager, agents, client server, metrics,
  dashboard) listens there only; otherwise Ray replaces `--node-ip-address 127.0.0.1` by the machine's
  routable address (`ray._private.services.resolve_ip_for_localhost`) and binds to all interfaces;
* stopping never uses `ray stop` (which kills every Ray on the host): it signals only this head's processes,
  found by the session `ray start` ran in (started with its own session id), by the temp dir in their
  command lines, and their descendants (job drivers start their own sessions), raylet first and the GCS
  last like `ray stop`, SIGKILL after a short grace period. The temp dir is removed afterwards.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

VENV_BIN = Path(sys.executable).parent  # the project venv's bin: `ray`, `freescale-render`, its python
RAY = str(VENV_BIN / "ray")


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    metrics_export_port: int
    temp_dir: Path
    env: dict[str, str]
    ports: dict[str, int]
    started: float
    session_id: int

    def ray(self, *args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run the venv's `ray` CLI against this head (with its environment); stdout/stderr captured as text."""
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)

    def api(self, path: str, timeout: float = 30):
        """GET a JSON resource of the dashboard's REST API, e.g. `/api/jobs/` or `/api/jobs/<submission id>`."""
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list KIND --filter F...` over the dashboard's state API (`/api/v0/KIND`), which the CLI calls too,
        without the CLI's start-up (seconds of CPU on a loaded 2-core machine). A filter is `key=value` or
        `key!=value`, e.g. `state!=DEAD`."""
        params = [("limit", "1000")]
        for item in filters:
            key, predicate, value = re.fullmatch(r"(\w+)(!?=)(.*)", item).groups()
            params += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        reply = self.api(f"/api/v0/{kind}?{urllib.parse.urlencode(params)}")
        assert reply["result"], f"the state API failed to list {kind}: {reply.get('msg')}"
        return reply["data"]["result"]["result"]

    def job_client(self):
        """A `ray.job_submission.JobSubmissionClient` for this head (the token goes in a header)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})

    def session_dir(self) -> Path:
        return (self.temp_dir / "session_latest").resolve()

    def processes(self) -> list[psutil.Process]:
        """Every live process of this head: its session's, those naming its temp dir, and their descendants."""
        marker = str(self.temp_dir)
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["pid", "cmdline", "create_time"]):
            try:
                if process.info["create_time"] < self.started - 1:
                    continue  # older than the head: a reused session id or pid cannot be ours
                mine = os.getsid(process.pid) == self.session_id or any(marker in part for part in process.info["cmdline"] or ())
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
            if mine:
                found[process.pid] = process
        for process in list(found.values()):
            try:
                for child in process.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop exactly this head: raylet, then everything else, then the GCS (SIGTERM, SIGKILL after grace_s)."""
        def name(process: psutil.Process) -> str:
            try:
                return " ".join(process.cmdline()[:1]) or process.name()
            except psutil.Error:
                return ""

        for _ in range(3):  # processes may start while the others stop (workers, agents): sweep again
            processes = self.processes()
            if not processes:
                break
            raylets = [p for p in processes if "/raylet/raylet" in name(p)]
            gcs = [p for p in processes if "/gcs/gcs_server" in name(p)]
            others = [p for p in processes if p not in raylets and p not in gcs]
            for bucket in (raylets, others, gcs):
                terminate(bucket, grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def terminate(processes: list[psutil.Process], grace_s: float) -> None:
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def port_is_free(port: int) -> bool:
    """Free on every interface (Ray's servers bind to all of them) and on loopback."""
    for host in ("", "127.0.0.1"):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        if port not in taken and port_is_free(port):
            taken.add(port)
            return port


def free_port_range(count: int, taken: set[int]) -> tuple[int, int]:
    """`count` consecutive free ports below the usual ephemeral range (for Ray's worker port pool)."""
    for _ in range(200):
        first = random.randrange(20000, 32000 - count)
        ports = range(first, first + count)
        if not taken.intersection(ports) and all(port_is_free(port) for port in ports):
            taken.update(ports)
            return first, first + count - 1
    raise RuntimeError(f"no {count} consecutive free ports found")


def wait_for_jobs_api(url: str, token: str, deadline: float, process_check) -> None:
    """Until the Jobs API lists jobs (the dashboard's job module is up, not just its port)."""
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    last = None
    while time.monotonic() < deadline:
        process_check()
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    json.loads(response.read())
                    return
        except (urllib.error.URLError, OSError, ValueError) as error:
            last = error
        time.sleep(0.5)
    raise TimeoutError(f"the Ray Jobs API at {url} did not answer: {last}")


def start_head(num_cpus: int, num_gpus: int, object_store_memory: int, timeout_s: float, worker_ports: int,
               extra_args: tuple[str, ...]) -> RayHead:
    """`ray start --head` on free ports, until its Jobs API answers; on failure, whatever it started is stopped."""
    taken: set[int] = set()
    ports = {name: free_port(taken) for name in (
        "port", "dashboard-port", "metrics-export-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")}
    min_worker, max_worker = free_port_range(worker_ports, taken)
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-node mode: the node is 127.0.0.1, servers listen there only
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # job entrypoints find the venv's programs
    })
    command = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--object-store-memory", str(object_store_memory),
        "--temp-dir", str(temp_dir), "--disable-usage-stats", "--log-style", "record", "--log-color", "false",
        "--min-worker-port", str(min_worker), "--max-worker-port", str(max_worker),
        *(arg for name, port in ports.items() for arg in (f"--{name}", str(port))), *extra_args,
    ]
    started = time.time()
    with tempfile.TemporaryFile("w+") as log:
        starter = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        head = RayHead(
            gcs_address=f"127.0.0.1:{ports['port']}", dashboard_url=f"http://127.0.0.1:{ports['dashboard-port']}",
            metrics_export_port=ports["metrics-export-port"], temp_dir=temp_dir, ports=ports, started=started,
            session_id=starter.pid,
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{ports['port']}", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['dashboard-port']}"},
        )

        def check_starter() -> None:
            if starter.poll() not in (None, 0):
                log.seek(0)
                raise RuntimeError(f"`ray start` failed ({starter.returncode}):\n{log.read()[-4000:]}")

        try:
            deadline = time.monotonic() + timeout_s
            try:
                starter.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            check_starter()
            wait_for_jobs_api(head.dashboard_url, token, deadline, check_starter)
        except BaseException:
            if starter.poll() is None:
                starter.kill()
                starter.wait()
            head.stop()
            raise
    return head


@contextmanager
def running_head(num_cpus: int = 2, num_gpus: int = 0, object_store_memory: int = 200 * 1024**2, timeout_s: float = 120,
                 worker_ports: int = 200, extra_args: tuple[str, ...] = (), attempts: int = 3) -> Iterator[RayHead]:
    """Start a private Ray head (a new set of free ports for each of `attempts`, in case another process took
    one meanwhile), yield it, and always stop it (and only it)."""
    for attempt in range(attempts):
        try:
            head = start_head(num_cpus, num_gpus, object_store_memory, timeout_s, worker_ports, extra_args)
            break
        except (RuntimeError, TimeoutError):
            if attempt == attempts - 1:
                raise
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    with running_head() as head:
        yield head
