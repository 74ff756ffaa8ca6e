"""A render's identity: one id from everything that affects its pixels, so that a checkpoint is only ever
resumed by the same request on the same code; and the record of the input picture (its digest) in the sidecar."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import freescale_core
from renderer.models.lora import lora_identity
from renderer.plan.geometry import Size, format_size
from renderer.plan.input_image import effective_strength, shown_size, strength_restart
from renderer.plan.request import RenderRequest

# Options that change where or how things run, or what is written beside the pixels, but not the pixels.
NOT_PIXELS = {
    "out", "save_stages", "preview", "compression", "dpi", "tile_size", "workers", "address", "gpus_per_worker",
    "shard_from", "cfg_split", "checkpoint_dir", "resume", "keep_checkpoints", "checkpoint_every_steps", "checkpoint_every_minutes",
    "max_restarts", "collective_timeout_s", "queue_timeout_s", "metrics_port", "metrics_addr", "metrics_linger_s",
}
# Options that change the pixels through what they name, so the id holds that instead of the name: the model's
# files, the pictures' digests, the LoRAs' digests, and the device type and dtype the ranks resolved them to.
BY_WHAT_THEY_NAME = {"model", "image", "mask", "device", "dtype", "loras"}
# The code whose edits can change a render's pixels or its checkpoints' meaning (paths under the repository's
# root). The CLI's help, the console, metrics, file writing, the executors' transport and the toy's training are
# not in it, so editing those keeps every checkpoint of a farm valid.
PIXEL_CODE = (
    "freescale_core", "renderer/cascade", "renderer/parallel", "renderer/vae", "renderer/models", "renderer/engine.py",
    "renderer/messages.py",
    "renderer/plan/geometry.py", "renderer/plan/identity.py", "renderer/plan/input_image.py", "renderer/plan/input_mask.py",
    "renderer/plan/render_plan.py", "renderer/plan/request.py", "renderer/resume/checkpoints.py",
)
ROOT = Path(freescale_core.__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def code_version() -> str:
    return code_digest(ROOT)


def code_digest(root: Path) -> str:
    """A digest of the Python sources of `PIXEL_CODE` under `root` (any edit there is a new version)."""
    digest = hashlib.sha256()
    for part in PIXEL_CODE:
        path = root / part
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(root)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_identity(model: str) -> dict:
    """A built-in name or hub id as it is; a folder or file by its resolved path and its files' sizes and
    modification times (hashing gigabytes of weights would cost more than it saves)."""
    path = Path(model)
    if not path.exists():
        return {"name": model}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path.resolve()), "files": [[str(f.relative_to(path) if f != path else f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def render_id(request: RenderRequest, stages: list[Size], dtype: str, device_type: str) -> str:
    """24 hex digits from the prompt, seed, model, its LoRAs (digest and scale), the scheduler, plan, every method
    option, inputs, precision and code."""
    fields = {key: value for key, value in asdict(request).items() if key not in NOT_PIXELS | BY_WHAT_THEY_NAME}
    identity = {
        "request": fields, "stages": [list(size) for size in stages], "model": model_identity(request.model),
        "image": file_digest(request.image), "mask": file_digest(request.mask), "dtype": dtype,
        "loras": [[entry["sha256"], entry["scale"]] for entry in lora_identity(request.loras)],
        "device": device_type, "code": code_version(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def input_record(request: RenderRequest, notes: list[str]) -> dict:
    """What the sidecar (and the TIFF's XMP) say of the picture: its digest, the setting and what was done to it."""
    strength = effective_strength(request)
    return {"image": str(request.image), "sha256": file_digest(request.image), "size": format_size(shown_size(Path(request.image))),
            "strength": strength, "first_restart_step": strength_restart(request.steps, strength), "notes": notes}
