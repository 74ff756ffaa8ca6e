"""Atomic output files: an image and its JSON sidecar appear complete or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it only if the block succeeds."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    os.close(handle)
    try:
        yield Path(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_json_lines(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")


def beside(out: Path, tail: str) -> Path:
    """A file a render writes beside its output: the output's FULL name and `tail` (`scene.tif` -> `scene.tif.json`),
    so that no two outputs' files share a name (`scene.tif` and `scene.png`, `kite.seed1.tif` and `kite.seed2.tif`)."""
    out = Path(out)
    return out.with_name(out.name + tail)


def sidecar_path(out: Path) -> Path:
    return beside(out, ".json")


def preview_path(out: Path, clip: bool = False) -> Path:
    """The output's preview: a poster's PNG, a clip's animated GIF."""
    return beside(out, ".preview.gif" if clip else ".preview.png")


def stage_path(out: Path, index: int, size: tuple[int, int], extension: str = ".png") -> Path:
    """An intermediate stage's image (--save-stages): `.png` for a poster, `.gif` for a clip."""
    return beside(out, f".stage{index}-{size[0]}x{size[1]}{extension}")
