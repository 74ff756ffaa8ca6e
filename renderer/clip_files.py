"""A clip's files: an H.264 MP4 a person can play, its lossless frames as one multi-page TIFF a studio can grade,
a small animated GIF preview, the stages as GIFs (--save-stages) and the sidecar. Each appears complete or not
at all.

The MP4 is written by FFmpeg's library through PyAV (libx264, yuv420p, `--crf`). Frames larger than H.264's
highest level takes are downscaled for the MP4 only, with one line saying so; the TIFF keeps them whole.
"""

from __future__ import annotations

import json
import logging
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np
import tifffile
import torch
from PIL import Image

from renderer.memory import peak_memory
from renderer.outputs import atomic_path, sidecar_path, stage_path, write_json

log = logging.getLogger("freescale_poster")

# H.264 level 6.2: at most 139,264 macroblocks of 16x16 pixels a frame; and 8192 pixels a side, which players take.
H264_MAX_SAMPLES = 139_264 * 256
H264_MAX_SIDE = 8192
PREVIEW_SIDE = 256


def frames_path(out: Path) -> Path:
    return Path(out).with_suffix(".frames.tif")


def preview_path(out: Path) -> Path:
    return Path(out).with_suffix(".preview.gif")


def mp4_size(width: int, height: int) -> tuple[int, int]:
    """The frame size the MP4 gets: halved until H.264 takes it, and even, as yuv420p needs."""
    while width * height > H264_MAX_SAMPLES or max(width, height) > H264_MAX_SIDE:
        width, height = width // 2, height // 2
    return width - width % 2, height - height % 2


def write_mp4(path: Path, frames: np.ndarray, fps: float, crf: int, size: tuple[int, int]) -> None:
    import av  # PyAV: FFmpeg's encoders and muxers; imported here, so that still images never load it

    with atomic_path(path) as temporary, av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if (frame.width, frame.height) != size:
                frame = frame.reformat(width=size[0], height=size[1])
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_frames_tiff(path: Path, frames: np.ndarray, metadata: dict, tile: int) -> None:
    """Every frame losslessly (deflate, `tile`² tiles), one page each, the render's parameters in the first page's
    description (`freescale-render inspect` reads it and decodes every tile)."""
    with atomic_path(path) as temporary:
        tifffile.imwrite(temporary, frames, photometric="rgb", compression="zlib", tile=(tile, tile), metadata=None,
                         description=json.dumps(metadata, sort_keys=True), software="freescale-poster")


def write_animation(path: Path, frames: np.ndarray, fps: float, side: int | None = None) -> None:
    """An animated GIF of `frames`, each shrunk to at most `side` pixels a side if given."""
    pictures = []
    for pixels in frames:
        picture = Image.fromarray(pixels)
        if side is not None:
            picture.thumbnail((side, side))
        pictures.append(picture)
    with atomic_path(path) as temporary:
        pictures[0].save(temporary, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)


def write_clip(request, result, bands: Iterable[np.ndarray], started: float, device: torch.device) -> list[Path]:
    """The clip's files from the final rows of every frame, (frames, rows, W, 3) bands top to bottom; with
    --save-stages, every stage before the last as an animated GIF at its size."""
    out = Path(request.out)
    written = []
    for index, (size, stage_frames) in enumerate(zip(result.stages, result.stage_images)):
        written.append(stage_path(out, index, size).with_suffix(".gif"))
        write_animation(written[-1], stage_frames, request.fps)
    frames = np.concatenate(list(bands), axis=1)
    height, width = frames.shape[1:3]
    size = mp4_size(width, height)
    if size != (width, height):
        log.warning("%s: H.264 takes at most %d pixels a side and %d a frame; the MP4 is %dx%d, %s keeps %dx%d",
                    out, H264_MAX_SIDE, H264_MAX_SAMPLES, *size, frames_path(out).name, width, height)
    result.metadata["clip"] = {"frames": len(frames), "fps": request.fps, "crf": request.crf, "mp4_size": list(size),
                               "frames_tiff": frames_path(out).name, "preview": preview_path(out).name}
    write_frames_tiff(frames_path(out), frames, result.metadata, request.tile_size)
    write_mp4(out, frames, request.fps, request.crf, size)
    write_animation(preview_path(out), frames, request.fps, PREVIEW_SIDE)
    result.metadata["seconds"]["total"] = time.perf_counter() - started
    result.metadata["peak_bytes"] = peak_memory(device)
    write_json(sidecar_path(out), result.metadata)
    return [*written, frames_path(out), out, preview_path(out), sidecar_path(out)]
