"""Faithfulness benchmark of `--image`: how much of the user's picture survives the upscale, and how much detail
is added (issue 34).

    python bench/upscale.py --scales 4 --steps 10 --out-dir bench/results/upscale --sheet docs/upscale_sheet.png
    python bench/upscale.py --model sdxl-random --device cuda --size 1024 --scales 4 --square-only --methods ours --strengths 0.1

Pictures the toy model did not make: procedural scenes of `renderer.toy.scenes` drawn at 512² and at 512×384 (a
512² scene's middle 384 rows, the creature inside). For each and each scale, every method's output is measured:

- faithfulness: PSNR and SSIM of the output brought back to the picture's size (box filter) against the picture;
- detail: the output's high-frequency energy (what a Gaussian of 2 px removes) over a bicubic upscale's;
- one subject: `renderer.toy.metrics.count_subjects` finds one subject in the output where the picture has one.

Methods: bicubic; direct img2img at the target size (diffusers' StableDiffusionXLImg2ImgPipeline built from the
same components, its default strength 0.3, as a user would try first); the official-style hack (the picture
shrunk to the base a generated cascade would have, then that cascade with its default restart); ours (the
picture's own size as the first stage) at each --strengths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import labelled_row  # noqa: E402
from renderer import RenderRequest, render  # noqa: E402
from renderer.models import load_pipeline, model_geometry, recommended_restart_fraction  # noqa: E402
from renderer.plan.geometry import plan_stages  # noqa: E402
from renderer.toy.metrics import count_subjects  # noqa: E402
from renderer.toy.scenes import draw_scenes  # noqa: E402


def pictures(size: int, seed: int) -> dict[str, tuple[np.ndarray, str]]:
    """A square scene and a 4:3 one (a scene's middle rows), with their captions."""
    square, other = draw_scenes(seed, 2, size)
    rows = size * 3 // 4
    top = (size - rows) // 2
    return {f"{size}x{size}": (square.image, square.caption), f"{size}x{rows}": (other.image[top : top + rows], other.caption)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM on luma (Gaussian window, sigma 1.5), averaged over the picture."""
    def luma(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    x, y = luma(a), luma(b)
    blur = lambda image: ndimage.gaussian_filter(image, 1.5, truncate=3.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def high_frequency(image: np.ndarray) -> float:
    gray = image.astype(np.float64).mean(-1)
    return float(np.mean((gray - ndimage.gaussian_filter(gray, 2.0)) ** 2))


def bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def direct_img2img(pipeline, image: np.ndarray, size: tuple[int, int], prompt: str, steps: int, seed: int) -> np.ndarray:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline(**{name: getattr(pipeline, name) for name in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")})
    img2img.set_progress_bar_config(disable=True)
    generator = torch.Generator(pipeline.unet.device).manual_seed(seed)
    out = img2img(prompt, image=Image.fromarray(bicubic(image, size)), num_inference_steps=steps, generator=generator,
                  output_type="np").images[0]
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def ours(pipeline, path: Path, size: tuple[int, int], prompt: str, steps: int, seed: int, strength: float,
         stages=None, model: str = "toy", device: str = "cpu") -> np.ndarray:
    request = RenderRequest(prompt=prompt, image=path, size=None if stages else size, stages=stages, steps=steps, seed=seed,
                            strength=strength, model=model, device=device, out=path.with_name("unused.png"),
                            freescale=render_config(model, seed))
    return render(request, pipeline=pipeline, progress=False, write=False).image


def render_config(model: str, seed: int):
    from freescale_core import FreeScaleConfig

    return FreeScaleConfig(restart_fraction=recommended_restart_fraction(model), seed=seed)


def measure(name: str, picture: np.ndarray, output: np.ndarray, reference_hf: float, seconds: float) -> dict:
    back = np.asarray(Image.fromarray(output).resize(picture.shape[1::-1], Image.Resampling.BOX))
    count = count_subjects(output, output.shape[1])
    return {"method": name, "psnr": psnr(back, picture), "ssim": ssim(back, picture), "hf": high_frequency(output) / reference_hf,
            "subjects": count.subjects, "eyes": list(count.eyes), "seconds": seconds}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model, device=args.device, dtype=torch.float16 if args.device.startswith("cuda") else torch.float32)
    geometry = model_geometry(pipeline)
    cascade_strength = 1 - recommended_restart_fraction(args.model)
    folder = Path(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (picture, caption) in list(pictures(args.size, args.seed).items())[: 1 if args.square_only else 2]:
        path = folder / f"in-{label}.png"
        Image.fromarray(picture).save(path)
        for scale in args.scales:
            size = (picture.shape[1] * scale, picture.shape[0] * scale)
            methods = {
                "bicubic": lambda: bicubic(picture, size),
                "direct img2img": lambda: direct_img2img(pipeline, picture, size, caption, args.steps, args.seed),
                "official-style hack": lambda: ours(pipeline, path, size, caption, args.steps, args.seed, cascade_strength,
                                                    stages=tuple(plan_stages(size, geometry)), model=args.model, device=args.device),
                **{f"ours, strength {s:g}": (lambda s=s: ours(pipeline, path, size, caption, args.steps, args.seed, s,
                                                               model=args.model, device=args.device)) for s in args.strengths},
            }
            reference_hf = high_frequency(bicubic(picture, size))
            for name, method in methods.items():
                if args.methods and not any(name.startswith(wanted) for wanted in args.methods):
                    continue
                started = time.perf_counter()
                output = method()
                row = {"picture": label, "scale": scale, **measure(name, picture, output, reference_hf, time.perf_counter() - started)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                Image.fromarray(output).save(folder / f"{label}-{scale}x-{name.replace(' ', '_').replace(',', '')}.png")
    (folder / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| picture | scale | method | PSNR (dB) | SSIM | HF / bicubic | subjects (eyes) | seconds |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['picture']} | {row['scale']}x | {row['method']} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                     f"{row['hf']:.2f} | {row['subjects']} ({', '.join(map(str, row['eyes'])) or '-'}) | {row['seconds']:.0f} |")
    return "\n".join(lines)


def sheet(rows: list[dict], folder: Path, path: Path, thumb: int = 320, crop: int = 160) -> None:
    """Per picture and scale: the picture and every method's output (whole, `thumb` wide), then the same
    `crop`-pixel square at the subject's centre at full output resolution (the picture's: nearest)."""
    picked = sorted({(row["picture"], row["scale"]) for row in rows})
    strips = []
    for label, scale in picked:
        picture = np.asarray(Image.open(folder / f"in-{label}.png"))
        outputs = [(row["method"], np.asarray(Image.open(folder / f"{label}-{scale}x-{row['method'].replace(' ', '_').replace(',', '')}.png")))
                   for row in rows if (row["picture"], row["scale"]) == (label, scale)]
        centre = count_subjects(picture, picture.shape[1]).centre or (0.5, 0.5)
        wholes, crops = [], []
        for image in [bicubic(picture, (picture.shape[1] * scale, picture.shape[0] * scale))] + [image for _, image in outputs]:
            height = thumb * image.shape[0] // image.shape[1]
            wholes.append(np.asarray(Image.fromarray(image).resize((thumb, height), Image.Resampling.BOX)))
            y, x = int(centre[0] * image.shape[0]) - crop // 2, int(centre[1] * image.shape[1]) - crop // 2
            tile = image[max(0, y) : max(0, y) + crop, max(0, x) : max(0, x) + crop]
            crops.append(np.asarray(Image.fromarray(tile).resize((thumb, thumb), Image.Resampling.NEAREST)))
        names = "input (bicubic) | " + " | ".join(name for name, _ in outputs)
        strips.append(labelled_row(f"{label} {scale}x", np.concatenate(wholes, axis=1)))
        strips.append(labelled_row(f"{crop}px at the centre", np.concatenate(crops, axis=1)))
        print(f"sheet row {label} {scale}x: {names}")
    Image.fromarray(np.concatenate(strips, axis=0)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512, help="the pictures' width")
    parser.add_argument("--scales", type=lambda text: [int(s) for s in text.split(",")], default=[4])
    parser.add_argument("--strengths", type=lambda text: [float(s) for s in text.split(",")],
                        default=[0.1, 0.2, 0.4], help="ours at each (default: the CLI's 0.1 and two that redraw more)")
    parser.add_argument("--methods", type=lambda text: text.split(","), help="only the methods whose names start so")
    parser.add_argument("--square-only", action="store_true", help="only the square picture")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=34)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="bench/results/upscale")
    parser.add_argument("--sheet", help="write the contact sheet here")
    parser.add_argument("--table", action="store_true", help="only print the table (and sheet) of --out-dir's results")
    args = parser.parse_args()
    rows = json.loads((Path(args.out_dir) / "results.json").read_text()) if args.table else run(args)
    print(table(rows))
    if args.sheet:
        sheet(rows, Path(args.out_dir), Path(args.sheet))


if __name__ == "__main__":
    main()
