"""Waiting for a gang's placement group: Ray's pending placement groups are the queue of a Ray cluster.

A gang that does not fit now waits (by default as long as it takes, `--queue-timeout` to bound it), says so
once, and is counted in `renders_waiting`. Ray keeps pending groups in a queue ordered by when each may next
be tried; a group that failed to fit is tried again after an exponential backoff (100 ms growing to 1 s by
default, `gcs_placement_group_manager.cc`), so when a gang ends, whichever waiting group is tried first gets
its resources: Ray does not place waiting gangs in the order they were created. A gang this cluster can never
hold (more than all its nodes have, and no autoscaler adding any) is refused within `NEVER_FITS_GRACE_S`.
"""

from __future__ import annotations

import json
import logging
import time

from renderer.errors import RenderError
from renderer.metrics.recorder import RenderMetrics

log = logging.getLogger("freescale_poster")

POLL_S = 1.0  # how often a waiting driver looks again (and sees a stop signal)
NEVER_FITS_GRACE_S = 30.0  # how long a gang larger than the cluster waits for an autoscaler to add nodes


def resources_text(resources: dict[str, float]) -> str:
    """CPU, GPU and memory of a resource dict, without Ray's per-group and per-node entries."""
    parts = [f"{resources[name]:g} {name}" for name in ("CPU", "GPU") if resources.get(name)]
    if resources.get("memory"):
        parts.append(f"{resources['memory'] / 2**30:.0f} GiB memory")
    return ", ".join(parts) or "nothing"


def demand_of(bundles: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def short_of(demand: dict[str, float], resources: dict[str, float]) -> dict[str, float]:
    """What `demand` needs beyond `resources`, by resource."""
    return {name: amount - resources.get(name, 0.0) for name, amount in demand.items() if amount > resources.get(name, 0.0) + 1e-9}


def nodes_on_the_way() -> bool | None:
    """Whether an autoscaler is launching nodes now (Ray's v1 autoscaler status); None where it cannot be told
    (no status: autoscaler v2, or none reporting)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw).get("autoscaler_report") or {} if raw else None
    except Exception:  # an internal interface: never let it break a render
        return None
    if report is None:
        return None
    return bool(report.get("pending_launches") or report.get("pending_nodes"))


def wait_for_gang(group, bundles: list[dict], timeout_s: float | None, metrics: RenderMetrics) -> float:
    """Wait until the placement group of `bundles` is placed; the seconds waited. Refuses (one line) a gang that
    has not been placed within `timeout_s`, or that the cluster can never hold."""
    import ray

    ready = group.ready()
    started = time.monotonic()
    demand = demand_of(bundles)
    waiting = False
    never_since: float | None = None
    totals_before = ray.cluster_resources()
    try:
        while not ray.wait([ready], timeout=POLL_S)[0]:
            waited = time.monotonic() - started
            totals, free = ray.cluster_resources(), ray.available_resources()
            # Never fits: more than the whole cluster has, the cluster not growing, and no autoscaler adding nodes
            # (asked only then: it reads Ray's autoscaler status).
            never = bool(short_of(demand, totals)) and totals == totals_before and nodes_on_the_way() is False
            never_since = (never_since or time.monotonic()) if never else None
            totals_before = totals
            if not waiting and never_since is None:  # a gang that can never fit is refused without this note first
                waiting = True
                metrics.waiting(1)
                log.warning("waiting for the cluster to free %d x {%s} (it has %s free of %s); the render starts when "
                            "they are", len(bundles), resources_text(bundles[0]), resources_text(free), resources_text(totals))
            if never_since is not None and time.monotonic() - never_since > NEVER_FITS_GRACE_S:
                raise RenderError(
                    f"--workers {len(bundles)}: the gang needs {resources_text(demand)} but the whole cluster has "
                    f"{resources_text(totals)} and no nodes are being added; use fewer workers, --gpus-per-worker 0 "
                    "(CPU workers) or a larger cluster")
            if timeout_s is not None and waited > timeout_s:
                metrics.placement_failed()
                raise RenderError(
                    f"--queue-timeout {timeout_s:g}: the cluster did not free {len(bundles)} x {{{resources_text(bundles[0])}}} "
                    f"within {timeout_s:g} s (it has {resources_text(free)} free of {resources_text(totals)}); raise "
                    "--queue-timeout, or leave it out to wait as long as it takes")
        ray.get(ready)
    finally:
        if waiting:
            metrics.waiting(-1)
    seconds = time.monotonic() - started
    metrics.gang_waited(seconds)
    if waiting:
        log.warning("the cluster placed the gang after %.0f s of waiting", seconds)
    return seconds
