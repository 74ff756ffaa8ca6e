"""`freescale-render batch FILE` and `render_many`: many posters in one process, the model loaded and the gang
reserved once.

A batch file is JSON Lines: one object per poster whose fields are the CLI's options (`prompt`, `size`,
`negative-prompt` or `negative_prompt`, ...; `true` for a flag), `out` required; options given on the command
line are every line's defaults. Every line is checked (as the CLI and the preflight check one poster) before
anything renders. Posters render in order through one `Executors` pool: a poster that needs another model,
device or gang gets it, and says so. A poster that fails is reported and the batch goes on; one whose output
is complete and belongs to the same request (its sidecar's render id) is skipped; an interrupted one resumes
from its checkpoints. The summary (JSON Lines) says per poster what happened.
"""

from __future__ import annotations

import codecs
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from renderer.cli.options import build_parser, request_from_args
from renderer.errors import RenderError
from renderer.metrics.recorder import RenderMetrics
from renderer.output.collisions import check_collisions
from renderer.output.files import write_json_lines
from renderer.plan.render_plan import RenderPlan
from renderer.plan.request import RenderRequest

log = logging.getLogger("freescale_poster")

NOT_PER_POSTER = {"dry_run", "quiet", "help"}  # options of the whole command, not of a poster


@dataclass(frozen=True)
class Poster:
    line: int  # in the batch file, from 1
    request: RenderRequest
    plan: RenderPlan | None  # checked by the preflight, rendered as checked (None: a model planned once loaded)


@dataclass
class PosterReport:
    line: int
    out: str
    outcome: str  # succeeded, skipped, failed or stopped
    seconds: float
    resumed: bool = False
    error: str | None = None


def read_batch(path: Path, defaults: list[str]) -> list[Poster]:
    """Every poster of the batch file, checked; a bad line is one `RenderError` naming its line and field."""
    from renderer.plan.preflight import preflight

    parser = build_parser()
    options = {action.dest: action for action in parser.options if action.dest not in NOT_PER_POSTER}
    text = batch_text(path)
    posters: list[Poster] = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a prompt
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            fields = json.loads(line)
        except ValueError as error:
            raise not_one_object_a_line(text, path) or RenderError(f"{where}: not JSON ({error})") from None
        if not isinstance(fields, dict):
            raise RenderError(f"{where}: one JSON object per poster, e.g. {{\"prompt\": \"a red kite\", \"out\": \"kite.tif\"}}")
        if "out" not in fields:
            raise RenderError(f"{where}: field 'out' is required: every poster names its own output")
        argv, switched_off = list(defaults), []
        for key, value in fields.items():
            action = options.get(str(key).replace("-", "_"))
            if action is None:
                raise RenderError(f"{where}: unknown field {key!r}; the fields are the CLI's options: "
                                  f"{', '.join(sorted(name.replace('_', '-') for name in options))}")
            argv += option_words(action, value, where, key, action.dest in parser.repeatable)
            if action.nargs == 0 and value is False:
                switched_off.append(action.dest)
        try:
            args = parser.parse_args(argv)
            for dest in switched_off:  # `"preview": false` turns off a --preview given for every poster
                setattr(args, dest, False)
            request = request_from_args(args)
            plan = preflight(request)
        except RenderError as error:
            raise RenderError(f"{where}: {error}") from None
        posters.append(Poster(number, request, plan))
    if not posters:
        raise RenderError(f"batch file {path} has no posters; write one JSON object per line")
    check_collisions(posters, str(path))
    return posters


def batch_text(path: Path) -> str:
    """The batch file's text: UTF-8, with or without a byte-order mark, lines ending in LF or CRLF."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise RenderError(f"batch file {path}: {error.strerror or error}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data[:4096]:
        raise RenderError(f"batch file {path} is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 {path} > night.jsonl)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RenderError(f"batch file {path} is not UTF-8 (byte {error.start} is {data[error.start]:#04x}); save it as "
                          "UTF-8") from None


def not_one_object_a_line(text: str, path: Path) -> RenderError | None:
    """The error for a file that is JSON but not JSON Lines: a pretty-printed object (or several), or an array."""
    text = text.lstrip()
    try:
        first, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    if "\n" not in text[:end]:
        return None  # the first value is on one line: the line that failed is the one to name
    if isinstance(first, dict):
        return RenderError(f"batch file {path} holds a JSON object over several lines; a batch is JSON Lines, one poster's "
                           f"object on each line (jq -c . {path} writes it so)")
    if isinstance(first, list):
        return RenderError(f"batch file {path} is a JSON array; a batch is JSON Lines, one poster's object on each line "
                           f"(jq -c '.[]' {path} writes it so)")
    return None


def option_words(action, value, where: str, key: str, repeatable: bool = False) -> list[str]:
    """The command-line words of one field: a flag for `true`, nothing for `false`, else `--option=value`, so that
    a value beginning with `-` (a negative prompt `-text, -watermark`) stays a value; a list, for a `repeatable`
    option, one `--option=value` per item."""
    option = max(action.option_strings, key=len)
    if isinstance(value, list) and repeatable:  # a repeatable option: one word per item
        return [word for item in value for word in option_words(action, item, where, key)]
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise RenderError(f"{where}: field {key!r} is a switch: give true or false, not {value!r}")
        return [option] if value else []
    if isinstance(value, (dict, list)) or value is None:
        raise RenderError(f"{where}: field {key!r} takes one value (a string or a number), not {json.dumps(value)}")
    return [f"{option}={value}"]


def render_many(requests: list[RenderRequest], progress: bool = True, metrics: bool | RenderMetrics = False,
                lines: list[int] | None = None, summary: Path | None = None,
                on_poster: Callable[[RenderRequest], None] = lambda request: None,
                plans: list[RenderPlan | None] | None = None) -> list[PosterReport]:
    """Render every request in order with one executor pool; the reports, also written to `summary` (JSON Lines)
    after each poster. `on_poster` hears of each poster as it starts; `plans`, the requests' plans where already
    made (`read_batch`). A stop (KeyboardInterrupt) ends the batch after reporting the poster it stopped."""
    from renderer.engine import opened_metrics, render
    from renderer.executor.pool import Executors

    lines = lines or list(range(1, len(requests) + 1))
    plans = plans or [None] * len(requests)
    reports: list[PosterReport] = []
    representative = next((request for request in requests if request.workers), requests[0])
    with opened_metrics(representative, metrics) as recorder, Executors(recorder, keep=True) as executors:
        recorder.batch_left(len(requests))
        for index, (line, request, plan) in enumerate(zip(lines, requests, plans)):
            announce(index, requests, reports)
            on_poster(request)
            started = time.perf_counter()
            try:
                result = render(request, progress=progress, keep_image=False, metrics=recorder, executors=executors,
                                skip_done=True, plan=plan)
            except KeyboardInterrupt:
                finish(reports, PosterReport(line, str(request.out), "stopped", time.perf_counter() - started), recorder, summary)
                raise
            except Exception as error:  # the batch goes on; the poster's own error is reported in one line
                message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                log.warning("poster %d/%d (%s) failed: %s", index + 1, len(requests), request.out, message)
                report = PosterReport(line, str(request.out), "failed", time.perf_counter() - started, error=message)
            else:
                skipped = bool(result.metadata.get("skipped"))
                report = PosterReport(line, str(request.out), "skipped" if skipped else "succeeded",
                                      time.perf_counter() - started, resumed=result.metadata.get("resumed_from") is not None)
            finish(reports, report, recorder, summary)
    return reports


def announce(index: int, requests: list[RenderRequest], reports: list[PosterReport]) -> None:
    done = [report for report in reports if report.outcome == "succeeded"]
    eta = ""
    if done:
        left = (len(requests) - index) * sum(report.seconds for report in done) / len(done)
        eta = f", about {left / 60:.0f} min left" if left >= 60 else f", about {left:.0f} s left"
    counts = ", ".join(f"{sum(r.outcome == outcome for r in reports)} {outcome}" for outcome in ("succeeded", "skipped", "failed"))
    log.info("poster %d/%d: %s (%s%s)", index + 1, len(requests), requests[index].out, counts, eta)


def finish(reports: list[PosterReport], report: PosterReport, metrics: RenderMetrics, summary: Path | None) -> None:
    reports.append(report)
    metrics.batch_poster(report.outcome)
    if summary is not None:
        write_json_lines(summary, [asdict(r) for r in reports])


def summary_path(batch_file: Path, posters: list[Poster]) -> Path:
    """Beside the batch's outputs (the first poster's folder): BATCH.summary.jsonl."""
    return Path(posters[0].request.out).parent / f"{Path(batch_file).stem}.summary.jsonl"


def table(reports: list[PosterReport]) -> str:
    rows = [("line", "outcome", "seconds", "resumed", "output")]
    rows += [(str(r.line), r.outcome, f"{r.seconds:.1f}", "yes" if r.resumed else "", r.out + (f"  ({r.error})" if r.error else ""))
             for r in reports]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[4]]) for row in rows)


def batch_command(argv: list[str], current: list[RenderRequest]) -> int:
    """`freescale-render batch FILE [OPTIONS]`: OPTIONS are every poster's defaults (`--quiet` and `--dry-run` are
    the batch's). Exit 0 when every poster succeeded or was already complete, 1 if any failed. `current` gets the
    poster being rendered (for the CLI's stop message)."""
    from renderer.cli.console import quiet_libraries, show_render_log

    if not argv or argv[0].startswith("-"):
        raise RenderError("batch: give the batch file first: freescale-render batch FILE [options for every poster]")
    path, options = Path(argv[0]), argv[1:]
    posters = read_batch(path, [word for word in options if word not in ("--quiet", "--dry-run")])
    if "--dry-run" in options:
        for poster in posters:
            print(f"line {poster.line}: {poster.request.out}")
        print(f"{path}: {len(posters)} posters, every line checked")
        return 0
    quiet_libraries()
    show_render_log()
    summary = summary_path(path, posters)
    reports = render_many([poster.request for poster in posters], progress="--quiet" not in options, metrics=True,
                          lines=[poster.line for poster in posters], summary=summary, on_poster=current.append,
                          plans=[poster.plan for poster in posters])
    print(table(reports))
    print(f"summary: {summary}")
    return 1 if any(report.outcome == "failed" for report in reports) else 0
