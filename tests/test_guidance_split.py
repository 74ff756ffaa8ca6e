"""Classifier-free guidance split over an even gang (`renderer.parallel.guidance`): 4 gloo ranks, two per branch, run a
whole 256 -> 512 stage (mask, checkpoints every step) and give the single process's latents and checkpoints.

Rank r runs branch r % 2 on strips 2(r // 2) and 2(r // 2) + 1; the branch groups exchange halos and K/V
among 2 ranks, and partners swap their predictions once a step. A swapped branch order, a wrong partner or
a strip sliced from the wrong rows changes the latents by far more than the float32 rounding allowed here."""

from __future__ import annotations

import pytest
import torch

import sharded_checks
from cluster.spawn import run_ranks
from renderer.cascade.stage_loop import run_stages

WORLD = 4


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(WORLD, sharded_checks.run_split_stage, timeout_s=600)


@pytest.fixture(scope="module")
def single(tiny_pipeline) -> tuple:
    handed = []
    run = run_stages(tiny_pipeline, sharded_checks.split_stage_job(tiny_pipeline), local=True,
                     checkpoint=lambda *args: handed.append(args))
    return run.latents, handed


def test_the_split_gang_denoises_what_one_process_does(ranks, single):
    """Each rank ends with its own strip of the gang's layout (16 of the 64 latent rows), equal to the single
    process's rows to float32 rounding: one UNet call on a batch of 1 instead of 2, halos and K/V over 2 ranks."""
    latents, _ = single
    assert [rank["span"] for rank in ranks] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    gathered = torch.cat([rank["latents"] for rank in ranks], dim=2)
    assert gathered.shape == latents.shape
    assert float((gathered - latents).abs().max()) <= 1e-4 * float(latents.abs().max())


def test_the_split_gang_hands_over_its_own_strips_of_every_checkpoint(ranks, single):
    """Every step's checkpoint: every rank hands over its own strip (not its branch rows), equal to the single
    process's rows, with the stage's reference."""
    _, handed = single
    for step, (stage, done, span, latents, reference) in enumerate(handed):
        pieces = [rank["checkpoints"][step] for rank in ranks]
        assert [piece[:3] for piece in pieces] == [(stage, done, rank["span"]) for rank in ranks]
        got = torch.cat([piece[3] for piece in pieces], dim=2)
        assert float((got - latents).abs().max()) <= 1e-4 * float(latents.abs().max())
        if reference is None:
            assert all(piece[4] is None for piece in pieces)
        else:
            assert float((torch.cat([piece[4] for piece in pieces], dim=2) - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


def test_partners_swap_one_prediction_a_step_and_the_ring_carries_one_branch(ranks):
    """Per step each rank receives its partner's prediction of its branch rows (4 channels × 32 rows × 64
    columns, fp32; plus a share of the one-off fetch of the partner's strip at the stage start) and, in each
    attention, the K/V of the one other rank of its branch for one branch."""
    prediction = 4 * 32 * 64 * 4
    for rank in ranks:
        assert rank["step_bytes"]["guidance"] >= prediction
        assert rank["step_bytes"]["guidance"] <= prediction + 4 * 16 * 64 * 4  # + the partner's reference strip, once
        assert rank["step_bytes"]["ring"] > 0
