"""Clips (issue 26): `--frames N` with a motion model, written as an MP4, lossless frames and a preview;
reproducible, resumable, sharded like posters, and bad input refused in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import tifffile
import torch
from diffusers import MotionAdapter
from PIL import Image

from renderer import RenderRequest, render
from renderer.cascade.stages import Conditioning, fresh_scheduler, predict_noise
from renderer.cli import main
from renderer.cli.inspect import describe
from renderer.errors import RenderError
from renderer.models import load_pipeline
from renderer.output.clip_files import frames_path, mp4_size
from renderer.output.files import preview_path
from renderer.output.files import sidecar_path
from test_resume import StopAt, Stopped, checkpoints, run_cli, wait_for

CLIP = dict(prompt="a red kite", seed=5, stages=((256, 256), (512, 512)), steps=3, model="tiny-video", frames=2, fps=12.0)


@pytest.fixture(scope="module")
def video_pipeline():
    return load_pipeline("tiny-video")


def test_a_clip_gives_an_mp4_lossless_frames_a_preview_and_a_sidecar(video_pipeline, tmp_path):
    out = tmp_path / "clip.mp4"
    result = render(RenderRequest(**CLIP, out=out, save_stages=True), pipeline=video_pipeline, progress=False)
    assert result.image.shape == (2, 512, 512, 3)
    assert np.abs(result.image[1].astype(int) - result.image[0]).mean() > 1  # two frames, not one twice
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate) == ("h264", "yuv420p", 12)
    assert [frame.shape for frame in decoded] == [(512, 512, 3)] * 2
    assert np.array_equal(tifffile.imread(frames_path(out)), result.image)  # the written frames are the rendered ones
    report = describe(frames_path(out))  # `freescale-render inspect`: every tile of every frame decodes
    assert report["frames"] == 2 and report["tiles_checked"] == 2 and report["parameters"]["render_id"]
    with Image.open(preview_path(out, clip=True)) as preview:
        assert preview.n_frames == 2 and max(preview.size) == 256
    with Image.open(tmp_path / "clip.mp4.stage0-256x256.gif") as stage:  # --save-stages: the base stage's frames
        assert stage.n_frames == 2 and stage.size == (256, 256)
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["clip"]["frames"] == 2 and sidecar["request"]["frames"] == 2 and sidecar["clip"]["mp4_size"] == [512, 512]


def test_a_clip_is_a_function_of_the_seed_and_resumes_to_the_same_frames(video_pipeline, tmp_path):
    request = RenderRequest(**CLIP, out=tmp_path / "a.mp4", checkpoint_every_steps=1)
    first = render(request, pipeline=video_pipeline, progress=False).image
    assert np.array_equal(render(request.with_(out=tmp_path / "b.mp4"), pipeline=video_pipeline, progress=False).image, first)
    stopped = request.with_(out=tmp_path / "c.mp4")
    with pytest.raises(Stopped):
        render(stopped, pipeline=video_pipeline, progress=StopAt("stage 1", 1))
    resumed = render(stopped, pipeline=video_pipeline, progress=False)
    assert resumed.metadata["resumed_from"] == {"stage": 1, "step": resumed.metadata["resumed_from"]["step"]}
    assert np.array_equal(resumed.image, first)


def test_sixteen_frames(video_pipeline, tmp_path):
    result = render(RenderRequest(**{**CLIP, "frames": 16, "steps": 2}, out=tmp_path / "c.mp4"), pipeline=video_pipeline, progress=False)
    assert result.image.shape == (16, 512, 512, 3)
    with av.open(str(tmp_path / "c.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
    report = describe(frames_path(tmp_path / "c.mp4"))  # every tile of every frame, the 16th included
    assert report["frames"] == 16 and report["tiles_checked"] == 16


def test_the_motion_unet_sees_every_frame_of_each_guidance_branch(video_pipeline):
    """predict_noise against the motion UNet called by hand in its own layout: (branch, C, frames, h, w), the
    prompt's states repeated per frame; frames that differ give predictions that differ."""
    unet = video_pipeline.unet
    frames = torch.stack([torch.full((4, 32, 32), float(index)) for index in range(3)]) + torch.linspace(-1, 1, 32)
    cond = Conditioning(torch.linspace(-1, 1, 2 * 77 * 64).view(2, 77, 64), torch.linspace(0, 1, 64).view(2, 32),
                        torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2), guidance=3.0)
    scheduler = fresh_scheduler(video_pipeline, 10)
    timestep = scheduler.timesteps[4]
    with torch.no_grad():
        ours = predict_noise(video_pipeline, scheduler, frames, timestep, cond)
        model_input = scheduler.scale_model_input(torch.stack([frames, frames]).transpose(1, 2), timestep)
        by_hand = unet(model_input, timestep, encoder_hidden_states=cond.prompt_embeds.repeat_interleave(3, dim=0),
                       added_cond_kwargs={"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}).sample.transpose(1, 2)
    expected = by_hand[0] + 3.0 * (by_hand[1] - by_hand[0])
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours[1] - ours[0]).abs().max() > 1e-3


def test_two_workers_render_the_single_process_clip(ray_session, video_pipeline, tmp_path):
    """Every frame's rows split over 2 CPU workers (the guidance split on): each frame within 1 level of the clip
    rendered in one process; the motion modules' temporal attention stays on each worker's own pixels."""
    single = render(RenderRequest(**CLIP, out=tmp_path / "single.mp4"), pipeline=video_pipeline, progress=False, write=False)
    out = tmp_path / "sharded.mp4"
    sharded = render(RenderRequest(**CLIP, out=out, workers=2), progress=False)
    assert sharded.image.shape == single.image.shape == (2, 512, 512, 3)
    assert np.abs(sharded.image.astype(int) - single.image).max() <= 1
    assert np.array_equal(tifffile.imread(frames_path(out)), sharded.image)
    assert json.loads(sidecar_path(out).read_text())["workers"]["stage_ranks"] == [[0], [0, 1]]


def wrong_adapter(folder: Path) -> str:
    MotionAdapter(block_out_channels=(16, 32, 64), motion_layers_per_block=1, motion_norm_num_groups=8).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("changes, message", [
    ({"--frames": "0"}, "--frames 0 must be a whole number of at least 1"),
    ({"--frames": "40"}, "--frames 40 exceeds the motion adapter's 32 frame positions; use at most 32"),
    ({"--model": "tiny"}, "--model tiny renders still images; use a motion model"),
    ({"--model": "tiny", "--motion-adapter": "WRONG"}, "do not match the UNet's [32, 64, 128]"),
    ({"--out": "clip.tif"}, "a clip (--frames 2) is written as an H.264 video; name it *.mp4"),
    ({"--image": "IMAGE"}, "clips start from the prompt, for now; drop --image"),
    ({"--fps": "0"}, "--fps 0.0 must be a positive number"),
    ({"--crf": "60"}, "--crf 60: use a whole number from 0"),
])
def test_bad_clip_input_is_one_line_and_writes_nothing(tmp_path, capsys, changes, message):
    options = {"--model": "tiny-video", "--prompt": "a kite", "--frames": "2", "--size": "512x512", "--out": "clip.mp4", **changes}
    if options.get("--image") == "IMAGE":
        Image.new("RGB", (256, 256)).save(tmp_path / "start.png")
        options["--image"] = str(tmp_path / "start.png")
    if options.get("--motion-adapter") == "WRONG":
        options["--motion-adapter"] = wrong_adapter(tmp_path / "adapter")
    options["--out"] = str(tmp_path / options["--out"])
    assert main([item for pair in options.items() for item in pair]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not list(tmp_path.glob("clip*"))


def test_frames_too_large_for_h264_are_downscaled_for_the_mp4_only():
    assert mp4_size(16384, 16384) == (4096, 4096)
    assert mp4_size(8192, 4096) == (8192, 4096)
    assert mp4_size(1024, 512) == (1024, 512)


def test_a_clip_too_large_for_memory_says_how_many_frames_would_fit(monkeypatch, tmp_path):
    """Every frame adds its activations: the preflight counts them and names a frame count that fits."""
    import renderer.plan.preflight

    monkeypatch.setattr(renderer.plan.preflight, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(renderer.plan.preflight, "process_memory", lambda: 0)
    with pytest.raises(RenderError, match=r"needs about [\d.]+ GiB on cpu, which has 1.0 GiB; try --frames \d+ or fewer \(each frame"):
        render(RenderRequest(**{**CLIP, "frames": 32, "stages": ((256, 256), (1024, 1024))}, out=tmp_path / "c.mp4"))
    assert not list(tmp_path.iterdir())


def test_the_motion_unet_keeps_every_weight_of_the_image_unet():
    """diffusers' from_unet2d leaves SDXL's add_embedding (the text_time conditioning) at a random init; the loaded
    clip model carries every image-UNet weight, so two loads are equal whatever the global random state."""
    image = load_pipeline("tiny").unet.state_dict()
    torch.manual_seed(123)
    motion = load_pipeline("tiny-video").unet.state_dict()
    assert all(torch.equal(motion[name], weight) for name, weight in image.items())
    assert any(name.startswith("add_embedding") for name in image)


@pytest.mark.timeout(600)
def test_a_clip_stopped_by_sigterm_resumes_to_the_same_bytes(tmp_path):
    """`freescale-render` stopped by SIGTERM in the middle of the upscaling stage, then run again: the same MP4 and
    frames, byte for byte, as a render that was never stopped."""
    args = ["--model", "tiny-video", "--prompt", "a red kite", "--seed", "5", "--frames", "2", "--stages", "256x256,512x512",
            "--steps", "8", "--checkpoint-every-steps", "1", "--quiet"]
    whole = tmp_path / "whole.mp4"
    assert subprocess.run([sys.executable, "-m", "renderer.cli", *args, "--out", str(whole)], capture_output=True).returncode == 0
    out, folder = tmp_path / "resumed.mp4", tmp_path / "resumed.mp4.checkpoints"
    first = run_cli([*args, "--out", str(out)])
    wait_for(lambda: any(name.startswith("stage01-step0003") for name in checkpoints(folder)), first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) != 0 and not out.exists()
    second = run_cli([*args, "--out", str(out)])
    assert second.wait(300) == 0, second.stderr.read()
    assert json.loads(sidecar_path(out).read_text())["resumed_from"]["stage"] == 1
    assert out.read_bytes() == whole.read_bytes()
    assert np.array_equal(tifffile.imread(frames_path(out)), tifffile.imread(frames_path(whole)))
