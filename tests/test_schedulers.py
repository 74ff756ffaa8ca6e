"""`--scheduler NAME` and `--scheduler-option key=value` (`renderer.cascade.schedulers`): every supported scheduler renders a
256 -> 512 tiny cascade in one process and on a 2-rank gang (rank 0 alone for the base, both for the stage, the
guidance split on) with the same pixels to one level; the restart's re-noising is diffusers' own `add_noise` at the
restart index; stochastic schedulers draw the render's seeded noise, not torch's global generator."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from cluster.spawn import run_ranks
from freescale_core import FreeScaleConfig
from renderer.cascade.schedulers import SUPPORTED, SchedulerChoice, build, noised, parse_options
from renderer.messages import Prompt, StageJob
from renderer.cascade.worker import Worker
from renderer.cli import main
from renderer.models.builtin import sdxl_scheduler

CHOICES = [SchedulerChoice(name) for name in SUPPORTED] + [
    SchedulerChoice("DPMSolverMultistepScheduler", (("use_karras_sigmas", True),)),
    SchedulerChoice("EulerDiscreteScheduler", (("timestep_spacing", "trailing"),)),
]


def cascade_job(choice: SchedulerChoice) -> StageJob:
    return StageJob(cond=None, prompt=Prompt("a red kite", "blurry", 7.5), latents=torch.empty(0), stages=[(256, 256), (512, 512)],
                    first=0, last=2, steps=4, config=FreeScaleConfig(seed=3), transition_modes=["exact"], final_mode="exact",
                    first_sharded=1, cfg_split=True, scheduler=choice)


def render_pixels(worker: Worker, choice: SchedulerChoice) -> np.ndarray:
    worker.run(cascade_job(choice))
    return np.concatenate(list(worker.final_rows()))


def rank_renders(rank: int, world: int, choices: list[SchedulerChoice]) -> list[np.ndarray]:
    """This rank's rows of every choice's render, the model loaded once: one gang for all of them."""
    from renderer.models import load_pipeline

    worker = Worker("tiny", pipeline=load_pipeline("tiny"))
    return [render_pixels(worker, choice) for choice in choices]


@pytest.fixture(scope="module")
def gang() -> list[list[np.ndarray]]:
    return run_ranks(2, partial(rank_renders, choices=CHOICES), timeout_s=600)


@pytest.mark.parametrize("index", range(len(CHOICES)), ids=[f"{c.name}{''.join(f'-{k}={v}' for k, v in c.options)}" for c in CHOICES])
def test_every_scheduler_renders_the_same_in_one_process_and_on_two_workers(tiny_pipeline, gang, index):
    single = render_pixels(Worker("tiny", pipeline=tiny_pipeline), CHOICES[index])
    gathered = np.concatenate([rows[index] for rows in gang])
    assert single.shape == gathered.shape == (512, 512, 3)
    assert single.std() > 1.0
    assert int(np.abs(single.astype(int) - gathered.astype(int)).max()) <= 1


def test_schedulers_differ_from_each_other(tiny_pipeline, gang):
    """The choice reaches the stages: Euler, DPM-Solver and LCM give different images."""
    euler, dpm, lcm = (gang[0][SUPPORTED.index(name)] for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "LCMScheduler"))
    assert np.abs(euler.astype(int) - dpm.astype(int)).max() > 8 and np.abs(euler.astype(int) - lcm.astype(int)).max() > 8


@pytest.mark.parametrize("name", SUPPORTED)
def test_restart_noise_is_the_schedulers_own_at_the_restart_index(name):
    """ñ_i equals what the scheduler's own add_noise gives once its begin index is the restart index: its own grid
    and its own parameterisation (σ space for Euler, α/σ for the variance-preserving ones)."""
    clean, noise = torch.linspace(-1, 1, 4 * 8 * 8).view(1, 4, 8, 8), torch.cos(torch.arange(256.0)).view(1, 4, 8, 8)
    for index in (0, 3, 7):
        scheduler = build(sdxl_scheduler().config, None, SchedulerChoice(name), 10)
        ours = noised(scheduler, clean, noise, index)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(index)
        expected = scheduler.add_noise(clean, noise, scheduler.timesteps[index : index + 1])
        assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler"])
def test_stochastic_schedulers_draw_the_renders_seeded_noise(tiny_pipeline, name):
    """Torch's global seed does not change the render; the render's seed does."""
    worker = Worker("tiny", pipeline=tiny_pipeline)
    job = cascade_job(SchedulerChoice(name))
    job.last = 1
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        results.append(worker.run(job).latents)
    job.config = FreeScaleConfig(seed=4)
    other = worker.run(job).latents
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], other)


def test_options_are_typed():
    assert parse_options(["use_karras_sigmas=true", "solver_order=3", "eta=0.5", "timestep_spacing=trailing", "x=False"]) == {
        "use_karras_sigmas": True, "solver_order": 3, "eta": 0.5, "timestep_spacing": "trailing", "x": False}


@pytest.mark.parametrize("words, message", [
    (["--scheduler", "KarrasDPM"], "--scheduler 'KarrasDPM' is not one this renderer takes; use one of EulerDiscreteScheduler,"),
    (["--scheduler", "DPMSolverMultistepScheduler", "--scheduler-option", "karras=true"],
     "--scheduler-option karras: DPMSolverMultistepScheduler has no such option; it takes algorithm_type,"),
    (["--scheduler-option", "use_karras_sigmas=true"], "--scheduler-option use_karras_sigmas needs --scheduler NAME"),
    (["--scheduler", "EulerDiscreteScheduler", "--scheduler-option", "trailing"], "--scheduler-option 'trailing' is not key=value"),
    (["--scheduler", "DPMSolverMultistepScheduler", "--scheduler-option", "algorithm_type=nonsense"],
     "--scheduler DPMSolverMultistepScheduler algorithm_type=nonsense with --steps 50: nonsense is not implemented"),
    (["--scheduler", "LCMScheduler", "--steps", "60"], "--scheduler LCMScheduler with --steps 60:"),
])
def test_bad_scheduler_choices_are_one_line_errors(capsys, tmp_path, words, message):
    assert main(["--prompt", "a", "--size", "256x256", "--out", str(tmp_path / "a.tif"), "--dry-run", *words]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_the_render_id_changes_with_the_scheduler_and_its_options():
    from renderer import RenderRequest
    from renderer.plan.identity import render_id

    base = RenderRequest(prompt="a", size=(256, 256))
    requests = [base, base.with_(scheduler="DPMSolverMultistepScheduler"),
                base.with_(scheduler="DPMSolverMultistepScheduler", scheduler_options={"use_karras_sigmas": True}),
                base.with_(scheduler="DPMSolverMultistepScheduler", scheduler_options={"use_karras_sigmas": False})]
    assert len({render_id(request, [(256, 256)], "float32", "cpu") for request in requests}) == 4
