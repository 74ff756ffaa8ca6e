"""Motion modules (AnimateDiff's) on an SDXL-style UNet: what makes a model render clips.

The built-in clip models (`renderer.models.builtin`) bring their adapters. Any other model takes
`--motion-adapter`: a diffusers MotionAdapter folder (safetensors) or a hub id. The adapter's temporal
attention runs between the UNet's spatial layers and attends along the frames at each pixel
(`diffusers.UNetMotionModel`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNetMotionModel

from renderer.errors import RenderError, first_line
from renderer.models.builtin import SHIPPED_ADAPTERS, VIDEO_MODELS, build_random_motion_adapter

def adapter_config(model: str, motion_adapter: str | None) -> dict | None:
    """The adapter's config without its weights (built in, or a folder's config.json); None for a hub id."""
    if model in VIDEO_MODELS and model not in SHIPPED_ADAPTERS:
        with torch.device("meta"):
            return dict(build_random_motion_adapter(VIDEO_MODELS[model]).config)
    folder = SHIPPED_ADAPTERS.get(model) or (Path(motion_adapter) if motion_adapter else None)
    if folder is not None and folder.is_dir():
        try:
            return json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise RenderError(f"--motion-adapter {motion_adapter}: its config.json cannot be read ({error}); give a "
                              "diffusers MotionAdapter folder (save_pretrained)") from None
    return None


def check_adapter(config: dict, unet_channels, frames: int, name: str) -> None:
    """The adapter must be made for this UNet's widths, and have a position for every frame."""
    channels = tuple(config["block_out_channels"])
    if channels != tuple(unet_channels):
        raise RenderError(f"--motion-adapter {name}: its block_out_channels {list(channels)} do not match the UNet's "
                          f"{list(unet_channels)}; use an adapter made for this model (an SDXL adapter for SDXL)")
    positions = config["motion_max_seq_length"]
    if frames > positions:
        raise RenderError(f"--frames {frames} exceeds the motion adapter's {positions} frame positions; use at most {positions}")


def add_motion(pipeline, model: str, motion_adapter: str | None):
    """`pipeline` with its UNet turned into a motion UNet (the image UNet's weights kept)."""
    name = motion_adapter or model
    if model in SHIPPED_ADAPTERS:
        folder = SHIPPED_ADAPTERS[model]
        if not (folder / "config.json").is_file():
            raise RenderError(f"--model {model}: the trained motion modules are missing from {folder}; reinstall the package")
        adapter = MotionAdapter.from_pretrained(folder, use_safetensors=True)
    elif model in VIDEO_MODELS:
        with torch.device(pipeline.unet.device):
            adapter = build_random_motion_adapter(VIDEO_MODELS[model])
    else:
        try:
            adapter = MotionAdapter.from_pretrained(motion_adapter, use_safetensors=True)
        except Exception as error:  # diffusers raises many types; the user needs one line
            raise RenderError(f"--motion-adapter {motion_adapter} could not be loaded: {first_line(error)}") from error
    check_adapter(adapter.config, pipeline.unet.config.block_out_channels, 1, name)
    pipeline.unet = motion_unet(pipeline.unet, adapter, model)
    return pipeline


def motion_unet(image_unet, adapter: MotionAdapter, model: str) -> UNetMotionModel:
    """The image UNet with the adapter's motion modules between its layers, every image weight kept."""
    unet = UNetMotionModel.from_unet2d(image_unet, adapter)
    # diffusers' from_unet2d (0.42) leaves some of the image UNet's weights at a random init (SDXL's add_embedding,
    # the text_time conditioning): load every one of them by name.
    unplaced = unet.load_state_dict(image_unet.state_dict(), strict=False).unexpected_keys
    if unplaced:
        raise RenderError(f"--model {model}: its UNet's weights {unplaced[:3]} have no place in the motion UNet; "
                          "use an SDXL-style model with an adapter made for it")
    return unet


def max_frames(unet) -> int:
    """Frames a motion UNet can attend over at once (its adapter's positions); 0 for an image UNet."""
    return unet.config.get("motion_max_seq_length", 0) if isinstance(unet, UNetMotionModel) else 0
