"""Bad input is refused with one RenderError line (API) or exit code 2 and one stderr line (CLI), and no output
file is written."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freescale_core import FreeScaleConfig
from renderer import RenderError, RenderRequest, render
from renderer.cli import main


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def workdir(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(inputs / "wrong-size.png")  # 300x200
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(inputs / "base.png")
    mask = np.zeros((50, 100), np.uint8)
    mask[:, 50:] = 255
    Image.fromarray(mask).save(inputs / "wide-mask.png")  # 100x50: not the 1:1 aspect of the base
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path, inputs, out


def run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CLI_CASES = [
    # (id, extra argv, offending value that must appear in the message)
    ("size-not-multiple-of-32", ["--size", "1000x1000"], "1000x1000"),
    ("stages-change-aspect", ["--stages", "256x256,512x768"], "512x768"),
    ("upscale-stage-below-training-size", ["--stages", "128x128,192x192"], "192x192"),
    ("stages-not-increasing", ["--stages", "256x256,512x512,384x384"], "384x384"),
    ("stages-equal", ["--stages", "512x512,512x512"], "512x512"),
    ("steps-zero", ["--size", "512x512", "--steps", "0"], "--steps 0"),
    ("guidance-nan", ["--size", "512x512", "--guidance", "nan"], "nan"),
    ("device-cuda", ["--size", "512x512", "--device", "cuda"], "cuda"),
]


@pytest.mark.parametrize("case_id,argv,offending", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(capsys, workdir, case_id, argv, offending):
    if case_id == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, inputs, out = workdir
    target = out / "poster.png"
    steps = [] if "--steps" in argv else ["--steps", "2"]
    code, stdout, stderr = run_cli(capsys, ["--prompt", "a cat", "--quiet", *steps, *argv, "--out", str(target)])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "error" in lines[0]
    assert offending in lines[0], lines[0]
    assert stdout == ""
    assert files_in(out) == set()


def test_cli_wrong_image_size(capsys, workdir):
    _, inputs, out = workdir
    image = inputs / "wrong-size.png"
    code, _, stderr = run_cli(capsys, ["--prompt", "a cat", "--quiet", "--size", "512x512", "--steps", "2", "--image", str(image), "--out", str(out / "p.png")])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert str(image) in lines[0] and "300x200" in lines[0] and "256x256" in lines[0]
    assert files_in(out) == set()


def test_cli_mask_wrong_aspect(capsys, workdir):
    _, inputs, out = workdir
    mask = inputs / "wide-mask.png"
    code, _, stderr = run_cli(capsys, ["--prompt", "a cat", "--quiet", "--size", "512x512", "--steps", "2", "--mask", str(mask), "--out", str(out / "p.png")])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert str(mask) in lines[0] and "100x50" in lines[0]
    assert files_in(out) == set()


def test_cli_out_in_missing_folder(capsys, workdir):
    tmp_path, _, out = workdir
    target = tmp_path / "no-such-folder" / "p.png"
    code, _, stderr = run_cli(capsys, ["--prompt", "a cat", "--quiet", "--size", "512x512", "--steps", "2", "--out", str(target)])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert str(target.parent) in lines[0]
    assert not target.parent.exists()
    assert files_in(out) == set()


def test_cli_out_jpg(capsys, workdir):
    _, _, out = workdir
    target = out / "poster.jpg"
    code, _, stderr = run_cli(capsys, ["--prompt", "a cat", "--quiet", "--size", "512x512", "--steps", "2", "--out", str(target)])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert "poster.jpg" in lines[0] and ".png" in lines[0]
    assert files_in(out) == set()


def test_cli_success_writes_outputs(capsys, workdir):
    # the same invocation shape as the failures, but valid: proves the failures are about the bad value
    _, inputs, out = workdir
    code, stdout, _ = run_cli(capsys, ["--prompt", "a cat", "--quiet", "--stages", "256x256,512x512", "--steps", "2", "--image", str(inputs / "base.png"), "--out", str(out / "ok.png")])
    assert code == 0
    assert "512x512" in stdout
    assert files_in(out) == {"ok.png", "ok.png.json"}


# ------------------------------------------------------------------------------------------ Python API

def api_error(tiny_pipeline, **kwargs) -> str:
    with pytest.raises(RenderError) as info:
        request = RenderRequest(prompt="a cat", **kwargs)
        render(request, pipeline=tiny_pipeline, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_api_errors(tiny_pipeline, workdir):
    tmp_path, inputs, out = workdir
    png = out / "p.png"
    assert "1000x1000" in api_error(tiny_pipeline, size=(1000, 1000), steps=2, out=png)
    assert "1000x1000" in api_error(tiny_pipeline, stages=((256, 256), (1000, 1000)), steps=2, out=png)
    assert "512x768" in api_error(tiny_pipeline, stages=((256, 256), (512, 768)), steps=2, out=png)
    assert "192x192" in api_error(tiny_pipeline, stages=((128, 128), (192, 192)), steps=2, out=png)
    assert "384x384" in api_error(tiny_pipeline, stages=((256, 256), (512, 512), (384, 384)), steps=2, out=png)
    assert "0" in api_error(tiny_pipeline, size=(512, 512), steps=0, out=png)
    assert "nan" in api_error(tiny_pipeline, size=(512, 512), steps=2, guidance=math.nan, out=png)
    assert "inf" in api_error(tiny_pipeline, size=(512, 512), steps=2, guidance=math.inf, out=png)
    assert "300x200" in api_error(tiny_pipeline, size=(512, 512), steps=2, image=inputs / "wrong-size.png", out=png)
    assert "100x50" in api_error(tiny_pipeline, size=(512, 512), steps=2, mask=inputs / "wide-mask.png", out=png)
    assert "no-such" in api_error(tiny_pipeline, size=(512, 512), steps=2, out=tmp_path / "no-such" / "p.png")
    assert "p.jpg" in api_error(tiny_pipeline, size=(512, 512), steps=2, out=out / "p.jpg")
    assert "missing.png" in api_error(tiny_pipeline, size=(512, 512), steps=2, image=inputs / "missing.png", out=png)
    if not torch.cuda.is_available():
        message = api_error(tiny_pipeline, size=(512, 512), steps=2, out=png, device="cuda")
        assert "cuda" in message and "cpu" in message
    assert files_in(out) == set()


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError, match="fusion_blur"):
        FreeScaleConfig(fusion_blur="xy")
    with pytest.raises(ValueError, match="restart_fraction"):
        FreeScaleConfig(restart_fraction=1.0)
    with pytest.raises(ValueError, match="cosine_scale"):
        FreeScaleConfig(cosine_scale=math.nan)


# Regression guard: stage sizes that pass the general checks (multiples of 32, aspect kept, >= the training size)
# but whose block grids are not divisible by the scale (s_h, s_w) once crashed fast mode with a RuntimeError in
# strided_global_attention. Decision 9: such sizes must work or be refused up front with a RenderError.
def test_fast_mode_on_sizes_not_multiple_of_training_size(tiny_pipeline, tmp_path):
    request = RenderRequest(
        prompt="a cat", stages=((256, 256), (800, 800)), steps=2, freescale=FreeScaleConfig(fast_mode=True), out=tmp_path / "f.png"
    )
    try:
        result = render(request, pipeline=tiny_pipeline, progress=False)
    except RenderError as error:
        assert "800x800" in str(error) and "\n" not in str(error)
        assert list(tmp_path.iterdir()) == []
        return
    assert result.image.shape == (800, 800, 3)


def test_cli_fast_mode_on_sizes_not_multiple_of_training_size(capsys, workdir):
    _, _, out = workdir
    code, _, stderr = run_cli(capsys, ["--prompt", "a cat", "--quiet", "--fast-mode", "--stages", "256x256,800x800", "--steps", "2", "--out", str(out / "f.png")])
    lines = stderr.strip().splitlines()
    if code == 2:
        assert len(lines) == 1 and "error" in lines[0] and "800x800" in lines[0]
        assert files_in(out) == set()
    else:
        assert code == 0 and "f.png" in files_in(out)


def test_non_fast_mode_on_sizes_not_multiple_of_training_size(tiny_pipeline, tmp_path):
    request = RenderRequest(prompt="a cat", stages=((256, 256), (800, 800)), steps=2, out=tmp_path / "f.png")
    result = render(request, pipeline=tiny_pipeline, progress=False, write=False)
    assert result.image.shape == (800, 800, 3)


def test_bad_size_is_refused_before_any_weights_load(monkeypatch, tmp_path):
    import renderer.engine
    import renderer.cascade.worker

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the size check")

    monkeypatch.setattr(renderer.cascade.worker, "load_pipeline", no_loading)  # where every rank loads its model
    for model in ("sdxl-random", "toy"):
        request = RenderRequest(prompt="p", size=(1000, 1000), model=model, out=tmp_path / "x.tif")
        with pytest.raises(RenderError, match="1000x1000"):
            renderer.engine.render(request, progress=False)
    assert list(tmp_path.iterdir()) == []
