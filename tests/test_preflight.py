"""Preflight: requests that cannot work are refused in one line before any weight is loaded; --dry-run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import renderer.cascade.worker
import renderer.plan.preflight
from renderer import RenderRequest, render
from renderer.cli import main
from renderer.errors import RenderError
from renderer.plan.memory import unet_activation_bytes, vae_store_bytes
from renderer.plan.preflight import preflight
from renderer.plan.shape import model_shape


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(renderer.cascade.worker, "load_pipeline", refuse)  # where every rank loads its model


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freescale-render: error: ")
    return lines[0]


@pytest.mark.parametrize("options, expected", [
    (["--steps", "1000000"], "--steps 1000000 exceeds the scheduler's 1000 training timesteps"),
    (["--restart-fraction", "1.0"], "restart_fraction=1.0: use a value in [0, 1)"),
    (["--size", "1048576x1048576"], "1048576x1048576"),
])
def test_impossible_plans_are_refused_before_loading(no_weights, capsys, tmp_path, options, expected):
    argv = ["--prompt", "p", "--size", "512x512", "--out", str(tmp_path / "p.tif"), *options]
    assert expected in one_line_error(capsys, argv)


def test_unreadable_image_and_directory_output_are_one_line_errors(no_weights, capsys, tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    line = one_line_error(capsys, ["--prompt", "p", "--size", "512x512", "--image", str(tmp_path / "fake.png"), "--out", str(tmp_path / "p.tif")])
    assert f"--image {tmp_path / 'fake.png'} is not a readable image" in line
    (tmp_path / "taken.tif").mkdir()
    line = one_line_error(capsys, ["--prompt", "p", "--size", "512x512", "--out", str(tmp_path / "taken.tif")])
    assert f"--out {tmp_path / 'taken.tif'} is a directory" in line


def test_a_plan_too_large_for_memory_says_what_would_fit(no_weights, monkeypatch, tmp_path):
    monkeypatch.setattr(renderer.plan.preflight, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(renderer.plan.preflight, "process_memory", lambda: 0)
    with pytest.raises(RenderError, match=r"--size 4096x4096 needs about [\d.]+ GiB on cpu, which has 1.0 GiB; try --vae-mode tiled, --fast-mode, --workers \d+"):
        render(RenderRequest(prompt="p", size=(4096, 4096), out=tmp_path / "p.tif"))


def test_dry_run_prints_the_plan_and_loads_nothing(no_weights, capsys, tmp_path):
    assert main(["--prompt", "p", "--size", "1024x1024", "--steps", "10", "--out", str(tmp_path / "p.tif"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "stages: 256x256 -> 512x512 -> 1024x1024" in printed
    assert "UNet calls: 24" in printed  # 10 base steps + 2 stages x (10 - 3)
    assert "peak memory, coordinator (cpu)" in printed
    assert not list(tmp_path.iterdir())


def test_worker_estimate_is_a_share_of_the_rows(tmp_path):
    request = RenderRequest(prompt="p", size=(2048, 2048), workers=4, out=tmp_path / "p.tif")
    plan = preflight(request)
    single = preflight(request.with_(workers=0))
    assert plan.worker is not None and plan.worker.unet < single.coordinator.unet / 2
    assert plan.coordinator.unet < single.coordinator.unet  # the coordinator holds no model: the gang runs every stage
    assert plan.coordinator.weights == 0 and plan.coordinator.vae == 0


def test_the_rayjob_entrypoint_plans_no_model_on_the_driver_and_fp16_gpu_workers(no_weights, capsys, tmp_path):
    """The shipped RayJob's command with `sdxl-random` for its model folder (same shapes): the driver holds no
    weights, the 8 workers are planned on their GPUs in fp16 (37.80 GiB each when they were planned in fp32),
    rank 0's whole base stage included."""
    import shlex

    import yaml

    job = yaml.safe_load((ROOT / "deploy/k8s/overlays/rayjob/job/rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])[2:]
    argv[argv.index("--model") + 1] = "sdxl-random"
    argv[argv.index("--out") + 1] = str(tmp_path / "poster.tif")
    assert main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (driver,) = [line for line in lines if line.startswith("peak memory, coordinator")]
    (worker,) = [line for line in lines if line.startswith("peak memory, each worker")]
    assert driver.startswith("peak memory, coordinator (cpu):") and "no model" in driver and "weights" not in driver
    assert worker.startswith("peak memory, each worker (cuda):")
    weights = float(re.search(r"weights ([\d.]+),", worker).group(1))
    assert 6 < weights < 7  # SDXL's UNet (2.6 B parameters) and text encoders (0.8 B) at 2 bytes, its VAE upcast to 4
    assert float(re.search(r"each worker \(cuda\): ([\d.]+) GiB", worker).group(1)) < 24


@pytest.mark.parametrize("size, goal, rows", [(8192, 12, 8), (16384, 24, 4)])
def test_eight_gpu_workers_fit_a_farm_gpu_with_the_exact_vae(no_weights, capsys, tmp_path, size, goal, rows):
    """SDXL shapes, 8 GPU workers in fp16, --vae-mode exact: each worker within the issue's goal (the VAE's
    strip decode took 48.75 GiB at 16384² before it ran in bands), the band height printed, and the layers
    kept between bands in host memory said."""
    argv = ["--model", "sdxl-random", "--prompt", "a kite", "--size", f"{size}x{size}", "--workers", "8",
            "--gpus-per-worker", "1", "--dtype", "float16", "--vae-mode", "exact", "--out", str(tmp_path / "p.tif"), "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    (worker,) = [line for line in lines if line.startswith("peak memory, each worker")]
    assert float(re.search(r"\(cuda\): ([\d.]+) GiB", worker).group(1)) <= goal
    (bands,) = [line for line in lines if line.startswith("exact VAE, each worker")]
    assert f"bands of {rows} latent rows ({8 * rows} px)" in bands and "GiB of host memory" in bands


def test_vae_store_is_a_resnets_input_and_hidden_activation():
    """A 2-level VAE (8, 16 channels) on 64 full-resolution pixels: the decoder's last resnet holds its 16-channel
    input and 8-channel hidden activation at full size, more than the upsampler's 16 channels at ¼ and full size."""
    vae = {"block_out_channels": [8, 16]}
    assert vae_store_bytes(vae, 64, 4) == (16 + 8) * 64 * 4


def test_unet_estimate_counts_every_held_skip(tmp_path):
    """Against a hand count for a 2-level UNet: conv_in + 2 resnets at full size, a downsampler output, 2 resnets
    at ¼ size, plus 28 activations of the attention level; CFG batch of 2, fp32."""
    unet = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2}
    skips = 8 * 64 + 2 * 8 * 64 + 8 * 16 + 2 * 16 * 16
    assert unet_activation_bytes(unet, (8, 8), 4) == 2 * 4 * (skips + 28 * 16 * 16)


def test_model_shape_of_a_folder_reads_configs_only(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    shape = model_shape(str(tmp_path / "model"))
    assert shape.unet_params == sum(p.numel() for p in tiny_pipeline.unet.parameters())
    assert shape.vae_params == sum(p.numel() for p in tiny_pipeline.vae.parameters())
    assert shape.train_timesteps == 1000
    assert model_shape("org/some-hub-id") is None


def test_mask_of_the_wrong_aspect_is_refused_before_loading(no_weights, capsys, tmp_path):
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "m.png")
    line = one_line_error(capsys, ["--prompt", "p", "--size", "512x512", "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "p.tif")])
    assert "--mask" in line and "aspect ratio" in line


def test_guidance_off_plans_the_unet_step_of_one_branch(tmp_path):
    """At --guidance 1 every UNet call runs the conditional branch alone: its activations, half those of a CFG batch
    of 2, are what the estimate counts (the weights and the VAE do not change)."""
    request = RenderRequest(prompt="a kite", size=(2048, 2048), model="sdxl-random", out=tmp_path / "a.tif", workers=4)
    guided, unguided = preflight(request), preflight(request.with_(guidance=1.0))
    assert abs(unguided.worker.unet * 2 - guided.worker.unet) <= 1  # each rounded down to whole bytes once
    assert (unguided.worker.weights, unguided.worker.vae) == (guided.worker.weights, guided.worker.vae)
