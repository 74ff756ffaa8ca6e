"""A model of a FreeScale step's time on a gang of GPUs at 8192² and 16384², from measured single-GPU times.

Compute: a FreeScale CFG forward of SDXL is split into global self-attention (FLOPs ∝ tokens²) and
everything else (convs, linears, windows, blur, FreeU: ∝ tokens). Two measured forward times on one card
(2048² and 4096², `--measured`) fix the effective rate of each part; a gang of G GPUs divides both (every
rank holds 1/G of the rows, and the ring gives each rank all keys for its queries).

Communication: the bytes each rank receives per step, by the design's rules (distributed-design.md §B):
the K/V of every other rank of its group in each of SDXL's 70 self-attentions (10 at the ½ grid with
640 channels, 60 at the ¼ grid with 1280), fp16; conv and blur halos and the guidance swap are small
beside it and are added as the design's per-step figures scale. With the guidance split (S), two groups
of G/2 ranks run one branch each (batch 1); co-located (C), G ranks run batch 2. The ring sends the next
block while the current one is computed, so a step costs max(compute, communication) when the link keeps
up, not their sum.

    python bench/time_model.py                                  # H200 figures of docs/benchmarks.md
    python bench/time_model.py --measured 2048=0.40,4096=2.06 --gpus 8 --link nvlink=450,infiniband=50
"""

from __future__ import annotations

import argparse

# SDXL's self-attentions: (count, channels, grid downsampling from the latent).
SDXL_SELF_ATTENTION = ((10, 640, 2), (60, 1280, 4))
CONV_CHANNELS_HALO_BYTES_8K = 0.142e9  # design §B.1, layout S, a dilated step: conv halos per rank at 8192²
BLUR_BYTES_8K = 0.92e9  # design §B.1, layout S: 5 blur halo rows × 2 tensors × 70 blocks at 8192²
STEPS_AT_TARGET = 35  # 50 steps, restart at 15


def tokens(size: int, downsample: int) -> int:
    side = size // 8 // downsample
    return side * side


def attention_flops(size: int) -> float:
    """Global self-attention FLOPs of one CFG forward (batch 2): 4·N²·C per block and image."""
    return sum(count * 4 * tokens(size, down) ** 2 * channels * 2 for count, channels, down in SDXL_SELF_ATTENTION)


def fit_rates(measured: dict[int, float]) -> tuple[float, float]:
    """Seconds per attention FLOP, and seconds of the token-linear rest at 2048², from two forward times."""
    (small, t_small), (large, t_large) = sorted(measured.items())[:2]
    growth = (large / small) ** 2  # token ratio: the rest grows by this, attention by its square
    attention_small = (t_large - growth * t_small) / (growth**2 - growth)
    rest_small = t_small - attention_small
    if attention_small <= 0 or rest_small <= 0:
        raise SystemExit(f"the measured times {measured} do not fit attention ∝ N² plus a rest ∝ N")
    return attention_small / attention_flops(small), rest_small * (2048 / small) ** 2


def received_bytes(size: int, gpus: int, split: bool) -> dict[str, float]:
    """Bytes one interior rank receives per step (fp16)."""
    group, batch = (gpus // 2, 1) if split else (gpus, 2)
    kv = sum(count * (group - 1) / group * tokens(size, down) * 2 * channels * 2 * batch
             for count, channels, down in SDXL_SELF_ATTENTION)
    width_scale = size / 8192 * batch  # halos are rows × width × channels: they grow with the width
    return {
        "K/V ring": kv,
        "conv + blur halos": (CONV_CHANNELS_HALO_BYTES_8K + BLUR_BYTES_8K) * width_scale,
        "guidance swap": 4 * (size // 8) ** 2 / group * 2 if split else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", default="2048=0.40,4096=2.06",
                        help="SIZE=SECONDS of one FreeScale CFG forward on one card (default: the H200 figures)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--link", default="nvlink=450,infiniband=50", help="NAME=GB/s received per GPU")
    parser.add_argument("--sizes", default="8192,16384")
    options = parser.parse_args()
    measured = {int(k): float(v) for k, v in (item.split("=") for item in options.measured.split(","))}
    links = {k: float(v) * 1e9 for k, v in (item.split("=") for item in options.link.split(","))}
    per_flop, rest_2048 = fit_rates(measured)
    print(f"fit: global attention at {1 / per_flop / 1e12:.0f} TFLOP/s effective; the rest {rest_2048:.3f} s per "
          f"forward at 2048², growing with the pixels\n")
    print("| size | GPUs | layout | compute s/step | received GB/step | "
          + " | ".join(f"comm s/step on {name}" for name in links) + " | 35-step stage (min), "
          + ", ".join(links) + " |")
    print("|---|---|---|---|---|" + "---|" * len(links) + "---|")
    for size in (int(s) for s in options.sizes.split(",")):
        single = attention_flops(size) * per_flop + rest_2048 * (size / 2048) ** 2
        print(f"| {size}² | 1 | — | {single:.1f} | — |" + " — |" * len(links) + f" {single * STEPS_AT_TARGET / 60:.0f} |")
        for split in (True, False):
            compute = single / options.gpus
            received = received_bytes(size, options.gpus, split)
            total = sum(received.values())
            comm = {name: total / rate for name, rate in links.items()}
            stage = ", ".join(f"{max(compute, seconds) * STEPS_AT_TARGET / 60:.1f}" for seconds in comm.values())
            print(f"| {size}² | {options.gpus} | {'S (guidance split)' if split else 'C (batch 2 per rank)'} | {compute:.2f} | "
                  f"{total / 1e9:.1f} | " + " | ".join(f"{seconds:.2f}" for seconds in comm.values()) + f" | {stage} |")


if __name__ == "__main__":
    main()
