"""`--lora PATH[:SCALE]` (`renderer.models.lora`): LoRAs made here with PEFT on the tiny model (its attention
projections, random nonzero B), saved with diffusers' `save_lora_weights`, fused at load.

References: the same model with the LoRA merged by hand (W += scale · B · A, alpha = rank), saved with
`save_pretrained` and rendered as `--model FOLDER`; the model without LoRA for scale 0; the diffusers-layout file
for its kohya-layout twin (keys renamed); one process for a 2-rank gang."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import tifffile
from PIL import Image
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cluster.spawn import run_ranks
from renderer import RenderRequest, render
from renderer.cli import main
from renderer.executor.spec import ExecutorSpec
from renderer.models import load_pipeline
from renderer.models.lora import lora_digest
from renderer.output.tiff import XMP_TAG
from renderer.plan.identity import render_id

STAGES = ((256, 256), (512, 512))


def make_lora(folder, name: str, targets: list[str], rank: int, seed: int) -> str:
    """A PEFT LoRA on the tiny UNet's attention projections with random B (A is PEFT's own random init)."""
    pipeline = load_pipeline("tiny")
    torch.manual_seed(seed)
    pipeline.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    for key, parameter in pipeline.unet.named_parameters():
        if "lora_B" in key:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
                                                weight_name=f"{name}.safetensors")
    return str(folder / f"{name}.safetensors")


def kohya_twin(path: str, out: str) -> str:
    """The same LoRA in kohya's layout: lora_unet_<module with underscores>.lora_down/lora_up/alpha."""
    renamed = {}
    for key, value in load_file(path).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        if kind.startswith("A"):
            renamed[f"{stem}.lora_down.weight"] = value
            renamed[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))
        else:
            renamed[f"{stem}.lora_up.weight"] = value
    save_file(renamed, out)
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("loras")
    style = make_lora(folder, "style", ["to_q", "to_k", "to_v", "to_out.0"], rank=4, seed=1)
    detail = make_lora(folder, "detail", ["to_k", "to_v"], rank=2, seed=2)
    bad = str(folder / "other_model.safetensors")
    save_file({key.replace("attn1", "attn9"): value for key, value in load_file(style).items()}, bad)
    return {"style": style, "detail": detail, "kohya": kohya_twin(style, str(folder / "kohya.safetensors")), "bad": bad}


@pytest.fixture(scope="module")
def merged_folder(loras, tmp_path_factory):
    """tiny with style at 0.8 and detail at 1 merged by hand into its UNet weights, saved as a diffusers folder."""
    pipeline = load_pipeline("tiny")
    weights = dict(pipeline.unet.named_parameters())
    with torch.no_grad():
        for path, scale in ((loras["style"], 0.8), (loras["detail"], 1.0)):
            tensors = load_file(path)
            for key, down in tensors.items():
                if ".lora_A." in key:
                    up = tensors[key.replace(".lora_A.", ".lora_B.")]
                    weights[key.removeprefix("unet.").split(".lora_A.")[0] + ".weight"] += scale * (up @ down)
    folder = tmp_path_factory.mktemp("merged") / "tiny-merged"
    pipeline.save_pretrained(folder)
    return str(folder)


def pixels(**changes) -> np.ndarray:
    request = RenderRequest(prompt="a red kite", stages=STAGES, steps=3, seed=2, out="unused.png").with_(**changes)
    return render(request, progress=False, write=False).image


def test_a_lora_render_equals_the_model_with_the_lora_merged_by_hand(loras, merged_folder):
    fused = pixels(loras=((loras["style"], 0.8), (loras["detail"], 1.0)))
    by_hand = pixels(model=merged_folder)
    plain = pixels()
    assert int(np.abs(fused.astype(int) - by_hand.astype(int)).max()) <= 1
    assert int(np.abs(fused.astype(int) - plain.astype(int)).max()) > 8  # the LoRAs change the picture


def test_scale_zero_is_no_lora_byte_for_byte(loras):
    assert np.array_equal(pixels(loras=((loras["style"], 0.0),)), pixels())


def test_a_kohya_layout_file_fuses_to_the_same_weights(loras):
    ours = load_pipeline("tiny", loras=((loras["kohya"], 0.8),)).unet.state_dict()
    diffusers_layout = load_pipeline("tiny", loras=((loras["style"], 0.8),)).unet.state_dict()
    assert ours.keys() == diffusers_layout.keys() and all(torch.equal(ours[key], diffusers_layout[key]) for key in ours)
    assert not any("lora" in key for key in ours)  # fused, the LoRA layers gone: nothing more per step


def rank_lora_render(rank: int, world: int, loras: tuple) -> np.ndarray:
    from renderer.messages import Prompt, StageJob
    from renderer.cascade.worker import Worker
    from freescale_core import FreeScaleConfig

    worker = Worker("tiny", loras=loras)
    worker.run(StageJob(cond=None, prompt=Prompt("a red kite", "", 7.5), latents=torch.empty(0), stages=list(STAGES), first=0,
                        last=2, steps=3, config=FreeScaleConfig(seed=2), transition_modes=["exact"], final_mode="exact",
                        first_sharded=1, cfg_split=True))
    return np.concatenate(list(worker.final_rows()))


def test_every_rank_of_a_gang_fuses_the_loras(loras):
    chosen = ((loras["style"], 0.8), (loras["detail"], 1.0))
    gathered = np.concatenate(run_ranks(2, partial(rank_lora_render, loras=chosen), timeout_s=600))
    single = pixels(loras=chosen)
    assert int(np.abs(gathered.astype(int) - single.astype(int)).max()) <= 1


def test_the_render_id_sidecar_and_xmp_name_each_lora_and_its_scale(loras, tmp_path):
    request = RenderRequest(prompt="a red kite", stages=((256, 256),), steps=2, out=tmp_path / "a.tif",
                            loras=((loras["style"], 0.5), (loras["detail"], 1.0)))
    render(request, progress=False)
    digests = [lora_digest(loras["style"]), lora_digest(loras["detail"])]
    sidecar = json.loads((tmp_path / "a.tif.json").read_text())
    assert [(entry["sha256"], entry["scale"]) for entry in sidecar["loras"]] == list(zip(digests, (0.5, 1.0)))
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        xmp = tif.pages[0].tags[XMP_TAG].value.decode("utf-8")
    assert f"style.safetensors sha256:{digests[0]} scale:0.5" in xmp and f"detail.safetensors sha256:{digests[1]} scale:1" in xmp
    ids = {render_id(request.with_(loras=changed), list(request.stages), "float32", "cpu")
           for changed in ((), ((loras["style"], 0.5),), ((loras["style"], 0.6),), ((loras["kohya"], 0.5),))}
    assert len(ids) == 4


def test_the_pool_shares_a_gang_only_for_the_same_model_and_loras(loras):
    base = RenderRequest(prompt="a", size=(256, 256), workers=2, loras=((loras["style"], 0.8),))
    assert ExecutorSpec.of(base) == ExecutorSpec.of(base.with_(prompt="b", scheduler="DDIMScheduler"))
    for other in (base.with_(loras=()), base.with_(loras=((loras["style"], 0.7),)), base.with_(loras=((loras["detail"], 0.8),))):
        assert ExecutorSpec.of(other) != ExecutorSpec.of(base)


def test_a_batch_line_takes_a_list_of_loras(loras, tmp_path):
    from renderer.cli.batch import read_batch

    line = {"prompt": "a", "size": "256x256", "out": str(tmp_path / "a.tif"), "lora": [f"{loras['style']}:0.8", loras["detail"]],
            "scheduler": "DPMSolverMultistepScheduler", "scheduler-option": ["use_karras_sigmas=true", "solver_order=2"]}
    (tmp_path / "batch.jsonl").write_text(json.dumps(line) + "\n")
    request = read_batch(tmp_path / "batch.jsonl", [])[0].request
    assert request.loras == ((loras["style"], 0.8), (loras["detail"], 1.0))
    assert request.scheduler_options == {"use_karras_sigmas": True, "solver_order": 2}


@pytest.mark.parametrize("word, message", [
    ("{bad}", "--lora {bad}: 44 of its 88 LoRA layers match no layer of --model tiny"),
    ("{style}:strong", "--lora {style}:strong: the scale 'strong' after {style} is not a number"),
    ("{style}.bin", "--lora {style}.bin: only .safetensors LoRA files are read"),
    ("missing.safetensors", "--lora missing.safetensors does not exist"),
])
def test_a_bad_lora_is_one_line_naming_the_file(loras, capsys, tmp_path, word, message):
    word, message = word.format(**loras), message.format(**loras)
    assert main(["--prompt", "a", "--stages", "256x256", "--steps", "1", "--out", str(tmp_path / "a.tif"), "--lora", word]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "a.tif").exists()


def test_the_issues_command_renders_in_one_process_and_on_a_gang(ray_session, loras, merged_folder, tmp_path):
    """`--model FOLDER --lora style:0.8 --lora detail --scheduler DPMSolverMultistepScheduler
    --scheduler-option use_karras_sigmas=true`, through the CLI, alone and with `--workers 2` on a real local Ray."""
    command = ["--model", merged_folder, "--lora", f"{loras['style']}:0.8", "--lora", loras["detail"],
               "--scheduler", "DPMSolverMultistepScheduler", "--scheduler-option", "use_karras_sigmas=true",
               "--prompt", "a lighthouse at dusk", "--stages", "256x256,512x512", "--steps", "4", "--vae-mode", "exact"]
    assert main([*command, "--out", str(tmp_path / "one.png")]) == 0
    assert main([*command, "--workers", "2", "--out", str(tmp_path / "gang.png")]) == 0
    one, gang = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("one.png", "gang.png"))
    assert one.shape == (512, 512, 3) and int(np.abs(one - gang).max()) <= 1
    assert json.loads((tmp_path / "gang.png.json").read_text())["workers"]["stage_ranks"][-1] == [0, 1]  # both ranks ran it
