"""End-to-end tiny renders on CPU: 256² → 512² → 1024², outputs, sidecar, determinism."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from freescale_core import FreeScaleConfig
from renderer import RenderRequest, RenderResult, render
from renderer.output.files import sidecar_path

PROMPT = "a red lighthouse on a cliff"


@pytest.fixture(scope="module")
def rendered(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("render")
    request = RenderRequest(prompt=PROMPT, size=(1024, 1024), steps=4, out=folder / "a.png")
    result = render(request, pipeline=tiny_pipeline, progress=False)
    return request, result


def test_output_png(rendered):
    request, result = rendered
    assert isinstance(result, RenderResult)
    assert request.out.is_file()
    with Image.open(request.out) as image:
        assert image.format == "PNG"
        assert image.size == (1024, 1024)
        assert image.mode == "RGB"
        pixels = np.asarray(image)
    assert result.image.shape == (1024, 1024, 3) and result.image.dtype == np.uint8
    assert np.array_equal(pixels, result.image)
    # a real picture, not a constant
    assert pixels.std() > 1.0
    # no temporary files left beside it
    assert sorted(p.name for p in request.out.parent.iterdir()) == ["a.png", "a.png.json"]


def test_result_fields(rendered):
    _, result = rendered
    assert result.stages == [(256, 256), (512, 512), (1024, 1024)]
    assert result.latents.shape == (1, 4, 128, 128) and result.latents.dtype == torch.float32
    assert torch.isfinite(result.latents).all()


def test_sidecar(rendered):
    request, result = rendered
    sidecar = sidecar_path(request.out)
    assert sidecar.is_file()
    data = json.loads(sidecar.read_text())
    assert data["stages"] == ["256x256", "512x512", "1024x1024"]
    assert data["transition_vae_modes"] == ["exact", "exact"]
    assert data["request"]["seed"] == 0 and data["freescale"]["seed"] == 0
    assert data["request"]["prompt"] == PROMPT
    assert data["request"]["steps"] == 4
    assert data["request"]["size"] == [1024, 1024]
    assert data["request"]["out"] == str(request.out)
    assert data["freescale"] == FreeScaleConfig().to_dict()
    versions = data["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["diffusers"] == diffusers.__version__
    for name in ("python", "numpy", "pillow", "transformers"):
        assert versions[name] and versions[name] != "not installed"
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    assert len(data["seconds"]["stages"]) == 3
    assert data["vae_mode"] in ("exact", "tiled", "untiled")
    expected = json.loads(json.dumps(result.metadata, sort_keys=True))
    assert {k: v for k, v in data.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}
    assert data["seconds"]["stages"] == expected["seconds"]["stages"]
    assert expected["seconds"]["total"] >= sum(expected["seconds"]["stages"])
    assert data["seconds"]["total"] >= sum(data["seconds"]["stages"])


def test_sidecar_has_total_time(rendered):
    request, result = rendered
    data = json.loads(sidecar_path(request.out).read_text())
    assert data["seconds"]["total"] == pytest.approx(result.metadata["seconds"]["total"])


def test_same_request_gives_identical_bytes(rendered, tiny_pipeline, tmp_path):
    request, result = rendered
    again = request.with_(out=tmp_path / "b.png")
    second = render(again, pipeline=tiny_pipeline, progress=False)
    assert request.out.read_bytes() == again.out.read_bytes()
    assert np.array_equal(second.image, result.image)
    assert torch.equal(second.latents, result.latents)


def small_request(tmp_path, name, **changes):
    return RenderRequest(prompt=PROMPT, size=(512, 512), steps=3, out=tmp_path / name, **changes)


def test_different_seed_gives_different_image(tiny_pipeline, tmp_path):
    a = render(small_request(tmp_path, "s0.png", seed=0), pipeline=tiny_pipeline, progress=False)
    b = render(small_request(tmp_path, "s1.png", seed=1), pipeline=tiny_pipeline, progress=False)
    assert a.stages == b.stages == [(256, 256), (512, 512)]
    assert a.image.shape == b.image.shape == (512, 512, 3)
    assert not np.array_equal(a.image, b.image)
    assert (tmp_path / "s0.png").read_bytes() != (tmp_path / "s1.png").read_bytes()
    assert json.loads((tmp_path / "s1.png.json").read_text())["request"]["seed"] == 1


def test_write_false_writes_nothing(tiny_pipeline, tmp_path):
    result = render(small_request(tmp_path, "n.png", save_stages=True), pipeline=tiny_pipeline, progress=False, write=False)
    assert list(tmp_path.iterdir()) == []
    assert result.image.shape == (512, 512, 3)
    assert result.stage_images and result.stage_images[0].shape == (256, 256, 3)


def test_save_stages_writes_intermediate_pngs(tiny_pipeline, tmp_path):
    request = small_request(tmp_path, "st.png", save_stages=True)
    result = render(request, pipeline=tiny_pipeline, progress=False)
    stage0 = tmp_path / "st.png.stage0-256x256.png"
    assert stage0.is_file()
    with Image.open(stage0) as image:
        assert image.size == (256, 256)
        assert np.array_equal(np.asarray(image), result.stage_images[0])
    with Image.open(tmp_path / "st.png") as image:
        assert np.array_equal(np.asarray(image), result.image)
