"""Which files a render writes, and which two posters of a batch would overwrite each other's, found before
anything renders.

Every file a render writes is named after its output's full name (`renderer.output.files.beside`), so two different
outputs only collide when one output's name is another's file (`a.tif` and `a.tif.preview.png`), or when two
spellings name one file (`out/a.tif`, `./out/../out/a.tif`, a symlinked folder): paths are compared resolved.
Checkpoints under an explicit `--checkpoint-dir` are kept per render id (`DIR/RENDER_ID/`), an id of everything
that affects the pixels, so posters that share one folder there share only identical checkpoints: not a collision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from renderer.errors import RenderError
from renderer.output.clip_files import frames_path, preview_path as clip_preview_path
from renderer.output.files import beside, preview_path, sidecar_path


@dataclass(frozen=True)
class Claim:
    """A file a render writes (`family` False) or a family of them: every path that begins with `path`."""

    what: str
    path: str
    family: bool = False

    def shown(self) -> str:
        return self.path + ("*" if self.family and not self.path.endswith(os.sep) else "")

    def overlaps(self, other: "Claim") -> bool:
        if self.family and other.family:
            return self.path.startswith(other.path) or other.path.startswith(self.path)
        if self.family or other.family:
            prefix, path = (self.path, other.path) if self.family else (other.path, self.path)
            return path.startswith(prefix)
        return self.path == other.path


def resolved(path: Path) -> str:
    return str(Path(path).resolve())  # relative to the working directory, `..` and every symlink resolved


def claims(request) -> list[Claim]:
    """Every file `request`'s render writes (temporaries aside, whose names are unique), resolved."""
    out = Path(request.out)
    found = [Claim("out", resolved(out)), Claim("sidecar", resolved(sidecar_path(out)))]
    if request.frames > 1:
        found += [Claim("frames TIFF", resolved(frames_path(out))), Claim("preview", resolved(clip_preview_path(out)))]
    elif request.preview and out.suffix.lower() != ".png":
        found.append(Claim("preview", resolved(preview_path(out))))
    if request.save_stages:
        found.append(Claim("stage images", resolved(beside(out, ".stage")), family=True))
    if request.checkpoint_dir is None:
        found.append(Claim("checkpoints", resolved(request.checkpoint_folder()) + os.sep, family=True))
    return found


def check_collisions(posters: list, where: str) -> None:
    """Refuse, in one line naming both lines, two posters (each with `.line` and `.request`) whose files collide."""
    seen: list[tuple[int, Claim]] = []
    for poster in posters:
        mine = claims(poster.request)
        for line, theirs in seen:
            for claim in mine:
                if claim.overlaps(theirs):
                    raise RenderError(
                        f"{where} line {poster.line}: {claim.what} {claim.shown()} is also line {line}'s {theirs.what} "
                        f"{theirs.shown()}, so the two would overwrite each other's files; give every poster an output "
                        f"name of its own")
        seen += [(poster.line, claim) for claim in mine]
