"""Load an SDXL pipeline from a name the user typed.

`tiny`, `toy` and `sdxl-random` are built in. Otherwise: a diffusers folder (`model_index.json`), a
single `.safetensors` file (this project's packed format, or an original Stability checkpoint converted
by diffusers, which needs `model_config` offline), or a hub id where the hub is reachable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from freescale_core import FreeScaleConfig
from renderer.errors import RenderError, first_line
from renderer.models.builtin import SDXL, TINY, TOY_WEIGHTS, VIDEO_MODELS, build_random_pipeline, image_model
from renderer.models.lora import Lora, fuse_loras
from renderer.models.motion import add_motion
from renderer.plan.geometry import ModelGeometry, vae_scale_of

BUILTIN = ("tiny", "toy", "sdxl-random", *VIDEO_MODELS)
# The toy learned its creature at one scale only: re-noised less, an upscaling stage keeps one round body and its
# two eyes (4x, 16 seeds: two eyes in 56 % at 0.8 against 31 % at the paper's 0.3; docs/benchmarks.md).
RECOMMENDED_RESTART_FRACTION = {"toy": 0.8}
PACKED_FORMAT = "freescale-sdxl-v1"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# The schedulers a packed file may name (a name is looked up in diffusers only if it is one of these, never any
# attribute a file asks for): SDXL's own and the common ones for it.
PACKED_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                     "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
                     "PNDMScheduler", "LMSDiscreteScheduler", "DDPMScheduler")
# Weight files that unpickle (and so may run code) when loaded; only safetensors are read.
PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def recommended_restart_fraction(model: str) -> float:
    """Where a model's upscaling stages restart when the user does not say: the paper's 0.3 unless the model
    renders measurably better otherwise."""
    return RECOMMENDED_RESTART_FRACTION.get(image_model(model), FreeScaleConfig().restart_fraction)


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, model_config: str | None = None,
                  motion_adapter: str | None = None, loras: tuple[Lora, ...] = ()) -> StableDiffusionXLPipeline:
    """The model, with `loras` fused into its weights (`renderer.models.lora`); with motion modules
    (`renderer.models.motion`) for a clip model or a `motion_adapter`."""
    diffusers_logging.set_verbosity_error()
    pipeline = _load(image_model(model), device, model_config)
    if not isinstance(pipeline.unet, UNet2DConditionModel) or pipeline.unet.config.addition_embed_type != "text_time":
        raise RenderError(f"--model {model} is not an SDXL-style model (its UNet has no text_time conditioning)")
    fuse_loras(pipeline, loras, model)
    if model in VIDEO_MODELS or motion_adapter:
        pipeline = add_motion(pipeline, model, motion_adapter)
    vae_dtype = torch.float32 if pipeline.vae.config.force_upcast else dtype
    for name, module_dtype in (("unet", dtype), ("text_encoder", dtype), ("text_encoder_2", dtype), ("vae", vae_dtype)):
        module = getattr(pipeline, name).to(device=device, dtype=module_dtype).eval().requires_grad_(False)
        for parameter in module.parameters():
            if parameter.device.type == "cpu":
                # Weights mapped from a safetensors file keep its (unaligned) buffers; CPU kernels round
                # unaligned operands differently, so own, aligned copies make every load path give equal bytes.
                parameter.data = parameter.data.clone()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load(model: str, device: str, model_config: str | None) -> StableDiffusionXLPipeline:
    if model == "tiny":
        return build_random_pipeline(TINY)
    if model == "sdxl-random":
        with torch.device(device):
            return build_random_pipeline(SDXL)
    if model == "toy":
        if not (TOY_WEIGHTS / "model_index.json").is_file():
            raise RenderError(f"--model toy: the trained weights are missing from {TOY_WEIGHTS}; reinstall the package")
        return StableDiffusionXLPipeline.from_pretrained(TOY_WEIGHTS, dtype=torch.float32, use_safetensors=True)
    path = Path(model)
    if path.suffix.lower() in PICKLED:
        raise RenderError(f"--model {model}: a pickled checkpoint ({path.suffix}) can run code when loaded; only .safetensors "
                          f"files are read. {CONVERT}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise RenderError(f"--model {model}: the folder has no model_index.json; give a diffusers SDXL folder (save_pretrained)")
        check_safetensors(path)
        return _checked(model, lambda: StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float32, use_safetensors=True))
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise RenderError(f"--model {model} does not exist; give a .safetensors file, a diffusers folder, a hub id, or one of {', '.join(BUILTIN)}")
        return _load_single_file(path, model_config)
    if path.exists() or model.count("/") != 1:
        raise RenderError(f"--model {model} is not a diffusers folder, a .safetensors file, a hub id (org/name) or one of {', '.join(BUILTIN)}")
    return _checked(model, lambda: StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32, use_safetensors=True))


CONVERT = ("Convert it once, where you trust the file, with diffusers: StableDiffusionXLPipeline.from_pretrained(SOURCE)"
           ".save_pretrained(FOLDER) writes safetensors; give FOLDER.")


def check_safetensors(folder: Path) -> None:
    """Refuse a diffusers folder any of whose weighted components has only pickled weights."""
    for name in COMPONENTS:
        files = [p for p in (folder / name).glob("*") if p.is_file()]
        if any(p.suffix in PICKLED for p in files) and not any(p.suffix == ".safetensors" for p in files):
            pickled = next(p.name for p in files if p.suffix in PICKLED)
            raise RenderError(f"--model {folder}: its {name} has only pickled weights ({pickled}), which can run code when "
                              f"loaded; only .safetensors are read. {CONVERT}")


def _checked(model: str, load):
    try:
        return load()
    except RenderError:
        raise
    except Exception as error:  # diffusers raises many types; the user needs one line
        said = first_line(error)
        advice = f" {CONVERT}" if "safetensors" in said.lower() else ""
        raise RenderError(f"--model {model} could not be loaded: {said}{advice}") from error


def _load_single_file(path: Path, model_config: str | None) -> StableDiffusionXLPipeline:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise RenderError(f"--model {path} is not a readable safetensors file ({error})") from error
    if metadata.get("format") == PACKED_FORMAT:
        return _checked(str(path), lambda: _load_packed(path, metadata))
    kwargs = {"config": model_config} if model_config else {}
    return _checked(str(path), lambda: StableDiffusionXLPipeline.from_single_file(str(path), dtype=torch.float32, **kwargs))


def save_single_file(pipeline: StableDiffusionXLPipeline, path: Path) -> None:
    """Pack a whole SDXL pipeline (weights, configs, tokenizers) into one .safetensors file."""
    tensors = {}
    for name in COMPONENTS:
        for key, value in getattr(pipeline, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    metadata = {
        "format": PACKED_FORMAT,
        "unet": json.dumps(dict(pipeline.unet.config)),
        "vae": json.dumps(dict(pipeline.vae.config)),
        "text_encoder": pipeline.text_encoder.config.to_json_string(),
        "text_encoder_2": pipeline.text_encoder_2.config.to_json_string(),
        "tokenizer": _tokenizer_json(pipeline.tokenizer),
        "tokenizer_2": _tokenizer_json(pipeline.tokenizer_2),
        "scheduler": json.dumps(dict(pipeline.scheduler.config)),
        "scheduler_class": type(pipeline.scheduler).__name__,
    }
    save_file(tensors, str(path), metadata=metadata)


def _load_packed(path: Path, metadata: dict[str, str]) -> StableDiffusionXLPipeline:
    import diffusers
    from safetensors.torch import load_file

    weights = load_file(str(path))
    unet = UNet2DConditionModel.from_config(json.loads(metadata["unet"]))
    vae = AutoencoderKL.from_config(json.loads(metadata["vae"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**json.loads(metadata["text_encoder"])))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**json.loads(metadata["text_encoder_2"])))
    modules = dict(zip(COMPONENTS, (unet, vae, text_encoder, text_encoder_2)))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}, strict=True)
    tokenizers = [_tokenizer_from_json(metadata[key]) for key in ("tokenizer", "tokenizer_2")]
    name = metadata.get("scheduler_class")
    if name not in PACKED_SCHEDULERS:
        raise RenderError(f"--model {path}: its scheduler_class {name!r} is not one this format takes; "
                          f"use one of {', '.join(PACKED_SCHEDULERS)} (re-pack it with save_single_file)")
    scheduler_class = getattr(diffusers, name)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler_class.from_config(json.loads(metadata["scheduler"])),
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def _tokenizer_json(tokenizer: CLIPTokenizer) -> str:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return json.dumps({"vocab": model["vocab"], "merges": model["merges"], "model_max_length": tokenizer.model_max_length})


def _tokenizer_from_json(text: str) -> CLIPTokenizer:
    data = json.loads(text)
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in data["merges"]]
    return CLIPTokenizer(vocab=data["vocab"], merges=merges, model_max_length=data["model_max_length"])


def geometry_from_config(sample_size: int, vae_channels, unet_channels) -> ModelGeometry:
    """Training size and size granularity from the UNet's latent sample size and both models' level counts."""
    vae_scale = vae_scale_of(vae_channels)
    return ModelGeometry(train_px=sample_size * vae_scale, granularity=vae_scale * 2 ** (len(unet_channels) - 1), vae_scale=vae_scale)


def model_geometry(pipeline: StableDiffusionXLPipeline) -> ModelGeometry:
    unet = pipeline.unet.config
    return geometry_from_config(unet.sample_size, pipeline.vae.config.block_out_channels, unet.block_out_channels)
