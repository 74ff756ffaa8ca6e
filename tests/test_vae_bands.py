"""Banded VAE decoding against diffusers' own untiled and tiled decodes, and the tiled encode against diffusers'."""

from __future__ import annotations

import pytest
import torch

from renderer.models.builtin import TINY, build_random_pipeline
from renderer.vae_bands import conv_bands, decode_rows, encode_tiled, group_norm_bands


@pytest.fixture(scope="module")
def vae():
    return build_random_pipeline(TINY, seed=3).vae


def latent_with_band_statistics(height: int, width: int) -> torch.Tensor:
    """Different means and scales in different row bands, plus a horizontal ramp."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, height, width)
    z[:, :, : height // 4] += 3.0
    z[:, :, height // 2 :] *= 0.2
    z[:, 1] -= 2.0
    return z + torch.linspace(-1, 1, width)


@pytest.mark.parametrize("band_rows", [1, 7, 16])
def test_exact_banded_decode_equals_untiled_decode(vae, band_rows):
    z = latent_with_band_statistics(40, 24)
    with torch.no_grad():
        reference = vae.decode(z).sample
        banded = torch.cat(list(decode_rows(vae, z, "exact", band_rows=band_rows)), dim=2)
    assert banded.shape == reference.shape
    assert (banded - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_tiled_streaming_equals_diffusers_tiled_decode(vae):
    z = latent_with_band_statistics(40, 24)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    with torch.no_grad():
        reference = vae.tiled_decode(z).sample
        streamed = list(decode_rows(vae, z, "tiled"))
    assert len(streamed) > 3  # really streamed in tile rows
    assert torch.equal(torch.cat(streamed, dim=2), reference)


def test_tiled_encode_equals_diffusers_tiled_encode(vae):
    """Moments of a 200 x 136 image (4 x 3 tiles of 64 px at a 48 px stride, the last ones cut) with row bands
    of different means: equal to diffusers' own tiled encode, and different from an untiled encode (so the
    tiles really are blended, not one whole encode)."""
    image = latent_with_band_statistics(200, 136)[:, :3] * 0.3
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    try:
        with torch.no_grad():
            ours = encode_tiled(vae, image)
            untiled = vae.encode(image).latent_dist.parameters
            vae.enable_tiling()
            reference = vae.encode(image).latent_dist.parameters
    finally:
        vae.disable_tiling()
    assert ours.shape == reference.shape == (1, 8, 25, 17)
    assert torch.equal(ours, reference)
    assert (ours - untiled).abs().max() > 1e-3


def test_group_norm_bands_merge_between_band_statistics():
    norm = torch.nn.GroupNorm(2, 4)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, -1.0])
    norm.bias.data = torch.tensor([0.0, 1.0, -1.0, 0.5])
    x = torch.arange(4 * 12 * 5, dtype=torch.float32).reshape(1, 4, 12, 5) / 50
    x[:, :, 6:] += 10.0  # per-band offset: wrong without the between-band term
    merged = torch.cat(group_norm_bands(norm, list(x.split(5, dim=2))), dim=2)
    assert torch.allclose(merged, norm(x), atol=1e-5)


def test_conv_bands_with_halos_equal_the_full_conv():
    conv = torch.nn.Conv2d(3, 2, 3, padding=2, dilation=2)
    x = torch.arange(3 * 11 * 6, dtype=torch.float32).reshape(1, 3, 11, 6) / 10
    x[:, :, 4:] -= 5.0
    merged = torch.cat(conv_bands(conv, list(x.split(4, dim=2))), dim=2)
    assert torch.allclose(merged, conv(x), atol=1e-5)


def test_unknown_mode_is_refused(vae):
    with pytest.raises(ValueError, match="vae mode"):
        list(decode_rows(vae, torch.zeros(1, 4, 8, 8), "fast"))
