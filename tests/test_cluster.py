"""Whole renders on a local Ray cluster with CPU workers equal the single-process render (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from cluster.gang import Gang
from renderer.executor.spec import ExecutorSpec
from renderer import RenderRequest, render
from freescale_core import FreeScaleConfig
from renderer.cli import main as cli_main
from renderer.cli.options import build_parser, request_from_args
from renderer.errors import RenderError
from renderer.output.files import sidecar_path
from polling import wait_until


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    mask = np.zeros((256, 256), np.uint8)
    mask[40:200, 90:170] = 255
    Image.fromarray(mask).save(path)
    return path


def test_two_workers_write_the_single_process_render(ray_session, tiny_pipeline, tmp_path, mask_path, capsys):
    """256 → 512 → 1024 (a 4× stage), mask and stage images on, the guidance split over the 2 workers: the written
    poster equals the image rendered in one process to 1 level, the final latents to 1e-4."""
    args = ["--prompt", "a red kite", "--seed", "11", "--stages", "256x256,512x512,1024x1024", "--steps", "6",
            "--vae-mode", "exact", "--mask", str(mask_path), "--cosine-scale-bg", "0.5", "--save-stages", "--tile-size", "256"]
    single_request = request_from_args(build_parser().parse_args([*args, "--out", str(tmp_path / "single.tif")]))
    single = render(single_request, pipeline=tiny_pipeline, progress=False, write=False)
    out = tmp_path / "sharded.tif"
    assert cli_main([*args, "--workers", "2", "--out", str(out)]) == 0
    progress = capsys.readouterr().err
    assert "stage 1 512x512 on 2 workers" in progress and "stage 2 1024x1024 on 2 workers" in progress and "5/5" in progress

    with tifffile.TiffFile(out) as tif:
        written = tif.pages[0].asarray()
    assert written.shape == single.image.shape
    assert np.abs(written.astype(int) - single.image).max() <= 1
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["workers"]["count"] == 2 and sidecar["workers"]["backend"] == "gloo"
    assert sidecar["workers"]["cfg_split"] is True  # an even gang: one guidance branch per worker (renderer.parallel.guidance)
    assert sidecar["workers"]["strips"] == [[0, 64], [64, 128]]
    assert sidecar["workers"]["stage_ranks"] == [[0], [0, 1], [0, 1]]  # the base stage on rank 0, inside the gang
    assert sidecar["device"] == "cpu" and sidecar["dtype"] == "float32"  # the workers' model, not a driver's
    for index, expected in enumerate(single.stage_images):
        stage = np.asarray(Image.open(tmp_path / f"sharded.tif.stage{index}-{['256x256', '512x512'][index]}.png"))
        assert np.abs(stage.astype(int) - expected).max() <= 1


def test_three_workers_from_a_later_stage_tiled_vae_fast_mode(ray_session, tiny_pipeline, tmp_path):
    """--shard-from 1024x1024: rank 0 runs 256 and 512 alone, 3 workers the 4x stage on uneven strips (fast mode
    needs 16-row units there: 48 + 48 + 32), with diffusers-tiled transitions and final decode."""
    request = RenderRequest(prompt="blue square", seed=2, stages=((256, 256), (512, 512), (1024, 1024)), steps=5,
                            vae_mode="tiled", freescale=FreeScaleConfig(fast_mode=True, fusion_blur="hwc"), out=tmp_path / "t.png")
    single = render(request, pipeline=tiny_pipeline, progress=False, write=False)
    sharded = render(request.with_(workers=3, shard_from=(1024, 1024)), pipeline=tiny_pipeline, progress=False, write=False)
    assert float((sharded.latents - single.latents).abs().max()) <= 1e-4
    assert np.abs(sharded.image.astype(int) - single.image).max() <= 1
    assert sharded.metadata["workers"]["first_stage"] == 2 and sharded.metadata["workers"]["cfg_split"] is False
    assert sharded.metadata["workers"]["strips"] == [(0, 48), (48, 96), (96, 128)]
    assert len(sharded.metadata["seconds"]["stages"]) == 3


def test_the_driver_of_a_sharded_render_builds_no_model(ray_session, monkeypatch, tmp_path):
    """No UNet, VAE or text encoder with weights is constructed in the driver's process (the gang's actors build
    theirs; the preflight's shape-only models on the meta device hold none), and the base stage runs on rank 0:
    the render equals the single-process one. The counting is shown to work on an in-process load first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from renderer.models import load_pipeline

    built: list[str] = []
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        def counting(self, *args, _init=cls.__init__, _name=cls.__name__, **kwargs):
            _init(self, *args, **kwargs)
            if next(self.parameters()).device.type != "meta":
                built.append(_name)
        monkeypatch.setattr(cls, "__init__", counting)
    pipeline = load_pipeline("tiny")
    assert set(built) == {"AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection", "UNet2DConditionModel"}
    built.clear()

    request = RenderRequest(prompt="a red kite", seed=3, stages=((256, 256), (512, 512)), steps=4, out=tmp_path / "k.png")
    sharded = render(request.with_(workers=2), progress=False, write=False)
    assert built == []
    assert sharded.metadata["workers"]["stage_ranks"] == [[0], [0, 1]]
    single = render(request, pipeline=pipeline, progress=False, write=False)
    assert np.abs(sharded.image.astype(int) - single.image).max() <= 1


def test_too_many_workers_is_refused_before_anything_starts(tiny_pipeline, tmp_path):
    request = RenderRequest(prompt="p", stages=((256, 256), (512, 512)), steps=2, workers=9, out=tmp_path / "x.png")
    with pytest.raises(RenderError, match=r"--workers 9 at stage 512x512: 64 latent rows cannot be split into 9 strips.*at most 8 workers"):
        render(request, pipeline=tiny_pipeline, progress=False)


def test_shard_from_above_every_stage_is_refused(tiny_pipeline, tmp_path):
    request = RenderRequest(prompt="p", stages=((256, 256), (512, 512)), steps=2, workers=2, shard_from=(2048, 2048), out=tmp_path / "x.png")
    with pytest.raises(RenderError, match=r"--shard-from 2048x2048 is larger than every upscaling stage \(512x512\)"):
        render(request, pipeline=tiny_pipeline, progress=False)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"workers": -1}, r"--workers -1 must be 0"),
        ({"address": "ray://head:10001"}, r"--address ray://head:10001 .* give --workers N too"),
        ({"workers": 2, "gpus_per_worker": 2.0}, r"--gpus-per-worker 2.0: use 1, a fraction"),
        ({"shard_from": (1024, 1024)}, r"--shard-from 1024x1024 chooses which stages run on workers; give --workers N too"),
    ],
)
def test_bad_cluster_options_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(RenderError, match=message):
        RenderRequest(prompt="p", size=(512, 512), out=tmp_path / "x.png", **changes)


def test_a_gang_that_waits_past_queue_timeout_is_a_clear_error(ray_session):
    with pytest.raises(RenderError, match=r"^--queue-timeout 2: the cluster did not free 2 x \{1 CPU, 1 GPU\} within 2 s "
                                          r"\(it has [^)]* free of [^)]*\); raise --queue-timeout"):
        Gang(ExecutorSpec(workers=2, model="tiny", gpus_per_worker=1.0, queue_timeout_s=2))


def test_a_worker_that_cannot_load_the_model_is_a_one_line_error(ray_session, tmp_path):
    with pytest.raises(RenderError, match=r"a worker failed to start: .*no-such-model"):
        Gang(ExecutorSpec(workers=1, model=str(tmp_path / "no-such-model")))


def test_workers_without_the_memory_of_the_plan_are_refused_before_any_stage(ray_session, tmp_path):
    """--workers 2 at 16384² with the tiny model: each CPU worker needs about 48 GiB for its share of the last
    stage's VAE encode, and both share this machine's node. One line naming the need and the free memory, and
    the gang's reservation is released: all the session's CPUs come back (not merely as many as were free at the
    start, which an earlier test's gang, still being released then, would have lowered)."""
    import ray

    total = ray.cluster_resources()["CPU"]
    request = RenderRequest(prompt="p", stages=((256, 256), (16384, 16384)), steps=2, workers=2, out=tmp_path / "x.tif")
    with pytest.raises(RenderError, match=r"^--workers 2: 2 of them share one node and need about 2 x \d+\.\d GiB beyond the "
                                          r"model there, but it has \d+\.\d GiB free \(.*\); spread the workers") as caught:
        render(request, progress=False)
    assert "\n" not in str(caught.value)
    wait_until(lambda: ray.available_resources().get("CPU") == total, 30,
               lambda: f"the gang's CPUs back: {ray.available_resources().get('CPU')} of {total} free")


def test_auto_vae_mode_sizes_a_sharded_decode_by_the_strip_and_the_workers_memory(tiny_pipeline, tmp_path):
    """16384² with the tiny VAE (16 channels, fp32): one activation is 17 GB. Whole, three of them do not fit in
    80 % of 32 GiB; an eighth of the rows does."""
    from renderer.plan.render_plan import choose_vae_mode
    from renderer.cascade.worker import model_info

    request = RenderRequest(prompt="p", size=(16384, 16384), out=tmp_path / "x.tif")
    assert choose_vae_mode(request, model_info(tiny_pipeline), (16384, 16384), available=32 * 2**30) == "tiled"
    assert choose_vae_mode(request, model_info(tiny_pipeline), (16384, 16384), share=1 / 8, available=32 * 2**30) == "exact"
