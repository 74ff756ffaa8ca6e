"""A clip's files: an H.264 MP4 a person can play, its lossless frames as one multi-page TIFF a studio can grade,
a small animated GIF preview, the stages as GIFs (--save-stages) and the sidecar. Each appears complete or not
at all.

The MP4 is written by FFmpeg's library through PyAV (libx264, yuv420p, `--crf`). Frames larger than H.264's
highest level takes are downscaled for the MP4 only, with one line saying so; the TIFF keeps them whole. The
final decode runs frame after frame, and each frame goes into the MP4 and the TIFF as soon as it is whole, so
the writer holds one frame (and the preview's thumbnails), not the clip.
"""

from __future__ import annotations

import json
import logging
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile
import torch
from PIL import Image

from renderer.memory import peak_memory
from renderer.output.files import atomic_path, beside, preview_path, sidecar_path, stage_path, write_json

log = logging.getLogger("freescale_poster")

# H.264 level 6.2: at most 139,264 macroblocks of 16x16 pixels a frame; and 8192 pixels a side, which players take.
H264_MAX_SAMPLES = 139_264 * 256
H264_MAX_SIDE = 8192
PREVIEW_SIDE = 256


def frames_path(out: Path) -> Path:
    return beside(out, ".frames.tif")


def mp4_size(width: int, height: int) -> tuple[int, int]:
    """The frame size the MP4 gets: halved until H.264 takes it, and even, as yuv420p needs."""
    while width * height > H264_MAX_SAMPLES or max(width, height) > H264_MAX_SIDE:
        width, height = width // 2, height // 2
    return width - width % 2, height - height % 2


class Mp4Writer:
    """Frames into an H.264 MP4 as they come (FFmpeg's libx264 through PyAV), resized to `size` if it differs."""

    def __init__(self, path: Path, fps: float, crf: int, size: tuple[int, int]):
        import av  # PyAV: FFmpeg's encoders and muxers; imported here, so that still images never load it

        self.av, self.size = av, size
        self.container = av.open(str(path), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf)}

    def add(self, pixels: np.ndarray) -> None:
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        if (frame.width, frame.height) != self.size:
            frame = frame.reformat(width=self.size[0], height=self.size[1])
        self.container.mux(self.stream.encode(frame))

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, error_type, *_) -> None:
        """Flush the encoder when every frame went in; close the file either way."""
        try:
            if error_type is None:
                self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()


def frames_of(bands: Iterable[np.ndarray], height: int) -> Iterator[np.ndarray]:
    """Whole (height, W, 3) frames from (rows, W, 3) bands that run through the frames top to bottom, one after another."""
    pending: list[np.ndarray] = []
    rows = 0
    for band in bands:
        while len(band):
            take = min(len(band), height - rows)
            pending.append(band[:take])
            rows, band = rows + take, band[take:]
            if rows == height:
                yield np.concatenate(pending)
                pending, rows = [], 0


def write_animation(path: Path, frames: Iterable[np.ndarray], fps: float) -> None:
    """An animated GIF of `frames`."""
    pictures = [Image.fromarray(pixels) for pixels in frames]
    with atomic_path(path) as temporary:
        pictures[0].save(temporary, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)


def write_clip(request, result, bands: Iterable[np.ndarray], started: float, device: torch.device) -> list[Path]:
    """The clip's files from its final rows, (rows, W, 3) bands through the frames one after another: each frame
    goes into the MP4 and the frames TIFF as soon as its last rows arrive. With --save-stages, every stage before
    the last as an animated GIF at its size."""
    out = Path(request.out)
    written = []
    for index, (size, stage_frames) in enumerate(zip(result.stages, result.stage_images)):
        written.append(stage_path(out, index, size, ".gif"))
        write_animation(written[-1], stage_frames, request.fps)
    width, height = result.stages[-1]
    size = mp4_size(width, height)
    if size != (width, height):
        log.warning("%s: H.264 takes at most %d pixels a side and %d a frame; the MP4 is %dx%d, %s keeps %dx%d",
                    out, H264_MAX_SIDE, H264_MAX_SAMPLES, *size, frames_path(out).name, width, height)
    result.metadata["clip"] = {"frames": request.frames, "fps": request.fps, "crf": request.crf, "mp4_size": list(size),
                               "frames_tiff": frames_path(out).name, "preview": preview_path(out, clip=True).name}
    thumbnails = []
    tile = (request.tile_size, request.tile_size)
    with (atomic_path(frames_path(out)) as tiff_file, atomic_path(out) as mp4_file, tifffile.TiffWriter(tiff_file) as tiff,
          Mp4Writer(mp4_file, request.fps, request.crf, size) as mp4):
        for index, frame in enumerate(frames_of(bands, height)):
            # Every frame losslessly (deflate, tiled), one page each; the render's parameters in the first page's
            # description (`freescale-render inspect` reads it and decodes every tile).
            description = json.dumps(result.metadata, sort_keys=True) if index == 0 else None
            tiff.write(frame, photometric="rgb", compression="zlib", tile=tile, metadata=None, description=description,
                       software="freescale-poster")
            mp4.add(frame)
            thumbnails.append(preview_frame(frame))
    write_animation(preview_path(out, clip=True), thumbnails, request.fps)
    result.metadata["seconds"]["total"] = time.perf_counter() - started
    result.metadata["peak_bytes"] = peak_memory(device)
    write_json(sidecar_path(out), result.metadata)
    return [*written, frames_path(out), out, preview_path(out, clip=True), sidecar_path(out)]


def preview_frame(pixels: np.ndarray) -> np.ndarray:
    """The frame shrunk to at most PREVIEW_SIDE pixels a side (never enlarged)."""
    picture = Image.fromarray(pixels)
    picture.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return np.asarray(picture)
