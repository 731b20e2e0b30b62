"""``run --sessions FILE|auto``: the hub (:mod:`emorecog_stream.engine.hub`) from the command line.

Not a command of its own: :mod:`emorecog_stream.commands.run` hands over here. With
``--sessions``, ``--log`` names a folder (one ``<session id>.jsonl`` per session); on a terminal
the dashboard shows a sessions table (the single-session view while there is one session),
otherwise a summary line every few seconds; Ctrl-C or SIGTERM stops every session (each one's
status goes offline, then the hub's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

#: Seconds between the summary lines printed when stdout is not a terminal.
LOG_LINE_PERIOD_S = 10.0


def run_sessions_file(
    config: Any, sessions_arg: str, speed: float, args: argparse.Namespace | None = None
) -> int:
    from emorecog_stream.cli import UsageError
    from emorecog_stream.engine.hub import AUTO, Hub, HubError, load_sessions_file
    from emorecog_stream.engine.runner import RunError, load_model_for

    include = getattr(args, "include", None)
    if include and sessions_arg != AUTO:
        raise UsageError("--include goes with --sessions auto (a sessions file lists its own)")
    linger = float(getattr(args, "linger", 30.0) or 30.0)
    if not linger > 0:
        raise UsageError(f"--linger: expected seconds > 0, found {linger}")
    if sessions_arg != AUTO:
        try:
            load_sessions_file(sessions_arg)  # a broken file is a usage error before anything
        except HubError as exc:
            raise UsageError(str(exc)) from None
    log_dir = config.output.log or None
    try:
        model = load_model_for(config)
    except RunError as exc:
        raise UsageError(str(exc)) from None

    async def main() -> list[Any]:
        hub = Hub(
            config, sessions_arg, model=model, log_dir=log_dir, time_scale=speed,
            hub_id=getattr(args, "hub_id", None), include=include, linger=linger,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, hub.stop)
        view = _start_view(config, hub)
        try:
            return await hub.run()
        finally:
            await view()

    try:
        results = asyncio.run(main())
    except (RunError, HubError) as exc:
        raise UsageError(str(exc)) from None
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"session {r.session_id} stopped: {r.error}", flush=True)
    return 1 if failed and len(failed) == len(results) else 0


def _start_view(config: Any, hub: Any) -> Any:
    """The sessions dashboard on a terminal, else a summary line every few seconds; returns
    the coroutine function that stops it."""
    from emorecog_stream.sinks.dashboard import HubDashboard, format_hub_log_line

    if config.output.dashboard and sys.stdout.isatty():
        dashboard = HubDashboard(hub.snapshots)
        dashboard.start()

        async def stop_dashboard() -> None:
            dashboard.stop()

        return stop_dashboard

    hub.snapshot_period = LOG_LINE_PERIOD_S / 2  # nobody looks between two lines

    async def lines() -> None:
        while True:
            await asyncio.sleep(LOG_LINE_PERIOD_S)
            snapshots = hub.snapshots()
            if snapshots:
                print(format_hub_log_line(snapshots), flush=True)

    task = asyncio.ensure_future(lines())

    async def stop_lines() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop_lines
