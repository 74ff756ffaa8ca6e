"""Checkpoints and resume: a stopped render goes on where it was and gives the same bytes; damaged
checkpoints and changed requests start the affected work afresh; a lost worker is replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from renderer import RenderRequest, render
from renderer.output.files import sidecar_path
from renderer.progress import Progress
from renderer.resume.checkpoints import CheckpointStore

STAGES = ((256, 256), (512, 512), (1024, 1024))
COMMAND = ["--prompt", "a red kite", "--seed", "7", "--stages", "256x256,512x512,1024x1024", "--steps", "5",
           "--checkpoint-every-steps", "1", "--quiet"]


class Stopped(Exception):
    pass


class StopAt(Progress):
    """Silent progress that calls `action` once, after `step` steps of the stage whose label starts with `prefix`."""

    def __init__(self, prefix: str, step: int, action=None):
        super().__init__(enabled=False)
        self.enabled = True  # so that a gang's rank 0 reports its steps here
        self.prefix, self.step, self.count, self.label = prefix, step, 0, ""
        self.action = action or self.stop
        self.fired = False

    @staticmethod
    def stop() -> None:
        raise Stopped

    def stage(self, label: str, steps: int) -> None:
        self.label, self.count = label, 0

    def advance(self) -> None:
        self.count += 1
        if not self.fired and self.label.startswith(self.prefix) and self.count == self.step:
            self.fired = True
            self.action()


def checkpoints(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*/*.safetensors"))


def run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "renderer.cli", *args], stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the render ended before the moment to stop it: {process.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_sigterm_after_a_stage_and_mid_stage_then_resume_gives_identical_bytes(tmp_path):
    whole = tmp_path / "whole.png"
    assert subprocess.run([sys.executable, "-m", "renderer.cli", *COMMAND, "--out", str(whole)], capture_output=True).returncode == 0
    out = tmp_path / "resumed.png"
    folder = tmp_path / "resumed.png.checkpoints"

    first = run_cli([*COMMAND, "--out", str(out)])  # stopped once stage 1 (the first upscaling stage) is complete
    wait_for(lambda: any(name.startswith("stage01-step0005") for name in checkpoints(folder)), first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) != 0 and not out.exists()

    second = run_cli([*COMMAND, "--out", str(out)])  # stopped in the middle of stage 2
    wait_for(lambda: any(name.startswith("stage02-step000") and name < "stage02-step0005" for name in checkpoints(folder)), second)
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) != 0 and not out.exists()
    mid = [name for name in checkpoints(folder) if name.startswith("stage02")]
    assert mid, "the stop left no mid-stage checkpoint"
    stopped_at = int(mid[-1].split("step")[1].split(".")[0])

    third = run_cli([*COMMAND, "--out", str(out)])
    assert third.wait(300) == 0, third.stderr.read()
    assert out.read_bytes() == whole.read_bytes()
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["resumed_from"] == {"stage": 2, "step": stopped_at}
    assert sidecar["seconds"]["stages"][0] is None and sidecar["seconds"]["stages"][1] is None  # not recomputed
    assert sidecar["seconds"]["stages"][2] > 0
    assert not folder.exists()  # removed once the output is complete


def stop_mid_stage(tiny_pipeline, request: RenderRequest) -> None:
    with pytest.raises(Stopped):
        render(request, pipeline=tiny_pipeline, progress=StopAt("stage 2", 3))


def test_damaged_checkpoint_is_ignored_and_the_one_before_used(tiny_pipeline, tmp_path):
    request = RenderRequest(prompt="a kite", seed=3, stages=STAGES[:2], steps=5, checkpoint_every_steps=1, out=tmp_path / "a.png")
    expected = render(request.with_(out=tmp_path / "whole.png"), pipeline=tiny_pipeline, progress=False).image
    with pytest.raises(Stopped):
        render(request, pipeline=tiny_pipeline, progress=StopAt("stage 1", 3))
    folder = request.checkpoint_folder()
    names = checkpoints(folder)
    assert names == ["stage00-step0005.safetensors", "stage01-step0004.safetensors"]
    newest = next(folder.glob("*/stage01-step0004.safetensors"))
    data = bytearray(newest.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte in the tensor data
    newest.write_bytes(bytes(data))

    result = render(request, pipeline=tiny_pipeline, progress=False)
    assert result.metadata["resumed_from"] == {"stage": 0, "step": 5}  # fell back to the base stage's checkpoint
    assert (result.image == expected).all()


def test_changed_request_starts_afresh_and_no_resume_ignores_checkpoints(tiny_pipeline, tmp_path):
    request = RenderRequest(prompt="a kite", seed=3, stages=STAGES[:2], steps=5, checkpoint_every_steps=1, out=tmp_path / "a.png")
    with pytest.raises(Stopped):
        render(request, pipeline=tiny_pipeline, progress=StopAt("stage 1", 2))
    changed = render(request.with_(seed=4), pipeline=tiny_pipeline, progress=False)
    assert changed.metadata["resumed_from"] is None and changed.metadata["render_id"] != ""
    assert checkpoints(request.checkpoint_folder()) == ["stage00-step0005.safetensors", "stage01-step0003.safetensors"]
    fresh = render(request.with_(resume=False), pipeline=tiny_pipeline, progress=False)
    assert fresh.metadata["resumed_from"] is None
    assert not request.checkpoint_folder().exists()


def test_checkpoint_store_rejects_another_renders_file(tmp_path):
    mine, other = CheckpointStore(tmp_path, "a" * 24, 5), CheckpointStore(tmp_path, "b" * 24, 5)
    from renderer.resume.checkpoints import Checkpoint

    other.write(Checkpoint(1, 5, torch.arange(8.0).reshape(1, 1, 2, 4)))
    mine.folder.mkdir(parents=True)
    os.replace(other.path(1, 5), mine.path(1, 5))  # right name, wrong render id in its header
    assert mine.newest() is None and not mine.path(1, 5).exists()
    mine.write(Checkpoint(1, 3, torch.ones(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)))
    loaded = mine.newest()
    assert (loaded.stage, loaded.step) == (1, 3) and torch.equal(loaded.reference, torch.zeros(1, 1, 2, 4))


def kill_one_worker() -> None:
    """SIGKILL the process of one live gang worker of this test's Ray (as a crashed node or OOM kill would)."""
    from ray._private import state

    pids = [actor["Pid"] for actor in state.actors().values() if actor["ActorClassName"] == "GangWorker" and actor["State"] == "ALIVE"]
    assert len(pids) == 2
    os.kill(max(pids), signal.SIGKILL)


@pytest.mark.timeout(600)
def test_a_killed_worker_is_replaced_and_the_render_is_byte_identical(ray_session, tiny_pipeline, tmp_path, monkeypatch):
    """Killed mid-stage, or after the last step while the driver takes the final rows (which only the workers
    hold): either way a new gang goes on from the newest checkpoint, the stage's end in the second case."""
    from cluster.gang import Gang

    request = RenderRequest(prompt="a red kite", seed=11, stages=STAGES, steps=5, workers=2, checkpoint_every_steps=1,
                            vae_mode="exact", out=tmp_path / "undisturbed.png")
    render(request, pipeline=tiny_pipeline, progress=False)
    disturbed = request.with_(out=tmp_path / "disturbed.png")
    result = render(disturbed, pipeline=tiny_pipeline, progress=StopAt("stage 2", 2, kill_one_worker))
    assert disturbed.out.read_bytes() == request.out.read_bytes()
    restarts = result.metadata["restarts"]
    assert len(restarts) == 1 and restarts[0]["workers_after"] == 2
    assert restarts[0]["resumed_from"]["stage"] == 2 and restarts[0]["resumed_from"]["step"] is not None
    assert "lost" in restarts[0]["error"]

    taking, killed = Gang.pixel_rows, []

    def pixel_rows(gang):
        if not killed:
            killed.append(kill_one_worker())
        yield from taking(gang)

    monkeypatch.setattr(Gang, "pixel_rows", pixel_rows)
    late = request.with_(out=tmp_path / "late.png")
    result = render(late, pipeline=tiny_pipeline, progress=False)
    assert late.out.read_bytes() == request.out.read_bytes()
    (restart,) = result.metadata["restarts"]
    assert restart["resumed_from"] == {"stage": len(STAGES), "step": None} and "lost" in restart["error"]


def test_render_id_follows_the_pixels_not_where_or_how_they_are_written(tmp_path):
    from freescale_core import FreeScaleConfig
    from renderer.plan.identity import render_id

    request = RenderRequest(prompt="a kite", seed=3, stages=STAGES[:2], steps=5, out=tmp_path / "a.png")
    same = render_id(request, list(STAGES[:2]), "float32", "cpu")
    for unchanged in ({"out": tmp_path / "b.tif"}, {"workers": 2}, {"checkpoint_every_steps": 1}, {"tile_size": 256},
                      {"metrics_port": 9100}, {"resume": False}, {"preview": True}):
        assert render_id(request.with_(**unchanged), list(STAGES[:2]), "float32", "cpu") == same, unchanged
    for changed in ({"seed": 4}, {"prompt": "a kit"}, {"negative_prompt": "x"}, {"steps": 6}, {"guidance": 7.0},
                    {"freescale": FreeScaleConfig(dilate_tau=30)}, {"vae_mode": "tiled"}, {"model": "toy"}):
        assert render_id(request.with_(**changed), list(STAGES[:2]), "float32", "cpu") != same, changed
    assert render_id(request, list(STAGES[:2]), "float16", "cpu") != same
    assert render_id(request, list(STAGES[:2]), "float32", "cuda") != same


def test_the_code_version_follows_the_code_of_the_pixels_not_the_help_text(tmp_path):
    """A farm's checkpoints stay valid through an edit of the CLI's help or the console, and are refused after an
    edit of the method or the stage loop (`renderer.plan.identity.code_digest` over a copy of the sources)."""
    import shutil

    from renderer.plan.identity import ROOT, code_digest

    for package in ("freescale_core", "renderer", "cluster"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    before = code_digest(tmp_path)
    assert before == code_digest(ROOT)
    for unchanged in ("renderer/cli/options.py", "renderer/cli/console.py", "renderer/metrics/recorder.py",
                      "renderer/toy/train.py", "cluster/gang.py", "renderer/plan/preflight.py"):
        source = tmp_path / unchanged
        source.write_text(source.read_text().replace('"""', '"""Edited. ', 1))
        assert code_digest(tmp_path) == before, unchanged
    for changed in ("freescale_core/attention.py", "renderer/cascade/stage_loop.py", "renderer/parallel/ops.py",
                    "renderer/vae/bands.py", "renderer/engine.py", "renderer/messages.py"):
        source = tmp_path / changed
        text = source.read_text()
        source.write_text(text + "\n# edited\n")
        assert code_digest(tmp_path) != before, changed
        source.write_text(text)
