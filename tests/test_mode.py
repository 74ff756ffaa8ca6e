"""`freescale_mode` installs scale fusion, dilation and FreeU for one UNet call and leaves the UNet bit-identical."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from freescale_core import FreeScaleConfig, freescale_mode
from freescale_core.attention import ScaleFusionProcessor


def snapshot(unet):
    return {
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
        "processors": {name: m.processor for name, m in unet.named_modules() if isinstance(m, Attention)},
        "convs": {name: (m.dilation, m.padding) for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)},
        "modules": [name for name, _ in unet.named_modules()],
    }


def up_resnets(unet):
    return [resnet for block in unet.up_blocks for resnet in block.resnets]


def no_hooks(unet) -> bool:
    return all(
        len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in unet.modules()
    )


def assert_restored(unet, before):
    state = unet.state_dict()
    assert state.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), key
    processors = {name: m.processor for name, m in unet.named_modules() if isinstance(m, Attention)}
    assert processors.keys() == before["processors"].keys()
    for name, processor in before["processors"].items():
        assert processors[name] is processor, name
    assert {name: (m.dilation, m.padding) for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)} == before["convs"]
    assert [name for name, _ in unet.named_modules()] == before["modules"]
    for resnet in up_resnets(unet):
        assert len(resnet._forward_pre_hooks) == 0
    assert no_hooks(unet)


def structured_latent(h, w, batch=2):
    i = torch.arange(h, dtype=torch.float32)[:, None]
    j = torch.arange(w, dtype=torch.float32)[None, :]
    planes = [torch.sin(0.2 * i * (c + 1)) + 0.05 * j - 0.5 * c for c in range(4)]
    x = torch.stack(planes)[None].repeat(batch, 1, 1, 1)
    x[:, :, : h // 2, : w // 2] += 0.7
    x[1] *= -0.5
    return x


@pytest.fixture(scope="module")
def inputs(tiny_pipeline):
    unet = tiny_pipeline.unet
    dim = unet.config.cross_attention_dim
    emb = torch.cos(torch.arange(2 * 77 * dim, dtype=torch.float32) * 0.01).view(2, 77, dim)
    added = {
        "text_embeds": torch.linspace(-1, 1, 64).view(2, 32),
        "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]]).repeat(2, 1),
    }
    return emb, added


def forward(unet, latent, inputs, t=500):
    emb, added = inputs
    with torch.no_grad():
        return unet(latent, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample


def test_processors_installed_inside(tiny_unet):
    attn1 = [m for name, m in tiny_unet.named_modules() if name.endswith("attn1")]
    attn2 = {name: m.processor for name, m in tiny_unet.named_modules() if name.endswith("attn2")}
    assert len(attn1) == 11  # down 1 (2) + down 2 (2) + mid (1) + up 0 (3) + up 1 (3): one layer each in tiny
    with freescale_mode(tiny_unet, FreeScaleConfig(seed=3), size=(512, 768), step_index=20):
        processors = [m.processor for m in attn1]
        assert all(isinstance(p, ScaleFusionProcessor) for p in processors)
        assert [p.block_index for p in processors] == list(range(len(attn1)))
        geometry = processors[0].geometry
        assert geometry.size_px == (512, 768)
        assert geometry.scale == (2, 3)
        assert geometry.train_latent == 32 and geometry.vae_scale == 8
        assert geometry.step_index == 20 and geometry.seed == 3
        # cross-attention keeps its processor
        assert {name: m.processor for name, m in tiny_unet.named_modules() if name.endswith("attn2")} == attn2
        # FreeU hooks on the 9 up-block resnets
        assert all(len(r._forward_pre_hooks) == 1 for r in up_resnets(tiny_unet))


def test_scale_fusion_off_keeps_processors(tiny_unet):
    before = {name: m.processor for name, m in tiny_unet.named_modules() if isinstance(m, Attention)}
    with freescale_mode(tiny_unet, FreeScaleConfig(scale_fusion=False, freeu=False), size=(512, 512), step_index=0):
        now = {name: m.processor for name, m in tiny_unet.named_modules() if isinstance(m, Attention)}
        assert all(now[name] is p for name, p in before.items())
        assert all(len(r._forward_pre_hooks) == 0 for r in up_resnets(tiny_unet))


@pytest.mark.parametrize(
    "config,size,step",
    [
        (FreeScaleConfig(), (512, 512), 20),
        (FreeScaleConfig(fast_mode=True, fusion_blur="hwc", dilate_up_blocks=True), (512, 1024), 3),
        (FreeScaleConfig(window_jitter=False, fusion_blur="wc"), (768, 768), 40),
    ],
)
def test_unet_bit_identical_after_exit(tiny_pipeline, inputs, config, size, step):
    unet = tiny_pipeline.unet
    latent_before = structured_latent(32, 32)
    before = snapshot(unet)
    reference = forward(unet, latent_before, inputs)
    stage_latent = structured_latent(size[0] // 8, size[1] // 8)
    with freescale_mode(unet, config, size=size, step_index=step):
        inside = forward(unet, stage_latent, inputs)
    assert inside.shape == stage_latent.shape and torch.isfinite(inside).all()
    assert_restored(unet, before)
    after = forward(unet, latent_before, inputs)
    assert torch.equal(after, reference)
    # and FreeScale actually changed the stage's output compared with the stock UNet
    assert not torch.allclose(inside, forward(unet, stage_latent, inputs))


def test_restored_after_exception_inside(tiny_pipeline, inputs):
    unet = tiny_pipeline.unet
    before = snapshot(unet)
    latent = structured_latent(32, 48)
    reference = forward(unet, latent, inputs)
    with pytest.raises(ValueError, match="tokens do not form a grid"):
        with freescale_mode(unet, FreeScaleConfig(), size=(512, 512), step_index=0):
            # a 32×48 latent's tokens do not form any grid of the square 64×64 stage latent: the processors refuse
            forward(unet, latent, inputs)
    assert_restored(unet, before)
    assert torch.equal(forward(unet, latent, inputs), reference)


def test_nested_and_repeated_use(tiny_pipeline, inputs):
    unet = tiny_pipeline.unet
    before = snapshot(unet)
    latent = structured_latent(64, 64)
    results = []
    for _ in range(2):
        with freescale_mode(unet, FreeScaleConfig(seed=9), size=(512, 512), step_index=16):
            results.append(forward(unet, latent, inputs))
    assert torch.equal(results[0], results[1])  # same seed, step and blocks: same jitter, same output
    with freescale_mode(unet, FreeScaleConfig(seed=10), size=(512, 512), step_index=16):
        other = forward(unet, latent, inputs)
    assert not torch.equal(other, results[0])
    assert_restored(unet, before)
