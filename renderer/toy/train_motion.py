"""Train `toy-video`'s motion modules on procedural clips, AnimateDiff's way, on CPU, reproducibly.

    python -m renderer.toy.train_motion --out renderer/models/toy_motion_weights [--device cuda]

The recipe (AnimateDiff, Guo et al. 2023): the shipped `toy` image model is frozen; a new MotionAdapter
(its output projections zero, so it starts as the image model) is inserted between the UNet's layers and
only its temporal modules learn. Clips of `renderer.toy.clips` (a creature sliding, bobbing and blinking)
are drawn and encoded once by the toy VAE; each step noises one clip's frames independently at one
timestep per clip and trains on the noise prediction, weighted by min-SNR-γ as the image model was. The
prompt is dropped as often as in the image model's training, so classifier-free guidance still works.
An exponential moving average of the motion modules is what gets shipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from renderer.models.builtin import MOTION_SPECS, TOY, TOY_WEIGHTS, motion_adapter
from renderer.models.motion import motion_unet
from renderer.toy.clips import FRAMES, draw_clips
from renderer.toy.train import CAPTION_DROPOUT, MIN_SNR_GAMMA, encode_dataset, learning_rate, map_chunks, update_average

CLIPS_PER_CHUNK = 16
EMA_DECAY = 0.995


def _draw_chunk(seed: int) -> tuple[np.ndarray, list[str]]:
    clips = draw_clips(seed, CLIPS_PER_CHUNK)
    return np.stack([c.frames for c in clips]), [c.caption for c in clips]


def draw_clip_dataset(count: int, seed: int, processes: int) -> tuple[np.ndarray, list[str]]:
    """(N, F, H, W, 3) frames and N captions; each chunk of 16 clips from its own seed, so any process count agrees."""
    chunks = map_chunks(_draw_chunk, [seed * 1_000_003 + chunk for chunk in range(-(-count // CLIPS_PER_CHUNK))], processes)
    return np.concatenate([frames for frames, _ in chunks]), [c for _, captions in chunks for c in captions]


def motion_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The motion modules' parameters by name, the only ones left trainable."""
    unet.freeze_unet2d_params()
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


@torch.no_grad()
def prompt_states(pipeline, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each distinct caption's (states, pooled) and the empty prompt's, encoded once."""
    states = {}
    for caption in sorted(set(captions)) + [""]:
        embeds, _, pooled, _ = pipeline.encode_prompt([caption], do_classifier_free_guidance=False, device=pipeline.unet.device)
        states[caption] = (embeds, pooled)
    return states


def train(pipeline, unet, means, stds, captions, steps: int, seed: int, lr: float, log_every: int) -> dict:
    """AdamW on the motion modules, one clip a step; returns the averaged motion modules' state."""
    generator = torch.Generator().manual_seed(seed)
    device = means.device
    clips, frames = means.shape[:2]
    trained = motion_parameters(unet)
    parameters = list(trained.values())
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    alphas_cumprod = pipeline.scheduler.alphas_cumprod.to(device)
    scale = pipeline.vae.config.scaling_factor
    size = unet.config.sample_size * pipeline.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    states = prompt_states(pipeline, captions)
    start = time.time()
    for step in range(steps):
        index = int(torch.randint(0, clips, (1,), generator=generator))
        sample = torch.randn(means[index].shape, generator=generator).to(device)
        latents = (means[index] + stds[index] * sample) * scale  # (F, C, h, w)
        if torch.rand(1, generator=generator) < 0.5:
            latents = latents.flip(-1)
        caption = "" if torch.rand(1, generator=generator) < CAPTION_DROPOUT else captions[index]
        embeds, pooled = states[caption]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timestep = torch.randint(0, pipeline.scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
        alpha = alphas_cumprod[timestep]
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        prediction = unet(
            noisy.transpose(0, 1)[None], timestep, encoder_hidden_states=embeds.repeat_interleave(frames, dim=0),
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample[0].transpose(0, 1)
        snr = alpha / (1 - alpha)
        loss = (snr.clamp(max=MIN_SNR_GAMMA) / snr * (prediction - noise).square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=min(100, steps // 4))
        optimizer.step()
        update_average(ema, parameters, step, EMA_DECAY)
        if step % log_every == 0 or step == steps - 1:
            print(f"motion step {step:5d}  t {int(timestep):3d}  loss {loss.item():.4f}  {time.time() - start:7.1f}s", flush=True)
    return dict(zip(trained, ema))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained MotionAdapter")
    parser.add_argument("--image-model", type=Path, default=TOY_WEIGHTS, help="the frozen image model (default: the shipped toy)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--clips", type=int, default=128, help="clips drawn and encoded for training")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the same script, faster on a GPU")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.time()
    frames, captions = draw_clip_dataset(args.clips, args.seed, processes=max(1, args.threads))
    print(f"drew {len(frames)} clips of {FRAMES} frames in {time.time() - started:.1f}s", flush=True)
    pipeline = StableDiffusionXLPipeline.from_pretrained(args.image_model, dtype=torch.float32, use_safetensors=True).to(args.device)
    pipeline.vae.requires_grad_(False)
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        encoder.requires_grad_(False)
    means, stds = encode_dataset(pipeline.vae, frames.reshape(-1, *frames.shape[2:]))
    means, stds = means.unflatten(0, frames.shape[:2]), stds.unflatten(0, frames.shape[:2])
    print(f"encoded {frames.shape[0] * frames.shape[1]} frames after {time.time() - started:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    adapter = motion_adapter(TOY, MOTION_SPECS["toy"])
    unet = motion_unet(pipeline.unet, adapter, "toy").to(args.device).train()
    averaged = train(pipeline, unet, means, stds, captions, args.steps, args.seed, args.lr, args.log_every)
    adapter.load_state_dict(adapter.state_dict() | averaged)
    adapter.to("cpu", torch.float16).save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out} after {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
