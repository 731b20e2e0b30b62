"""`emorecog-stream synth`: write the deterministic synthetic corpus as XDF files.

One file per participant (``P01.xdf`` ...), written by our XDF writer; the same arguments give
the same bytes. See docs/recordings.md for the generative model.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from emorecog_stream.cli import UsageError

_DEFAULTS = {"seed": 2024, "participants_total": 16, "trials": 30}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder for the XDF files")
    parser.add_argument(
        "--participants",
        default=None,
        metavar="LIST",
        help="which participants to write: e.g. 'P15,P16', '15-16' or '1,3,5-8'"
        " (default: all of the corpus)",
    )
    parser.add_argument(
        "--n-participants",
        type=int,
        default=_DEFAULTS["participants_total"],
        metavar="N",
        help="corpus size; labels are balanced over it (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=_DEFAULTS["seed"], help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--tr", type=float, default=1.0, metavar="S", help="fMRI TR in s (default: %(default)s)"
    )
    parser.add_argument(
        "--ppg-rate", type=float, default=400.0, metavar="HZ", help="PPG rate (default: 400)"
    )
    parser.add_argument(
        "--resp-rate",
        type=float,
        default=50.0,
        metavar="HZ",
        help="respiration rate (default: 50)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=_DEFAULTS["trials"],
        metavar="N",
        help="video trials per participant (default: %(default)s)",
    )
    parser.add_argument(
        "--rest",
        type=float,
        default=10.0,
        metavar="S",
        help="rest between trials in s (default: %(default)s)",
    )
    parser.add_argument(
        "--compress",
        action="store_true",
        help="write gzipped .xdfz files (about half the size) instead of .xdf",
    )
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist")


def parse_participants(text: str | None, total: int) -> list[int]:
    """``"P15,P16"``, ``"15-16"``, ``"1,3,5-8"`` -> sorted 1-based indices within 1..total."""
    if text is None:
        return list(range(1, total + 1))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"[Pp]?(\d+)(?:\s*-\s*[Pp]?(\d+))?", part)
        if not m:
            raise UsageError(
                f"--participants: cannot read {part!r}; expected e.g. 'P15,P16', '15-16' or"
                " '1,3,5-8'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if lo > hi or lo < 1 or hi > total:
            raise UsageError(
                f"--participants: {part!r} is outside 1..{total} (the corpus has {total}"
                " participants; change it with --n-participants)"
            )
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from emorecog_stream.recordings.synth import SynthConfig, generate_session, participant_id
    from emorecog_stream.recordings.xdf import write_xdf

    try:
        config = SynthConfig(
            seed=args.seed,
            n_participants=args.n_participants,
            n_trials=args.trials,
            rest_s=args.rest,
            tr=args.tr,
            ppg_rate=args.ppg_rate,
            resp_rate=args.resp_rate,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    indices = parse_participants(args.participants, config.n_participants)
    out_dir: Path = args.out_dir
    suffix = ".xdfz" if args.compress else ".xdf"
    targets = [(i, out_dir / f"{participant_id(i)}{suffix}") for i in indices]
    existing = [str(p) for _, p in targets if p.exists()]
    if existing and not args.force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise UsageError(f"{', '.join(existing)} already {verb}; pass --force to overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    console = Console(stderr=True)
    total_bytes = 0
    with Progress(
        TextColumn("[bold]synth[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("starting", total=len(targets))
        for index, path in targets:
            progress.update(task, description=f"{participant_id(index)} -> {path.name}")
            session = generate_session(index, config)
            write_xdf(session, path)
            total_bytes += path.stat().st_size
            progress.advance(task)
        progress.update(task, description="done")
    console.print(
        f"wrote {len(targets)} session(s) to {out_dir} ({total_bytes / 1e6:.1f} MB), seed"
        f" {config.seed}, TR {config.tr:g} s, PPG {config.ppg_rate:g} Hz, respiration"
        f" {config.resp_rate:g} Hz, {config.n_trials} trials each"
    )
    return 0
