"""A render's files: stage PNGs, the image streamed into its TIFF (or a PNG), the preview, and the sidecar."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from renderer.memory import peak_memory
from renderer.output.files import preview_path, sidecar_path, stage_path, write_json, write_png
from renderer.output.tiff import TiffOptions, write_preview, write_pyramid

LIBRARIES = ("freescale-poster", "torch", "diffusers", "transformers", "numpy", "pillow", "tifffile", "av")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tee_into(rows: Iterable[np.ndarray], kept: list[np.ndarray]) -> Iterator[np.ndarray]:
    for band in rows:
        kept.append(band)
        yield band


def write_outputs(request, result, rows: Iterable[np.ndarray], started: float, device: torch.device) -> list[Path]:
    """Stage PNGs, then the image (streamed), then the sidecar, whose total time includes the writing and whose
    peak is this process's on `device`, the writing included. Returns the files written."""
    out = Path(request.out)
    written = []
    for index, (size, pixels) in enumerate(zip(result.stages, result.stage_images)):
        written.append(stage_path(out, index, size))
        write_png(written[-1], pixels)
    if out.suffix.lower() == ".png":
        write_png(out, np.concatenate(list(rows), axis=0))
    else:
        options = TiffOptions(tile=request.tile_size, compression=request.compression, dpi=request.dpi, software=software_name())
        picture = result.metadata.get("input")
        fields = {"inputImageSha256": picture["sha256"], "strength": f"{picture['strength']:g}"} if picture else None
        write_pyramid(out, rows, result.stages[-1], options, result.metadata, request.prompt, request.negative_prompt, fields)
        if request.preview:
            written.append(preview_path(out))
            write_preview(out, written[-1])
    result.metadata["seconds"]["total"] = time.perf_counter() - started
    result.metadata["peak_bytes"] = peak_memory(device)
    write_json(sidecar_path(out), result.metadata)
    return [*written, out, sidecar_path(out)]


def software_name() -> str:
    return f"freescale-poster {library_versions()['freescale-poster']}"
