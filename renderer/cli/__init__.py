"""`freescale-render`: render a poster, `freescale-render batch FILE` many, or `freescale-render inspect FILE` to
check an output.

The command is the first word, read here rather than by argparse's subparsers: a batch's words after FILE are
every poster's render options, parsed per line by the render parser (`renderer.cli.batch`), and a subparser
cannot pass on words that begin with `-` unparsed (argparse.REMAINDER refuses them there); and the bare form,
`freescale-render --prompt ...`, is the render command without its word."""

from __future__ import annotations

import shlex
import sys

from renderer.cli.options import OneLineParser, build_parser, request_from_args
from renderer.errors import RenderError
from renderer.plan.geometry import format_size
from renderer.plan.request import RenderRequest

COMMANDS = ("batch", "inspect")


def check_command_first(argv: list[str], parser: OneLineParser) -> None:
    """`freescale-render --model toy batch FILE`: a command word after options (never an option's value) is refused
    with the command line that works, its word and file first."""
    takes_value = {name for action in parser.options if action.nargs != 0 for name in action.option_strings}
    for index, word in enumerate(argv):
        if word in COMMANDS and index and argv[index - 1] not in takes_value:
            works = ["freescale-render", word, *argv[index + 1 : index + 2], *argv[:index], *argv[index + 2 :]]
            raise RenderError(f"'{word}' must come first, before any option: {shlex.join(works)}")


def dry_run(request: RenderRequest) -> int:
    """Print what the render would do and need, without loading any weight."""
    from renderer.plan.preflight import preflight

    plan = preflight(request)
    if plan is None:
        print(f"--model {request.model}: its configs cannot be read without loading it; nothing more to check before a render")
        return 0
    print("\n".join(plan.lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    import time

    from renderer.cli.console import quiet_libraries, show_render_log
    from renderer.progress import Progress
    from renderer.resume.stopping import StopSignals, stopped_message

    as_program = argv is None  # the `freescale-render` command itself, not a caller in the same process
    argv = sys.argv[1:] if argv is None else argv
    stop = StopSignals()  # SIGTERM (`ray job stop`) and SIGINT (Ctrl-C) end the render cleanly, see renderer.resume.stopping
    request = None
    posters: list[RenderRequest] = []  # a batch's posters as they start: where a stop found it
    started = time.time()
    try:
        if argv[:1] == ["inspect"]:
            from renderer.cli.inspect import main as inspect_main

            return inspect_main(argv[1:])
        with stop:  # also while reporting a stop: a second signal must not interrupt that
            try:
                if argv[:1] == ["batch"]:
                    from renderer.cli.batch import batch_command

                    return batch_command(argv[1:], posters)
                parser = build_parser()
                check_command_first(argv, parser)
                args = parser.parse_args(argv)
                request = request_from_args(args)
                if args.dry_run:
                    return dry_run(request)
                quiet_libraries()
                show_render_log()
                from renderer.engine import render

                Progress.latest = None
                result = render(request, progress=not args.quiet, keep_image=False, metrics=True)
            except KeyboardInterrupt:  # ours (RenderStopped), or Ray's re-raise of it from inside ray.get/ray.wait
                if stop.received is None:
                    raise
                print(stopped_message(stop, posters[-1] if posters else request, started), file=sys.stderr, flush=True)
                if as_program:
                    stop.exit_now()  # cleaned up already; skip the interpreter's slow teardown (Ray's stop grace is 3 s)
                return stop.exit_code
    except (RenderError, ValueError) as error:
        print(f"freescale-render: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {request.out} ({format_size(result.stages[-1])}, stages {' -> '.join(format_size(s) for s in result.stages)})")
    return 0
