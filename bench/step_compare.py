"""The FreeScale step against a plain step, for two revisions side by side in one run.

    python bench/step_compare.py 5561bfe                      # that revision against this working tree
    python bench/step_compare.py 5561bfe --base HEAD --sizes 1024 --repeats 12 --threads 2

Each revision's code runs in its own child process (its tree checked out by `git archive` into a temporary
folder, or this working tree), with the same model, latents and calls as `bench/step_profile.py`. The
parent interleaves the two children round by round, in alternating order, so that a drifting machine moves
both alike: one round is one plain call, one FreeScale call at a dilated step and one at a plain-conv step,
then the same calls instrumented by part (local windows, global attention, blur, FreeU, the dilated convs,
and entering and leaving `freescale_mode`). Ratios are medians of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
MODE_ENTRIES = 20  # freescale_mode entries and exits timed per round (each is well under a millisecond)


def checkout(revision: str, into: Path) -> Path:
    """The tree of `revision` under `into` (only what a UNet call imports)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "freescale_core", "renderer", "cluster"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"step_compare: git archive {revision!r} failed: {archive.stderr.decode().strip()}")
    tree = into / revision.replace("/", "_")
    tree.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


# ---------------------------------------------------------------- child: one revision's calls


def serve(options: argparse.Namespace) -> None:
    """Load the model once, then answer each line on stdin with one round's seconds as a JSON line."""
    import torch

    import step_profile as sp  # imports the method and the renderer from STEP_PROFILE_TREE

    torch.set_num_threads(options.threads)
    pipeline = sp.load_pipeline(options.model, "cpu", torch.float32)
    unet = pipeline.unet
    cond = sp.encode_prompts(pipeline, "a red kite over a harbour", "", (sp.train_px(unet),) * 2, 5.0)
    bench = sp.Bench(pipeline, cond, sp.fresh_scheduler(pipeline, sp.STEPS), sp.Clock(torch.device("cpu")))
    config = sp.FreeScaleConfig()
    size = options.size
    rows = sp.variants(unet, size, config, ablations=False)
    tau = config.dilate_tau
    print(json.dumps({"ready": sp.fs_attention.__file__}), flush=True)
    for _ in sys.stdin:
        seconds = bench.time_rounds(size, rows, repeats=1, warmup=0)
        result = {"calls": {name: times[0] for name, times in seconds.items()}, "parts": {}}
        with torch.inference_mode():
            for label, step in (("i=0", 0), (f"i={tau}", tau)):
                components = sp.Components(bench.clock)
                with sp.instrumented(unet, components) as backend:
                    bench.call(size, sp.freescale_mode(unet, config, size=(size, size), step_index=step, backend=backend), step)
                result["parts"][label] = dict(components.seconds)
                started = bench.clock.now()
                for _ in range(MODE_ENTRIES):
                    with sp.freescale_mode(unet, config, size=(size, size), step_index=step):
                        pass
                result["parts"][label]["freescale_mode entry + exit"] = (bench.clock.now() - started) / MODE_ENTRIES
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent: interleave two children


class Child:
    def __init__(self, label: str, tree: Path, options: argparse.Namespace):
        self.label = label
        env = {**os.environ, "STEP_PROFILE_TREE": str(tree), "PYTHONPATH": str(tree)}
        command = [sys.executable, str(HERE), "--serve", "--model", options.model, "--size", str(options.size),
                   "--threads", str(options.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = json.loads(self.read())
        print(f"{label}: {ready['ready']}", file=sys.stderr)
        self.rounds: list[dict] = []

    def read(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"step_compare: the {self.label} child exited ({self.process.wait()})")
        return line

    def round(self) -> None:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        self.rounds.append(json.loads(self.read()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def ratios(child: Child, name: str) -> list[float]:
    return [r["calls"][name] / r["calls"]["plain"] for r in child.rounds]


def report(old: Child, new: Child, warmup: int) -> None:
    for child in (old, new):
        del child.rounds[:warmup]
    names = list(old.rounds[0]["calls"])
    print(f"| variant | {old.label} s | {new.label} s | {old.label} / plain | {new.label} / plain | {new.label} / {old.label} |")
    print("|---|---|---|---|---|---|")
    for name in names:
        a = [r["calls"][name] for r in old.rounds]
        b = [r["calls"][name] for r in new.rounds]
        ratio_a, ratio_b = statistics.median(ratios(old, name)), statistics.median(ratios(new, name))
        change = statistics.median(y / x for x, y in zip(a, b))
        print(f"| {name} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | {ratio_a:.3f}x | {ratio_b:.3f}x | {change:.3f} |")
    print(f"\nRounds' ratios to plain ({new.label}, FreeScale steps): "
          + ", ".join(f"{min(ratios(new, n)):.3f}–{max(ratios(new, n)):.3f}" for n in names[1:]))
    for label in old.rounds[0]["parts"]:
        print(f"\n| part, FreeScale {label} (s, median; synchronised, summed over blocks) | {old.label} | {new.label} | difference |")
        print("|---|---|---|---|")
        parts = list(dict.fromkeys([*old.rounds[0]["parts"][label], *new.rounds[0]["parts"][label]]))
        for part in parts:
            a = statistics.median(r["parts"][label].get(part, 0.0) for r in old.rounds)
            b = statistics.median(r["parts"][label].get(part, 0.0) for r in new.rounds)
            print(f"| {part} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", nargs="?", help="the revision to compare against (any git revision)")
    parser.add_argument("--base", default=None, help="the other revision (default: this working tree)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=1024, help="square stage side in pixels (1024: tiny's 4x stage)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in each child")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        return serve(options)
    if not options.revision:
        parser.error("name the revision to compare against, e.g. 5561bfe")
    with tempfile.TemporaryDirectory(prefix="step-compare-") as folder:
        old_tree = checkout(options.revision, Path(folder))
        new_tree = checkout(options.base, Path(folder)) if options.base else REPO
        old = Child(options.revision, old_tree, options)
        new = Child(options.base or "working tree", new_tree, options)
        try:
            print(f"model {options.model}, fp32, CPU, {options.threads} thread(s) per child, {options.size}², "
                  f"{options.repeats} rounds after {options.warmup} warm-up, children alternating\n")
            for round_ in range(options.warmup + options.repeats):
                for child in ((old, new) if round_ % 2 == 0 else (new, old)):
                    child.round()
            report(old, new, options.warmup)
        finally:
            for child in (old, new):
                child.close()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
