"""Named, independent random streams derived from the render seed (project decision 2).

Every draw is made on the CPU from a generator keyed by (seed, purpose, *key), then moved to the
device, so results do not depend on the device, on the order of other draws, or on how the work is
sharded: a worker that needs stage 2's noise for its rows draws the same full tensor every time.
"""

from __future__ import annotations

import hashlib

import torch


def stream(seed: int, purpose: str, *key: object) -> torch.Generator:
    digest = hashlib.sha256(repr((int(seed), purpose, *key)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def normal(shape: tuple[int, ...], seed: int, purpose: str, *key: object) -> torch.Tensor:
    return torch.randn(shape, generator=stream(seed, purpose, *key), dtype=torch.float32)
