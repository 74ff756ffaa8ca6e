"""How much memory a device has, has free, and has used at its peak (CPU: this process; CUDA: torch's)."""

from __future__ import annotations

import os
import resource

import torch


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: its GPU's free memory, or the machine's available memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**34


def process_memory() -> int:
    """This process's resident memory now (what the interpreter and libraries already hold)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def memory_limit(device: torch.device) -> int:
    """What the device has for this process: the GPU's memory (times the per-process fraction a shared GPU
    is capped at); on CPU the cgroup's memory limit where one is set, else the machine's memory."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
        return int(torch.cuda.get_device_properties(index).total_memory * fraction)
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(int(text), machine)
    return machine


def peak_memory(device: torch.device) -> int:
    """Peak CUDA allocation on a GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
