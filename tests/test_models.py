"""Model loading: a saved diffusers folder and the packed single file render the same image as the built-in model;
bad model inputs give a RenderError naming the path; the shipped toy weights fit their budget and their spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from renderer import RenderError, RenderRequest, render
from renderer.models import load_pipeline, model_geometry, save_single_file
from renderer.models.builtin import TOY, TOY_WEIGHTS

PROMPT = "a blue bicycle"

# Regression guard: folder-loaded weights used to stay in the safetensors-mapped, unaligned buffers, and CPU GEMM
# kernels round unaligned operands differently, so a render from a saved folder differed by 1 level in a few
# pixels from the same weights in memory. load_pipeline must give bit-identical renders on every load path.


def request_for(tmp_path, name):
    return RenderRequest(prompt=PROMPT, size=(512, 512), steps=3, seed=4, out=tmp_path / name)


@pytest.fixture(scope="module")
def in_memory(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    return render(request_for(folder, "m.png"), pipeline=tiny_pipeline, progress=False)


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)


def test_tiny_geometry(tiny_pipeline):
    geometry = model_geometry(tiny_pipeline)
    assert geometry.train_px == 256
    assert geometry.granularity == 32


def test_tiny_is_reproducible_across_loads(tiny_pipeline):
    assert_same_weights(tiny_pipeline, load_pipeline("tiny"))


@pytest.fixture(scope="module")
def saved_folder(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny-folder"
    tiny_pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder_render(saved_folder, tmp_path_factory):
    loaded = load_pipeline(str(saved_folder))
    out = tmp_path_factory.mktemp("folder-render")
    return loaded, render(request_for(out, "f.png"), pipeline=loaded, progress=False)


def test_saved_folder_has_same_components(tiny_pipeline, saved_folder):
    assert (saved_folder / "model_index.json").is_file()
    loaded = load_pipeline(str(saved_folder))
    assert_same_weights(tiny_pipeline, loaded)
    assert type(loaded.scheduler) is type(tiny_pipeline.scheduler)
    for key in ("timestep_spacing", "steps_offset", "beta_schedule", "prediction_type"):
        assert loaded.scheduler.config[key] == tiny_pipeline.scheduler.config[key]
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name)(PROMPT).input_ids == getattr(tiny_pipeline, name)(PROMPT).input_ids
    assert loaded.unet.config.sample_size == 32 and model_geometry(loaded) == model_geometry(tiny_pipeline)


def test_save_pretrained_folder_renders_same_image(folder_render, in_memory):
    _, result = folder_render
    assert np.array_equal(result.image, in_memory.image)


def test_render_loads_folder_by_name(saved_folder, folder_render, tmp_path):
    request = request_for(tmp_path, "n.png").with_(model=str(saved_folder))
    result = render(request, progress=False)
    assert np.array_equal(result.image, folder_render[1].image)
    assert (tmp_path / "n.png").is_file()


def test_single_file_renders_same_image(tiny_pipeline, in_memory, tmp_path):
    path = tmp_path / "m.safetensors"
    save_single_file(tiny_pipeline, path)
    assert path.is_file() and path.stat().st_size > 0
    loaded = load_pipeline(str(path))
    assert_same_weights(tiny_pipeline, loaded)
    assert loaded.tokenizer_2("a cat").input_ids == tiny_pipeline.tokenizer_2("a cat").input_ids
    result = render(request_for(tmp_path, "s.png"), pipeline=loaded, progress=False)
    assert np.array_equal(result.image, in_memory.image)


def assert_render_error_names(model: str):
    with pytest.raises(RenderError) as info:
        load_pipeline(model)
    message = str(info.value)
    assert model in message
    assert "\n" not in message
    return message


def test_nonexistent_path(tmp_path):
    assert_render_error_names(str(tmp_path / "no" / "such" / "model"))


def test_nonexistent_safetensors(tmp_path):
    message = assert_render_error_names(str(tmp_path / "missing.safetensors"))
    assert "does not exist" in message


def test_folder_without_model_index(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "unet").mkdir()
    message = assert_render_error_names(str(folder))
    assert "model_index.json" in message


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x13\x37 this is not a safetensors file \x00\xff" * 10)
    assert_render_error_names(str(path))


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n")
    assert_render_error_names(str(path))


def test_broken_diffusers_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text("{ this is not json")
    assert_render_error_names(str(folder))


def test_a_folder_with_only_pickled_weights_is_refused_with_how_to_convert(tiny_pipeline, tmp_path):
    """save_pretrained without safetensors writes .bin files, which unpickle (and may run code) when loaded."""
    folder = tmp_path / "pickled"
    tiny_pipeline.save_pretrained(folder, safe_serialization=False)
    assert list((folder / "unet").glob("*.bin")) and not list((folder / "unet").glob("*.safetensors"))  # (transformers' text
    # encoders are written as safetensors whatever is asked)
    message = assert_render_error_names(str(folder))
    assert "only pickled weights (diffusion_pytorch_model.bin)" in message
    assert "save_pretrained(FOLDER) writes safetensors" in message


def test_a_pickled_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even read")
    message = assert_render_error_names(str(path))
    assert "pickled checkpoint (.ckpt) can run code" in message


def test_a_packed_file_names_its_scheduler_from_a_fixed_list(tiny_pipeline, tmp_path):
    """A packed file whose scheduler_class names something else in diffusers (here a pipeline class) is refused,
    not looked up and called."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_single_file(tiny_pipeline, good)
    with safe_open(str(good), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    assert metadata["scheduler_class"] == "EulerDiscreteScheduler"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "scheduler_class": "DiffusionPipeline"})
    message = assert_render_error_names(str(bad))
    assert "scheduler_class 'DiffusionPipeline' is not one this format takes" in message


def test_shipped_toy_weights_fit_the_budget_and_match_the_toy_spec():
    """Issue 13's weight budget (40 MB, decimal, every file of the folder) and the spec that `renderer.plan.shape` and
    `renderer.toy.train` read: the shipped configs must say what TOY says."""
    files = [path for path in TOY_WEIGHTS.rglob("*") if path.is_file()]
    total = sum(path.stat().st_size for path in files)
    assert total <= 40_000_000, f"toy weights hold {total:,} bytes"
    vae = json.loads((TOY_WEIGHTS / "vae" / "config.json").read_text())
    unet = json.loads((TOY_WEIGHTS / "unet" / "config.json").read_text())
    assert (tuple(vae["block_out_channels"]), vae["norm_num_groups"]) == (TOY.vae_channels, TOY.vae_groups)
    assert (tuple(unet["block_out_channels"]), unet["norm_num_groups"], unet["sample_size"]) == (
        TOY.unet_channels, TOY.unet_groups, TOY.sample_size)


def test_the_cli_restarts_each_model_where_it_renders_best_unless_told():
    """--model toy restarts the upscaling stages at 0.8 (docs/benchmarks.md), other models at the paper's 0.3;
    an explicit --restart-fraction wins for every model. The value is the request's (and so its render id's)."""
    from renderer.cli.options import build_parser, request_from_args

    def restart(*options: str) -> float:
        return request_from_args(build_parser().parse_args(["--prompt", "p", "--size", "512x512", *options])).freescale.restart_fraction

    assert restart("--model", "toy") == 0.8
    assert restart() == restart("--model", "sdxl-random") == restart("--model", "/models/sdxl") == 0.3
    assert restart("--model", "toy", "--restart-fraction", "0.3") == 0.3
    assert restart("--restart-fraction", "0.5") == 0.5
