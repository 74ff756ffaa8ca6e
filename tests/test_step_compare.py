"""`bench/step_compare.py`, the A/B of a FreeScale step between two revisions, keeps working as the code moves:
it checks out a revision, runs each revision's code in its own process and prints both side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "step_compare.py"


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_head_against_the_working_tree_prints_every_variant_and_part():
    run = compare("HEAD", "--size", "512", "--repeats", "1", "--warmup", "0", "--threads", "1")
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    assert "| 1.000x | 1.000x |" in rows["plain"]
    assert {"FreeScale, dilated step (i=0)", "FreeScale, plain-conv step (i=35)"} <= set(rows)
    assert {"window attention (gather, attend, scatter)", "global attention", "blur", "FreeU skip filter",
            "freescale_mode entry + exit"} <= set(rows)
    # each child imported its own tree: HEAD's from the checkout, the working tree's from this folder
    assert "step-compare-" in run.stderr and str(ROOT / "freescale_core") in run.stderr


def test_an_unknown_revision_is_one_line():
    run = compare("no-such-revision-38")
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "no-such-revision-38" in run.stderr
