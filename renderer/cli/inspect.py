"""`freescale-render inspect FILE.tif`: describe a written poster (or a clip's frames) and check that every tile decodes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tifffile

from renderer.errors import RenderError
from renderer.output.tiff import read_xmp_prompt


def levels(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Level 0 and its reductions, whichever layout (page chain or SubIFDs) was used."""
    series = tif.series[0]
    return [level.keyframe for level in series.levels]


def every_page(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Every page of every level: one per level for a poster, one per frame for a clip's frames (tifffile reads
    pages after the first as light frames; `aspage` makes each a full page, with its tiles)."""
    return [page.aspage() for level in tif.series[0].levels for page in level.pages]


def check_tiles(page: tifffile.TiffPage) -> int:
    """Decode every tile of `page` one at a time; return the tile count. Raises on a missing or bad tile."""
    if not page.is_tiled:
        raise RenderError(f"page {page.index} is not tiled")
    empty = [index for index, count in enumerate(page.databytecounts) if count == 0]
    if empty:
        raise RenderError(f"page {page.index} has {len(empty)} missing tiles (first: {empty[0]})")
    decoded = 0
    try:
        for segment, _, _ in page.segments():
            if segment is None:
                raise RenderError(f"page {page.index}: tile {decoded} does not decode ({tile_place(page, decoded)})")
            decoded += 1
    except RenderError:
        raise
    except Exception as error:  # any codec error means a damaged tile
        raise RenderError(f"page {page.index}: tile {decoded} does not decode ({tile_place(page, decoded)}; "
                          f"{type(error).__name__}: {error})") from error
    return decoded


def tile_place(page: tifffile.TiffPage, index: int) -> str:
    across = -(-page.imagewidth // page.tilewidth)
    row, column = divmod(index, across)
    return f"tile row {row}, column {column}: pixels from x {column * page.tilewidth}, y {row * page.tilelength}"


def describe(path: Path) -> dict:
    if Path(path).suffix.lower() == ".mp4":
        from renderer.output.clip_files import frames_path

        raise RenderError(f"{path} is a clip; inspect its lossless frames instead: {frames_path(path)}")
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, tifffile.TiffFileError) as error:
        raise RenderError(f"{path} is not a readable TIFF ({error})") from error
    try:
        with tif:
            return report_of(path, tif)
    except RenderError as error:
        raise RenderError(f"{path}: {error}") from None
    except Exception as error:  # a damaged IFD chain or tag: tifffile raises many kinds
        raise RenderError(f"{path} is damaged ({type(error).__name__}: {error}); it cannot be read as a TIFF") from None


def report_of(path: Path, tif: tifffile.TiffFile) -> dict:
    """The inspect report of an open TIFF; every tile of every page is decoded."""
    pages = levels(tif)
    first = pages[0]
    parameters = None
    if first.description and first.description.lstrip().startswith("{"):
        parameters = json.loads(first.description)
    report = {
        "file": str(path), "bigtiff": tif.is_bigtiff, "ome": tif.is_ome,
        "size": f"{first.imagewidth}x{first.imagelength}",
        "levels": [f"{page.imagewidth}x{page.imagelength}" for page in pages],
        "tile": f"{first.tilewidth}x{first.tilelength}", "compression": first.compression.name,
        "dpi": first.get_resolution()[0] if first.tags.get("XResolution") else None,
        "software": first.software, "prompt": read_xmp_prompt(path), "parameters": parameters,
        "frames": len(tif.series[0].levels[0].pages), "tiles_checked": sum(check_tiles(page) for page in every_page(tif)),
    }
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="freescale-render inspect", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        raise RenderError(f"{args.file} does not exist")
    report = describe(args.file)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    for key, value in report.items():
        if key == "parameters" and value:
            value = json.dumps(value, ensure_ascii=False)[:2000]
        print(f"{key:14s} {value}")
    print(f"ok: all {report['tiles_checked']} tiles present and decoded", file=sys.stderr)
    return 0
