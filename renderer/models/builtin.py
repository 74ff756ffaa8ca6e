"""Built-in SDXL-shaped models that need no download.

- `tiny`: random, seeded weights, SDXL's block layout at a 256 px training size; builds in seconds and
  exists to test the plumbing.
- `toy`: the same layout, trained by `renderer.toy.train` on procedural scenes and shipped inside the
  package (`renderer/models/toy_weights`), so demos draw real shapes.
- `sdxl-random`: the true SDXL architecture with random weights, for timings on a GPU.
- Their clip models (`renderer.models.motion`): `tiny-video` and `sdxl-random-video` with seeded random motion
  modules (the latter of the public SDXL adapter's shapes), `toy-video` with motion modules trained by
  `renderer.toy.train_motion` and shipped in `renderer/models/toy_motion_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, MotionAdapter, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from renderer.models.tokenizer import MAX_LENGTH, build_offline_tokenizer, offline_vocab

TOY_WEIGHTS = Path(__file__).with_name("toy_weights")
TOY_MOTION_WEIGHTS = Path(__file__).with_name("toy_motion_weights")


@dataclass(frozen=True)
class ArchitectureSpec:
    """The few numbers that distinguish the built-in SDXL-shaped models."""

    sample_size: int  # latent training size; train_px = 8 * sample_size
    unet_channels: tuple[int, int, int]
    transformer_layers: tuple[int, int, int]
    attention_heads: tuple[int, int, int]
    unet_groups: int
    time_embed_dim: int
    vae_channels: tuple[int, int, int, int]
    vae_layers: int
    vae_groups: int
    text_hidden: tuple[int, int]  # (encoder 1, encoder 2); the UNet's cross-attention width is their sum
    text_layers: tuple[int, int]
    text_heads: tuple[int, int]
    vocab_size: int | None  # None: the offline byte-level vocabulary


TINY = ArchitectureSpec(
    sample_size=32, unet_channels=(32, 64, 128), transformer_layers=(1, 1, 1), attention_heads=(1, 2, 4),
    unet_groups=8, time_embed_dim=8, vae_channels=(16, 32, 32, 32), vae_layers=1, vae_groups=8,
    text_hidden=(32, 32), text_layers=(1, 1), text_heads=(2, 2), vocab_size=None,
)
TOY = ArchitectureSpec(
    sample_size=32, unet_channels=(64, 128, 192), transformer_layers=(1, 1, 1), attention_heads=(2, 4, 6),
    unet_groups=32, time_embed_dim=16, vae_channels=(32, 64, 128, 112), vae_layers=1, vae_groups=8,
    text_hidden=(64, 64), text_layers=(2, 2), text_heads=(2, 2), vocab_size=None,
)
SDXL = ArchitectureSpec(
    sample_size=128, unet_channels=(320, 640, 1280), transformer_layers=(1, 2, 10), attention_heads=(5, 10, 20),
    unet_groups=32, time_embed_dim=256, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32,
    text_hidden=(768, 1280), text_layers=(12, 32), text_heads=(12, 20), vocab_size=49408,
)


SPECS = {"tiny": TINY, "toy": TOY, "sdxl-random": SDXL}
# a built-in clip model -> the image model its motion adapter extends
VIDEO_MODELS = {"tiny-video": "tiny", "toy-video": "toy", "sdxl-random-video": "sdxl-random"}
SHIPPED_ADAPTERS = {"toy-video": TOY_MOTION_WEIGHTS}  # clip models whose motion modules are trained and shipped; the others are random


def image_model(model: str) -> str:
    """The image model a built-in clip model extends; any other name as it is."""
    return VIDEO_MODELS.get(model, model)


def builtin_spec(model: str) -> ArchitectureSpec | None:
    """The architecture of a built-in model (a clip model's: its image model's); None for any other name."""
    return SPECS.get(image_model(model))


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's scheduler: Euler, scaled-linear betas, "leading" spacing (t_i = 981 - 20 i at 50 steps)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1, prediction_type="epsilon", interpolation_type="linear",
    )


def build_unet(spec: ArchitectureSpec) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=spec.sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=spec.unet_channels, layers_per_block=2,
        transformer_layers_per_block=spec.transformer_layers, attention_head_dim=spec.attention_heads,
        cross_attention_dim=sum(spec.text_hidden), use_linear_projection=True, norm_num_groups=spec.unet_groups,
        addition_embed_type="text_time", addition_time_embed_dim=spec.time_embed_dim,
        projection_class_embeddings_input_dim=spec.text_hidden[1] + 6 * spec.time_embed_dim,
    )


def build_vae(spec: ArchitectureSpec) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels, layers_per_block=spec.vae_layers, norm_num_groups=spec.vae_groups,
        sample_size=spec.sample_size * 8, scaling_factor=0.13025, force_upcast=False,
    )


def build_text_encoders(spec: ArchitectureSpec) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    vocab_size = spec.vocab_size or len(offline_vocab())
    bos, eos = (vocab_size - 2, vocab_size - 1)
    configs = [
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=MAX_LENGTH, projection_dim=hidden,
            hidden_act=act, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )
        for hidden, layers, heads, act in zip(spec.text_hidden, spec.text_layers, spec.text_heads, ("quick_gelu", "gelu"))
    ]
    return CLIPTextModel(configs[0]), CLIPTextModelWithProjection(configs[1])


def build_random_pipeline(spec: ArchitectureSpec, seed: int = 0) -> StableDiffusionXLPipeline:
    """Every weight is drawn from a fixed seed, so the model is the same on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(spec)
        vae = build_vae(spec)
        text_encoder, text_encoder_2 = build_text_encoders(spec)
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_offline_tokenizer(),
        tokenizer_2=build_offline_tokenizer(), unet=unet, scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass(frozen=True)
class MotionSpec:
    """An AnimateDiff adapter's shape beyond its UNet's widths."""

    heads: int
    mid_block: bool
    positions: int = 32  # frames it can attend over


# sdxl-random-video: the public SDXL adapter's (animatediff-motion-adapter-sdxl-beta's config)
MOTION_SPECS = {"tiny": MotionSpec(heads=2, mid_block=True), "toy": MotionSpec(heads=4, mid_block=True),
                "sdxl-random": MotionSpec(heads=8, mid_block=False)}


def motion_adapter(spec: ArchitectureSpec, motion: MotionSpec) -> MotionAdapter:
    """A new adapter for `spec`'s UNet; its output projections are zero, so that it starts as the image model."""
    return MotionAdapter(block_out_channels=spec.unet_channels, motion_layers_per_block=2, motion_num_attention_heads=motion.heads,
                         motion_norm_num_groups=spec.unet_groups, motion_max_seq_length=motion.positions,
                         use_motion_mid_block=motion.mid_block)


def build_random_motion_adapter(model: str, seed: int = 1) -> MotionAdapter:
    """Seeded random motion modules for a built-in image model (`tiny-video`, `sdxl-random-video`).

    The output projections are drawn too (a new adapter's are zero), so that the frames really interact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = motion_adapter(SPECS[model], MOTION_SPECS[model])
        for name, parameter in adapter.named_parameters():
            if "proj_out" in name:
                parameter.data = torch.randn_like(parameter) * 0.1
    return adapter
