"""Train the `toy` model from scratch on procedural scenes, on CPU, reproducibly.

    python -m renderer.toy.train --out renderer/models/toy_weights [--device cuda]

A fixed set of seeded scenes is drawn first (in parallel processes). Then three phases, all seeded:
(1) the VAE on random 128 px crops of those scenes (it is fully convolutional, so crops teach it the
256 px scenes at a quarter of the cost), (2) one pass that encodes every scene into its latent posterior
and sets the latent scaling factor to unit variance, (3) the UNet and both text encoders together on
those latents, with caption dropout so that classifier-free guidance works; an exponential moving
average of the weights is what gets shipped.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from renderer.models.builtin import TOY, build_random_pipeline
from renderer.toy.scenes import SCENE_SIZE, draw_scenes

CAPTION_DROPOUT = 0.1


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


CHUNK = 64


def _draw_chunk(seed: int) -> tuple[np.ndarray, list[str]]:
    scenes = draw_scenes(seed, CHUNK)
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def draw_dataset(count: int, seed: int, processes: int) -> tuple[np.ndarray, list[str]]:
    """`count` scenes (rounded up to chunks of 64), each chunk from its own seed: the same for any process count."""
    seeds = [seed * 1_000_003 + chunk for chunk in range(-(-count // CHUNK))]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        chunks = pool.map(_draw_chunk, seeds)
    return np.concatenate([images for images, _ in chunks]), [c for _, captions in chunks for c in captions]


def train_vae(vae, images: np.ndarray, steps: int, batch: int, seed: int, log_every: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    crop = SCENE_SIZE // 2
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator).numpy()
        y, x = torch.randint(0, SCENE_SIZE - crop + 1, (2,), generator=generator).tolist()
        images_ = to_tensor(images[index, y : y + crop, x : x + crop]).to(device)
        posterior = vae.encode(images_).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, images_) + F.mse_loss(reconstruction, images_) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step:5d}  loss {loss.item():.4f}  {time.time() - start:7.1f}s", flush=True)


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


def train_unet(pipeline, means, stds, captions, steps: int, batch: int, seed: int, log_every: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    device = means.device
    unet, encoders = pipeline.unet, (pipeline.text_encoder, pipeline.text_encoder_2)
    modules = torch.nn.ModuleList([unet, *encoders])
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=3e-4, weight_decay=1e-2)
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
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 3e-4 * min(1.0, (step + 1) / 200)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), modules.parameters()):
                averaged.lerp_(current, 1 - decay)
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the same script, faster on a GPU")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    images, captions = draw_dataset(args.dataset, args.seed, processes=max(1, args.threads))
    print(f"drew {len(images)} scenes in {time.time() - started:.1f}s", flush=True)
    pipeline = build_random_pipeline(TOY, seed=args.seed).to(args.device)
    pipeline.vae.train()
    train_vae(pipeline.vae, images, args.vae_steps, max(4, args.batch // 2), args.seed, args.log_every)
    pipeline.vae.eval().requires_grad_(False)

    means, stds = encode_dataset(pipeline.vae, images)
    scaling_factor = float(1.0 / means.std())
    pipeline.vae.register_to_config(scaling_factor=scaling_factor)
    print(f"latent scaling factor {scaling_factor:.5f}", flush=True)

    for module in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        module.train()
    averaged = train_unet(pipeline, means, stds, captions, args.unet_steps, args.batch, args.seed, args.log_every)
    modules = torch.nn.ModuleList([pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2])
    modules.load_state_dict(averaged)
    pipeline.to("cpu", torch.float16)
    pipeline.save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out} after {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
