"""FreeU with the reference's channel-count rule (reference §7) on the tiny UNet (block_out_channels 32, 64, 128)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freescale_core import FreeScaleConfig, freeu_mode
from freescale_core.freeu import backbone_channels, fourier_filter, freeu, freeu_rule

# Expected backbone widths of the up-block resnets, written out (reference §7 scaled: 1280 → 128, 640 → 64).
EXPECTED_BACKBONE = {
    "up_blocks.0.resnets.0": 128, "up_blocks.0.resnets.1": 128, "up_blocks.0.resnets.2": 128,
    "up_blocks.1.resnets.0": 128, "up_blocks.1.resnets.1": 64, "up_blocks.1.resnets.2": 64,
    "up_blocks.2.resnets.0": 64, "up_blocks.2.resnets.1": 32, "up_blocks.2.resnets.2": 32,
}
B1, B2, S1, S2 = 1.1, 1.2, 0.6, 0.4


def resnets(unet) -> dict[str, torch.nn.Module]:
    modules = dict(unet.named_modules())
    return {name: modules[name] for name in EXPECTED_BACKBONE}


def numpy_fourier_filter(x: np.ndarray, threshold: int, scale: float) -> np.ndarray:
    spectrum = np.fft.fftshift(np.fft.fft2(x, axes=(-2, -1)), axes=(-2, -1))
    h, w = x.shape[-2:]
    crow, ccol = h // 2, w // 2
    spectrum[..., crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] *= scale
    return np.real(np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)), axes=(-2, -1)))


def ramp_image(channels: int, h: int, w: int) -> torch.Tensor:
    i = torch.arange(h, dtype=torch.float32)[:, None]
    j = torch.arange(w, dtype=torch.float32)[None, :]
    planes = []
    for c in range(channels):
        plane = 0.05 * (c % 8 + 1) * i - 0.03 * j + 0.2 * (c % 5)
        plane = plane + 0.5 * ((i + j + c) % 2)  # checkerboard
        plane[: h // 2, w // 2 :] += 1.0 + 0.1 * (c % 7)  # per-region offset
        planes.append(plane)
    return torch.stack(planes)[None]


def test_backbone_channel_rule(tiny_unet):
    assert tuple(tiny_unet.config.block_out_channels) == (32, 64, 128)
    split = backbone_channels(tiny_unet)
    named = {name: split[module] for name, module in resnets(tiny_unet).items()}
    assert named == EXPECTED_BACKBONE
    assert len(split) == 9
    # consistent with each resnet's actual input width: backbone + skip, where the skip has the width of the
    # down-path feature it is paired with (so the skip width is never larger than the resnet's output width)
    for name, module in resnets(tiny_unet).items():
        skip = module.conv1.in_channels - EXPECTED_BACKBONE[name]
        assert 0 < skip <= module.conv1.out_channels * 2


def test_rule_table():
    class Fake:
        class config:
            block_out_channels = (320, 640, 1280)

    assert freeu_rule(Fake, B1, B2, S1, S2) == {1280: (B1, S1), 640: (B2, S2)}


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 2, 7, 9), (1, 1, 16, 12), (1, 2, 4, 4)])
@pytest.mark.parametrize("scale", [0.6, 0.4, 1.0, 0.0])
def test_fourier_filter_matches_numpy(shape, scale):
    x = ramp_image(shape[1], shape[2], shape[3]).repeat(shape[0], 1, 1, 1)
    x = x + torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1, 1)
    got = fourier_filter(x, threshold=1, scale=scale)
    expected = numpy_fourier_filter(x.double().numpy(), 1, scale)
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-5, rtol=0)
    if scale == 1.0:
        np.testing.assert_allclose(got.numpy(), x.numpy(), atol=2e-5)
    else:
        assert not np.allclose(got.numpy(), x.numpy(), atol=1e-3)


def test_fourier_filter_keeps_half_precision_dtype():
    x = ramp_image(2, 8, 8).half()
    got = fourier_filter(x, 1, 0.5)
    assert got.dtype == torch.float16
    np.testing.assert_allclose(got.float().numpy(), numpy_fourier_filter(x.double().numpy(), 1, 0.5), atol=1e-2)


def capture_inputs(unet, names, run):
    """Capture each named resnet's input as it would be without FreeU (raw) and as the resnet receives it."""
    raw, seen = {}, {}
    modules = resnets(unet)
    handles = []
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(lambda m, args, name=name: raw.__setitem__(name, args[0].clone())))
    try:
        run(lambda: [modules[name].register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].clone())) for name in names])
    finally:
        for handle in handles:
            handle.remove()
    return raw, seen


def expected_after_freeu(x: torch.Tensor, backbone: int) -> torch.Tensor:
    scales = {128: (B1, S1), 64: (B2, S2)}
    if backbone not in scales:
        return x
    b, s = scales[backbone]
    out = x.clone()
    out[:, : backbone // 2] = x[:, : backbone // 2] * b
    skip = x[:, backbone:].double().numpy()
    out[:, backbone:] = torch.from_numpy(numpy_fourier_filter(skip, 1, s)).to(x.dtype)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKBONE))
def test_hook_on_each_resnet_with_structured_input(tiny_unet, name):
    module = resnets(tiny_unet)[name]
    backbone = EXPECTED_BACKBONE[name]
    x = ramp_image(module.conv1.in_channels, 8, 8)
    temb = torch.linspace(-1, 1, tiny_unet.time_embedding.linear_2.out_features)[None]
    received = {}
    with torch.no_grad():
        with freeu(tiny_unet, B1, B2, S1, S2):
            handle = module.register_forward_pre_hook(lambda m, args: received.__setitem__("x", args[0].clone()))
            try:
                out_freeu = module(x, temb)
            finally:
                handle.remove()
        out_plain = module(x, temb)
    got = received["x"]
    expected = expected_after_freeu(x, backbone)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    if backbone in (128, 64):
        b = B1 if backbone == 128 else B2
        half = backbone // 2
        assert torch.equal(got[:, :half], x[:, :half] * b)  # first half scaled by exactly b
        assert torch.equal(got[:, half:backbone], x[:, half:backbone])  # second half untouched
        assert not torch.allclose(got[:, backbone:], x[:, backbone:], atol=1e-3)  # skip filtered
        assert not torch.allclose(out_freeu, out_plain)
    else:
        assert torch.equal(got, x)  # nothing applied to 32-channel backbones
        assert torch.equal(out_freeu, out_plain)
    # the module's hooks are gone again
    assert len(module._forward_pre_hooks) == 0


def test_hooks_in_a_full_unet_forward(tiny_pipeline):
    unet = tiny_pipeline.unet
    latent = ramp_image(4, 32, 32) * 0.1
    emb = torch.linspace(-1, 1, 77 * unet.config.cross_attention_dim).view(1, 77, -1)
    added = {"text_embeds": torch.linspace(0, 1, 32)[None], "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}
    names = sorted(EXPECTED_BACKBONE)

    def forward():
        with torch.no_grad():
            return unet(latent, 400, encoder_hidden_states=emb, added_cond_kwargs=added).sample

    plain = forward()
    outputs = {}

    def run(register_seen):
        with freeu_mode(unet, FreeScaleConfig()):
            handles = register_seen()
            try:
                outputs["freeu"] = forward()
            finally:
                for handle in handles:
                    handle.remove()

    raw, seen = capture_inputs(unet, names, run)
    for name in names:
        torch.testing.assert_close(seen[name], expected_after_freeu(raw[name], EXPECTED_BACKBONE[name]), atol=2e-5, rtol=0)
    assert not torch.allclose(outputs["freeu"], plain)
    # off: the same forward as without any context, and no hooks anywhere
    with freeu_mode(unet, FreeScaleConfig(freeu=False)):
        assert all(len(m._forward_pre_hooks) == 0 for m in resnets(unet).values())
        assert torch.equal(forward(), plain)
    assert all(len(m._forward_pre_hooks) == 0 for m in resnets(unet).values())
    assert torch.equal(forward(), plain)


def test_custom_factors_are_used(tiny_unet):
    module = resnets(tiny_unet)["up_blocks.1.resnets.1"]  # 64-channel backbone: b2/s2
    x = ramp_image(module.conv1.in_channels, 8, 8)
    temb = torch.zeros(1, tiny_unet.time_embedding.linear_2.out_features)
    received = {}
    with torch.no_grad(), freeu(tiny_unet, 1.0, 2.5, 1.0, 1.0):
        handle = module.register_forward_pre_hook(lambda m, args: received.__setitem__("x", args[0].clone()))
        module(x, temb)
        handle.remove()
    assert torch.equal(received["x"][:, :32], x[:, :32] * 2.5)
    torch.testing.assert_close(received["x"][:, 32:], x[:, 32:], atol=2e-5, rtol=0)
