"""Inputs a new user really has: batch lines with values that look like options, switches turned off per line,
files saved by other editors, misplaced commands, broken or enormous images, damaged TIFFs and a stray
RAY_ADDRESS. Each is a poster rendered as asked, or one line saying what would work, exit 2 (README: Many
posters in one job)."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from renderer.cli import main
from renderer.cli.batch import read_batch
from renderer.output.tiff import TiffOptions, write_pyramid

SMALL = ["--stages", "256x256,512x512", "--steps", "2", "--quiet"]


def lines_of(path: Path, posters: list[dict]) -> Path:
    path.write_text("".join(json.dumps(poster, ensure_ascii=False) + "\n" for poster in posters), encoding="utf-8")
    return path


def refused(capsys, argv: list[str]) -> str:
    """The one line a refused command prints; it exits 2."""
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("freescale-render: error: ")
    return line


def test_values_beginning_with_a_dash_are_values(tmp_path):
    batch = lines_of(tmp_path / "b.jsonl", [{"prompt": "-a kite-", "negative-prompt": "-text, -watermark", "stages": "256x256",
                                            "out": str(tmp_path / "a.png")}])
    (poster,) = read_batch(batch, [])
    assert poster.request.prompt == "-a kite-" and poster.request.negative_prompt == "-text, -watermark"


def test_false_turns_off_a_switch_given_for_every_poster(tmp_path):
    batch = lines_of(tmp_path / "b.jsonl", [
        {"prompt": "p", "stages": "256x256", "out": str(tmp_path / "on.tif")},
        {"prompt": "p", "stages": "256x256", "out": str(tmp_path / "off.tif"), "preview": False, "no-freeu": False},
    ])
    on, off = read_batch(batch, ["--preview", "--no-freeu"])
    assert on.request.preview and not on.request.freescale.freeu
    assert not off.request.preview and off.request.freescale.freeu


def test_a_utf8_bom_and_crlf_line_ends_are_accepted(tmp_path):
    posters = [{"prompt": "eine grüne Kreatur", "stages": "256x256", "out": str(tmp_path / f"{name}.png")} for name in "ab"]
    batch = tmp_path / "windows.jsonl"
    batch.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(p, ensure_ascii=False).encode() + b"\r\n" for p in posters))
    assert [poster.request.prompt for poster in read_batch(batch, [])] == ["eine grüne Kreatur"] * 2


def test_a_utf16_file_says_to_save_it_as_utf8(tmp_path, capsys):
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "p", "stages": "256x256", "out": "a.png"}) + "\n", encoding="utf-16")
    line = refused(capsys, ["batch", str(batch)])
    assert f"batch file {batch} is UTF-16 text; save it as UTF-8" in line


@pytest.mark.parametrize("document, hint", [
    ({"prompt": "p", "stages": "256x256", "out": "a.png"}, "holds a JSON object over several lines; a batch is JSON Lines"),
    ([{"prompt": "p", "stages": "256x256", "out": "a.png"}], "is a JSON array; a batch is JSON Lines"),
], ids=["object", "array"])
def test_pretty_printed_json_says_what_a_line_is(tmp_path, capsys, document, hint):
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps(document, indent=2) + "\n")
    line = refused(capsys, ["batch", str(batch)])
    assert f"batch file {batch} {hint}" in line and "jq -c" in line


def test_an_option_before_the_batch_word_gets_the_command_that_works(tmp_path, capsys):
    batch = lines_of(tmp_path / "b.jsonl", [{"prompt": "p", "stages": "256x256", "out": str(tmp_path / "a.png")}])
    line = refused(capsys, ["--model", "tiny", "--quiet", "batch", str(batch)])
    assert line.endswith(f"'batch' must come first, before any option: freescale-render batch {batch} --model tiny --quiet")
    assert not (tmp_path / "a.png").exists()
    assert main(["--prompt", "batch", "--stages", "256x256", "--dry-run"]) == 0  # a prompt that is the word is a prompt


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims `width` x `height` (a decompression bomb's shape: tiny file, huge image)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:33] = header + struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


def noise(path: Path, size: tuple[int, int], format: str, cut: float = 1.0) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    return path


@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_an_enormous_image_is_one_line(tmp_path, capsys, option):
    bomb = png_claiming(tmp_path / "bomb.png", 40_000, 40_000)  # 1.6 G pixels: above Pillow's bomb limit
    line = refused(capsys, ["--prompt", "p", *SMALL, option, str(bomb), "--out", str(tmp_path / "x.tif")])
    assert f"{option} {bomb} " in line and "decompression bomb" in line
    if option == "--image":  # big, under the bomb limit: refused by its size before a pixel is decoded
        big = png_claiming(tmp_path / "big.png", 8192, 8192)
        line = refused(capsys, ["--prompt", "p", *SMALL, option, str(big), "--out", str(tmp_path / "x.tif")])
        assert f"--image {big} " in line  # one line naming the file (a header claiming 8192² over no pixels)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["bomb.png", "big.png"][: 1 + (option == "--image")])


@pytest.mark.parametrize("format", ["PNG", "JPEG", "TIFF"])
@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_a_truncated_image_is_one_line(tmp_path, capsys, option, format):
    cut = noise(tmp_path / f"cut.{format.lower()}", (256, 256), format, cut=0.5)
    line = refused(capsys, ["--prompt", "p", *SMALL, option, str(cut), "--out", str(tmp_path / "x.tif")])
    assert f"{option} {cut} is not a readable image" in line


@pytest.fixture
def poster_tif(tmp_path) -> Path:
    path = tmp_path / "p.tif"
    pixels = np.random.default_rng(1).integers(0, 256, (600, 700, 3), dtype=np.uint8)
    write_pyramid(path, [pixels], (700, 600), TiffOptions(tile=256), {}, "p")
    return path


def test_inspect_names_the_file_and_the_tile_of_a_damaged_tiff(poster_tif, capsys):
    with tifffile.TiffFile(poster_tif) as tif:
        offset = tif.pages[0].dataoffsets[4]  # 3 tiles across: tile 4 is row 1, column 1
    data = bytearray(poster_tif.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64
    poster_tif.write_bytes(bytes(data))
    line = refused(capsys, ["inspect", str(poster_tif)])
    assert f"{poster_tif}: page 0: tile 4 does not decode (tile row 1, column 1: pixels from x 256, y 256;" in line


def test_inspect_names_the_file_of_a_truncated_tiff(poster_tif, capsys):
    poster_tif.write_bytes(poster_tif.read_bytes()[: poster_tif.stat().st_size // 2])
    assert str(poster_tif) in refused(capsys, ["inspect", str(poster_tif)])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once closed: nothing listens there


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:{port}", "nothing answers at 127.0.0.1:{port}"),
    ("http://127.0.0.1:{port}", "is a dashboard URL"),
    ("head-node", "is not a Ray address"),
], ids=["closed", "dashboard", "garbage"])
def test_a_bad_ray_address_is_named_as_coming_from_the_environment(tmp_path, capsys, monkeypatch, address, says):
    import ray

    if ray.is_initialized():
        pytest.skip("this process already joined a Ray cluster, so RAY_ADDRESS is not read")
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", address.format(port=port))
    line = refused(capsys, ["--prompt", "p", *SMALL, "--workers", "2", "--out", str(tmp_path / "x.tif")])
    assert line.startswith(f"freescale-render: error: RAY_ADDRESS={address.format(port=port)}")
    assert says.format(port=port) in line and line.endswith("(RAY_ADDRESS is set in this process's environment: unset it, or give --address)")
    assert not list(tmp_path.iterdir())
