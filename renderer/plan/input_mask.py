"""Masks as model tensors (the --image picture: `renderer.plan.input_image`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from renderer.errors import RenderError
from renderer.plan.geometry import Size, format_size


def open_image(path: Path, label: str, check: Callable[[Image.Image], None] = lambda image: None) -> Image.Image:
    """The image in `path`, or a one-line error when it is not one PIL can read: not an image, truncated, or so large
    that Pillow refuses it as a decompression bomb. `check` sees its header (size, mode) before the pixels are read."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise RenderError(f"{label} {path} is too large to read ({one_line(error)}); give a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RenderError(f"{label} {path} is not a readable image ({type(error).__name__}); give a PNG, JPEG or TIFF") from None
    try:
        check(image)
        image.load()
    except RenderError:
        image.close()
        raise
    except Exception as error:  # a truncated or damaged file: whatever its decoder raises (OSError, struct.error, ...)
        image.close()
        raise RenderError(f"{label} {path} is not a readable image ({type(error).__name__}: {one_line(error)}); it may be "
                          "truncated or damaged: give a complete PNG, JPEG or TIFF") from None
    return image


def one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_mask(path: Path, base: Size) -> torch.Tensor:
    """A binary (1, 1, H, W) mask: any non-zero gray value is foreground (as the reference)."""
    with open_image(path, "--mask", lambda image: check_mask(image, path, base)) as image:
        gray = np.asarray(image.convert("L"))
    return torch.from_numpy((gray > 0).astype(np.float32))[None, None]


def check_mask(image: Image.Image, path: Path, base: Size) -> None:
    if image.size[0] * base[1] != image.size[1] * base[0]:
        raise RenderError(f"--mask {path} is {format_size(image.size)}; it needs the aspect ratio of {format_size(base)}")
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "P", "I", "I;16"):
        raise RenderError(f"--mask {path} has mode {image.mode}; use a grayscale or RGB(A) image")


def mask_at(mask: torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask, size=latent, mode="nearest")
