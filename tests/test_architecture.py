"""The packages import one way (docs/architecture.md): freescale_core ← renderer ← cluster.

Read from the sources, so a new import anywhere is caught: `freescale_core` imports neither of the others,
`renderer` names `cluster` in one place only (the executor's choice of the Ray gang), and a render without
workers never imports Ray or `cluster`. No source file of the packages is longer than 400 lines."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("freescale_core", "renderer", "cluster")
# The one place renderer/ may name cluster/: where the executor for --workers N is chosen.
RENDERER_TO_CLUSTER = {("renderer/executor/pool.py", "cluster.gang")}


def imports_of(path: Path) -> set[str]:
    """Every module a source file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def package_imports() -> dict[tuple[str, str], set[str]]:
    """(file, imported module) for every import of one of our packages, by the importing package."""
    found: dict[tuple[str, str], set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imports_of(path):
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault((package, top), set()).add((str(path.relative_to(ROOT)), name))
    return found


def test_the_method_imports_neither_the_renderer_nor_the_cluster():
    found = package_imports()
    assert not found.get(("freescale_core", "renderer")) and not found.get(("freescale_core", "cluster"))


def test_the_renderer_names_the_cluster_only_where_it_picks_the_ray_executor():
    assert package_imports().get(("renderer", "cluster"), set()) == RENDERER_TO_CLUSTER


def test_the_cluster_uses_the_renderer():
    """The other direction is the one allowed, and used: the gang's workers are the renderer's `Worker`."""
    assert ("cluster/gang.py", "renderer.cascade.worker") in package_imports()[("cluster", "renderer")]


def test_the_import_check_sees_a_forbidden_import(tmp_path):
    """The reader finds imports inside functions too (where the old engine imported the coordinator)."""
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from cluster.gang import Gang\n    import ray\n")
    assert imports_of(source) == {"cluster.gang", "ray"}


def test_a_render_without_workers_imports_neither_ray_nor_the_cluster(tmp_path):
    script = (
        "import json, sys\n"
        "from renderer import RenderRequest, render\n"
        f"render(RenderRequest(prompt='p', stages=((256, 256), (512, 512)), steps=2, out={str(tmp_path / 'x.tif')!r}), progress=False)\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in ('ray', 'cluster'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.tif").is_file()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_no_source_file_is_longer_than_400_lines():
    long = {str(path.relative_to(ROOT)): lines for package in PACKAGES
            for path in (ROOT / package).rglob("*.py") if (lines := len(path.read_text().splitlines())) > 400}
    assert long == {}


def test_the_architecture_page_names_the_one_crossing_and_every_module_it_routes_through():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert "`freescale_core` ← `renderer` ← `cluster`" in page
    for _, module in RENDERER_TO_CLUSTER:
        assert module in page
    for path in set(re.findall(r"\b((?:renderer|cluster)/[\w/]+\.py)\b", page)):
        assert (ROOT / path).is_file(), f"docs/architecture.md names {path}, which does not exist"
