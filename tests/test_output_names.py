"""Outputs never overwrite each other: every file a render writes is named after its output's full name, and a
batch refuses, before anything renders, two lines whose files collide through any spelling of the path
(README: Every option, `--out`; Many posters in one job)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from renderer.cli import main
from renderer.cli.batch import read_batch
from renderer.errors import RenderError
from renderer.output.clip_files import frames_path
from renderer.output.files import preview_path, sidecar_path, stage_path

TINY = ["--stages", "256x256", "--steps", "2", "--quiet"]


def write_batch(path: Path, posters: list[dict]) -> Path:
    path.write_text("".join(json.dumps(poster) + "\n" for poster in posters))
    return path


def summary(batch: Path) -> list[dict]:
    return [json.loads(line) for line in batch.with_name(f"{batch.stem}.summary.jsonl").read_text().splitlines()]


def test_every_file_is_named_after_the_full_output_name():
    assert sidecar_path(Path("o/scene.tif")) == Path("o/scene.tif.json")
    assert sidecar_path(Path("o/scene.png")) == Path("o/scene.png.json")
    assert preview_path(Path("kite.seed1.tif")) == Path("kite.seed1.tif.preview.png")
    assert stage_path(Path("kite.seed2.ome.tif"), 0, (256, 128)) == Path("kite.seed2.ome.tif.stage0-256x128.png")
    assert frames_path(Path("clip.mp4")) == Path("clip.mp4.frames.tif")


def test_a_tif_and_a_png_of_one_name_keep_their_own_sidecars_and_are_skipped_when_done(tmp_path, capsys):
    """`scene.tif` and `scene.png` in one batch: two sidecars, each naming its own output; the batch run again
    skips both (each sidecar's render id), which a shared sidecar would break."""
    posters = [{"prompt": "a red kite", "out": str(tmp_path / "scene.tif")},
               {"prompt": "a red kite", "seed": 5, "out": str(tmp_path / "scene.png")}]
    batch = write_batch(tmp_path / "night.jsonl", posters)
    assert main(["batch", str(batch), *TINY]) == 0
    for poster in posters:
        sidecar = json.loads(sidecar_path(Path(poster["out"])).read_text())
        assert sidecar["request"]["out"] == poster["out"] and sidecar["request"]["seed"] == poster.get("seed", 0)
    assert main(["batch", str(batch), *TINY]) == 0
    assert [report["outcome"] for report in summary(batch)] == ["skipped", "skipped"]


def test_two_outputs_sharing_the_part_before_the_first_dot_keep_their_own_previews(tmp_path):
    """`kite.seed1.tif` and `kite.seed2.tif` with previews: each preview is its own TIFF's pixels (256² fits the
    preview's 1024 px, so it is level 0 itself)."""
    posters = [{"prompt": "a red kite", "seed": seed, "preview": True, "out": str(tmp_path / f"kite.seed{seed}.tif")}
               for seed in (1, 2)]
    assert main(["batch", str(write_batch(tmp_path / "seeds.jsonl", posters)), *TINY]) == 0
    images = [tifffile.imread(poster["out"]) for poster in posters]
    assert not np.array_equal(*images)
    for poster, image in zip(posters, images):
        with Image.open(preview_path(Path(poster["out"]))) as preview:
            assert np.array_equal(np.asarray(preview), image), poster["out"]


def test_a_clip_keeps_its_frames_beside_a_poster_named_as_its_frames_once_were(tmp_path):
    """`c.mp4` (2 frames) and a poster `c.frames.tif` (what the clip's frames were called) in one batch: the clip's
    frames TIFF holds its 2 frames, the poster its one image, and each has its own sidecar."""
    posters = [{"prompt": "a red kite", "model": "tiny-video", "frames": 2, "out": str(tmp_path / "c.mp4")},
               {"prompt": "a red kite", "out": str(tmp_path / "c.frames.tif")}]
    assert main(["batch", str(write_batch(tmp_path / "clips.jsonl", posters)), *TINY]) == 0
    assert tifffile.imread(frames_path(tmp_path / "c.mp4")).shape == (2, 256, 256, 3)
    assert tifffile.imread(tmp_path / "c.frames.tif").shape == (256, 256, 3)
    assert json.loads(sidecar_path(tmp_path / "c.mp4").read_text())["request"]["frames"] == 2
    assert json.loads(sidecar_path(tmp_path / "c.frames.tif").read_text())["request"]["frames"] == 1


def collide(tmp_path: Path, first: dict, second: dict) -> str:
    """The one error line of a batch of `first` and `second`; checks nothing was written."""
    batch = write_batch(tmp_path / "b.jsonl", [{"prompt": "p", "stages": "256x256", **first},
                                               {"prompt": "p", "stages": "256x256", **second}])
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(RenderError) as refused:
        read_batch(batch, [])
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # refused before anything rendered
    (line,) = str(refused.value).splitlines()
    assert line.startswith(f"{batch} line 2: ") and "line 1's" in line
    return line


@pytest.mark.parametrize("spell", [
    lambda folder: str(folder / "out" / "a.tif"),  # the same absolute path
    lambda folder: "out/a.tif",  # relative, from the working directory
    lambda folder: "./out/../out/./a.tif",
    lambda folder: str(folder / "link" / "a.tif"),  # through a symlink to the folder
], ids=["absolute", "relative", "dots", "symlink"])
def test_one_output_through_any_spelling_of_its_path_is_refused(tmp_path, monkeypatch, spell):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    line = collide(tmp_path, {"out": str(tmp_path / "out" / "a.tif")}, {"out": spell(tmp_path)})
    assert f"out {tmp_path / 'out' / 'a.tif'} is also line 1's out" in line


@pytest.mark.parametrize("first, second, what", [
    ({"out": "a.tif", "preview": True}, {"out": "a.tif.preview.png"}, "out {}/a.tif.preview.png is also line 1's preview"),
    ({"out": "a.tif", "save-stages": True}, {"out": "a.tif.stage0-256x256.png"}, "is also line 1's stage images {}/a.tif.stage*"),
    ({"out": "clip.mp4", "model": "tiny-video", "frames": 2}, {"out": "clip.mp4.frames.tif"}, "is also line 1's frames TIFF"),
    ({"out": "a.tif"}, {"out": "a.tif.checkpoints/b.png"}, "is also line 1's checkpoints {}/a.tif.checkpoints/"),
], ids=["preview", "stages", "frames", "checkpoints"])
def test_an_output_that_is_another_lines_file_is_refused(tmp_path, monkeypatch, first, second, what):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.tif.checkpoints").mkdir()
    assert what.format(tmp_path) in collide(tmp_path, first, second)


def test_posters_with_their_own_names_are_not_refused(tmp_path, monkeypatch):
    """The check is not a blanket refusal: a TIFF, a PNG and a clip of one name, with every file each can write."""
    monkeypatch.chdir(tmp_path)
    lines = [{"prompt": "p", "stages": "256x256", "out": out, "preview": True, "save-stages": True} for out in ("a.tif", "a.png")]
    lines.append({"prompt": "p", "stages": "256x256", "out": "a.mp4", "model": "tiny-video", "frames": 2, "save-stages": True})
    assert [poster.line for poster in read_batch(write_batch(tmp_path / "b.jsonl", lines), [])] == [1, 2, 3]


def test_the_sorted_sweep_finds_the_collision_that_comparing_every_pair_finds(tmp_path):
    """Batches of names built to collide in every way (a name that is another's preview, stage images or
    checkpoint folder; one file under two spellings): the sweep names the same pair as the plain pairwise check."""
    import random
    from types import SimpleNamespace

    from renderer.output.collisions import claims, check_collisions
    from renderer.plan.request import RenderRequest

    def pairwise(posters) -> str | None:
        for index, poster in enumerate(posters):
            for earlier in posters[:index]:
                for theirs in claims(earlier.request):
                    if any(claim.overlaps(theirs) for claim in claims(poster.request)):
                        return f"line {poster.line}: "
        return None

    stems = ["a.tif", "a.tif.preview.png", "a.tif.checkpoints.png", "a.tif.stage0.png", "a.tif.checkpoints/x.tif", "b.tif",
             "b.png", "./a.tif", "c.tif", "c.tif.checkpoints.tif", "d.tif"]
    (tmp_path / "a.tif.checkpoints").mkdir()
    rng = random.Random(33)
    seen = set()
    for trial in range(300):
        names = rng.sample(stems, rng.randint(2, 5))
        posters = [SimpleNamespace(line=line + 1, request=RenderRequest(
            prompt="p", size=(256, 256), out=tmp_path / name, preview=rng.random() < 0.5, save_stages=rng.random() < 0.5))
            for line, name in enumerate(names)]
        expected = pairwise(posters)
        try:
            check_collisions(posters, "b.jsonl")
            found = None
        except RenderError as error:
            found = str(error)
        seen.add(expected is not None)
        assert (found is None) == (expected is None), (names, found, expected)
        assert found is None or f"b.jsonl {expected}" in found, (names, found, expected)
    assert seen == {True, False}
