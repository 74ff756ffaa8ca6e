"""Joining a Ray cluster and sizing a gang's reservation on it.

Workers are reserved together in one placement group (PACK: on as few nodes as possible): 1 GPU each where
the cluster has a GPU per worker (or as --gpus-per-worker asks), else a share of the free CPUs.
"""

from __future__ import annotations

import logging
import math
import os
import socket

from renderer.errors import RenderError


def connect(address: str | None, workers: int) -> None:
    """Join `address`, else the cluster this process runs in (`ray job submit`, RAY_ADDRESS, a local `ray start`),
    else start a local Ray with at least one CPU per worker.

    Joining never passes resources (Ray only takes them when it starts a cluster). Under `ray job submit` the
    job's supervisor sets RAY_ADDRESS to the cluster's GCS address, so this process becomes the job's driver and
    the gang's actors and placement group belong to the job (they end with it). `ray.init` replaces the
    driver's SIGTERM handler with its own `sys.exit`; a handler the caller installed (the CLI's, which stops
    the render cleanly) is put back."""
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        joined = address or os.environ.get("RAY_ADDRESS")
        if joined:
            where = f"--address {address}" if address else f"RAY_ADDRESS={joined}"
            origin = "" if address else ENVIRONMENT
            check_listening(joined, where, origin)
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except ConnectionError as error:
                raise RenderError(f"{where}: the Ray cluster there did not let this process in ({error}); "
                                  f"{token_advice()}{origin}") from None
            except ValueError as error:  # an address Ray cannot parse
                raise RenderError(f"{where}: Ray cannot join it ({error}){origin}") from None
            return
        try:
            ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), log_to_driver=False,
                     include_dashboard=False, logging_level=logging.WARNING)
    finally:
        if callable(handler) and signal.getsignal(signal.SIGTERM) is not handler:
            signal.signal(signal.SIGTERM, handler)


ADDRESSES = "HOST:6379 (its GCS), ray://HOST:10001, or auto on one of its nodes"
ENVIRONMENT = " (RAY_ADDRESS is set in this process's environment: unset it, or give --address)"


def check_listening(address: str, where: str, origin: str = "", timeout_s: float = 5.0) -> None:
    """Refuse at once an address where nothing listens (`ray.init` would retry it for minutes), or one that is no
    address at all; `origin` says where it came from (the environment, for RAY_ADDRESS)."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise RenderError(f"{where} is a dashboard URL (the Jobs API, for `ray job submit`); a render joins the cluster "
                          f"itself: give {ADDRESSES}{origin}")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RenderError(f"{where} is not a Ray address; give {ADDRESSES}{origin}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise RenderError(f"{where}: nothing answers at {host}:{port} ({error.strerror or error}); give the address of a "
                          f"running Ray head: {ADDRESSES}{origin}") from None


def token_advice() -> str:
    """What to set when a Ray cluster refuses a process: most often a head started with token authentication."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the "
                "cluster's token (or put it in ~/.ray/auth_token), as the README's Who may submit section shows")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return "RAY_AUTH_MODE=token is set but RAY_AUTH_TOKEN is not: set it to the cluster's token"
    return "check that RAY_AUTH_TOKEN is this cluster's token, and that the address is its GCS (HOST:6379)"


def cpu_share(workers: int) -> float:
    """CPUs per CPU worker: the cluster's free CPUs split evenly (fractions allowed, so 3 workers fit 2 cores;
    free, so that CPUs held by others, e.g. a job's --entrypoint-num-cpus, are not asked for), at most one
    node's worth so that the PACK group can still be placed."""
    import ray

    largest_node = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    free = ray.available_resources().get("CPU", 0)
    share = min(largest_node, (free or ray.cluster_resources().get("CPU", 1)) / workers)
    return math.floor(share * 10_000) / 10_000  # Ray counts resources in 1e-4 units: round down so all fit


def bundle_for(gpus_per_worker: float | None, workers: int) -> tuple[dict, float]:
    """One worker's reservation, and its GPUs: 1 GPU each if the cluster has one per worker (or as asked), else CPUs."""
    import ray

    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= workers else 0.0
    return {"CPU": 1 if gpus else cpu_share(workers), **({"GPU": gpus} if gpus else {})}, gpus


def workers_that_fit(gpus_per_worker: float | None, wanted: int, settle_s: float = 10.0) -> int:
    """How many of `wanted` workers the cluster's free resources host now (waiting up to `settle_s` for
    resources of a torn-down gang to come back)."""
    import time

    import ray

    deadline = time.monotonic() + settle_s
    while True:
        bundle, _ = bundle_for(gpus_per_worker, wanted)
        free = ray.available_resources()
        fit = min(int(free.get(name, 0) // amount) if amount else wanted for name, amount in bundle.items())
        if fit >= wanted or time.monotonic() > deadline:
            return min(fit, wanted)
        time.sleep(0.5)
