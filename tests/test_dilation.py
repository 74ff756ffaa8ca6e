"""Restrained dilated convolution (reference §3) on the tiny UNet (train px 256, so 512 px gives d = 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freescale_core import FreeScaleConfig, freescale_mode
from freescale_core.dilation import DILATED_CONVS, dilate

# Reference §3, written out: the only 9 convs FreeScale dilates.
EXPECTED_NAMES = {
    "down_blocks.1.downsamplers.0.conv",
    "down_blocks.2.resnets.0.conv1",
    "down_blocks.2.resnets.0.conv2",
    "down_blocks.2.resnets.1.conv1",
    "down_blocks.2.resnets.1.conv2",
    "mid_block.resnets.0.conv1",
    "mid_block.resnets.0.conv2",
    "mid_block.resnets.1.conv1",
    "mid_block.resnets.1.conv2",
}


def conv_state(unet: nn.Module) -> dict[str, tuple]:
    return {name: (m.dilation, m.padding) for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)}


def up_block_resnet_convs(unet: nn.Module) -> set[str]:
    return {
        name
        for name, m in unet.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith("up_blocks.") and ".resnets." in name and name.rsplit(".", 1)[-1] in ("conv1", "conv2")
    }


def test_dilated_conv_list_is_the_reference_nine():
    assert set(DILATED_CONVS) == EXPECTED_NAMES
    assert len(DILATED_CONVS) == 9


def test_original_state_is_undilated(tiny_unet):
    state = conv_state(tiny_unet)
    assert all(dilation == (1, 1) for dilation, _ in state.values())
    for name in EXPECTED_NAMES:
        assert state[name] == ((1, 1), (1, 1))


@pytest.mark.parametrize("step_index", [0, 10, 15, 34, 35, 36, 49])
def test_freescale_mode_dilates_exactly_the_nine_before_tau(tiny_unet, step_index):
    before = conv_state(tiny_unet)
    config = FreeScaleConfig()
    assert config.dilate_tau == 35
    with freescale_mode(tiny_unet, config, size=(512, 512), step_index=step_index):
        inside = conv_state(tiny_unet)
    for name, state in inside.items():
        if step_index < 35 and name in EXPECTED_NAMES:
            assert state == ((2, 2), (2, 2)), name
        else:
            assert state == before[name], name
    assert conv_state(tiny_unet) == before


def test_factor_follows_width_relative_to_training_size(tiny_unet):
    before = conv_state(tiny_unet)
    # (H, W) = (512, 1024): d = 1024 // 256 = 4; (1024, 512): d = 512 // 256 = 2 (width only, as the reference)
    for size, d in (((512, 1024), 4), ((1024, 512), 2), ((1024, 1024), 4), ((256, 256), 1)):
        with freescale_mode(tiny_unet, FreeScaleConfig(), size=size, step_index=0):
            inside = conv_state(tiny_unet)
        for name in EXPECTED_NAMES:
            assert inside[name] == ((d, d), (d, d)), (size, name)
    assert conv_state(tiny_unet) == before


def test_dilate_tau_zero_disables(tiny_unet):
    before = conv_state(tiny_unet)
    with freescale_mode(tiny_unet, FreeScaleConfig(dilate_tau=0), size=(512, 512), step_index=0):
        assert conv_state(tiny_unet) == before


def test_dilate_up_blocks_ablation(tiny_unet):
    before = conv_state(tiny_unet)
    up = up_block_resnet_convs(tiny_unet)
    assert len(up) == 3 * 3 * 2  # 3 up blocks × 3 resnets × conv1/conv2
    with freescale_mode(tiny_unet, FreeScaleConfig(dilate_up_blocks=True), size=(512, 512), step_index=3):
        inside = conv_state(tiny_unet)
    for name, state in inside.items():
        if name in EXPECTED_NAMES or name in up:
            assert state == ((2, 2), (2, 2)), name
        else:
            assert state == before[name], name
    with freescale_mode(tiny_unet, FreeScaleConfig(dilate_up_blocks=True), size=(512, 512), step_index=35):
        assert conv_state(tiny_unet) == before
    assert conv_state(tiny_unet) == before


def test_dilation_restored_after_exception(tiny_unet):
    before = conv_state(tiny_unet)
    with pytest.raises(RuntimeError, match="boom"):
        with freescale_mode(tiny_unet, FreeScaleConfig(), size=(512, 512), step_index=0):
            raise RuntimeError("boom")
    assert conv_state(tiny_unet) == before


def structured_input(channels: int, size: int, dtype=torch.float64) -> torch.Tensor:
    """A ramp over rows/cols/channels plus a distinct offset per quadrant."""
    rows = torch.arange(size, dtype=dtype)[:, None]
    cols = torch.arange(size, dtype=dtype)[None, :]
    x = torch.stack([0.1 * rows + 0.03 * (c + 1) * cols - 0.05 * c for c in range(channels)])[None]
    half = size // 2
    x[..., :half, half:] += 1.5
    x[..., half:, :half] -= 0.75
    x[..., half:, half:] += 0.5 * ((rows[half:] + cols[:, half:]) % 2)  # checkerboard
    return x


@pytest.mark.parametrize("name", ["mid_block.resnets.0.conv1", "down_blocks.1.downsamplers.0.conv"])
def test_dilated_conv_output_matches_reference(tiny_unet, name):
    conv = dict(tiny_unet.named_modules())[name]
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    x = structured_input(conv.in_channels, 12)
    d = 2
    stride = conv.stride[0]
    with freescale_mode(tiny_unet, FreeScaleConfig(), size=(512, 512), step_index=0):
        got = F.conv2d(x, weight, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        # the module itself (its own forward, in float64 on a copy)
        copy = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=conv.padding, dilation=conv.dilation).double()
        copy.load_state_dict({"weight": weight, "bias": bias})
        module_out = copy(x)
    expected = F.conv2d(x, weight, bias, stride=stride, padding=d, dilation=d)
    # explicit shifted sums: y[i, j] = b + Σ_{u,v} W[:, :, u, v] · x_pad[i·s + d·u, j·s + d·v]
    padded = F.pad(x, (d, d, d, d))
    out_h = (x.shape[-2] + 2 * d - 2 * d - 1) // stride + 1
    manual = bias.view(1, -1, 1, 1).expand(1, conv.out_channels, out_h, out_h).clone()
    for u in range(3):
        for v in range(3):
            patch = padded[..., d * u : d * u + stride * (out_h - 1) + 1 : stride, d * v : d * v + stride * (out_h - 1) + 1 : stride]
            manual += torch.einsum("oc,bchw->bohw", weight[:, :, u, v], patch)
    torch.testing.assert_close(expected, manual, atol=1e-10, rtol=0)
    torch.testing.assert_close(got, manual, atol=1e-10, rtol=0)
    torch.testing.assert_close(module_out, manual, atol=1e-10, rtol=0)
    # same spatial size as the undilated conv (for the stride-2 downsampler too)
    undilated = F.conv2d(x, weight, bias, stride=stride, padding=1)
    assert got.shape == undilated.shape
    assert not torch.allclose(got, undilated)


def test_dilate_context_directly(tiny_unet):
    before = conv_state(tiny_unet)
    with dilate(tiny_unet, 3):
        inside = conv_state(tiny_unet)
        assert all(inside[n] == ((3, 3), (3, 3)) for n in EXPECTED_NAMES)
    assert conv_state(tiny_unet) == before


def test_unet_forward_with_dilation_keeps_shapes_and_changes_output(tiny_pipeline):
    unet = tiny_pipeline.unet
    torch.manual_seed(0)
    latent = structured_input(4, 64, dtype=torch.float32)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}
    config = FreeScaleConfig(scale_fusion=False, freeu=False)
    with torch.no_grad():
        plain = unet(latent, 500, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        with freescale_mode(unet, config, size=(512, 512), step_index=0):
            dilated = unet(latent, 500, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        with freescale_mode(unet, config, size=(512, 512), step_index=40):
            late = unet(latent, 500, encoder_hidden_states=emb, added_cond_kwargs=added).sample
    assert dilated.shape == plain.shape
    assert not torch.allclose(dilated, plain)
    assert torch.equal(late, plain)  # nothing else active: past tau the UNet is stock
