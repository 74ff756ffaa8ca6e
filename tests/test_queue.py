"""Posters wait their turn on one Ray cluster (README: Waiting for the GPU pool), and who may submit.

A private head with room for exactly one 2-worker gang (2 CPUs; the entrypoints reserve none, as the README's
jobs do). Three posters submitted at once all succeed, one after another, each equal to its single-process
render; a fourth, stopped while it waits, ends at once without touching the running one. A gang larger than
the cluster is refused within a minute, an address where nothing listens within 30 s, and the Jobs API refuses
a submission without the head's token."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
import tifffile

from polling import wait_until
from ray_head import RAY, VENV_BIN, running_head
from test_jobs import job_logs, job_status, ray_job_id  # the Jobs REST API, read as test_jobs reads it
from renderer import render
from renderer.cli.options import build_parser, request_from_args
from renderer.output.files import sidecar_path

FREESCALE_ARGS = ["--stages", "256x256,512x512", "--workers", "2", "--quiet"]


@pytest.fixture(scope="module")
def small_head():
    with running_head(num_cpus=2) as head:
        yield head


def submit(head, sid: str, *render_args: str) -> None:
    """`ray job submit --no-wait` as the README's farm section gives it: no resources for the entrypoint."""
    head.ray("job", "submit", "--address", head.dashboard_url, "--submission-id", sid, "--no-wait", "--",
             "exec", "freescale-render", *render_args)


@pytest.mark.timeout(900)
def test_posters_submitted_together_render_one_after_another(small_head, tiny_pipeline, tmp_path):
    """Poster a (longer: 80 steps) takes the cluster; b, c and d are submitted while it renders, and d is stopped
    while it waits. Then b and c render in turn, in whichever order Ray retries them."""
    head = small_head
    run = uuid.uuid4().hex[:6]
    posters = {f"queue-{run}-{name}": (seed, steps, tmp_path / f"{name}.tif") for name, seed, steps in (("a", 1, 80), ("b", 2, 4), ("c", 3, 4))}
    first, *others = posters
    for sid in (first, *others):
        seed, steps, out = posters[sid]
        submit(head, sid, "--prompt", "a red kite", "--seed", str(seed), *FREESCALE_ARGS, "--steps", str(steps), "--out", str(out))
        if sid == first:  # the others are submitted once it holds the cluster
            wait_until(lambda: ray_job_id(head, first) and head.state("placement_groups", f"creator_job_id={ray_job_id(head, first)}",
                                                                      "state=CREATED"), 120, "poster a's gang placed", interval=0.5)

    # A fourth poster, stopped while it waits: STOPPED within 30 s, its own placement group gone, nothing written.
    stopped_sid, stopped_out = f"queue-{run}-d", tmp_path / "d.tif"
    submit(head, stopped_sid, "--prompt", "a kite", *FREESCALE_ARGS, "--steps", "4", "--out", str(stopped_out))
    wait_until(lambda: "waiting for the cluster" in job_logs(head, stopped_sid), 120, "the fourth poster waiting", interval=1)
    assert job_status(head, first) == "RUNNING", "poster a must still hold the cluster"
    job_id = ray_job_id(head, stopped_sid)
    started = time.monotonic()
    head.ray("job", "stop", "--address", head.dashboard_url, stopped_sid, timeout=60)
    wait_until(lambda: job_status(head, stopped_sid) == "STOPPED", 30 - (time.monotonic() - started), "STOPPED")
    assert time.monotonic() - started < 30
    wait_until(lambda: not head.state("placement_groups", f"creator_job_id={job_id}", "state!=REMOVED"), 20,
               "the stopped poster's placement group removed")
    assert not stopped_out.exists()

    wait_until(lambda: all(job_status(head, sid) in ("SUCCEEDED", "FAILED", "STOPPED") for sid in posters), 600,
               lambda: {sid: job_status(head, sid) for sid in posters}, interval=2)
    assert {sid: job_status(head, sid) for sid in posters} == dict.fromkeys(posters, "SUCCEEDED"), \
        {sid: job_logs(head, sid)[-2000:] for sid in posters}

    held = []  # (placed, done) of each gang: when Ray placed it, and when its sidecar was written (the gang still held)
    for sid, (seed, steps, out) in posters.items():
        sidecar = json.loads(sidecar_path(out).read_text())
        assert sidecar["workers"]["bundle"] == {"CPU": 1}, "each gang takes all of the head's 2 CPUs"
        held.append((sidecar["workers"]["placed_at"], sidecar_path(out).stat().st_mtime, sidecar["seconds"]["waiting"], sid))
        single = render(request_from_args(build_parser().parse_args(
            ["--prompt", "a red kite", "--seed", str(seed), "--stages", "256x256,512x512", "--steps", str(steps),
             "--out", str(tmp_path / "single.tif")])), pipeline=tiny_pipeline, progress=False, write=False)
        with tifffile.TiffFile(out) as tif:
            assert np.abs(tif.pages[0].asarray().astype(int) - single.image).max() <= 1
    held.sort()
    for (_, done, _, earlier), (placed, _, _, later) in zip(held, held[1:]):
        assert placed >= done, f"{later} was placed while {earlier} still held the workers"
    # The README's promise: the first gang is placed at once, the others each wait for a gang to end.
    assert held[0][3] == first and held[0][2] < 5 and held[1][2] > 1 and held[2][2] > held[1][2], held
    for _, _, _, sid in held[1:]:
        assert re.search(r"the cluster placed the gang after \d+ s of waiting", job_logs(head, sid)), job_logs(head, sid)


@pytest.mark.timeout(180)
def test_a_gang_larger_than_the_cluster_is_refused_within_a_minute(small_head, tmp_path):
    """Two GPU workers on a head without GPUs: Ray calls the demand infeasible, no autoscaler adds a node."""
    started = time.monotonic()
    done = subprocess.run(["freescale-render", "--prompt", "p", *FREESCALE_ARGS, "--steps", "4", "--gpus-per-worker", "1",
                           "--out", str(tmp_path / "x.tif")], env=small_head.env, capture_output=True, text=True, timeout=170)
    assert time.monotonic() - started < 60 + 15  # a minute, plus the CLI's start on a loaded machine
    assert done.returncode == 2
    message = [line for line in done.stderr.splitlines() if line.startswith("freescale-render:")]
    assert len(message) == 1 and re.match(r"freescale-render: error: --workers 2: the gang needs 2 CPU, 2 GPU but the "
                                          r"whole cluster has 2 CPU, \d+ GiB memory and no nodes are being added", message[0]), done.stderr
    assert not list(tmp_path.iterdir())


def test_an_address_where_nothing_listens_is_one_line_within_30_s(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    started = time.monotonic()
    done = subprocess.run([str(VENV_BIN / "freescale-render"), "--prompt", "p", *FREESCALE_ARGS, "--steps", "4", "--address", f"127.0.0.1:{port}",
                           "--out", str(tmp_path / "x.tif")], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"freescale-render: error: --address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} (Connection refused); "
        "give the address of a running Ray head: HOST:6379 (its GCS), ray://HOST:10001, or auto on one of its nodes"]


@pytest.mark.timeout(180)
def test_the_jobs_api_refuses_a_submission_without_the_token(small_head):
    """What the README's hand submission does: with RAY_AUTH_MODE=token and the head's token it is accepted."""
    bare = {key: value for key, value in small_head.env.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    command = [RAY, "job", "submit", "--address", small_head.dashboard_url, "--no-wait", "--", "echo", "hello"]
    refused = subprocess.run(command, env=bare, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stdout + refused.stderr or "authentication" in (refused.stdout + refused.stderr).lower()
    accepted = subprocess.run(command, env=small_head.env, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


@pytest.mark.timeout(180)
def test_a_render_without_the_token_says_which_variables_to_set(small_head, tmp_path):
    """The head's address without its token: Ray's own retries end in a ConnectionError; the renderer names the
    variables to set, in one line."""
    bare = {key: value for key, value in small_head.env.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    done = subprocess.run([str(VENV_BIN / "freescale-render"), "--prompt", "p", *FREESCALE_ARGS, "--steps", "4",
                           "--out", str(tmp_path / "x.tif")], env=bare, capture_output=True, text=True, timeout=170)
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("freescale-render:")]
    assert line.startswith(f"freescale-render: error: RAY_ADDRESS={small_head.gcs_address}: the Ray cluster there did not let "
                           "this process in") and "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in line, line
