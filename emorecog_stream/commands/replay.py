"""`emorecog-stream replay PATH... [--speed X] [--loop]`: recordings -> live-looking LSL streams.

Loads every PATH with :func:`emorecog_stream.recordings.load_sessions` (XDF files or folders,
ICBHI ``.mat`` folders, the official ICBHI layout, ``replay_data/``), then plays the sessions back
to back through :class:`emorecog_stream.adapters.replay.Replayer` with a rich progress bar.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from emorecog_stream.core.streams import Role

if TYPE_CHECKING:
    from emorecog_stream.adapters.replay import Replayer


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="recording(s): .xdf/.xdfz file, folder of them, ICBHI .mat folder or official layout",
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, metavar="X", help="playback speed (default 1)"
    )
    parser.add_argument(
        "--loop", action="store_true", help="start over at the end, timestamps keep increasing"
    )
    parser.add_argument(
        "--tag",
        default="",
        help="append -TAG to every stream name and source_id (to run beside a live setup)",
    )
    parser.add_argument(
        "--roles",
        default="",
        metavar="LIST",
        help="comma-separated roles to replay (fmri,ppg,resp,rates,markers; default all present)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="ROLE=SELECTOR",
        help="XDF files: which stream plays which role, e.g. --map ppg=name=Pleth or"
        " --map resp=type=RESP,channel=0 (repeatable; default: by LSL type, then name)",
    )
    parser.add_argument(
        "--chunk-ms",
        type=float,
        default=20.0,
        metavar="MS",
        help="wall-clock chunk length for high-rate streams (default 20 ms)",
    )
    parser.add_argument(
        "--tr",
        type=float,
        default=None,
        metavar="S",
        help="TR in seconds for recordings that do not carry one (ICBHI folders; default 1)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds between the streams appearing and the first sample (default 0)",
    )
    parser.add_argument(
        "--wait-for-consumer",
        action="store_true",
        help="do not start before an inlet (e.g. the engine) is connected to the fMRI stream",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=1.0,
        metavar="S",
        help="keep the streams up S seconds after the last sample so inlets get it all (default 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="play the sessions at the same time as distinct sessions (streams tagged with each"
        " session's id, e.g. EmoRecog-fMRI-P15), not back to back",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        metavar="N",
        help="play N copies of every session at once as distinct sessions P15, P15-2, ..."
        " (implies --parallel)",
    )


def _roles(text: str) -> list[Role] | None:
    from emorecog_stream.cli import UsageError

    if not text:
        return None
    roles = []
    for item in text.split(","):
        try:
            roles.append(Role(item.strip()))
        except ValueError:
            valid = ", ".join(r.value for r in Role)
            raise UsageError(f"--roles: unknown role {item.strip()!r} (valid: {valid})") from None
    return roles


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from emorecog_stream.adapters.lsl_log import quiet_liblsl
    from emorecog_stream.adapters.replay import Replayer, ReplayError
    from emorecog_stream.cli import UsageError
    from emorecog_stream.recordings import load_sessions

    if not args.speed > 0:
        raise UsageError(f"--speed: expected a number > 0, got {args.speed}")
    quiet_liblsl()  # before the first LSL call: liblsl's INFO lines would cover the progress bar
    if args.chunk_ms < 0 or args.delay < 0 or args.linger < 0:
        raise UsageError("--chunk-ms, --delay and --linger must be >= 0")
    roles = _roles(args.roles)
    console = Console(stderr=True)
    sessions = []
    for path in args.paths:
        try:
            options = {} if args.tr is None else {"tr": args.tr}
            loaded = load_sessions(path, args.map or None, **options)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot replay {path}: {exc}") from None
        if not loaded:
            raise UsageError(f"cannot replay {path}: no session found in it")
        sessions.extend(loaded)
    if args.copies < 1:
        raise UsageError(f"--copies: expected a number >= 1, got {args.copies}")
    if args.parallel or args.copies > 1:
        from emorecog_stream.commands.replay_parallel import replay_parallel

        return replay_parallel(sessions * args.copies, args, roles, console)
    try:
        replayer = Replayer(
            sessions,
            speed=args.speed,
            loop=args.loop,
            tag=args.tag,
            chunk_seconds=args.chunk_ms / 1000.0,
            roles=roles,
        )
    except ReplayError as exc:
        raise UsageError(str(exc)) from None

    try:
        replayer.open()
        for desc in replayer.descriptions.values():
            rate = "irregular" if desc.nominal_srate == 0 else f"{desc.nominal_srate:g} Hz"
            console.print(
                f"LSL outlet [bold]{desc.name}[/] type={desc.type} source_id={desc.source_id}"
                f" channels={desc.channel_count} rate={rate}"
            )
        if args.wait_for_consumer:
            console.print("waiting for an inlet on the fMRI stream (Ctrl-C to give up) ...")
            while not replayer.wait_for_consumers([Role.FMRI], timeout=1.0):
                pass
        replayer.start(delay=args.delay)
        _show_progress(replayer, console, enabled=not args.no_progress)
        if replayer.error is None and args.linger > 0:
            time.sleep(args.linger)
    except KeyboardInterrupt:
        replayer.stop()
        console.print("replay stopped")
        return 130
    replayer.stop()
    if replayer.error is not None:
        console.print(f"[red]replay failed:[/] {replayer.error}")
        return 1
    p = replayer.progress()
    pushed = ", ".join(f"{r.value} {n}" for r, n in p.pushed.items())
    console.print(
        f"replayed {len(sessions)} session(s): samples pushed: {pushed};"
        f" pushes more than 5 ms late: {p.late_pushes} (max {p.max_late * 1000:.1f} ms)"
    )
    return 0


def _show_progress(replayer: Replayer, console: object, enabled: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,  # type: ignore[arg-type]
        disable=not enabled or not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("replay", total=replayer.duration, detail="")
        while not replayer.join(0.1):
            p = replayer.progress()
            done = sum(replayer.session_spans[: p.session_index]) + p.position
            label = f"{p.participant} ({p.session_index + 1}/{p.n_sessions})"
            if replayer.loop:
                label += f" pass {p.loop_index + 1}"
            pushed = sum(p.pushed.values())
            progress.update(
                task,
                completed=min(done, replayer.duration),
                description=label,
                detail=f"x{replayer.speed:g}  {pushed} samples",
            )
        progress.update(task, completed=replayer.duration)
