"""The tiled VAE (streamed decode, tiled encode) against diffusers' own tiled decode and encode."""

from __future__ import annotations

import pytest
import torch

from renderer.models.builtin import TINY, build_random_pipeline
from renderer.parallel.strips import RowGroup
from renderer.vae.bands import encode_tiled
from renderer.vae.strip import decoded_bands


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


def test_tiled_streaming_equals_diffusers_tiled_decode(vae):
    z = latent_with_band_statistics(40, 24)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    with torch.no_grad():
        reference = vae.tiled_decode(z).sample
        streamed = list(decoded_bands(vae, RowGroup.single(z.shape[2]), z, "tiled"))
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


def test_unknown_mode_is_refused(vae):
    with pytest.raises(ValueError, match="vae mode"):
        list(decoded_bands(vae, RowGroup.single(8), torch.zeros(1, 4, 8, 8), "fast"))
