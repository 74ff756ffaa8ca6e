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
from renderer.output.clip_files import frames_path
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
        found += [Claim("frames TIFF", resolved(frames_path(out))), Claim("preview", resolved(preview_path(out, clip=True)))]
    elif request.preview and out.suffix.lower() != ".png":
        found.append(Claim("preview", resolved(preview_path(out))))
    if request.save_stages:
        found.append(Claim("stage images", resolved(beside(out, ".stage")), family=True))
    if request.checkpoint_dir is None:
        found.append(Claim("checkpoints", resolved(request.checkpoint_folder()) + os.sep, family=True))
    return found


def check_collisions(posters: list, where: str) -> None:
    """Refuse, in one line naming both lines, two posters (each with `.line` and `.request`) whose files collide:
    the first poster that collides with one before it.

    Sorted, every path that begins with a family's lies right after it, so one sweep over the sorted claims, with
    the families the current path lies in, finds each poster's collisions: 10 000 posters in a fraction of a second
    (comparing every pair took a minute)."""
    found = sorted(((claim.path, not claim.family, index) for index, poster in enumerate(posters) for claim in claims(poster.request)))
    first: int | None = None  # the earliest poster that collides with one before it
    families: list[tuple[str, int]] = []  # the families the current path lies in, outermost first
    same_path, files = None, []  # the posters with a file of the current path
    for path, is_file, index in found:
        while families and not path.startswith(families[-1][0]):
            families.pop()
        if path != same_path:
            same_path, files = path, []
        partners = [other for _, other in families if other != index] + [other for other in files if other != index]
        if partners:
            later = index if min(partners) < index else min(partners)
            first = later if first is None else min(first, later)
        if is_file:
            files.append(index)
        else:
            families.append((path, index))
    if first is not None:
        raise collision(posters, first, where)


def collision(posters: list, index: int, where: str) -> RenderError:
    """The error for poster `index`: its first claim that overlaps a claim of a poster before it, the earliest such."""
    mine = claims(posters[index].request)
    for poster in posters[:index]:
        for theirs in claims(poster.request):
            for claim in mine:
                if claim.overlaps(theirs):
                    return RenderError(
                        f"{where} line {posters[index].line}: {claim.what} {claim.shown()} is also line {poster.line}'s "
                        f"{theirs.what} {theirs.shown()}, so the two would overwrite each other's files; give every poster "
                        "an output name of its own")
    raise AssertionError(f"poster {index} was found to collide, but overlaps no claim before it")
