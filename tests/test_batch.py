"""`freescale-render batch FILE`: many posters in one process, each output as if rendered alone; a batch checked
before it renders, going on past a failed poster, and resumed after a stop (README: Many posters in one job)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from polling import wait_until
from ray_head import VENV_BIN
from renderer.cli import main
from renderer.cli.batch import read_batch
from renderer.errors import RenderError
from renderer.output.files import sidecar_path

FREESCALE = str(VENV_BIN / "freescale-render")
COMMON = ["--steps", "4", "--checkpoint-every-steps", "1"]


def write_batch(path: Path, posters: list[dict]) -> Path:
    path.write_text("".join(json.dumps(poster) + "\n" for poster in posters))
    return path


def summary(folder: Path, batch: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{batch.stem}.summary.jsonl").read_text().splitlines()]


def render_alone(poster: dict, out: Path) -> bytes:
    argv = [*COMMON]
    for key, value in poster.items():
        if key != "out":
            argv += [f"--{key}", str(value)]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    return out.read_bytes()


def test_a_batch_renders_every_poster_as_it_would_be_rendered_alone(ray_session, tmp_path, capsys):
    """Three posters, two sizes, one on a 2-worker gang: one model load for the two in-process posters, and each
    PNG byte-identical to the same poster rendered by itself."""
    posters = [
        {"prompt": "a red kite", "seed": 1, "stages": "256x256,512x512", "out": str(tmp_path / "a.png")},
        {"prompt": "a blue lake", "seed": 2, "stages": "256x256", "out": str(tmp_path / "b.png")},
        {"prompt": "a red kite", "seed": 3, "stages": "256x256,512x512", "workers": 2, "out": str(tmp_path / "c.png")},
    ]
    batch = write_batch(tmp_path / "night.jsonl", posters)
    assert main(["batch", str(batch), *COMMON, "--quiet"]) == 0
    printed = capsys.readouterr()
    reports = summary(tmp_path, batch)
    assert [report["outcome"] for report in reports] == ["succeeded"] * 3
    assert [Path(report["out"]).name for report in reports] == ["a.png", "b.png", "c.png"]
    assert "line  outcome" in printed.out and "poster 3/3" in printed.err
    alone = tmp_path / "alone"
    alone.mkdir()
    for poster in posters:
        assert Path(poster["out"]).read_bytes() == render_alone(poster, alone / Path(poster["out"]).name), poster["out"]
    sidecars = [json.loads(sidecar_path(poster["out"]).read_text()) for poster in posters]
    assert sidecars[2]["workers"]["count"] == 2 and "workers" not in sidecars[0]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p", "sizee": "256x256", "out": "x.png"}, r"line 2: unknown field 'sizee'; the fields are the CLI's options: .*size"),
    ({"prompt": "p", "size": "1000x1000", "out": "x.png"}, r"line 2: size 1000x1000 is not a multiple of 32px"),
    ({"prompt": "p", "stages": "256x256"}, r"line 2: field 'out' is required"),
    ({"prompt": "p", "stages": "256x256", "out": "first.png"}, r"line 2: out .*first.png is also line 1's"),
])
def test_a_bad_line_is_one_error_with_its_line_and_nothing_renders(tmp_path, capsys, monkeypatch, bad, message):
    monkeypatch.chdir(tmp_path)
    batch = write_batch(tmp_path / "b.jsonl", [{"prompt": "p", "stages": "256x256", "out": "first.png"}, bad])
    with pytest.raises(RenderError, match=message):
        read_batch(batch, [])
    assert main(["batch", str(batch)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"freescale-render: error: {batch} line 2: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.jsonl"]


def test_a_poster_that_fails_late_is_reported_and_the_others_render(tiny_pipeline, tmp_path):
    """The second poster's model folder passes the checks (its configs are fine) and is refused only when loaded
    (pickled weights): reported, and the third poster renders on a fresh load of the first one's model."""
    pickled = tmp_path / "pickled-model"
    tiny_pipeline.save_pretrained(pickled, safe_serialization=False)
    posters = [{"prompt": "a", "stages": "256x256", "out": str(tmp_path / "a.png")},
               {"prompt": "b", "stages": "256x256", "model": str(pickled), "out": str(tmp_path / "b.png")},
               {"prompt": "c", "stages": "256x256", "out": str(tmp_path / "c.png")}]
    batch = write_batch(tmp_path / "b.jsonl", posters)
    assert main(["batch", str(batch), *COMMON, "--quiet"]) == 1
    reports = summary(tmp_path, batch)
    assert [report["outcome"] for report in reports] == ["succeeded", "failed", "succeeded"]
    assert "only pickled weights" in reports[1]["error"]
    assert (tmp_path / "a.png").is_file() and (tmp_path / "c.png").is_file() and not (tmp_path / "b.png").exists()


@pytest.mark.timeout(600)
def test_a_batch_stopped_inside_its_second_poster_goes_on_where_it_was(tmp_path):
    """SIGTERM while the second poster's upscaling stage runs; the same command again skips the first, resumes the
    second from its checkpoint, renders the third, and all three equal undisturbed renders."""
    posters = [{"prompt": name, "seed": seed, "stages": "256x256,512x512", "steps": 8, "out": str(tmp_path / f"{name}.png")}
               for name, seed in (("one", 1), ("two", 2), ("three", 3))]
    batch = write_batch(tmp_path / "stop.jsonl", posters)
    command = [FREESCALE, "batch", str(batch), "--checkpoint-every-steps", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        checkpoints = tmp_path / "two.png.checkpoints"
        wait_until(lambda: checkpoints.is_dir() and any(path.name.startswith("stage01-") for path in checkpoints.rglob("*.safetensors"))
                   or process.poll() is not None, 300, "a checkpoint inside the second poster's stage 1", interval=0.2)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert (tmp_path / "one.png").is_file() and not (tmp_path / "two.png").exists() and not (tmp_path / "three.png").exists()
    assert [report["outcome"] for report in summary(tmp_path, batch)] == ["succeeded", "stopped"]

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    reports = summary(tmp_path, batch)
    assert [(report["outcome"], report["resumed"]) for report in reports] == [("skipped", False), ("succeeded", True), ("succeeded", False)]
    assert json.loads((tmp_path / "two.png.json").read_text())["resumed_from"]["stage"] == 1
    alone = tmp_path / "alone"
    alone.mkdir()
    for poster in posters:
        steps = ["--steps", str(poster["steps"])]
        fields = {key: value for key, value in poster.items() if key not in ("out", "steps")}
        argv = [arg for key, value in fields.items() for arg in (f"--{key}", str(value))]
        # as its own process, as the batch ran: the same torch threads, so the same float rounding
        subprocess.run([FREESCALE, *argv, *steps, "--quiet", "--out", str(alone / Path(poster["out"]).name)], check=True, timeout=300)
        assert Path(poster["out"]).read_bytes() == (alone / Path(poster["out"]).name).read_bytes(), poster["out"]


def test_the_batch_command_needs_its_file_first(capsys):
    assert main(["batch", "--steps", "4"]) == 2
    assert "give the batch file first" in capsys.readouterr().err
