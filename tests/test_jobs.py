"""Run where render farms run things: Ray Jobs on a real (private, local) Ray head, stopping, a quiet console.

The Ray tests share the module's one head (`ray_head`: started from this venv on free loopback ports, with its own
temp dir and token, stopped at the end). What they run, as subprocesses, is what the README gives:

    ray job submit --address URL --submission-id ID --runtime-env deploy/runtime_env.yaml --entrypoint-num-cpus 1 \\
        -- freescale-render --prompt "a red kite" --stages 256x256,512x512 --steps 4 --workers 2 --out X.tif --quiet
    ray job submit --address URL --submission-id ID --no-wait --entrypoint-num-cpus 1 \\
        -- exec freescale-render --prompt "a red kite" --stages 256x256,768x768 --steps 300 --workers 2 --out Y.tif
    ray job stop --address URL ID                      # once `on 2 workers` shows in `ray job logs ID`
    freescale-render ... --workers 0|2 --out Z.tif      # then SIGTERM, or SIGINT to its process group (Ctrl-C)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from renderer.jobs import submission_id
from polling import wait_until
from ray_head import RAY, VENV_BIN, ray_head  # noqa: F401  (ray_head: the module's Ray head fixture)
from renderer import render
from renderer.cli.options import build_parser, request_from_args
from renderer.output.files import sidecar_path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = ROOT / "deploy" / "runtime_env.yaml"
FREESCALE = str(VENV_BIN / "freescale-render")
ENTRYPOINT_CPUS = "1"  # the README's `ray job submit --entrypoint-num-cpus 1`: the driver holds 1 of the head's 2 CPUs
STOPPED = re.compile(r"^freescale-render: stopped by (SIGTERM|SIGINT) at stage \d+ \d+x\d+.*; nothing written(;.*)?$")


def leftovers(folder: Path) -> list[str]:
    """Anything a render leaves beside its output other than its checkpoints (kept on purpose, for resuming)."""
    return sorted(path.name for path in folder.iterdir() if not path.name.endswith(".checkpoints"))


def lines(text: str) -> list[str]:
    """Non-empty lines, progress-bar redraws (\\r) split too."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def job(head, command: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address URL ARGS...` (options before the entrypoint's `--`)."""
    return head.ray("job", command, "--address", head.dashboard_url, *args, **kwargs)


def job_status(head, sid: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED (the Jobs REST API)."""
    return head.api(f"/api/jobs/{sid}")["status"]


def job_logs(head, sid: str) -> str:
    """The job's log so far (the Jobs REST API: milliseconds, where the `ray job logs` CLI takes seconds to start)."""
    return head.api(f"/api/jobs/{sid}/logs")["logs"]


def ray_job_id(head, sid: str) -> str | None:
    """The Ray job id (hex) of a submission, once its driver runs: what actors and placement groups are labelled with."""
    try:
        return head.api(f"/api/jobs/{sid}").get("job_id")
    except urllib.error.HTTPError as error:
        if error.code == 404:  # not submitted yet
            return None
        raise


class PlacementWatch:
    """Fails fast (stopping the job) if a job's gang placement group stays PENDING, rather than wait out the
    renderer's 5-minute placement timeout; `check()` is called from the test's polling loops."""

    def __init__(self, head, sid: str, patience_s: float = 60):
        self.head, self.sid, self.patience_s = head, sid, patience_s
        self.pending_since: float | None = None

    def check(self) -> None:
        job_id = ray_job_id(self.head, self.sid)
        pending = self.head.state("placement_groups", f"creator_job_id={job_id}", "state=PENDING") if job_id else []
        if not pending:
            self.pending_since = None
        elif self.pending_since is None:
            self.pending_since = time.monotonic()
        elif time.monotonic() - self.pending_since > self.patience_s:
            job(self.head, "stop", self.sid, check=False)
            raise AssertionError(
                f"the job's gang placement group stayed PENDING for {self.patience_s:.0f} s on the 2-CPU head with "
                f"--entrypoint-num-cpus {ENTRYPOINT_CPUS}: the workers' bundles ask for CPUs the entrypoint holds")


# ---------------------------------------------------------------------------------------------- no Ray needed


def test_submission_id_comes_from_the_job_config_ray_gives_the_entrypoint():
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "poster-42", "job_name": "poster-42"}}
    assert submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(config)}) == "poster-42"
    assert submission_id({}) is None
    assert submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})}) is None
    assert submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}) is None


def zipped_names(folder: Path, excludes: list[str], package: Path) -> tuple[int, list[str]]:
    """Zip `folder` as Ray zips a job's working_dir (`.gitignore` honoured, `excludes` applied): size, entries."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(folder), package, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(package) as archive:
        return package.stat().st_size, archive.namelist()


def test_runtime_env_keeps_the_uploaded_working_dir_small(tmp_path):
    """deploy/runtime_env.yaml is a valid runtime env; the checkout zipped as Ray zips a working_dir with its
    excludes is under 10 MiB, and outputs, temporaries, caches and weights of any kind stay behind."""
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**spec)  # Ray's own validation
    assert spec["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert all(isinstance(value, str) for value in spec["env_vars"].values())
    assert "pip" not in spec and "conda" not in spec and "working_dir" not in spec

    size, names = zipped_names(ROOT, spec["excludes"], tmp_path / "checkout.zip")
    assert size < 10 * 1024**2, f"working_dir zip is {size / 1024**2:.1f} MiB"
    assert {"renderer/cli/__init__.py", "cluster/gang.py", "pyproject.toml"} <= set(names)
    for name in names:
        assert not {".git", ".venv", "__pycache__", ".pytest_cache"} & set(name.split("/")), name
        assert not name.endswith((".safetensors", ".pyc")), name

    # What a user may have lying in a checkout (no .gitignore here: the excludes alone must keep it out).
    tree = tmp_path / "checkout"
    kept = ["renderer/cli/__init__.py", "cluster/jobs.py", "deploy/runtime_env.yaml", "docs/benchmarks.md", "README.md"]
    dropped = [".git/objects/pack/pack-1.pack", ".venv/lib/python3.11/site-packages/torch/lib.so", "renderer/__pycache__/cli.cpython-311.pyc",
               ".pytest_cache/v/cache", ".hypothesis/examples/x", "freescale_poster.egg-info/PKG-INFO", "out/demo.tif",
               "bench/results/run.json", "poster.tif", "kite.ome.tif", ".poster.tif.k2j3.partial", ".pyramid-x1/level1.raw",
               "poster.tif.checkpoints/abc/stage1.safetensors", "poster.tif.stage0-256x256.png", "poster.tif.preview.png",
               "docs/quality_contact_sheet.png", "renderer/models/toy_weights/unet/diffusion_pytorch_model.safetensors",
               "models/sdxl.ckpt", "models/pytorch_model.bin", "lora.pt"]
    for name in kept + dropped:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")
    _, names = zipped_names(tree, spec["excludes"], tmp_path / "tree.zip")
    assert sorted(name for name in names if not name.endswith("/")) == sorted(kept)


@pytest.mark.timeout(180)
def test_called_in_process_main_returns_143_and_puts_the_handlers_back(tmp_path, capsys):
    """`main([...])` from Python: a SIGTERM mid-stage ends it with 143 and the one line, leaves nothing, and the
    caller's signal handlers are back afterwards (no os._exit outside the command itself)."""
    from renderer.cli import main
    from renderer.progress import Progress

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    Progress.latest = None

    def stop_mid_stage() -> None:
        wait_until(lambda: Progress.latest is not None and Progress.latest.done >= 1, 120, "a step", interval=0.05)
        if signal.getsignal(signal.SIGTERM) is not before[0]:  # only ever into main's own handler
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_mid_stage, daemon=True).start()
    code = main(["--prompt", "a red kite", "--stages", "256x256,512x512", "--steps", "30", "--out", str(tmp_path / "x.tif")])
    assert code == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    captured = capsys.readouterr()
    assert STOPPED.match(lines(captured.err)[-1]) and "at stage 0 256x256, step " in lines(captured.err)[-1], captured.err
    assert captured.out == "" and leftovers(tmp_path) == []


def test_the_render_log_writes_to_the_stderr_of_the_moment(monkeypatch):
    """In-process callers (tests, notebooks) swap sys.stderr: a note logged after the stream that was current at
    set-up has been closed goes to the new one, whole, instead of logging's "I/O operation on closed file"."""
    import io
    import logging

    from renderer.cli.console import show_render_log

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    show_render_log()
    log = logging.getLogger("freescale_poster")
    log.info("resumed from %s", "step 3")
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    log.info("resumed from %s", "step 4")
    assert second.getvalue() == "freescale-render: resumed from step 4\n"


# ---------------------------------------------------------------------------------------------- Ray Jobs


@pytest.mark.timeout(180)
def test_the_test_head_listens_on_loopback_only(ray_head):  # noqa: F811
    import psutil

    pids = {process.pid for process in ray_head.processes()}
    listening = [conn for conn in psutil.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN and conn.pid in pids]
    ports = {conn.laddr.port for conn in listening}
    assert {ray_head.ports["port"], ray_head.ports["dashboard-port"], ray_head.metrics_export_port} <= ports
    assert all(conn.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for conn in listening), listening


@pytest.mark.timeout(360)
def test_ray_job_submit_renders_the_single_process_image(ray_head, tiny_pipeline, tmp_path):  # noqa: F811
    """The README's command as written: exit 0, the TIFF equals the single-process render to 1 level, the
    sidecar names the submission, and the job's log is the one `wrote` line (no library chatter)."""
    out = tmp_path / "kite.tif"
    sid = f"freescale-test-{uuid.uuid4().hex[:8]}"
    args = ["--prompt", "a red kite", "--stages", "256x256,512x512", "--steps", "4"]
    command = [RAY, "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", sid, "--runtime-env", str(RUNTIME_ENV),
               "--entrypoint-num-cpus", ENTRYPOINT_CPUS, "--", "freescale-render", *args, "--workers", "2", "--out", str(out), "--quiet"]
    submitting = subprocess.Popen(command, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        watch = PlacementWatch(ray_head, sid)
        while submitting.poll() is None:
            watch.check()
            time.sleep(1)
        submitted = submitting.communicate(timeout=240)[0]
    finally:
        if submitting.poll() is None:
            submitting.kill()
            submitting.wait()
    logs = job(ray_head, "logs", sid, check=False).stdout
    assert submitting.returncode == 0, f"{submitted[-3000:]}\n{logs[-3000:]}"
    assert job_status(ray_head, sid) == "SUCCEEDED"

    single = render(request_from_args(build_parser().parse_args([*args, "--out", str(tmp_path / "single.tif")])),
                    pipeline=tiny_pipeline, progress=False, write=False)
    with tifffile.TiffFile(out) as tif:
        written = tif.pages[0].asarray()
    assert written.shape == single.image.shape == (512, 512, 3)
    assert np.abs(written.astype(int) - single.image).max() <= 1

    entrypoint = lines(logs.split("Running entrypoint for job", 1)[1])[1:]  # what freescale-render printed
    assert entrypoint == [f"wrote {out} (512x512, stages 256x256 -> 512x512)"], logs

    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["workers"]["count"] == 2
    assert sidecar.get("ray_job_submission_id") == sid  # recorded by renderer.engine from renderer.jobs.submission_id()


@pytest.mark.timeout(420)
def test_ray_job_stop_ends_the_render_cleanly(ray_head, tmp_path):  # noqa: F811
    """`ray job stop` while a sharded stage runs: STOPPED, the render's own one-line stop message in the job's log,
    the entrypoint gone by itself within Ray's 3 s grace (no SIGKILL), no output or temporaries, and no live actors
    or placement groups of the job.

    The entrypoint starts with `exec`, as the README advises: Ray runs it under `sh -c`, which dies at the SIGTERM at
    once, and the render, orphaned, is then only seen gone once the host's PID 1 reaps it (1-2 s here, slower
    elsewhere), however fast it ended itself."""
    out = tmp_path / "long.tif"
    sid = f"freescale-stop-{uuid.uuid4().hex[:8]}"
    job(ray_head, "submit", "--submission-id", sid, "--no-wait", "--entrypoint-num-cpus", ENTRYPOINT_CPUS, "--",
        "exec", "freescale-render", "--prompt", "a red kite", "--stages", "256x256,768x768", "--steps", "300", "--workers", "2",
        "--out", str(out))

    watch = PlacementWatch(ray_head, sid)

    def sharded_stage_running():
        # The sharded stage (210 steps at 768x768, over a minute on 2 loaded cores) must still run when the test
        # has seen its bar and `ray job stop` has started: all polling is over REST, none a `ray` CLI start.
        status = job_status(ray_head, sid)
        assert status in ("PENDING", "RUNNING"), status
        if "on 2 workers" in job_logs(ray_head, sid):
            return True
        watch.check()
        return False

    wait_until(sharded_stage_running, 240, "the sharded stage's bar in the job's log", interval=1)
    job_id = ray_job_id(ray_head, sid)
    assert ray_head.state("actors", f"job_id={job_id}", "state=ALIVE", "class_name=GangWorker")

    # `ray job stop` returns once the job has ended; its time here is mostly its own start-up on 2 loaded cores, so
    # promptness is judged by the supervisor's log below: "gracefully" means within Ray's 3 s grace of the SIGTERM.
    job(ray_head, "stop", sid, timeout=120)
    wait_until(lambda: job_status(ray_head, sid) == "STOPPED", 10, "status STOPPED")

    logs = job(ray_head, "logs", sid).stdout
    stop_lines = [line for line in lines(logs) if line.startswith("freescale-render:")]
    assert len(stop_lines) == 1 and STOPPED.match(stop_lines[0]), logs[-3000:]
    assert "stopped by SIGTERM at stage 1 768x768 on 2 workers, step " in stop_lines[0]
    assert "Traceback" not in logs
    supervisor_log = ray_head.session_dir() / "logs" / "jobs" / f"supervisor-{sid}.log"
    # the supervisor logs how the entrypoint ended (gracefully, or SIGKILLed after the grace) before it sets
    # STOPPED; the wait covers only the log file reaching the disk, and either outcome ends it
    supervisor = wait_until(lambda: supervisor_log.is_file() and re.search("terminated gracefully|force-killed", supervisor_log.read_text())
                            and supervisor_log.read_text(), 10, "the job supervisor's log to say how the entrypoint ended")
    assert "terminated gracefully with SIGTERM" in supervisor and "SIGKILL" not in supervisor, supervisor

    assert leftovers(tmp_path) == []  # no output, no sidecar, no .long.tif.*.partial, no .pyramid-* scratch
    wait_until(lambda: not ray_head.state("actors", f"job_id={job_id}", "state!=DEAD"), 20, "the job's actors to be dead")
    wait_until(lambda: not ray_head.state("placement_groups", f"creator_job_id={job_id}", "state!=REMOVED"), 20,
             "the job's placement group to be removed")


# ---------------------------------------------------------------------------------------------- signals


class StderrReader:
    """Collects a process's stderr in a thread, so the test can wait for text without blocking on a read."""

    def __init__(self, stream):
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            with self._lock:
                self.text += chunk.decode("utf-8", "replace")

    def contains(self, needle: str) -> bool:
        with self._lock:
            return needle in self.text

    def finish(self) -> str:
        self._thread.join(timeout=10)
        return self.text


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGINT, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-2-workers"])
def test_a_signal_stops_the_cli_cleanly(signum, workers, request, tmp_path):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C, sent to the process group as a terminal does) once a stage bar is
    up: exit 128 + signal, the last stderr line says where it stopped, no output, no temporaries, and with
    workers no gang left on the cluster."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    head = None
    if workers:
        head = request.getfixturevalue("ray_head")
        env = dict(head.env)  # RAY_ADDRESS: join the test's head, never another Ray on this machine
    out = tmp_path / "x.tif"
    process = subprocess.Popen(
        [FREESCALE, "--prompt", "a red kite", "--stages", "256x256,512x512", "--steps", "40", "--workers", str(workers),
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    reader = StderrReader(process.stderr)
    try:
        marker = "on 2 workers" if workers else "stage 0 256x256"
        wait_until(lambda: reader.contains(marker) or process.poll() is not None, 180, f"'{marker}' on stderr", interval=0.2)
        assert process.poll() is None, reader.finish()
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)  # Ctrl-C: the whole foreground process group
        else:
            process.send_signal(signum)
        sent = time.monotonic()
        code = process.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr = reader.finish()
    stdout = process.stdout.read().decode()
    assert code == 128 + signum, stderr[-3000:]
    assert took < 10, f"took {took:.1f} s to stop"
    last = lines(stderr)[-1]
    assert STOPPED.match(last) and f"stopped by {signal.Signals(signum).name}" in last, stderr[-3000:]
    assert sum("freescale-render:" in line for line in lines(stderr)) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and stdout == ""
    assert leftovers(tmp_path) == []
    if head is not None:
        wait_until(lambda: not head.state("actors", "class_name=GangWorker", "state!=DEAD"), 20, "the workers to be dead")
        wait_until(lambda: not head.state("placement_groups", "state!=REMOVED"), 20, "the placement group to be removed")
