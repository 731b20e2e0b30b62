"""`emorecog-stream report SESSION.jsonl [-o report.html] [--png DIR]`: a session log as a page.

One self-contained HTML file (figures embedded as PNG, no script, no URL; opens offline and
prints) with the timeline of probabilities and intensity against the trial markers, heart and
respiration rate (and framewise displacement when logged), latency, status changes and gaps, the
MQTT counters when the log has them, and, when the markers carry labels, the per-trial and per-TR
accuracy and intensity error with ``evaluate``'s definitions. See docs/report.md.

The report and the PNGs hold personal health data: they are written readable by their owner
only (mode 0600).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from emorecog_stream.cli import UsageError


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, metavar="SESSION.jsonl", help="a session log (run --log)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="the HTML file to write (default: the log's name with .report.html)",
    )
    parser.add_argument(
        "--png", type=Path, default=None, metavar="DIR", help="also write each figure as a PNG here"
    )
    parser.add_argument(
        "--run",
        type=int,
        default=None,
        metavar="N",
        help="which run of a log that holds several (1 = first; default: the last)",
    )
    parser.add_argument(
        "--label-delay",
        type=_delay,
        default=None,
        metavar="S",
        help="seconds from a trial to the volumes it labels, as evaluate (default 5)",
    )
    parser.add_argument(
        "--time-scale",
        type=_positive,
        default=None,
        metavar="X",
        help="replay speed the session ran at (default: from the log, else 1 = live)",
    )


def default_output(log: Path) -> Path:
    """``session.jsonl`` -> ``session.report.html`` in the same folder."""
    return log.with_name(f"{log.stem if log.suffix else log.name}.report.html")


def main(args: argparse.Namespace) -> int:
    from emorecog_stream import __version__
    from emorecog_stream.report import (
        ReportInputError,
        read_session_log,
        render_report,
        session_view,
        write_private,
    )
    from emorecog_stream.report.figures import make_figures
    from emorecog_stream.sinks.payload import utc_now

    try:
        view = session_view(
            read_session_log(args.log),
            run=args.run,
            time_scale=args.time_scale,
            label_delay=args.label_delay,
        )
    except ReportInputError as exc:
        raise UsageError(str(exc)) from None
    output: Path = args.output if args.output is not None else default_output(args.log)
    try:
        if output.is_dir():
            raise UsageError(
                f"output {str(output)!r} is a directory; expected a file path such as"
                f" {str(output / default_output(args.log).name)!r}"
            )
        if not output.parent.is_dir():
            raise UsageError(f"output folder {str(output.parent)!r} does not exist")
        if output.resolve() == args.log.resolve():
            raise UsageError(f"output {str(output)!r} is the log itself; choose another file")
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise UsageError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None
    figures = make_figures(view)
    page = render_report(view, figures, generated_utc=utc_now(), version=__version__)

    def write(path: Path, data: bytes) -> Path:
        try:
            return write_private(path, data)
        except OSError as exc:
            raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None

    written = [write(output, page.encode("utf-8"))]
    if args.png is not None:
        if args.png.exists() and not args.png.is_dir():
            raise UsageError(f"--png {str(args.png)!r} is a file; expected a folder")
        try:
            args.png.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {str(args.png)!r}: {exc.strerror or exc}") from None
        written += [write(args.png / f"{fig.name}.png", fig.png) for fig in figures]
    print(f"wrote {written[0]} ({view.n_predictions} predictions, {len(view.trials)} trials)")
    for path in written[1:]:
        print(f"wrote {path}")
    for note in view.notes:
        print(f"note: {note}")
    return 0
