"""Train the `toy` model from scratch on procedural scenes, on CPU, reproducibly.

    python -m renderer.toy.train --out renderer/models/toy_weights [--device cuda]

A fixed set of seeded scenes is drawn first (in parallel processes). Then three phases, all seeded:
(1) the VAE on whole scenes, (2) one pass that encodes every scene into its latent posterior and sets the
latent scaling factor to unit variance, (3) the UNet and both text encoders together on those latents,
with caption dropout so that classifier-free guidance works; an exponential moving average of the weights
is what gets shipped. `--init DIR` continues from a trained pipeline instead of random weights.

Why the VAE is trained as it is (measured; docs/benchmarks.md, issue 13):
- Whole scenes, not crops. Its GroupNorms have 1–4 channels a group, so the colour it decodes depends on
  the statistics of the whole input: trained on crops, it turned red creatures orange or yellow and every
  background grey when decoding whole images.
- A narrow posterior (`--posterior-shift`: added to the log-variance, −7 from random weights). A wide one
  makes the decoder ignore what the noise hides, and every round trip (FreeScale re-encodes at each
  stage) loses colours and eyes.
- The loss adds the image gradients' L1, so that small sharp parts (eyes) count beside the large smooth ones.
- The subject with its eyes weighs `SUBJECT_WEIGHT`× more, and the colours of 8×8 blocks have their own
  term. Without them the VAE learns the background first and, for hundreds of steps, decodes every warm
  creature the same orange (the mean of red, orange and yellow).
- `--vae-warmup-steps` first train on whole scenes drawn at half the size: 4× cheaper a step, and the
  GroupNorms see the same statistics of a whole scene.
The UNet's loss is weighted by min-SNR-γ (Hang et al. 2023), which spends a short run on the noisy steps
that decide layout and colour rather than on the nearly clean ones.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import StableDiffusionXLPipeline

from renderer.models.builtin import TOY, build_random_pipeline, build_vae
from renderer.toy.scenes import SCENE_SIZE, draw_scenes

CAPTION_DROPOUT = 0.1
SUBJECT_WEIGHT = 6.0  # extra weight of the subject's pixels in the VAE's loss
SUBJECT_SATURATION = 0.5  # subjects are drawn at saturation 0.85, backgrounds at ≤ 0.22
SUBJECT_MARGIN = 0.05  # of the width: more than an eye's radius (at most 0.22 · 0.2 of the width)
BLOCK_COLOUR_WEIGHT = 4.0  # weight of the 8×8 block colours' L1 in the VAE's loss
HELD_OUT_SEED = 999  # scenes never trained on, for the VAE's round-trip error
MIN_SNR_GAMMA = 5.0


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


CHUNK = 64


def _draw_chunk(seed_and_size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    seed, size = seed_and_size
    scenes = draw_scenes(seed, CHUNK, size)
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def map_chunks(draw, arguments: list, processes: int) -> list:
    """`draw` of each argument, in this process or in a spawned pool: the same results either way."""
    if processes == 1 or len(arguments) == 1:  # a spawned pool would only add its start-up (seconds)
        return [draw(argument) for argument in arguments]
    with multiprocessing.get_context("spawn").Pool(min(processes, len(arguments))) as pool:
        return pool.map(draw, arguments)


def draw_dataset(count: int, seed: int, processes: int, size: int = SCENE_SIZE) -> tuple[np.ndarray, list[str]]:
    """`count` scenes (rounded up to chunks of 64), each chunk from its own seed: the same for any process count."""
    chunks = map_chunks(_draw_chunk, [(seed * 1_000_003 + chunk, size) for chunk in range(-(-count // CHUNK))], processes)
    return np.concatenate([images for images, _ in chunks]), [c for _, captions in chunks for c in captions]


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the vertical and horizontal pixel differences of two images: weight on edges."""
    return F.l1_loss(a.diff(dim=-2), b.diff(dim=-2)) + F.l1_loss(a.diff(dim=-1), b.diff(dim=-1))


def subject_weights(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight, (B, 1, H, W): 1 + SUBJECT_WEIGHT on the subject and its eyes.

    The subject is where the HSV saturation is high; its eyes (white and black) are not saturated, so the
    mask is widened by `SUBJECT_MARGIN` of the image: weighting the body alone taught the VAE to paint the
    eyes over in the body's colour.
    """
    high, low = images.amax(1, keepdim=True), images.amin(1, keepdim=True)
    saturation = (high - low) / (high + 1).clamp(min=1e-3)  # on [−1, 1] the 2s cancel
    subject = (saturation > SUBJECT_SATURATION).to(images.dtype)
    margin = max(1, round(SUBJECT_MARGIN * images.shape[-1]))
    return 1 + SUBJECT_WEIGHT * F.max_pool2d(subject, 2 * margin + 1, stride=1, padding=margin)


def vae_loss(reconstruction: torch.Tensor, images: torch.Tensor, posterior) -> torch.Tensor:
    error = reconstruction - images
    return ((subject_weights(images) * (error.abs() + error.square())).mean()
            + image_gradient_l1(reconstruction, images)
            + BLOCK_COLOUR_WEIGHT * F.l1_loss(F.avg_pool2d(reconstruction, 8), F.avg_pool2d(images, 8))
            + 1e-6 * posterior.kl().mean())


def train_vae(vae, images: np.ndarray, rates: list[float], batch: int, seed: int, log_every: int) -> None:
    """One AdamW step per learning rate in `rates`, on random batches of `images`."""
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=rates[0], weight_decay=0.0)
    start, steps = time.time(), len(rates)
    for step, rate in enumerate(rates):
        for group in optimizer.param_groups:
            group["lr"] = rate
        index = torch.randint(0, len(images), (batch,), generator=generator).numpy()
        images_ = to_tensor(images[index]).to(device)
        posterior = vae.encode(images_).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = vae_loss(reconstruction, images_, posterior)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step:5d} ({images.shape[1]}²)  loss {loss.item():.4f}  {time.time() - start:7.1f}s", flush=True)


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    """decode(posterior mean) of each scene, clamped to [−1, 1]: what a stage transition does to an image."""
    x = to_tensor(images).to(next(vae.parameters()).device)
    return torch.cat([vae.decode(vae.encode(part).latent_dist.mean).sample.clamp(-1, 1) for part in x.split(batch)])


def round_trip_error(vae, images: np.ndarray) -> float:
    """Mean absolute error of the round trip on [−1, 1]."""
    decoded = round_trip(vae, images)
    return float((decoded - to_tensor(images).to(decoded.device)).abs().mean())


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent posterior mean and std of every scene."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in range(0, len(images), 32):
        posterior = vae.encode(to_tensor(images[start : start + 32]).to(device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def learning_rate(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the peak by the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_average(averaged, current, step: int, ceiling: float) -> None:
    """One step of an exponential moving average whose decay warms up to `ceiling`, so early weights fade fast."""
    decay = min(ceiling, (1 + step) / (10 + step))
    for mean, value in zip(averaged, current):
        mean.lerp_(value, 1 - decay)


def train_unet(pipeline, means, stds, captions, steps: int, batch: int, seed: int, log_every: int, lr: float) -> dict:
    generator = torch.Generator().manual_seed(seed)
    device = means.device
    unet, encoders = pipeline.unet, (pipeline.text_encoder, pipeline.text_encoder_2)
    modules = torch.nn.ModuleList([unet, *encoders])
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=1e-2)
    scheduler = pipeline.scheduler
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scale = pipeline.vae.config.scaling_factor
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device).repeat(batch, 1)
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, len(captions), (batch,), generator=generator)
        sample = torch.randn(means[index].shape, generator=generator).to(device)
        latents = (means[index.to(device)] + stds[index.to(device)] * sample) * scale
        flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
        latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        prompts = ["" if drop else captions[i] for drop, i in zip(dropped.tolist(), index.tolist())]
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
        alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        prediction = unet(
            noisy, timesteps, encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        snr = alpha / (1 - alpha)
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        loss = (weight * (prediction - noise).square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        optimizer.step()
        update_average(ema.parameters(), modules.parameters(), step, 0.999)
        if step % log_every == 0 or step == steps - 1:
            print(f"unet step {step:5d}  loss {loss.item():.4f}  {time.time() - start:7.1f}s", flush=True)
    return ema.state_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained diffusers pipeline")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=2200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dataset", type=int, default=4096, help="scenes encoded for UNet training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this trained pipeline folder instead of random weights")
    parser.add_argument("--vae-lr", type=float, default=1e-3, help="peak learning rate of the VAE (cosine decay over all its steps)")
    parser.add_argument("--unet-lr", type=float, default=3e-4, help="peak learning rate of the UNet and text encoders")
    parser.add_argument("--posterior-shift", type=float,
                        help="added to the VAE's posterior log-variance before its training (default: -7 for a fresh VAE, else 0)")
    parser.add_argument("--vae-groups", type=int,
                        help="GroupNorm groups of the VAE (default: TOY's, or the --init pipeline's; weights carry over)")
    parser.add_argument("--vae-channels", type=lambda text: tuple(int(c) for c in text.split(",")),
                        help="widths of the VAE's four levels, e.g. 32,64,128,112 (default: TOY's); needs a fresh VAE")
    parser.add_argument("--fresh-vae", action="store_true",
                        help="with --init: train a VAE from random weights (the UNet and text encoders still continue)")
    parser.add_argument("--vae-warmup-steps", type=int, default=0,
                        help="VAE steps on whole scenes drawn at half size (4x cheaper) before --vae-steps at full size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the same script, faster on a GPU")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    spec = replace(TOY, vae_groups=args.vae_groups or TOY.vae_groups, vae_channels=args.vae_channels or TOY.vae_channels)
    fresh_vae = args.fresh_vae or not args.init
    if args.vae_channels and not fresh_vae:
        parser.error("--vae-channels changes the VAE's weights: it needs --fresh-vae (or no --init)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    images, captions = draw_dataset(args.dataset, args.seed, processes=max(1, args.threads))
    print(f"drew {len(images)} scenes in {time.time() - started:.1f}s", flush=True)
    if args.init:
        pipeline = StableDiffusionXLPipeline.from_pretrained(args.init, dtype=torch.float32)
        if fresh_vae:
            torch.manual_seed(args.seed)
            pipeline.register_modules(vae=build_vae(spec))
        elif args.vae_groups:  # regroup the trained VAE: the group count changes no parameter
            vae = build_vae(spec)
            vae.load_state_dict(pipeline.vae.state_dict())
            pipeline.register_modules(vae=vae)
    else:
        pipeline = build_random_pipeline(spec, seed=args.seed)
    pipeline.to(args.device)
    vae = pipeline.vae
    held_out = np.stack([scene.image for scene in draw_scenes(HELD_OUT_SEED, 8)])
    shift = args.posterior_shift if args.posterior_shift is not None else (-7.0 if fresh_vae else 0.0)
    with torch.no_grad():  # quant_conv's second half of channels is the posterior's log-variance
        vae.quant_conv.bias[vae.config.latent_channels :] += shift
    vae_batch = max(4, args.batch // 4)
    if args.vae_steps or args.vae_warmup_steps:
        print(f"vae round trip before: {round_trip_error(vae, held_out):.4f}", flush=True)
        vae.train().requires_grad_(True)
    # one schedule over both phases, so the full-size steps refine at the low end of it instead of restarting
    vae_steps = args.vae_warmup_steps + args.vae_steps
    rates = [learning_rate(step, vae_steps, args.vae_lr, warmup=min(50, vae_steps // 4)) for step in range(vae_steps)]
    if args.vae_warmup_steps:
        small, _ = draw_dataset(args.dataset, args.seed, max(1, args.threads), size=SCENE_SIZE // 2)
        train_vae(vae, small, rates[: args.vae_warmup_steps], 2 * vae_batch, args.seed, args.log_every)
    if args.vae_steps:
        train_vae(vae, images, rates[args.vae_warmup_steps :], vae_batch, args.seed + 1, args.log_every)
    vae.eval().requires_grad_(False)
    print(f"vae round trip on held-out scenes: {round_trip_error(vae, held_out):.4f}", flush=True)

    means, stds = encode_dataset(vae, images)
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    print(f"latent scaling factor {scaling_factor:.5f}", flush=True)

    for module in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        module.train().requires_grad_(True)
    averaged = train_unet(pipeline, means, stds, captions, args.unet_steps, args.batch, args.seed, args.log_every, args.unet_lr)
    modules = torch.nn.ModuleList([pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2])
    modules.load_state_dict(averaged)
    pipeline.to("cpu", torch.float16)
    pipeline.save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out} after {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
