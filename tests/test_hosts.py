"""A render farm of four hosts on one machine: network namespaces made by the test, joined by veth pairs to a
bridge in a namespace of its own (10.210.0.0/24; nothing is added to the machine's own namespace), a Ray head
on one host (no CPUs: it runs the driver), a one-CPU worker node on each of the three others, and a token. A
2-worker gang cannot fit on one worker host, so its ranks always run on two hosts and exchange over the
bridge (gloo bound to the hosts' interfaces, `cluster.gang.use_interface_of`); the driver on the head streams
their strips from them. Faults: a worker host's link cut mid-stage, and its raylet killed (the driver held
until that host's workers have exited: they may be past the stage's end, and a live worker still hands over
its rows); each render ends, on the hosts left, in the very bytes of an undisturbed render, resumed from the
newest checkpoint, with the sidecar's `restarts` saying what was lost (the host comes back before the next
test). The driver killed mid-stage: the same command resumes. The fixture always stops every Ray process it started and deletes its namespaces, also on failure.

Detection is governed by the head's GCS health checks (set here, `HEALTH_CHECKS`) and the render's
`--collective-timeout`; docs/benchmarks.md has the measured times.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest
from PIL import Image

from ray_head import RAY, VENV_BIN, RayHead
from renderer.cli import main
from renderer.output.files import sidecar_path

NET = "10.210.0"
HOSTS = {"head": 1, "w1": 2, "w2": 3, "w3": 4}  # host -> last byte of its address
WORKER_HOSTS = ("w1", "w2", "w3")
# GCS health checks of every node: a host is declared dead after about period x threshold of silence.
HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
# How often a worker process checks that its raylet lives, and exits when it does not (Ray's default).
RAYLET_DEATH_CHECK = {"RAY_raylet_death_check_interval_milliseconds": "1000"}
COLLECTIVE_TIMEOUT_S = 60  # above a detection by the health checks, so that a host's loss is seen as the node's
STEPS = 12
RENDER = ["--prompt", "a red kite", "--seed", "3", "--stages", "256x256,512x512", "--steps", str(STEPS), "--quiet"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Farm:
    prefix: str
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fsh", dir="/tmp")))
    nodes: dict[str, RayHead] = field(default_factory=dict)

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{NET}.{HOSTS[host]}"

    @property
    def gcs(self) -> str:
        return f"{self.address('head')}:6379"

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        return {**env, **HEALTH_CHECKS, **RAYLET_DEATH_CHECK, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def build(self) -> None:
        """The namespaces, a bridge in the switch's, and each host's veth with its address (links up, lo too)."""
        switch = self.ns("switch")
        ip("netns", "add", switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for host, last in HOSTS.items():
            ip("netns", "add", self.ns(host))
            ip("-n", switch, "link", "add", f"p{last}", "type", "veth", "peer", "name", "eth0", "netns", self.ns(host))
            ip("-n", switch, "link", "set", f"p{last}", "master", "br0", "up")
            ip("-n", self.ns(host), "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", self.ns(host), "link", "set", "eth0", "up")
            ip("-n", self.ns(host), "link", "set", "lo", "up")

    def start(self, host: str) -> None:
        """`ray start` on `host` (the head: no CPUs; a worker host: one), until it is up."""
        temp_dir = self.temp / f"{host}-{len(self.nodes)}-{time.monotonic_ns() % 10**6}"
        command = ["ip", "netns", "exec", self.ns(host), RAY, "start", "--node-ip-address", self.address(host),
                   "--temp-dir", str(temp_dir), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
                   "--log-style", "record", "--log-color", "false"]
        if host == "head":
            command += ["--head", "--port", "6379", "--num-cpus", "0", "--include-dashboard", "false"]
        else:
            command += ["--address", self.gcs, "--num-cpus", "1"]
        started = time.time()
        starter = subprocess.Popen(command, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        self.nodes[host] = RayHead(gcs_address=self.gcs, dashboard_url="", metrics_export_port=0, temp_dir=temp_dir,
                                   env=self.env(), ports={}, started=started, session_id=starter.pid)
        output, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, f"`ray start` on {host} failed:\n{output[-3000:]}"

    def driver(self, *args: str) -> list[str]:
        """The command that runs freescale-render on the head host, against the farm."""
        return ["ip", "netns", "exec", self.ns("head"), str(VENV_BIN / "freescale-render"), *args, "--address", self.gcs]

    def gang_workers(self, host: str) -> list[psutil.Process]:
        """The gang workers (actors of `cluster.gang.GangWorker`) that run on `host` now."""
        found = []
        for process in self.nodes[host].processes() if host in self.nodes else []:
            try:
                if "GangWorker" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def gang_hosts(self) -> list[str]:
        """The worker hosts where a gang worker runs now."""
        return [host for host in WORKER_HOSTS if self.gang_workers(host)]

    def cut(self, host: str) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "down")

    def kill_raylet(self, host: str) -> None:
        """SIGKILL the host's raylet, and return once the gang workers it started have exited (each within
        Ray's raylet death check; under load, allow many of its periods)."""
        workers = self.gang_workers(host)
        for process in self.nodes[host].processes():
            try:
                if "/raylet/raylet" in " ".join(process.cmdline()[:1]):
                    process.kill()
            except psutil.Error:
                pass
        period_s = int(RAYLET_DEATH_CHECK["RAY_raylet_death_check_interval_milliseconds"]) / 1000
        _, alive = psutil.wait_procs(workers, timeout=30 * period_s)
        assert not alive, f"gang workers {[process.pid for process in alive]} outlived their raylet on {host}"

    def bring_back(self, host: str) -> None:
        """The host comes back: whatever is left of its Ray node stopped, its link up, a new node started."""
        self.nodes.pop(host).stop(grace_s=1)
        ip("-n", self.ns(host), "link", "set", "eth0", "up")
        self.start(host)
        wait_for_nodes(self, len(WORKER_HOSTS) + 1)

    def close(self) -> None:
        for host in [*WORKER_HOSTS, "head"]:
            if host in self.nodes:
                self.nodes.pop(host).stop(grace_s=2)
        for host in [*HOSTS, "switch"]:
            ip("netns", "delete", self.ns(host), check=False)  # its veths (and the bridge) go with it
        shutil.rmtree(self.temp, ignore_errors=True)


def wait_for_nodes(farm: Farm, count: int, timeout_s: float = 120) -> None:
    """Until the head lists `count` live nodes (asked from the head host)."""
    probe = ("import ray, time, sys; ray.init(address=sys.argv[1], log_to_driver=False); deadline = time.time() + float(sys.argv[3])\n"
             "while sum(node['Alive'] for node in ray.nodes()) != int(sys.argv[2]) and time.time() < deadline: time.sleep(0.5)\n"
             "sys.exit(sum(node['Alive'] for node in ray.nodes()) != int(sys.argv[2]))")
    done = subprocess.run(["ip", "netns", "exec", farm.ns("head"), str(VENV_BIN / "python"), "-c", probe, farm.gcs, str(count),
                           str(timeout_s)], env=farm.env(), capture_output=True, text=True, timeout=timeout_s + 60)
    assert done.returncode == 0, f"the farm did not reach {count} live nodes:\n{done.stderr[-3000:]}"


def namespaces_allowed() -> str | None:
    """None where this process may make network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"fsprobe{os.getpid()}"
    made = ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here ({made.stderr.strip() or made.returncode})"
    ip("netns", "delete", name, check=False)
    return None


@pytest.fixture(scope="module")
def farm() -> Iterator[Farm]:
    why_not = namespaces_allowed()
    if why_not:
        pytest.skip(f"multi-host tests need network namespaces (root): {why_not}")
    made = Farm(prefix=f"fs{os.getpid() % 100000}")
    try:
        made.build()
        for host in HOSTS:
            made.start(host)
        wait_for_nodes(made, len(HOSTS))
        yield made
    finally:
        made.close()


@dataclass
class Run:
    returncode: int
    lines: list[tuple[float, str]]  # (time.monotonic(), line) of the driver's output


def run_driver(farm: Farm, out: Path, fault=None, timeout_s: float = 300) -> Run:
    """Render `RENDER` on a 2-worker gang from the head host into `out`; `fault(driver)` runs in this thread once
    the sharded stage has written its first mid-stage checkpoint, while the driver (a Popen) goes on."""
    command = farm.driver(*RENDER, "--workers", "2", "--checkpoint-every-steps", "1",
                          "--collective-timeout", str(COLLECTIVE_TIMEOUT_S), "--out", str(out))
    process = subprocess.Popen(command, env=farm.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line.rstrip()) for line in process.stdout), daemon=True)
    reader.start()
    try:
        if fault is not None:
            folder = Path(f"{out}.checkpoints")
            deadline = time.monotonic() + timeout_s
            while not list(folder.glob("*/stage01-step*.safetensors")):
                assert process.poll() is None and time.monotonic() < deadline, "the render ended before its sharded stage"
                time.sleep(0.05)
            fault(process)
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
    return Run(process.returncode, lines)


@pytest.fixture(scope="module")
def undisturbed(farm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("undisturbed") / "kite.png"
    run = run_driver(farm, out)
    assert run.returncode == 0, "\n".join(line for _, line in run.lines)
    return out


def test_a_gang_on_two_hosts_equals_the_single_process_render(farm, undisturbed, tmp_path):
    workers = json.loads(sidecar_path(undisturbed).read_text())["workers"]
    assert workers["count"] == 2 and workers["backend"] == "gloo"
    assert len(set(workers["nodes"])) == 2 and set(workers["nodes"]) <= {farm.address(host) for host in WORKER_HOSTS}
    alone = tmp_path / "alone.png"
    assert main([*RENDER, "--out", str(alone)]) == 0
    sharded = np.asarray(Image.open(undisturbed), dtype=np.int16)
    assert np.abs(sharded - np.asarray(Image.open(alone), dtype=np.int16)).max() <= 1


def detection(run: Run, started: float) -> float:
    """Seconds from the fault to the driver's line that a worker was lost."""
    lost = [at for at, line in run.lines if "a worker was lost" in line]
    assert lost, "\n".join(line for _, line in run.lines)
    return lost[0] - started


def newest_checkpoint(out: Path) -> tuple[int, int]:
    """(stage, steps done) of the newest checkpoint the driver has written for `out`."""
    names = [path.stem for path in Path(f"{out}.checkpoints").glob("*/stage*-step*.safetensors")]
    return max(tuple(int(part) for part in name.removeprefix("stage").split("-step")) for name in names)


def resumed_at(resumed: dict) -> tuple[int, int]:
    """A restart's `resumed_from` as (stage, steps done): the start of a stage is the end of the one before."""
    return (resumed["stage"], resumed["step"]) if resumed["step"] is not None else (resumed["stage"] - 1, STEPS)


@pytest.mark.parametrize("fault", ["cut-link", "killed-raylet"])
def test_a_lost_worker_host_ends_in_the_undisturbed_bytes(farm, undisturbed, tmp_path, fault, record_property):
    out = tmp_path / "kite.png"
    struck: dict[str, object] = {}

    def strike(driver) -> None:
        (host,) = farm.gang_hosts()[:1]
        struck.update(host=host, at=time.monotonic(), seen=newest_checkpoint(out))
        if fault == "cut-link":  # nothing gets through the link: the driver cannot take that rank's rows any more
            farm.cut(host)
            return
        # The workers run ahead of the checkpoints the driver has written, and may have ended the stage already:
        # the driver is held until the host's workers are gone, so that it cannot take their rows before.
        driver.send_signal(signal.SIGSTOP)
        try:
            farm.kill_raylet(host)
        finally:
            driver.send_signal(signal.SIGCONT)

    try:
        run = run_driver(farm, out, strike)
    finally:
        if "host" in struck:
            farm.bring_back(struck["host"])
    assert run.returncode == 0, "\n".join(line for _, line in run.lines)
    seconds = detection(run, struck["at"])
    record_property(f"{fault}_detection_s", round(seconds, 1))
    assert out.read_bytes() == undisturbed.read_bytes()
    sidecar = json.loads(sidecar_path(out).read_text())
    (restart,) = sidecar["restarts"]
    print(f"{fault}: the driver saw the loss {seconds:.1f} s after the fault ({restart['error']}); the render took "
          f"{sidecar['seconds']['total']:.0f} s, struck after checkpoint {struck['seen']}, resumed from "
          f"{restart['resumed_from']}, ended on {sidecar['workers']['nodes']}")
    assert restart["workers_before"] == restart["workers_after"] == 2
    assert farm.address(struck["host"]) in restart["hosts_before"]
    assert farm.address(struck["host"]) not in sidecar["workers"]["nodes"]
    # From the newest checkpoint: mid-stage, or the stage's end where the workers had run past it by then.
    assert resumed_at(restart["resumed_from"]) >= struck["seen"]


def test_a_killed_driver_resumes_when_the_same_command_runs_again(farm, undisturbed, tmp_path):
    """The driver (the job's entrypoint) SIGKILLed mid-stage, as when its host is lost: Ray ends its gang, and the
    same command, run again, resumes from the checkpoints it kept and ends in the undisturbed bytes."""
    out = tmp_path / "kite.png"
    killed = run_driver(farm, out, lambda driver: driver.kill())
    assert killed.returncode == -9 and not out.exists()
    again = run_driver(farm, out)
    assert again.returncode == 0, "\n".join(line for _, line in again.lines)
    assert out.read_bytes() == undisturbed.read_bytes()
    resumed = json.loads(sidecar_path(out).read_text())["resumed_from"]
    assert resumed["stage"] == 1 and resumed["step"] > 0
