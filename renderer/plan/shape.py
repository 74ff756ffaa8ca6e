"""A model's shape from its configs alone (its modules built on the meta device: no weights), read once per model
and process, so that a batch of 10 000 posters of one model reads its configs once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from renderer.errors import RenderError
from renderer.plan.geometry import ModelGeometry, vae_scale_of

CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: its configs and its parameter counts."""

    unet: dict
    vae: dict
    unet_params: int
    vae_params: int
    text_params: int
    train_timesteps: int

    @property
    def vae_scale(self) -> int:
        return vae_scale_of(self.vae["block_out_channels"])

    @property
    def geometry(self) -> ModelGeometry:
        from renderer.models.loading import geometry_from_config

        return geometry_from_config(self.unet["sample_size"], self.vae["block_out_channels"], self.unet["block_out_channels"])


def model_shape(model: str) -> ModelShape | None:
    """The shape of a built-in model or a diffusers folder; None for a single file or a hub id (those are planned
    once loaded). A folder is read again when one of its configs changed."""
    folder = Path(model)
    stamps = tuple((folder / name).stat().st_mtime_ns if (folder / name).is_file() else None for name in CONFIGS)
    return shape_of(model, stamps)


@lru_cache(maxsize=16)
def shape_of(model: str, stamps: tuple) -> ModelShape | None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from renderer.models.builtin import build_text_encoders, build_unet, build_vae, builtin_spec

    spec, folder = builtin_spec(model), Path(model)
    with torch.device("meta"):
        if spec is not None:
            unet, vae, encoders = build_unet(spec), build_vae(spec), build_text_encoders(spec)
            timesteps = 1000
        elif (folder / "model_index.json").is_file():
            try:
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
                timesteps = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("num_train_timesteps", 1000)
            except (OSError, ValueError) as error:
                raise RenderError(f"--model {model}: its configs cannot be read ({error})") from None
            encoders = ()
        else:
            return None
    count = lambda module: sum(parameter.numel() for parameter in module.parameters())  # noqa: E731
    text = sum(count(encoder) for encoder in encoders) or text_params_from_files(folder)
    return ModelShape(dict(unet.config), dict(vae.config), count(unet), count(vae), text, timesteps)


def text_params_from_files(folder: Path) -> int:
    """Text encoders' parameters of a diffusers folder, from their weight files' sizes (2 bytes each in fp16)."""
    total = 0
    for name in ("text_encoder", "text_encoder_2"):
        for weights in (folder / name).glob("*.safetensors"):
            total += weights.stat().st_size // (2 if ".fp16." in weights.name else 4)
    return total
