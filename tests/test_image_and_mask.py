"""Starting from a user image, and region-aware detail control with a mask (reference §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from renderer.cascade.stage_loop import detail_scale
from renderer.parallel.strips import RowGroup
from freescale_core import FreeScaleConfig
from freescale_core.cascade import skip_residual_weight
from freescale_core.rng import normal
from renderer import RenderRequest, render
from renderer.plan.input_mask import load_mask

STAGES = ((256, 256), (512, 512))


def ramp_image(path, size=(256, 256)):
    rows, cols = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([rows % 256, cols % 256, (rows + cols) // 2 % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_image_input_is_the_base_stage_encoded_with_its_seeded_posterior(tiny_pipeline, tmp_path):
    """The base stage's latents are the picture's seeded encode (what a latent-space upsample and a stage-0
    checkpoint hold; the RGB upsample takes the picture itself, tests/test_upscale_input.py): a render of
    that one stage decodes them."""
    pixels = ramp_image(tmp_path / "in.png")
    request = RenderRequest(prompt="p", stages=STAGES[:1], steps=3, seed=5, image=tmp_path / "in.png", out=tmp_path / "o.png")
    result = render(request, pipeline=tiny_pipeline, progress=False, write=False)
    vae = tiny_pipeline.vae
    with torch.no_grad():
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        posterior = vae.encode(image).latent_dist
        latents = posterior.mean + posterior.std * normal(tuple(posterior.mean.shape), 5, "vae-posterior", 0)
        expected = vae.decode(latents).sample
    expected = ((expected[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(result.image.astype(int) - expected).max() <= 1


def render_with(tiny_pipeline, tmp_path, name, mask_value=None, **config):
    mask = None
    if mask_value is not None:
        mask = tmp_path / f"mask{mask_value}.png"
        Image.fromarray(np.full((256, 256), mask_value, np.uint8)).save(mask)
    request = RenderRequest(prompt="p", stages=STAGES, steps=4, seed=2, mask=mask, freescale=FreeScaleConfig(**config), out=tmp_path / f"{name}.png")
    return render(request, pipeline=tiny_pipeline, progress=False, write=False).latents


def test_white_mask_uses_cosine_scale_and_black_mask_uses_the_background_scale(tmp_path):
    """Checked where α is computed: a pure mask gives the scalar scale at every latent pixel, exactly."""
    config = FreeScaleConfig(cosine_scale=3.0, cosine_scale_bg=0.5)
    rows = RowGroup.single(64)
    for value, expected in ((255, 3.0), (0, 0.5)):
        Image.fromarray(np.full((256, 256), value, np.uint8)).save(tmp_path / "m.png")
        alpha = detail_scale(config, load_mask(tmp_path / "m.png", (256, 256)), rows, 64, torch.device("cpu"))
        assert alpha.shape == (1, 1, 64, 64) and bool((alpha == expected).all())
    assert detail_scale(config, None, rows, 64, torch.device("cpu")) == 3.0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_per_pixel_skip_weight_equals_the_scalar_weight(alpha):
    """c₁ for a per-pixel α is the scalar c₁ rounded to fp32, at every timestep of a schedule: both are float64
    powers (torch's and libm's may differ in the last double bit), so at most one fp32 ulp apart."""
    for timestep in torch.linspace(999, 1, 50).tolist():
        weight = skip_residual_weight(timestep, torch.full((1, 1, 4, 4), alpha))
        expected = torch.tensor(skip_residual_weight(timestep, alpha), dtype=torch.float32)
        assert weight.dtype == torch.float32
        assert bool(((weight - expected).abs() <= expected.abs() * 2**-23).all())


def test_white_and_black_masks_render_differently(tiny_pipeline, tmp_path):
    white = render_with(tiny_pipeline, tmp_path, "w", 255, cosine_scale=3.0, cosine_scale_bg=0.5)
    black = render_with(tiny_pipeline, tmp_path, "b", 0, cosine_scale=3.0, cosine_scale_bg=0.5)
    assert not torch.allclose(white, black, atol=1e-3)


def test_half_mask_mixes_the_two_scales_by_region(tiny_pipeline, tmp_path):
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 128:] = 7  # any non-zero value is foreground
    Image.fromarray(mask).save(tmp_path / "half.png")
    request = RenderRequest(prompt="p", stages=STAGES, steps=4, seed=2, mask=tmp_path / "half.png",
                            freescale=FreeScaleConfig(cosine_scale=3.0, cosine_scale_bg=0.5), out=tmp_path / "h.png")
    half = render(request, pipeline=tiny_pipeline, progress=False, write=False).latents
    white = render_with(tiny_pipeline, tmp_path, "w", 255, cosine_scale=3.0, cosine_scale_bg=0.5)
    black = render_with(tiny_pipeline, tmp_path, "b", 0, cosine_scale=3.0, cosine_scale_bg=0.5)
    # Attention mixes the halves, so the result differs from both pure masks on both sides.
    assert not torch.allclose(half, white, atol=1e-3) and not torch.allclose(half, black, atol=1e-3)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_masks_are_binarised_through_gray(tiny_pipeline, tmp_path, mode):
    from renderer.plan.input_mask import load_mask

    pixels = np.zeros((64, 64, len(mode)), np.uint8)
    pixels[:32, :, 0] = 1
    pixels[32:, :, 1] = 255
    Image.fromarray(pixels, mode).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (256, 256))
    assert mask.shape == (1, 1, 64, 64)
    assert mask[0, 0, :32].sum() == 0  # gray of (1, 0, 0) rounds to 0, as in the reference's gray-then-binarise
    assert (mask[0, 0, 32:] == 1).all()
