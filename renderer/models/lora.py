"""LoRA add-ons (`--lora PATH[:SCALE]`, repeatable): fused into the weights once, at load, on every rank.

Loading goes through diffusers' own loader and its PEFT backend (`load_lora_weights`, which also converts
kohya/A1111 key layouts, then `fuse_lora` at the file's scale and `unload_lora_weights`), so a LoRA costs nothing
per step. A file whose LoRA layers do not all land on layers of the model is refused in one line naming it,
before any stage runs. Only safetensors are read, as for models.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from functools import lru_cache
from pathlib import Path

from renderer.errors import RenderError, first_line

Lora = tuple[str, float]  # (path, scale)
DOWN_KEYS = ("lora_A.", "lora.down.", "lora_linear_layer.down.")  # one per LoRA layer, in diffusers' layouts


def parse_lora(text: str) -> Lora:
    """PATH or PATH:SCALE (scale 1 by default); the file must be a readable .safetensors."""
    path, colon, scale_text = text.rpartition(":")
    if not colon or not path.lower().endswith(".safetensors") and text.lower().endswith(".safetensors"):
        path, scale_text = text, "1"
    try:
        scale = float(scale_text)
    except ValueError:
        raise RenderError(f"--lora {text}: the scale {scale_text!r} after {path} is not a number; give PATH or PATH:SCALE, "
                          f"e.g. {path}:0.8") from None
    check_lora(path, scale)
    return path, scale


def check_lora(path: str, scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise RenderError(f"--lora {path}: the scale {scale!r} is not a finite number; give PATH:SCALE, e.g. {path}:0.8")
    if not str(path).lower().endswith(".safetensors"):
        raise RenderError(f"--lora {path}: only .safetensors LoRA files are read (a pickled file can run code when loaded)")
    if not Path(path).is_file():
        raise RenderError(f"--lora {path} does not exist or is not a file")


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_digest(path: str) -> str:
    """The file's SHA-256 (computed once per version of the file)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def lora_identity(loras: tuple[Lora, ...]) -> list[dict]:
    """What the render id, the sidecar and the TIFF's XMP record of each LoRA: its file, digest and scale."""
    return [{"path": str(path), "sha256": lora_digest(path), "scale": float(scale)} for path, scale in loras]


def fuse_loras(pipeline, loras: tuple[Lora, ...], model: str) -> None:
    """Fuse every LoRA into the pipeline's UNet and text encoders at its scale: all loaded first (loading one
    unmerges any fused before it), then fused together, then their layers removed."""
    if not loras:
        return
    names = [f"lora{index}" for index in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        expected = _layer_count(pipeline, path)
        try:
            with warnings.catch_warnings():  # PEFT warns of every adapter after the first, which is what is wanted here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipeline.load_lora_weights(path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, IndexError) as error:
            raise RenderError(f"--lora {path}: its keys do not match --model {model} ({first_line(error)[:300]})") from None
        loaded = sum(1 for component in _components(pipeline) for module in component.modules()
                     if name in getattr(module, "lora_A", {}))
        if loaded != expected:
            raise RenderError(f"--lora {path}: {expected - loaded} of its {expected} LoRA layers match no layer of --model "
                              f"{model}; it was made for another model")
    pipeline.set_adapters(names, adapter_weights=[float(scale) for _, scale in loras])
    pipeline.fuse_lora(adapter_names=names)
    pipeline.unload_lora_weights()  # the LoRA layers go; the fused weights stay


def _layer_count(pipeline, path: str) -> int:
    """LoRA layers in the file, once diffusers has converted its keys to its own layout."""
    try:
        state_dict, _ = pipeline.lora_state_dict(path)
    except Exception as error:  # diffusers raises many types for a file it cannot read; the user needs one line
        raise RenderError(f"--lora {path} is not a LoRA file diffusers can read ({str(error).strip()[:300] or type(error).__name__})") from None
    count = sum(1 for key in state_dict if any(marker in key for marker in DOWN_KEYS))
    if not count:
        raise RenderError(f"--lora {path} holds no LoRA layers (no lora_A / lora_down weights)")
    return count


def _components(pipeline):
    return [module for module in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2) if module is not None]
