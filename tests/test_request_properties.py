"""Property-based tests of request and CLI parsing (hypothesis): every rejection is one line that names the
value, and a request the preflight accepts does not fail later for a reason it could have known."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from renderer.cli import main
from renderer.errors import RenderError
from renderer.plan.geometry import parse_size

SIZES = st.one_of(
    st.tuples(st.integers(-64, 4096), st.integers(-64, 4096)).map(lambda wh: f"{wh[0]}x{wh[1]}"),
    st.sampled_from(["256x256", "512x512", "512x256", "1024x1024", "1048576x1048576", "0x256", "256", "ax b", "", "256x256x2"]),
    st.text(max_size=12),
)
NUMBERS = st.one_of(st.integers(-5, 2_000_000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-1", "0", "x", ""]))
OPTIONS = {
    "--size": SIZES,
    "--stages": st.lists(SIZES, min_size=1, max_size=3).map(",".join),
    "--steps": NUMBERS,
    "--guidance": NUMBERS,
    "--restart-fraction": st.sampled_from(["0.3", "0", "1", "1.5", "-0.1", "nan"]),
    "--tile-size": st.sampled_from(["512", "256", "100", "0", "-16", "x"]),
    "--dpi": st.sampled_from(["300", "0", "-1", "nan", "inf"]),
    "--workers": st.sampled_from(["0", "-1", "x"]),
    "--vae-mode": st.sampled_from(["auto", "exact", "tiled", "fast"]),
    "--compression": st.sampled_from(["deflate", "none", "lzma", "zip"]),
    "--dtype": st.sampled_from(["float32", "float64", "half"]),
    "--checkpoint-every-steps": st.sampled_from(["0", "2", "-3"]),
    "--checkpoint-every-minutes": st.sampled_from(["10", "0", "-1", "nan"]),
    "--max-restarts": st.sampled_from(["3", "0", "-1"]),
    "--out": st.sampled_from(["OUT/p.tif", "OUT/p.png", "OUT/p.jpg", "OUT", "OUT/missing/p.tif"]),
    "--image": st.sampled_from(["OUT/in.png", "OUT/text.png", "OUT/nothing.png"]),
    "--metrics-port": st.sampled_from(["0", "9100", "-1", "70000", "x"]),
    "--metrics-linger": st.sampled_from(["0", "15", "-1", "nan"]),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("props")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(path / "in.png")
    (path / "text.png").write_text("not an image")
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
    lambda chosen: st.fixed_dictionaries({name: OPTIONS[name] for name in chosen})))
def test_every_rejection_is_one_line_naming_the_value(options, folder, capsys):
    argv = ["--prompt", "p"]
    for name, value in options.items():
        argv += [name, value.replace("OUT", str(folder))]
    if "--size" not in options and "--stages" not in options:
        argv += ["--size", "512x512"]
    if "--out" not in options:
        argv += ["--out", str(folder / "p.tif")]
    code = main([*argv, "--dry-run"])
    captured = capsys.readouterr()
    if code == 0:
        assert "UNet calls" in captured.out and captured.err == ""
        return
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freescale-render: error: "), captured.err
    named = [name for name in options if name in lines[0]] + [value for value in argv[1::2] if value and value in lines[0]]
    assert named or "--prompt" in lines[0], f"{lines[0]!r} names none of {argv}"


@given(text=st.text(max_size=20))
def test_parse_size_accepts_only_positive_width_by_height(text):
    try:
        width, height = parse_size(text)
    except RenderError as error:
        assert "\n" not in str(error) and repr(text) in str(error)
    else:
        assert width > 0 and height > 0 and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", text)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(side=st.sampled_from([256, 512]), aspect=st.sampled_from([(1, 1), (2, 1), (1, 2)]), steps=st.integers(1, 3),
       restart=st.sampled_from(["0", "0.3", "0.9"]), out=st.sampled_from(["p.tif", "p.png"]), fast=st.booleans())
def test_what_preflight_accepts_renders(side, aspect, steps, restart, out, fast, folder, capsys):
    size = f"{side * aspect[0]}x{side * aspect[1]}"
    argv = ["--prompt", "p", "--size", size, "--steps", str(steps), "--restart-fraction", restart,
            "--out", str(folder / out), "--quiet", *(["--fast-mode"] if fast else [])]
    if main([*argv, "--dry-run"]) != 0:
        return
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert (folder / out).is_file()
    assert math.isfinite((folder / out).stat().st_size)
