"""Several recorded sessions played at the same time, each as its own set of LSL streams.

Why: a hub (many sessions in one engine), a benchmark or a rehearsal of a centre with several
scanners needs many live-looking sessions at once, each one told apart the way real scanners
are: by its streams' names and source ids. Session ``P15-2`` gets the tag ``P15-2`` (after
the caller's own tag), so its streams are ``EmoRecog-fMRI-P15-2``, ``EmoRecog-PPG-P15-2``...
with source ids ``emorecog-fmri-P15-2``...: one suffix shared by every stream of a session and
by no other session's.

Each session is its own :class:`~emorecog_stream.adapters.replay.Replayer` (its own scheduler
thread, the timing and chunking of a single replay) and all start on one LSL start time, so
the sessions run side by side as they would in parallel scanners.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pylsl

from emorecog_stream.adapters.replay import Replayer, ReplayError
from emorecog_stream.core.streams import Role
from emorecog_stream.recordings.session import Session


def session_tag(session_id: str, tag: str = "") -> str:
    """The tag one session's streams carry: the caller's tag, then the session id."""
    return f"{tag}-{session_id}" if tag else session_id


@dataclass(frozen=True)
class GroupMember:
    """One session of a group: its id, the tag on its streams, its replayer."""

    session_id: str
    tag: str
    replayer: Replayer


class ReplayGroup:
    """Play ``sessions`` at once, session ``ids[i]`` with streams tagged
    :func:`session_tag` ``(ids[i], tag)``; other options as for :class:`Replayer`."""

    def __init__(
        self,
        sessions: Sequence[Session],
        ids: Sequence[str],
        *,
        tag: str = "",
        speed: float = 1.0,
        loop: bool = False,
        chunk_seconds: float = 0.02,
        roles: Iterable[Role] | None = None,
    ) -> None:
        if len(sessions) != len(ids):
            raise ReplayError(f"expected one session id per session, got {len(ids)} for"
                              f" {len(sessions)} sessions")  # fmt: skip
        if len(set(ids)) != len(ids):
            raise ReplayError(f"session ids must be unique, got {list(ids)}")
        if not sessions:
            raise ReplayError("nothing to replay: no sessions given")
        wanted = list(roles) if roles is not None else None
        self.members = [
            GroupMember(
                sid,
                session_tag(sid, tag),
                Replayer(
                    s,
                    speed=speed,
                    loop=loop,
                    tag=session_tag(sid, tag),
                    chunk_seconds=chunk_seconds,
                    roles=wanted,
                ),
            )
            for sid, s in zip(ids, sessions, strict=True)
        ]
        self.speed = float(speed)
        self.loop = loop
        self.start_time: float | None = None

    @property
    def replayers(self) -> list[Replayer]:
        return [m.replayer for m in self.members]

    @property
    def duration(self) -> float:
        """Wall seconds until the longest session ends."""
        return max(r.duration for r in self.replayers)

    def open(self) -> None:
        for r in self.replayers:
            r.open()

    def wait_for_consumers(self, roles: Iterable[Role] | None = None, timeout: float = 5.0) -> bool:
        """Every session's outlets in ``roles`` have an inlet (within ``timeout`` s overall)."""
        roles = list(roles) if roles is not None else None
        deadline = pylsl.local_clock() + timeout
        return all(
            r.wait_for_consumers(roles, max(0.0, deadline - pylsl.local_clock()))
            for r in self.replayers
        )

    def start(self, delay: float = 0.0) -> None:
        """Start every session; their first samples are due at one moment ``delay`` s on
        (to within the microseconds between two starts)."""
        self.open()
        start = pylsl.local_clock() + delay
        for r in self.replayers:
            r.start(delay=max(0.0, start - pylsl.local_clock()))
        self.start_time = start

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else pylsl.local_clock() + timeout
        for r in self.replayers:
            left = None if deadline is None else max(0.0, deadline - pylsl.local_clock())
            if not r.join(left):
                return False
        return True

    @property
    def error(self) -> BaseException | None:
        return next((r.error for r in self.replayers if r.error is not None), None)

    def stop(self) -> None:
        for r in self.replayers:
            r.stop()

    def __enter__(self) -> ReplayGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["GroupMember", "ReplayGroup", "session_tag"]
