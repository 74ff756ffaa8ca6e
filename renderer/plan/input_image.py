"""The user's picture as the cascade's first stage (`--image`): its header, the stages planned from its size,
and its pixels brought to that size.

`shown_size` and `input_plan` read only the file's header, so that the plan, the preflight and `--dry-run`
know every size before a pixel (or a weight) is loaded; `load_input` decodes and converts the picture.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from renderer.errors import RenderError
from renderer.plan.geometry import ModelGeometry, Size, check_granular, check_stages, format_size

if TYPE_CHECKING:  # the request plans through this module; here it is only a type
    from renderer.plan.request import RenderRequest

ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose honours
QUARTER_TURNS = {5, 6, 7, 8}  # orientations shown turned by 90°: width and height swap
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
DEFAULT_STRENGTH = 0.1  # bench/upscale.py: as faithful as direct img2img by PSNR and SSIM, one subject kept


@dataclass(frozen=True)
class InputPlan:
    stages: list[Size]
    notes: list[str] = field(default_factory=list)  # one line for each change the picture goes through


def unreadable(path: Path, error: BaseException) -> RenderError:
    return RenderError(f"--image {path} is not a readable image ({type(error).__name__}); give a PNG, JPEG or TIFF")


def too_large(path: Path) -> RenderError:
    limit = Image.MAX_IMAGE_PIXELS
    return RenderError(f"--image {path} has more than the {limit / 1e6:.0f} M pixels PIL reads without suspecting a "
                       "decompression bomb (PIL.Image.MAX_IMAGE_PIXELS); give a smaller picture")


def opened(path: Path) -> Image.Image:
    """The picture, opened lazily (its header read), a decompression bomb refused in one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large(path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise unreadable(path, error) from None


def shown_size(path: Path) -> Size:
    """The picture's size as shown (after its EXIF rotation), from its header."""
    with opened(path) as image:
        width, height = image.size
        try:  # PIL's PNG reader decodes every pixel to look for EXIF after them: there, only an eXIf chunk before them
            exif = image.getexif() if image.format != "PNG" else Image.Exif()
            if image.format == "PNG" and image.info.get("exif"):
                exif.load(image.info["exif"])
            orientation = exif.get(ORIENTATION, 1)
        except (OSError, SyntaxError, ValueError):  # a damaged EXIF block: shown as stored
            orientation = 1
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


def on_grid(size: tuple[float, float], unit: int) -> Size:
    return tuple(max(unit, int(round(side / unit)) * unit) for side in size)  # type: ignore[return-value]


def first_stage(shown: Size, geometry: ModelGeometry, path: Path) -> tuple[Size, list[str]]:
    """The picture's size on the model's grid, its short side at least the training size (aspect kept)."""
    notes, (width, height) = [], shown
    if min(shown) < geometry.train_px:
        scale = geometry.train_px / min(shown)
        width, height = width * scale, height * scale
    size = on_grid((width, height), geometry.granularity)
    if min(shown) < geometry.train_px:
        notes.append(f"--image {path} is {format_size(shown)}, below the model's {geometry.train_px}px training size: "
                     f"brought to {format_size(size)} first")
    elif size != shown:
        notes.append(f"--image {path} is {format_size(shown)}: resized to {format_size(size)}, the model's "
                     f"{geometry.granularity}px grid")
    return size, notes


def keeps_aspect(size: Size, first: Size, unit: int) -> bool:
    """`size` scaled to the first stage's width is within one grid unit of its height (the first stage itself is
    the picture rounded to that grid)."""
    return abs(size[1] * first[0] / size[0] - first[1]) <= unit


def doublings(first: Size, target: Size) -> list[Size]:
    """The first stage, each doubling of it short of the target, and the target."""
    stages = [first]
    while 2 * stages[-1][0] < target[0] and 2 * stages[-1][1] < target[1]:
        stages.append((2 * stages[-1][0], 2 * stages[-1][1]))
    return [*stages, target]


def aspect_sizes(first: Size) -> str:
    return ", ".join(f"{format_size((first[0] * k, first[1] * k))} ({k}x)" for k in (2, 4))


def input_plan(request: RenderRequest, geometry: ModelGeometry) -> InputPlan:
    """The stages of a render that starts from `request.image`: the picture's size first (see `first_stage`), then
    every doubling toward --size (or the scale of --size Nx), or --stages as given."""
    path = Path(request.image)
    shown = shown_size(path)
    first, notes = first_stage(shown, geometry, path)
    if request.stages:
        stages = [tuple(size) for size in request.stages]
        check_stages(stages, geometry)
        if not keeps_aspect(stages[0], first, geometry.granularity):
            raise RenderError(f"--image {path} is {format_size(shown)}; the first of --stages {format_size(stages[0])} "
                              f"does not keep its aspect: start --stages at {format_size(first)}")
        if stages[0] != first:
            notes.append(f"--image {path} is {format_size(shown)}: resized to the first of --stages, {format_size(stages[0])}")
        return InputPlan(stages, notes)
    if request.scale is not None:
        target = on_grid((first[0] * request.scale, first[1] * request.scale), geometry.granularity)
    else:
        target = tuple(request.size)
        check_granular(target, geometry)
    label = f"--size {format_size(target)}" if request.scale is None else f"--size {request.scale:g}x ({format_size(target)})"
    if not keeps_aspect(target, first, geometry.granularity):
        raise RenderError(f"--image {path} is {format_size(shown)} (first stage {format_size(first)}); {label} does not keep "
                          f"its aspect: give --size {aspect_sizes(first)} or Nx, or a picture of the aspect of {label} "
                          f"(at least {format_size(on_grid((target[0] / max(target) * geometry.train_px, target[1] / max(target) * geometry.train_px), geometry.granularity))})")
    if target[0] <= first[0] or target[1] <= first[1]:
        raise RenderError(f"--image {path} is {format_size(shown)} (first stage {format_size(first)}); {label} is not "
                          f"larger: give a larger --size, e.g. {aspect_sizes(first)}")
    return InputPlan(doublings(first, target), notes)


def conditioning_size(first: Size, train_px: int) -> Size:
    """The size SDXL's micro-conditioning names for a render from a picture: the base today's cascade would
    generate for it (halved until its long side is at most the training size), so that every upscaling stage is
    conditioned as after a generated base."""
    while max(first) > train_px:
        first = (first[0] // 2, first[1] // 2)
    return first


def strength_restart(steps: int, strength: float) -> int:
    """The schedule index the first upscaling stage restarts at: diffusers' img2img rule, which runs the last
    int(steps · strength) steps of the schedule (here at least one)."""
    return steps - min(max(1, int(steps * strength)), steps)


def effective_strength(request: RenderRequest) -> float:
    return DEFAULT_STRENGTH if request.strength is None else request.strength


def check_strength(request: RenderRequest) -> None:
    if request.strength is not None and request.image is None:
        raise RenderError(f"--strength {request.strength} sets how much of your picture's first upscaling stage is redone; "
                          "give --image too")
    strength = effective_strength(request)
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise RenderError(f"--strength {strength} must be in (0, 1]: small keeps the picture, 1 redoes the whole first "
                          f"upscaling stage (default {DEFAULT_STRENGTH})")


def to_rgb(image: Image.Image, path: Path) -> tuple[Image.Image, list[str]]:
    """8-bit RGB: 16-bit gray scaled to 8 bits, CMYK converted by PIL (no colour profile), transparency
    composited onto white, each with a note; a floating-point picture refused."""
    mode = image.mode
    if mode == "F":
        raise RenderError(f"--image {path} holds floating-point pixels (mode F), whose range is unknown; save it as 8- or "
                          "16-bit PNG or TIFF")
    if mode in SIXTEEN_BIT:
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB"), [f"--image {path}: 16-bit gray, scaled to 8 bits"]
    notes = []
    if mode == "CMYK":
        notes.append(f"--image {path}: CMYK converted to RGB without its colour profile (convert it yourself for exact colour)")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append(f"--image {path}: its transparent pixels composited onto white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    try:
        return image.convert("RGB"), notes
    except ValueError:
        raise RenderError(f"--image {path} has mode {mode}, which PIL cannot convert to RGB; save it as RGB") from None


def load_input(path: Path, size: Size) -> tuple[torch.Tensor, list[str]]:
    """The picture as shown (EXIF rotation applied), in RGB, resized to `size` (Lanczos) when it differs: a
    (1, 3, H, W) tensor in [-1, 1], with a note for each conversion."""
    with opened(path) as image:
        try:
            image.load()
            shown = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError:
            raise too_large(path) from None
        except (OSError, SyntaxError, ValueError) as error:  # a truncated or damaged file
            raise unreadable(path, error) from None
        rgb, notes = to_rgb(shown, path)
    if rgb.size != tuple(size):
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1.0, notes
