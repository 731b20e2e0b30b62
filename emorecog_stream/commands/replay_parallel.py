"""``replay --parallel`` / ``--copies N``: many sessions at once, each its own set of streams.

Not a command of its own: :mod:`emorecog_stream.commands.replay` hands over here when asked to
play sessions side by side (:class:`~emorecog_stream.adapters.replay_group.ReplayGroup`).
Session ids are the participants' (``P15``, then ``P15-2``, ``P15-3``... for copies and
repeats), as ``rerun`` names them, and each session's streams carry its id as their tag.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from emorecog_stream.core.streams import Role


def replay_parallel(
    sessions: list[Any], args: argparse.Namespace, roles: list[Role] | None, console: Any
) -> int:
    from emorecog_stream.adapters.replay import ReplayError
    from emorecog_stream.adapters.replay_group import ReplayGroup
    from emorecog_stream.cli import UsageError
    from emorecog_stream.engine.rerun import session_ids

    ids = session_ids(sessions)
    try:
        group = ReplayGroup(
            sessions,
            ids,
            tag=args.tag,
            speed=args.speed,
            loop=args.loop,
            chunk_seconds=args.chunk_ms / 1000.0,
            roles=roles,
        )
    except ReplayError as exc:
        raise UsageError(str(exc)) from None
    try:
        group.open()
        for member in group.members:
            fmri = member.replayer.descriptions[Role.FMRI]
            console.print(
                f"session [bold]{member.session_id}[/]: {len(member.replayer.descriptions)}"
                f" outlets tagged -{member.tag} (fMRI {fmri.name}, source_id {fmri.source_id})"
            )
        if args.wait_for_consumer:
            console.print("waiting for an inlet on every session's fMRI stream (Ctrl-C to give up)")
            while not group.wait_for_consumers([Role.FMRI], timeout=1.0):
                pass
        group.start(delay=args.delay)
        while not group.join(0.5):
            if group.error is not None:
                break
        if group.error is None and args.linger > 0:
            time.sleep(args.linger)
    except KeyboardInterrupt:
        group.stop()
        console.print("replay stopped")
        return 130
    group.stop()
    if group.error is not None:
        console.print(f"[red]replay failed:[/] {group.error}")
        return 1
    late = sum(r.progress().late_pushes for r in group.replayers)
    console.print(
        f"replayed {len(sessions)} session(s) at once; pushes more than 5 ms late: {late}"
    )
    return 0
