"""FreeScale's knobs, with the reference defaults (freescale-reference.md §1.3, §7)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FUSION_BLURS = ("hw", "hwc", "wc")
UPSAMPLE_SPACES = ("rgb", "latent")


@dataclass(frozen=True)
class FreeScaleConfig:
    cosine_scale: float = 2.0  # α of the skip residual c1 = cf(t)^α; larger means more new detail
    cosine_scale_bg: float = 1.0  # α outside the region mask (only used with a mask)
    dilate_tau: int = 35  # convs are dilated while the step index i < dilate_tau
    restart_fraction: float = 0.3  # each upscaling stage restarts at step floor(restart_fraction * N)
    fusion_blur: str = "hw"  # axes of the Gaussian that splits local/global frequencies
    window_jitter: bool = True  # seeded random shifts of the local attention windows
    fast_mode: bool = False  # global attention on strided sub-grids instead of all tokens
    freeu: bool = True
    freeu_b1: float = 1.1
    freeu_b2: float = 1.2
    freeu_s1: float = 0.6
    freeu_s2: float = 0.4
    seed: int = 0
    # Ablations of the paper (§4.3); the defaults are FreeScale.
    scale_fusion: bool = True  # False: self-attention stays global only
    dilate_up_blocks: bool = False  # True: also dilate every up-block resnet conv
    upsample_space: str = "rgb"  # "latent": bicubic on latents instead of decode → resize → encode

    def __post_init__(self) -> None:
        for name in ("cosine_scale", "cosine_scale_bg", "restart_fraction", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name}={value} is not a finite number")
        if self.cosine_scale < 0 or self.cosine_scale_bg < 0:
            raise ValueError(f"cosine_scale={self.cosine_scale}, cosine_scale_bg={self.cosine_scale_bg}: use values >= 0 (typically 0.5-3)")
        if not 0.0 <= self.restart_fraction < 1.0:
            raise ValueError(f"restart_fraction={self.restart_fraction}: use a value in [0, 1), e.g. 0.3")
        if self.dilate_tau < 0:
            raise ValueError(f"dilate_tau={self.dilate_tau}: use a step index >= 0 (0 disables dilation)")
        if self.upsample_space not in UPSAMPLE_SPACES:
            raise ValueError(f"upsample_space={self.upsample_space!r}: use one of {', '.join(UPSAMPLE_SPACES)}")
        if self.fusion_blur not in FUSION_BLURS:
            raise ValueError(f"fusion_blur={self.fusion_blur!r}: use one of {', '.join(FUSION_BLURS)}")

    def to_dict(self) -> dict:
        return asdict(self)
