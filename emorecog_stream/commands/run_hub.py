"""``run --sessions FILE``: the hub (:mod:`emorecog_stream.engine.hub`) from the command line.

Not a command of its own: :mod:`emorecog_stream.commands.run` hands over here. With
``--sessions``, ``--log`` names a folder (one ``<session id>.jsonl`` per session), the terminal
dashboard is off (one log line per TR and session, prefixed with the session id), and Ctrl-C or
SIGTERM stops every session (each one's status goes offline).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any


def run_sessions_file(config: Any, path: str, speed: float) -> int:
    from emorecog_stream.cli import UsageError
    from emorecog_stream.engine.hub import HubError, load_sessions_file, run_hub
    from emorecog_stream.engine.runner import RunError, load_model_for

    try:
        sessions = load_sessions_file(path)
    except HubError as exc:
        raise UsageError(str(exc)) from None
    log_dir = config.output.log or None
    try:
        model = load_model_for(config)
    except RunError as exc:
        raise UsageError(str(exc)) from None
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        return await run_hub(
            config, sessions, model=model, log_dir=log_dir, time_scale=speed, stop=stop
        )

    results = asyncio.run(main())
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"session {r.session_id} stopped: {r.error}", flush=True)
    return 1 if failed and len(failed) == len(results) else 0
