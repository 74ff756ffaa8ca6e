"""The user's scheduler (`--scheduler NAME`, `--scheduler-option key=value`) and what FreeScale's restart needs of it.

Each stage gets a fresh scheduler built from the model's scheduler config (the options on top), so a multistep
solver's history starts empty at every stage. The restart re-noises the upsampled latents to the scheduler's own
level at its own grid index (`noised`), in its own parameterisation: x0 + σ·ε for the σ-space schedulers (Euler),
α·x0 + σ·ε for the variance-preserving ones (DPM-Solver, UniPC, DDIM, LCM, TCD). Stochastic schedulers (Euler
ancestral, LCM, TCD, SDE solvers) draw their step noise through diffusers' `randn_tensor`; `seeded_step_noise`
hands them the render's seeded noise, drawn whole and sliced to the rows a rank holds, so a gang equals one process.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from freescale_core.rng import normal
from renderer.errors import RenderError, first_line

# The schedulers --scheduler takes: every one is tested in one process and on a gang (tests/test_schedulers.py).
SUPPORTED = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
             "UniPCMultistepScheduler", "DDIMScheduler", "LCMScheduler", "TCDScheduler")
# Config keys that describe the model's training, not a choice of sampler: never an option.
TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


@dataclass(frozen=True)
class SchedulerChoice:
    """A scheduler class by name (None: the model's own) and the config options set on top of the model's."""

    name: str | None = None
    options: tuple[tuple[str, object], ...] = ()


def parse_value(text: str) -> object:
    """`true`/`false` as booleans, numbers as int or float, `none` as None, anything else as the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(words: list[str] | None) -> dict[str, object]:
    """--scheduler-option key=value words, typed."""
    options: dict[str, object] = {}
    for word in words or []:
        key, equals, value = word.partition("=")
        if not equals or not key.strip():
            raise RenderError(f"--scheduler-option {word!r} is not key=value, e.g. use_karras_sigmas=true")
        options[key.strip()] = parse_value(value)
    return options


def scheduler_class(name: str):
    import diffusers

    if name not in SUPPORTED:
        raise RenderError(f"--scheduler {name!r} is not one this renderer takes; use one of {', '.join(SUPPORTED)}")
    return getattr(diffusers, name)


def option_names(name: str) -> list[str]:
    """What --scheduler-option may set for this class: its config's keyword arguments, training keys aside."""
    parameters = inspect.signature(scheduler_class(name).__init__).parameters
    return sorted(key for key in parameters if key != "self" and key not in TRAINING_KEYS)


def check_choice(name: str | None, options: dict[str, object]) -> None:
    """Refuse an unknown class, or an option its config does not have, in one line naming the valid ones."""
    if name is not None:
        scheduler_class(name)
    if options and name is None:
        raise RenderError(f"--scheduler-option {next(iter(options))} needs --scheduler NAME (one of {', '.join(SUPPORTED)})")
    valid = option_names(name) if name else []
    for key in options:
        if key not in valid:
            raise RenderError(f"--scheduler-option {key}: {name} has no such option; it takes {', '.join(valid)}")


def build(config, model_class: type | None, choice: SchedulerChoice | None, steps: int, device=None):
    """A fresh scheduler for one stage: the choice's class (else the model's) from the model's config with the
    choice's options, its timesteps set. A bad option value is one line naming it."""
    cls = scheduler_class(choice.name) if choice is not None and choice.name else model_class
    options = dict(choice.options) if choice is not None else {}
    try:
        scheduler = cls.from_config(config, **options)
        scheduler.set_timesteps(steps, device=device)
    except (ValueError, TypeError, NotImplementedError, AttributeError) as error:
        settings = " ".join(f"{key}={value}" for key, value in options.items())
        raise RenderError(f"--scheduler {cls.__name__}{' ' + settings if settings else ''} with --steps {steps}: "
                          f"{first_line(error)}") from None
    return scheduler


def model_scheduler_config(model: str) -> dict:
    """A built-in model's or a diffusers folder's scheduler config, read without loading weights ({}: known once
    loaded, the scheduler's own defaults meanwhile)."""
    import json
    from pathlib import Path

    from renderer.models.builtin import TOY_WEIGHTS, image_model, sdxl_scheduler

    name = image_model(model)
    if name in ("tiny", "sdxl-random"):
        return dict(sdxl_scheduler().config)
    folder = TOY_WEIGHTS if name == "toy" else Path(model)
    try:
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return {}


def keeps_history(scheduler) -> bool:
    """A multistep solver remembers its last predictions: resuming in the middle of a stage would forget them."""
    return hasattr(scheduler, "model_outputs")


def noised(scheduler, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """ñ_i: the clean latent noised to the level of schedule step i, in the scheduler's parameterisation,
    without touching scheduler state."""
    if not hasattr(scheduler, "sigmas"):  # DDIM, LCM, TCD: add_noise reads ᾱ at the timestep alone
        return scheduler.add_noise(clean, noise, scheduler.timesteps[index : index + 1])
    sigma = scheduler.sigmas[index].to(clean.device, clean.dtype)
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t"):  # variance-preserving latents, σ in the k-diffusion form
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * clean + sigma_t * noise
    return clean + sigma * noise


@contextmanager
def seeded_step_noise(scheduler, seed: int, key: tuple, height: int, rows: slice = slice(None)) -> Iterator[None]:
    """While one `scheduler.step` runs: any noise it draws is the render's, keyed by `key` (stage, step index),
    drawn whole (`height` latent rows) and sliced to `rows`, never torch's global generator."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield
        return

    def drawn(shape, generator=None, device=None, dtype=None, layout=None):
        whole = normal((shape[0], shape[1], height, *shape[3:]), seed, "step-noise", *key)[:, :, rows]
        if tuple(whole.shape) != tuple(shape):
            raise ValueError(f"{type(scheduler).__name__} drew noise of shape {tuple(shape)}, not the latents' {tuple(whole.shape)}")
        return whole.to(device=device, dtype=dtype)

    module.randn_tensor = drawn
    try:
        yield
    finally:
        module.randn_tensor = original
