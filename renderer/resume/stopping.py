"""Ending a render cleanly on SIGTERM (`ray job stop`, Kubernetes, a scheduler) or SIGINT (Ctrl-C).

`StopSignals` installs handlers in the main thread that raise `RenderStopped` where the render is. The
exception unwinds through the engine's context managers: the gang is torn down (actors killed, placement
group removed), temporary files beside the output are removed (`renderer.output.files.atomic_path`, the
writer's scratch folder), and nothing appears at the output path. The CLI then prints one line saying
where the render stopped and exits with 128 + the signal number.

`RenderStopped` is a `KeyboardInterrupt`: generic `except Exception` blocks let it through, and Ray's
blocking calls (`ray.get`, `ray.wait`) return at once for it, but re-raise it as a plain
`KeyboardInterrupt` (and anything else not at all until the call returns), so the signal received is
also kept on the `StopSignals` object.

Only the first signal raises; later ones (Ray's job supervisor signals every process of the job's tree,
an impatient second Ctrl-C) are ignored so that they cannot interrupt the clean-up, which takes well
under Ray's default stop grace period of 3 s (RAY_JOB_STOP_WAIT_TIME_S) before its SIGKILL. Run as a
command, the CLI then leaves at once (`exit_now`): the interpreter's own teardown of torch, diffusers and
transformers alone takes 1-3 s.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RenderStopped(KeyboardInterrupt):
    """A stop signal arrived; `signal_name` says which."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT raise `RenderStopped` in the main thread.

    The previous handlers come back on exit. Outside the main thread (where Python cannot install
    handlers) it does nothing. `received` is the first signal's number, or None."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (143 SIGTERM, 130 SIGINT)."""
        return 128 + (self.received or signal.SIGTERM)

    def exit_now(self) -> None:
        """End the process at once with `exit_code`, once the render has cleaned up: Ray disconnected, logs and
        stdio flushed, but without the interpreter's teardown, which takes 1-3 s with torch, diffusers and
        transformers loaded, most of `ray job stop`'s 3 s grace before its SIGKILL. For the program only
        (the CLI run as a command), never for a caller in the same process."""
        import logging
        import os
        import sys

        ray = sys.modules.get("ray")
        try:
            if ray is not None and ray.is_initialized():
                ray.shutdown()
        finally:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (AttributeError, OSError, ValueError):
                    pass
            os._exit(self.exit_code)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # already stopping: let the clean-up finish
        self.received = signum
        raise RenderStopped(signal.Signals(signum).name)

    def install(self) -> None:
        """(Re)install the handlers, e.g. after a library replaced one (`ray.init` sets its own SIGTERM handler)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in self.signals:
            current = signal.getsignal(number)
            if current != self._handle:
                self._previous.setdefault(number, current)
                signal.signal(number, self._handle)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def stopped_line(prog: str, signal_name: str, where: str | None, written: list[str], kept: str | None = None) -> str:
    """The one line printed when a render is stopped."""
    at = f"at {where}" if where else "before the first stage"
    result = "nothing written" if not written else f"already written: {', '.join(written)}"
    return f"{prog}: stopped by {signal_name} {at}; {result}" + (f"; {kept}" if kept else "")


def stopped_message(stop: StopSignals, request, started: float, prog: str = "freescale-render") -> str:
    """The CLI's line for a stopped `request` (a RenderRequest, or None if it stopped before one was made):
    which signal, where the render was (the latest `Progress` stage), and what is on disk, counting only
    files this run wrote (since `started`, a time.time())."""
    from renderer.output.files import sidecar_path
    from renderer.progress import Progress

    bar = Progress.latest
    if bar is not None:
        bar.close()  # end the bar's line, so that the message is a line of its own
    from tqdm import tqdm

    for orphan in list(getattr(tqdm, "_instances", ())):
        # A bar whose creation the signal interrupted (just after it drew itself, before tqdm noted that it
        # had): tqdm's close() then leaves its line open, so end it here.
        drawn_unnoted = getattr(orphan, "sp", None) is not None and not hasattr(orphan, "last_print_t")
        orphan.close()
        if drawn_unnoted:
            orphan.fp.write("\n")
    written, kept = [], None
    if request is not None:
        for path in (Path(request.out), sidecar_path(request.out)):
            if path.exists() and path.stat().st_mtime >= started:
                written.append(str(path))
        folder = request.checkpoint_folder()
        if folder.is_dir() and any(path.is_file() for path in folder.rglob("*")):
            kept = f"checkpoints kept in {folder} (the same command resumes from them)"
    return stopped_line(prog, stop.signal_name or "a signal", bar.position() if bar is not None else None, written, kept)
