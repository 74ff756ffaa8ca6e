"""FreeScale (arXiv 2412.09626) for diffusers SDXL-style UNets: the method, usable on its own.

    from freescale_core import FreeScaleConfig, freescale_mode
    with freescale_mode(unet, config, size=(H, W), step_index=i):
        out = unet(...)
"""

from freescale_core.config import FreeScaleConfig
from freescale_core.mode import freescale_mode, freeu_mode

__all__ = ["FreeScaleConfig", "freescale_mode", "freeu_mode"]
