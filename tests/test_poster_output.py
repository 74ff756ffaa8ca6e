"""A tiny render written as a TIFF poster equals the image rendered in memory."""

from __future__ import annotations

import json

import numpy as np
import tifffile

from renderer import RenderRequest, render
from renderer.cli import main as cli_main
from renderer.output.tiff import read_xmp_prompt


def test_tiff_poster_reads_back_pixel_equal_with_parameters(tmp_path, tiny_pipeline, capsys):
    prompt = "eine grüne Kreatur"
    request = RenderRequest(prompt=prompt, stages=((256, 256), (512, 512)), steps=3, out=tmp_path / "p.tif",
                            tile_size=128, preview=True, vae_mode="exact")
    result = render(request, pipeline=tiny_pipeline, progress=False)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert np.array_equal(tif.pages[0].asarray(), result.image)
        assert [page.shape[:2] for page in tif.pages] == [(512, 512), (256, 256), (128, 128)]
        stored = json.loads(tif.pages[0].description)
    assert stored["request"]["prompt"] == prompt and stored["vae_mode"] == "exact"
    assert read_xmp_prompt(tmp_path / "p.tif") == prompt
    assert (tmp_path / "p.tif.preview.png").is_file()
    sidecar = json.loads((tmp_path / "p.tif.json").read_text())
    assert sidecar["stages"] == ["256x256", "512x512"]

    assert cli_main(["inspect", str(tmp_path / "p.tif")]) == 0
    out = capsys.readouterr()
    assert "512x512" in out.out and prompt in out.out and "all 21 tiles" in out.err  # 16 + 4 + 1


def test_exact_and_tiled_final_decodes_are_recorded_and_differ_only_slightly(tmp_path, tiny_pipeline):
    common = dict(prompt="p", stages=((256, 256),), steps=2)
    exact = render(RenderRequest(**common, vae_mode="exact", out=tmp_path / "e.png"), pipeline=tiny_pipeline, progress=False)
    tiled = render(RenderRequest(**common, vae_mode="tiled", out=tmp_path / "t.png"), pipeline=tiny_pipeline, progress=False)
    assert exact.metadata["vae_mode"] == "exact" and tiled.metadata["vae_mode"] == "tiled"
    # At the training size one tile covers the image, so both modes decode the same thing.
    assert np.abs(exact.image.astype(int) - tiled.image).max() <= 1
