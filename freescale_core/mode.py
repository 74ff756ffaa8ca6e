"""`freescale_mode`: put a diffusers SDXL-style UNet into FreeScale mode for one UNet call of a stage."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from diffusers.models.attention_processor import Attention
from torch import nn

from freescale_core.attention import ScaleFusionProcessor, StageGeometry
from freescale_core.cascade import dilation_factor, scale_factors
from freescale_core.config import FreeScaleConfig
from freescale_core.dilation import dilate
from freescale_core.freeu import SkipFilter, fourier_filter, freeu


@dataclass(frozen=True)
class Backend:
    """How the two FreeScale operations that see the whole image are computed.

    The default works on whole tensors in one process; `renderer.parallel.sharding` gives row-strip versions
    that exchange what they need with the other strips.
    """

    fusion_processor: Callable[[StageGeometry, int], object] = ScaleFusionProcessor
    skip_filter: SkipFilter = fourier_filter


LOCAL = Backend()


def is_temporal(name: str) -> bool:
    """Whether the module named `name` is inside a motion UNet's (AnimateDiff's) `motion_modules`: those attend
    along the frames at each pixel, and FreeScale leaves them as the model has them."""
    return "motion_modules" in name


def temporal_modules(unet: nn.Module) -> set[nn.Module]:
    """Every module inside a motion UNet's `motion_modules` (`is_temporal`). Empty for an image UNet."""
    return {module for name, module in unet.named_modules() if is_temporal(name)}


def self_attentions(unet: nn.Module) -> list[Attention]:
    """Every spatial transformer block's `attn1`, in module order (the order keys the window-jitter streams).

    One walk over the modules: this runs on every `freescale_mode` entry, once per UNet call."""
    return [module for name, module in unet.named_modules()
            if name.endswith("attn1") and isinstance(module, Attention) and not is_temporal(name)]


def train_px(unet: nn.Module, vae_scale: int = 8) -> int:
    return unet.config.sample_size * vae_scale


@contextmanager
def swap_processors(modules: list[Attention], processors: list[object]) -> Iterator[None]:
    saved = [module.processor for module in modules]
    try:
        for module, processor in zip(modules, processors):
            module.processor = processor
        yield
    finally:
        for module, processor in zip(modules, saved):
            module.processor = processor


@contextmanager
def freeu_mode(unet: nn.Module, config: FreeScaleConfig, backend: Backend = LOCAL) -> Iterator[None]:
    """FreeU only (per config): what the base stage runs with."""
    with ExitStack() as stack:
        if config.freeu:
            stack.enter_context(freeu(unet, config.freeu_b1, config.freeu_b2, config.freeu_s1, config.freeu_s2, backend.skip_filter))
        yield


@contextmanager
def freescale_mode(
    unet: nn.Module, config: FreeScaleConfig, size: tuple[int, int], step_index: int, vae_scale: int = 8,
    backend: Backend = LOCAL,
) -> Iterator[None]:
    """FreeScale for an upscaling stage of H×W pixels at step `step_index`, restored exactly on exit.

    Dilates the 9 restrained convs while step_index < config.dilate_tau, replaces every self-attention
    with scale fusion, and applies FreeU if configured.
    """
    train = train_px(unet, vae_scale)
    geometry = StageGeometry(
        size_px=tuple(size), vae_scale=vae_scale, train_latent=unet.config.sample_size,
        scale=scale_factors(size, train), step_index=step_index, seed=config.seed,
        fusion_blur=config.fusion_blur, window_jitter=config.window_jitter, fast_mode=config.fast_mode,
    )
    with ExitStack() as stack:
        if config.scale_fusion:
            attentions = self_attentions(unet)
            processors = [backend.fusion_processor(geometry, index) for index in range(len(attentions))]
            stack.enter_context(swap_processors(attentions, processors))
        if step_index < config.dilate_tau:
            stack.enter_context(dilate(unet, dilation_factor(size[1], train), config.dilate_up_blocks))
        stack.enter_context(freeu_mode(unet, config, backend))
        yield
