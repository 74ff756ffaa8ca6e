"""Checkpoints of a render's latents, so that a stopped or failed render resumes where it was.

A checkpoint is taken at every stage end and, inside an upscaling stage, every K steps or M minutes. It
holds the whole latents after a step (fp32, so resuming gives the same bytes as not stopping) and, in the
middle of a stage, that stage's reference ẑ₀. Each is one safetensors file, written atomically, whose
header carries the render id, the position and a SHA-256 of the tensor bytes: a file that does not check
out is ignored (and removed), never trusted. Files live in `<folder>/<render id>/`, so a different
request never sees another's checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from renderer.output.files import atomic_path
from renderer.parallel.strips import Span

log = logging.getLogger("freescale_poster")


@dataclass
class Checkpoint:
    stage: int
    step: int  # schedule steps of the stage done (the stage's full schedule length at its end)
    latents: torch.Tensor  # whole (1, C, h, w), fp32, CPU
    reference: torch.Tensor | None = None  # mid-stage: the stage's ẑ₀, whole


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CheckpointStore:
    """The checkpoints of one render (one render id); `steps` is its schedule length, marking stage ends."""

    def __init__(self, folder: Path, render_id: str, steps: int):
        self.folder = Path(folder) / render_id
        self.render_id = render_id
        self.steps = steps

    def path(self, stage: int, step: int) -> Path:
        return self.folder / f"stage{stage:02d}-step{step:04d}.safetensors"

    def write(self, checkpoint: Checkpoint) -> None:
        """Write atomically; a mid-stage checkpoint replaces the stage's older mid-stage ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": checkpoint.latents.float().contiguous()}
        if checkpoint.reference is not None:
            tensors["reference"] = checkpoint.reference.float().contiguous()
        header = {"render_id": self.render_id, "stage": str(checkpoint.stage), "step": str(checkpoint.step),
                  "sha256": tensor_digest(tensors)}
        target = self.path(checkpoint.stage, checkpoint.step)
        with atomic_path(target) as temporary:
            save_file(tensors, temporary, metadata=header)
        if checkpoint.step < self.steps:
            for older in self.folder.glob(f"stage{checkpoint.stage:02d}-step*.safetensors"):
                if older != target and self.position(older)[1] < checkpoint.step:
                    older.unlink(missing_ok=True)

    @staticmethod
    def position(path: Path) -> tuple[int, int]:
        stage, step = path.stem.removeprefix("stage").split("-step")
        return int(stage), int(step)

    def read(self, path: Path) -> Checkpoint | None:
        """The checkpoint in `path` if its header and checksum check out; else None (the file is removed)."""
        try:
            stage, step = self.position(path)
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            valid = (metadata.get("render_id") == self.render_id and metadata.get("stage") == str(stage)
                     and metadata.get("step") == str(step) and metadata.get("sha256") == tensor_digest(tensors))
        except (OSError, ValueError, SafetensorError, RuntimeError) as error:
            valid, reason = False, f"{type(error).__name__}: {error}"
        else:
            reason = "its checksum or header does not match"
        if not valid:
            log.warning("ignoring damaged checkpoint %s (%s)", path, reason)
            path.unlink(missing_ok=True)
            return None
        return Checkpoint(stage, step, tensors["latents"], tensors.get("reference"))

    def newest(self) -> Checkpoint | None:
        """The furthest valid checkpoint (damaged ones are skipped and removed)."""
        for path in sorted(self.folder.glob("stage*-step*.safetensors"), key=self.position, reverse=True):
            checkpoint = self.read(path)
            if checkpoint is not None:
                return checkpoint
        return None

    def stage_end(self, stage: int) -> Checkpoint | None:
        path = self.path(stage, self.steps)
        return self.read(path) if path.exists() else None

    def clear(self) -> None:
        """Remove this render's checkpoints (and the folder above when nothing else is left in it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass


@dataclass
class Cadence:
    """When to checkpoint inside a stage: every `steps` steps (0: never by count) or `seconds` seconds."""

    steps: int = 0
    seconds: float = 600.0
    last_step: int = 0
    last_time: float = 0.0

    def start(self, step: int) -> None:
        """Count from `step`, now (a stage's first step, or a checkpoint just taken)."""
        self.last_step, self.last_time = step, time.monotonic()

    def due(self, step: int) -> bool:
        by_count = self.steps > 0 and step - self.last_step >= self.steps
        return by_count or time.monotonic() - self.last_time >= self.seconds


class CheckpointWriter:
    """Takes a checkpoint's rows from whoever holds them (one process: all rows at once; a gang: every
    worker's strip) and writes the checkpoint once its strips cover every row. Used as a stage loop's
    checkpoint sink: (stage, steps done, rows, latents, reference or None)."""

    def __init__(self, store: CheckpointStore, latent_heights: list[int], on_written=lambda: None):
        self.store, self.heights, self.on_written = store, latent_heights, on_written
        self.pieces: dict[tuple[int, int], list[tuple[Span, torch.Tensor, torch.Tensor | None]]] = {}

    def __call__(self, stage: int, step: int, span: Span, latents: torch.Tensor, reference: torch.Tensor | None) -> None:
        pieces = self.pieces.setdefault((stage, step), [])
        pieces.append((span, latents, reference))
        if sum(stop - start for (start, stop), _, _ in pieces) < self.heights[stage]:
            return
        del self.pieces[(stage, step)]
        pieces.sort(key=lambda piece: piece[0][0])
        whole = torch.cat([piece[1] for piece in pieces], dim=2)
        reference = torch.cat([piece[2] for piece in pieces], dim=2) if pieces[0][2] is not None else None
        self.store.write(Checkpoint(stage, step, whole, reference))
        self.on_written()

    def discard_partial(self) -> None:
        """Forget strips of checkpoints a lost gang did not finish handing over."""
        self.pieces.clear()
