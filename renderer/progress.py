"""Progress per stage and step with an ETA, on stderr (tqdm), or silent."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self.bar: tqdm | None = None

    def stage(self, label: str, steps: int) -> None:
        self.close()
        if self.enabled:
            self.bar = tqdm(total=steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
