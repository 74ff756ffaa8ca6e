"""Run a function on every rank of a local process group of spawned processes, without Ray.

The per-operation tests and the GPU checks use it: it needs nothing but torch, and each rank's result
(or its traceback) comes back to the caller."""

from __future__ import annotations

import multiprocessing
import pickle
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from renderer.parallel.strips import init_process_group


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, function: Callable, queue, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        init_process_group(rank, world, f"127.0.0.1:{port}", "gloo", timeout_s=300)
        # Pickled here with plain pickle: torch would otherwise pass tensors as shared-memory handles that
        # vanish when this process exits before the parent reads them.
        queue.put((rank, True, pickle.dumps(function(rank, world))))
    except BaseException:  # report, never hang the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, function: Callable[[int, int], Any], timeout_s: float = 600, threads: int = 1) -> list[Any]:
    """`function(rank, world)` on `world` gloo ranks; its results in rank order, or the first rank's error.

    `function` must be importable by name (a module-level function or a partial of one)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world, port, function, queue, threads)) for rank in range(world)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, ok, value = queue.get(timeout=5)
            except queue_module.Empty:
                if time.monotonic() > deadline or not any(process.is_alive() for process in processes):
                    raise AssertionError(f"ranks {sorted(set(range(world)) - set(results))} gave no result") from None
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(world)]
