"""The plan is made once per poster (issue 33): a render enters the planning code once, a batch once per line and
reads its model's configs once, and the plan it checked is the plan it renders."""

from __future__ import annotations

import json

import pytest

import renderer.plan.render_plan as render_plan
import renderer.plan.shape as shape
from renderer.cli import main
from renderer.plan.render_plan import plan_render
from renderer.plan.request import RenderRequest
from renderer.plan.shape import model_shape


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How often the stages are planned and a model's configs are read (the cache emptied first)."""
    counts = {"planned": 0, "configs read": 0}
    planned, read = render_plan.planned_stages, shape.shape_of.__wrapped__

    def counting_plan(*args, **kwargs):
        counts["planned"] += 1
        return planned(*args, **kwargs)

    def counting_read(*args, **kwargs):
        counts["configs read"] += 1
        return read(*args, **kwargs)

    monkeypatch.setattr(render_plan, "planned_stages", counting_plan)
    monkeypatch.setattr(shape, "shape_of", shape.lru_cache(maxsize=16)(counting_read))
    return counts


def test_a_render_plans_once(counted, tmp_path):
    assert main(["--model", "tiny", "--prompt", "a red kite", "--size", "512x512", "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "a.tif")]) == 0
    assert counted == {"planned": 1, "configs read": 1}


def test_a_batch_plans_each_line_once_and_reads_its_models_configs_once(counted, tmp_path):
    batch = tmp_path / "night.jsonl"
    batch.write_text("".join(json.dumps({"prompt": f"kite {k}", "size": "512x512", "seed": k, "out": str(tmp_path / f"{k}.tif")}) + "\n"
                             for k in range(3)))
    assert main(["batch", str(batch), "--model", "tiny", "--steps", "2", "--quiet"]) == 0
    assert counted == {"planned": 3, "configs read": 1}
    assert all((tmp_path / f"{k}.tif").is_file() for k in range(3))


def test_a_folders_configs_are_read_again_once_changed(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    first = model_shape(str(tmp_path / "model"))
    assert model_shape(str(tmp_path / "model")) is first  # read once
    config = tmp_path / "model" / "unet" / "config.json"
    changed = {**json.loads(config.read_text()), "sample_size": 64}
    config.write_text(json.dumps(changed))
    again = model_shape(str(tmp_path / "model"))
    assert again is not first and again.geometry.train_px == 512 and first.geometry.train_px == 256


def test_the_plan_a_render_is_handed_is_the_one_it_renders(tiny_pipeline, tmp_path):
    """A caller's plan wins over planning again: here one made for other stages, which the render then runs."""
    from renderer import render

    request = RenderRequest(prompt="a red kite", size=(512, 512), steps=2, model="tiny", out=tmp_path / "a.tif")
    other = plan_render(request.with_(size=(256, 256)), model_shape("tiny").geometry)
    result = render(request, pipeline=tiny_pipeline, progress=False, write=False, plan=other)
    assert result.stages == [(256, 256)] and result.image.shape == (256, 256, 3)
