"""The banded exact VAE in one process against diffusers' untiled decode and encode, and its parts against the
plain torch ops. (On 2 and 3 ranks: `sharded_checks.check_vae`.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from renderer.models.builtin import SDXL, TINY, build_random_pipeline
from renderer.parallel.banded_vae import BAND_BYTES, Activation, BandedVAE, band_rows
from renderer.parallel.strips import RowGroup
from renderer.vae.bands import group_moments, merged_moments
from test_vae_bands import latent_with_band_statistics


@pytest.fixture(scope="module")
def vae():
    return build_random_pipeline(TINY, seed=3).vae


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


# float32 all through, as in the sharded checks: the banded VAE sums the same products in another order, and
# merges GroupNorm moments in float64 instead of one fp32 reduction.
VAE_TOLERANCE = 1e-5


@pytest.mark.parametrize("rows", [1, 7, 16, 40])
def test_banded_decode_equals_the_untiled_decode(vae, rows):
    z = latent_with_band_statistics(40, 24)
    with torch.inference_mode():
        expected = vae.decode(z).sample
        bands = list(BandedVAE(vae, RowGroup.single(40), rows).decode(z))
    assert [band.shape[2] for band in bands] == [8 * len(range(start, min(start + rows, 40))) for start in range(0, 40, rows)]
    assert relative(torch.cat(bands, dim=2), expected) <= VAE_TOLERANCE


@pytest.mark.parametrize("rows", [1, 3, 25])
def test_banded_encode_equals_the_untiled_encode(vae, rows):
    """A 200 x 136 image with row bands of different means: its moments, through three asymmetrically padded
    downsamplers whose bottom row of zeros only the last band sees."""
    image = latent_with_band_statistics(200, 136)[:, :3] * 0.3
    with torch.inference_mode():
        expected = vae.encode(image).latent_dist.parameters
        got = BandedVAE(vae, RowGroup.single(25), rows).encode(image)
    assert got.shape == expected.shape == (1, 8, 25, 17)
    assert relative(got, expected) <= VAE_TOLERANCE


def split_rows(x: torch.Tensor, rows: int) -> Activation:
    return Activation(list(x.split(rows, dim=2)), merged_moments(torch.stack([group_moments(b, b.shape[1]) for b in x.split(rows, dim=2)])))


@pytest.mark.parametrize("conv, upsample, pad_right", [
    (torch.nn.Conv2d(3, 2, 3, padding=1), False, False),
    (torch.nn.Conv2d(3, 2, 3, padding=2, dilation=2), False, False),
    (torch.nn.Conv2d(3, 2, 3, stride=2, padding=1), False, False),
    (torch.nn.Conv2d(3, 2, 3, stride=2, padding=0), False, True),  # the encoder's downsampler
    (torch.nn.Conv2d(3, 2, 3, padding=1), True, False),  # the decoder's upsampler
], ids=["3x3", "dilated", "stride 2", "padded bottom-right", "after nearest 2x"])
def test_banded_conv_after_group_norm_equals_the_torch_ops(vae, conv, upsample, pad_right):
    """GroupNorm + SiLU + conv over bands of 4 rows of an input whose halves differ in mean (a band-local
    norm, or zeros where a halo belongs, would show)."""
    torch.manual_seed(1)
    conv = conv.double()
    norm = torch.nn.GroupNorm(1, 3).double()
    x = torch.arange(3 * 12 * 6, dtype=torch.float64).reshape(1, 3, 12, 6) / 30
    x[:, :, 6:] -= 5.0
    engine = BandedVAE(vae, RowGroup.single(12), 4)
    engine.device, engine.store = torch.device("cpu"), torch.device("cpu")
    with torch.no_grad():
        whole = F.silu(norm(x))
        whole = F.interpolate(whole, scale_factor=2.0, mode="nearest") if upsample else whole
        expected = conv(F.pad(whole, (0, 1, 0, 1)) if pad_right else whole)
        bands = engine.outputs(conv, split_rows(x, 4), engine.norm_act(norm, split_rows(x, 4)), upsample=upsample, pad_right=pad_right)
        got = torch.cat(list(bands), dim=2)
    assert got.shape == expected.shape
    assert relative(got, expected) <= 1e-12


def test_band_height_follows_the_width_and_the_budget():
    """At 16384 px an SDXL band (fp16, 256 channels at full resolution) is 4 latent rows of 64 MiB each."""
    sdxl = {"block_out_channels": SDXL.vae_channels}
    assert band_rows(sdxl, 16384, 2) == BAND_BYTES // (8 * 16384 * 256 * 2) == 4
    assert band_rows(sdxl, 8192, 2) == 2 * band_rows(sdxl, 16384, 2)
    assert band_rows(sdxl, 2**20, 4) == 1
