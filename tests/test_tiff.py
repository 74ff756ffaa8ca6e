"""The streamed pyramidal TIFF writer against what tifffile, libtiff and OpenSlide read back."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import tifffile

from renderer.output.tiff import BandTiler, TiffOptions, level_shapes, needs_bigtiff, read_xmp_prompt, reduce2, write_pyramid


def structured_image(height: int, width: int) -> np.ndarray:
    """Ramps in each channel plus a distinct offset per 100-row band, so misplaced tiles show."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([(rows + cols) % 256, (3 * cols) % 256, (rows // 100 * 37 + cols // 7) % 256], axis=-1)
    return image.astype(np.uint8)


def bands_of(image: np.ndarray, heights: list[int]):
    start, index = 0, 0
    while start < image.shape[0]:
        height = heights[index % len(heights)]
        yield image[start : start + height]
        start += height
        index += 1


@pytest.fixture
def image():
    return structured_image(1000, 1312)


def test_written_pixels_equal_the_input_for_any_band_heights(tmp_path, image):
    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [37, 300, 1]), (1312, 1000), TiffOptions(tile=256), {"seed": 1}, "a prompt")
    with tifffile.TiffFile(path) as tif:
        assert np.array_equal(tif.pages[0].asarray(), image)
        assert json.loads(tif.pages[0].description) == {"seed": 1}
        assert not tif.is_bigtiff


def test_pyramid_levels_halve_down_to_one_tile_and_match_area_average(tmp_path, image):
    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [256]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    with tifffile.TiffFile(path) as tif:
        shapes = [page.shape[:2] for page in tif.pages]
        assert shapes == [(1000, 1312), (500, 656), (250, 328), (125, 164)]
        assert max(shapes[-1]) <= 256 and max(shapes[-2]) > 256
        expected = image.astype(np.float64).reshape(500, 2, 656, 2, 3).mean(axis=(1, 3))
        assert np.abs(tif.pages[1].asarray() - expected).max() <= 0.5 + 1e-9
        for page in tif.pages:
            assert page.is_tiled and page.tilewidth == 256
            assert min(page.databytecounts) > 0
            assert page.software.startswith("freescale-poster")
            assert page.get_resolution() == (300, 300)
        assert all(page.subfiletype == 1 for page in tif.pages[1:])


def test_ome_variant_stores_levels_as_subifds(tmp_path, image):
    path = tmp_path / "p.ome.tif"
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.pages) == 1
        assert len(tif.pages[0].subifds) == 3
        levels = tif.series[0].levels
        assert [level.shape[:2] for level in levels] == [(1000, 1312), (500, 656), (250, 328), (125, 164)]
        assert np.array_equal(levels[0].asarray(), image)


def test_non_ascii_prompt_round_trips_through_xmp(tmp_path, image):
    path = tmp_path / "p.tif"
    prompt = "Ein grüner Käfer, 緑の生き物 <&> \"quoted\""
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256), {"prompt": prompt}, prompt)
    assert read_xmp_prompt(path) == prompt
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].description.isascii()
        assert json.loads(tif.pages[0].description)["prompt"] == prompt


@pytest.mark.parametrize("compression", ["none", "jpeg", "webp", "zstd"])
def test_other_compressions_round_trip(tmp_path, image, compression):
    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256, compression=compression), {}, "p")
    with tifffile.TiffFile(path) as tif:
        back = tif.pages[0].asarray()
    if compression in ("none", "zstd"):
        assert np.array_equal(back, image)
    else:  # lossy: close on average
        assert np.abs(back.astype(int) - image).mean() < 20


def test_failure_midway_leaves_no_file(tmp_path, image):
    path = tmp_path / "p.tif"

    def failing():
        yield image[:512]
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError, match="decoder died"):
        write_pyramid(path, failing(), (1312, 1000), TiffOptions(tile=256), {}, "p")
    assert list(tmp_path.iterdir()) == []


def test_too_few_rows_is_an_error_and_leaves_no_file(tmp_path, image):
    path = tmp_path / "p.tif"
    with pytest.raises(ValueError, match="rows"):
        write_pyramid(path, iter([image[:700]]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    assert list(tmp_path.iterdir()) == []


def test_band_tiler_yields_row_major_zero_padded_tiles():
    image = structured_image(300, 200)
    tiles = list(BandTiler(300, 200, 128).tiles(bands_of(image, [50])))
    assert len(tiles) == 3 * 2
    assert np.array_equal(tiles[3][:, :72], image[128:256, 128:200])
    assert not tiles[3][:, 72:].any()
    assert np.array_equal(tiles[4][:44], image[256:300, :128]) and not tiles[4][44:].any()


def test_reduce2_rounds_the_area_average():
    pixels = np.array([[[0] * 3, [1] * 3], [[1] * 3, [1] * 3]], np.uint8)  # mean 0.75 → 1
    assert reduce2(pixels)[0, 0, 0] == 1
    odd = np.full((3, 3, 3), 10, np.uint8)
    assert reduce2(odd).shape == (2, 2, 3) and (reduce2(odd) == 10).all()


def test_bigtiff_only_when_the_uncompressed_pyramid_could_pass_4gb():
    assert level_shapes(16384, 16384, 512)[-1] == (512, 512)
    assert not needs_bigtiff(16384, 16384, 512)  # 1.07 GB
    assert needs_bigtiff(40000, 40000, 512)  # 6.4 GB


@pytest.mark.skipif(shutil.which("tiffcp") is None, reason="libtiff-tools not installed (make test installs them)")
def test_libtiff_decodes_every_tile(tmp_path, image):
    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    info = subprocess.run(["tiffinfo", str(path)], capture_output=True, text=True, check=True).stdout
    assert info.count("Tile Width: 256") == 4
    copy = tmp_path / "copy.tif"
    subprocess.run(["tiffcp", "-c", "none", str(path), str(copy)], check=True)
    with tifffile.TiffFile(copy) as tif:
        assert np.array_equal(tif.pages[0].asarray(), image)


def test_openslide_sees_the_pyramid(tmp_path, image):
    openslide = pytest.importorskip("openslide")
    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count == 4
    assert slide.level_dimensions[0] == (1312, 1000)


def test_outputs_get_the_usual_file_permissions(tmp_path, image):
    import os

    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_inspect_reports_a_damaged_tile_in_one_line(tmp_path, image, capsys):
    from renderer.cli import main

    path = tmp_path / "p.tif"
    write_pyramid(path, bands_of(image, [512]), (1312, 1000), TiffOptions(tile=256), {}, "p")
    assert main(["inspect", str(path)]) == 0
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "tile 5 does not decode" in error
