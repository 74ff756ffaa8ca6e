"""Streamed, tiled, pyramidal TIFF output (ecosystem-conventions.md §5).

Pixels arrive as row bands of any height, top to bottom. Full-resolution tiles are handed to tifffile
as they complete, and each band is also reduced 2× by area averaging into the level-1 buffer (a quarter
of the image, uint8), from which the smaller levels are made once level 0 is written. The whole image
is never held, as bytes or as floats. Layouts: reduced-resolution pages after the main page (what
OpenSlide and QuPath read; the default), or SubIFDs for `.ome.tif` (OME-TIFF, Bio-Formats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
import tempfile
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator
from xml.sax.saxutils import escape

import numpy as np
import tifffile

from renderer.output.files import atomic_path

COMPRESSIONS = ("deflate", "jpeg", "webp", "zstd", "none")
BIGTIFF_THRESHOLD = 2**32 - 2**25  # classic TIFF offsets are 32-bit; keep a margin for tags
XMP_TAG = 700


@dataclass(frozen=True)
class TiffOptions:
    tile: int = 512
    compression: str = "deflate"
    dpi: float = 300.0
    software: str = "freescale-poster"

    def __post_init__(self) -> None:
        if self.tile % 16 or self.tile <= 0:
            raise ValueError(f"tile size {self.tile} must be a positive multiple of 16, e.g. 512")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r}: use one of {', '.join(COMPRESSIONS)}")
        if not self.dpi > 0:
            raise ValueError(f"dpi {self.dpi} must be positive, e.g. 300")

    def codec(self) -> dict:
        """tifffile arguments for the chosen compression."""
        if self.compression == "none":
            return {"compression": None}
        if self.compression == "jpeg":
            return {"compression": "jpeg", "compressionargs": {"level": 90}}
        if self.compression == "webp":
            return {"compression": "webp", "compressionargs": {"level": 90}}
        return {"compression": "zlib" if self.compression == "deflate" else "zstd", "predictor": True}


def level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """Level 0 and each 2× reduction (rounding up) until a level fits in one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def needs_bigtiff(height: int, width: int, tile: int) -> bool:
    """True when the file could pass 4 GB even uncompressed (the worst case of any codec)."""
    raw = sum(h * w * 3 for h, w in level_shapes(height, width, tile))
    return raw > BIGTIFF_THRESHOLD


def reduce2(pixels: np.ndarray) -> np.ndarray:
    """2× area average of a (H, W, 3) uint8 array; an odd last row or column is averaged with itself."""
    if pixels.shape[0] % 2:
        pixels = np.concatenate([pixels, pixels[-1:]], axis=0)
    if pixels.shape[1] % 2:
        pixels = np.concatenate([pixels, pixels[:, -1:]], axis=1)
    total = pixels.reshape(pixels.shape[0] // 2, 2, pixels.shape[1] // 2, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
    return ((total + 2) // 4).astype(np.uint8)


def xmp_packet(prompt: str, negative_prompt: str, software: str, loras: list[dict] = (), fields: dict[str, str] | None = None) -> bytes:
    """UTF-8 XMP with the prompt in dc:description, so non-ASCII prompts survive (TIFF text tags are ASCII), each
    LoRA fused into the model (file name, SHA-256, scale), and `fields` as freescale: properties (e.g. the input
    picture's digest)."""
    items = "".join(f'<rdf:li>{escape(Path(lora["path"]).name)} sha256:{lora["sha256"]} scale:{lora["scale"]:g}</rdf:li>' for lora in loras)
    properties = "".join(f"<freescale:{name}>{escape(value)}</freescale:{name}>" for name, value in (fields or {}).items())
    body = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:freescale="https://freescale-poster/ns/1.0/">'
        f'<xmp:CreatorTool>{escape(software)}</xmp:CreatorTool>'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(prompt)}</rdf:li></rdf:Alt></dc:description>'
        f'<freescale:negativePrompt>{escape(negative_prompt)}</freescale:negativePrompt>{properties}'
        + (f'<freescale:loras><rdf:Seq>{items}</rdf:Seq></freescale:loras>' if items else '') +
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return body.encode("utf-8")


def read_xmp_prompt(path: Path) -> str | None:
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags.get(XMP_TAG)
        if tag is None:
            return None
        text = bytes(tag.value).decode("utf-8")
    start = text.find('<rdf:li xml:lang="x-default">')
    end = text.find("</rdf:li>", start)
    if start < 0 or end < 0:
        return None
    from xml.sax.saxutils import unescape

    return unescape(text[start + len('<rdf:li xml:lang="x-default">') : end])


class BandTiler:
    """Collects row bands into tile-high strips and yields (tile, tile, 3) tiles in row-major order.

    Each finished strip is also reduced 2× and handed to `reduced` (the next pyramid level's rows)."""

    def __init__(self, height: int, width: int, tile: int, reduced: Callable[[np.ndarray], None] | None = None):
        self.height, self.width, self.tile = height, width, tile
        self.reduced = reduced
        self.rows_done = 0

    def tiles(self, bands: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        pending_rows = 0
        for band in bands:
            if band.ndim != 3 or band.shape[1:] != (self.width, 3) or band.dtype != np.uint8:
                raise ValueError(f"band of shape {band.shape} {band.dtype}; expected (rows, {self.width}, 3) uint8")
            pending.append(band)
            pending_rows += band.shape[0]
            while pending_rows >= self.tile or (pending_rows and self.rows_done + pending_rows >= self.height):
                strip = np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]
                rows = min(self.tile, strip.shape[0])
                yield from self._strip_tiles(strip[:rows])
                pending = [strip[rows:]] if rows < strip.shape[0] else []
                pending_rows = strip.shape[0] - rows
        if self.rows_done != self.height:
            raise ValueError(f"bands gave {self.rows_done} rows; the image has {self.height}")

    def _strip_tiles(self, strip: np.ndarray) -> Iterator[np.ndarray]:
        if self.rows_done + strip.shape[0] > self.height:
            raise ValueError(f"bands gave more than the image's {self.height} rows")
        if self.reduced is not None:
            self.reduced(reduce2(strip))
        self.rows_done += strip.shape[0]
        padded = np.zeros((self.tile, -(-self.width // self.tile) * self.tile, 3), np.uint8)
        padded[: strip.shape[0], : self.width] = strip
        for column in range(0, self.width, self.tile):
            yield padded[:, column : column + self.tile]


def raw_bands(path: Path, width: int, rows: int) -> Iterator[np.ndarray]:
    """Read back a level spilled to disk as raw RGB rows, `rows` at a time."""
    with open(path, "rb") as handle:
        while True:
            band = np.fromfile(handle, dtype=np.uint8, count=rows * width * 3)
            if band.size == 0:
                return
            yield band.reshape(-1, width, 3)


def write_pyramid(
    path: Path, bands: Iterable[np.ndarray], size: tuple[int, int], options: TiffOptions,
    parameters: dict, prompt: str, negative_prompt: str = "", xmp_fields: dict[str, str] | None = None,
) -> None:
    """Write the bands (top to bottom, (rows, W, 3) uint8) as a tiled pyramidal TIFF, atomically.

    Each level is streamed; its 2× reduction is spilled to a scratch file beside the output and read
    back in bands for the next level, so memory holds a few tile-high strips whatever the image size."""
    width, height = size
    path = Path(path)
    ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    shapes = level_shapes(height, width, options.tile)
    common = {
        "photometric": "rgb", "tile": (options.tile, options.tile), "resolution": (options.dpi, options.dpi),
        "resolutionunit": "INCH", "software": options.software, **options.codec(),
    }
    xmp = xmp_packet(prompt, negative_prompt, options.software, parameters.get("loras", []), xmp_fields)
    first = {"extratags": [(XMP_TAG, "B", len(xmp), xmp, True)], "datetime": True}
    if ome:
        first.update(metadata={"axes": "YXS"}, subifds=len(shapes) - 1)
    else:
        first.update(description=json.dumps(parameters, ensure_ascii=True, sort_keys=True), metadata=None)
    with atomic_path(path) as temporary, tempfile.TemporaryDirectory(prefix=".pyramid-", dir=path.parent) as scratch:
        with tifffile.TiffWriter(temporary, bigtiff=needs_bigtiff(height, width, options.tile), ome=ome) as tif:
            for level, (level_height, level_width) in enumerate(shapes):
                spill_path = Path(scratch) / f"level{level + 1}.raw"
                with open(spill_path, "wb") if level + 1 < len(shapes) else nullcontext() as spill:
                    sink = (lambda rows, spill=spill: spill.write(np.ascontiguousarray(rows).data)) if spill else None
                    tiler = BandTiler(level_height, level_width, options.tile, sink)
                    extra = first if level == 0 else {"subfiletype": 1, "metadata": None}
                    tif.write(tiler.tiles(bands), shape=(level_height, level_width, 3), dtype=np.uint8, **common, **extra)
                if level + 1 < len(shapes):
                    bands = raw_bands(spill_path, shapes[level + 1][1], options.tile)


def write_preview(tiff_path: Path, png_path: Path, max_side: int = 1024) -> None:
    """Save the largest pyramid level whose long side is at most `max_side` as a PNG."""
    from PIL import Image

    from renderer.output.files import write_png

    with tifffile.TiffFile(tiff_path) as tif:
        levels = tif.series[0].levels
        chosen = next((level for level in levels if max(level.shape[:2]) <= max_side), levels[-1])
        pixels = chosen.asarray()
    if max(pixels.shape[:2]) > max_side:
        image = Image.fromarray(pixels)
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        pixels = np.asarray(image)
    write_png(png_path, pixels)
