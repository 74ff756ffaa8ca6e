"""Progress per stage and step with an ETA, on stderr (tqdm), or silent."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    latest: Progress | None = None  # the one whose stage started last in this process: where a stopped render was

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self.bar: tqdm | None = None
        self.label: str | None = None  # the current stage's label, its steps and those done (also when not shown)
        self.steps = self.done = 0

    def stage(self, label: str, steps: int) -> None:
        self.close()
        self.label, self.steps, self.done = label, steps, 0
        Progress.latest = self
        if self.enabled:
            self.bar = tqdm(total=steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def finished(self, stage: int, seconds: float) -> None:
        """Stage `stage` ended after `seconds` (its transition included); the bars show nothing more."""

    def position(self) -> str | None:
        """Where the render is, e.g. "stage 2 1024x1024, step 4/5" (the step running); None before any stage."""
        if self.label is None:
            return None
        if self.done < self.steps:
            return f"{self.label}, step {self.done + 1}/{self.steps}"
        return f"{self.label}, after its last step ({self.steps}/{self.steps})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
