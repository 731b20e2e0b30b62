"""Recorded sessions -> LSL outlets that look exactly like a live setup.

Each role gets one outlet with the live defaults (name, type, stable source_id from
:func:`~emorecog_stream.adapters.lsl_info.stream_identity`, channel labels/units and
participant/TR/atlas in ``desc``), whatever the recording called its streams: an engine
configured for the live lab finds a replay without any change.

Timing: one scheduler thread merges every stream (and the markers) in time order. A sample
recorded at ``t`` gets the explicit LSL timestamp ``start + (t - t0) / speed`` and is pushed at
that moment on the local LSL clock, so timestamps and arrival agree as they would live (samples
are never "from the future"). High-rate streams go out in small chunks (one push per
``chunk_seconds`` of wall time, pushed when their last sample is due), the way acquisition
drivers deliver them. With ``speed != 1`` the nominal rates and the ``tr`` in ``desc`` are
scaled too (``replay_speed`` in ``desc`` says by how much), so every stream stays
self-consistent. Several sessions play back to back; ``loop=True`` starts over with timestamps
that keep increasing (one TR of spacing between passes).

:meth:`Replayer.drop_stream` destroys one outlet for a while and re-creates it with the same
source_id, which is how tests make "PPG vanishes for 20 s then returns" happen for real.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pylsl

from emorecog_stream.adapters.lsl_info import (
    OutletDescription,
    default_labels,
    default_units,
    stream_identity,
)
from emorecog_stream.core.streams import Role
from emorecog_stream.recordings.session import Session, SignalStream

_ROLE_ORDER = {Role.FMRI: 0, Role.PPG: 1, Role.RESP: 2, Role.RATES: 3, Role.MARKERS: 4}


class ReplayError(ValueError):
    """Sessions that cannot be replayed together (naming the session, role, expected, found)."""


@dataclass(frozen=True)
class _Plan:
    """One session's pushes, precomputed: event i pushes samples [begin[i], end[i]) of role[i]."""

    participant: str
    t0: float  # recording time of the session's first sample
    span: float  # wall seconds this session occupies (last sample + one period)
    rel: dict[Role, np.ndarray]  # per-sample wall offset from the session start (s)
    data: dict[Role, np.ndarray | list[str]]
    due: np.ndarray  # wall offset of each push (its last sample)
    role: np.ndarray  # index into _ROLES
    begin: np.ndarray
    end: np.ndarray


_ROLES = list(Role)


@dataclass
class ReplayProgress:
    """Where the replay is (for the progress bar and for tests)."""

    session_index: int = 0
    n_sessions: int = 0
    participant: str = ""
    loop_index: int = 0
    position: float = 0.0  # wall seconds into the current session
    session_span: float = 0.0
    pushed: dict[Role, int] = field(default_factory=dict)
    dropped: dict[Role, int] = field(default_factory=dict)  # samples not sent while dropped
    late_pushes: int = 0  # pushes more than 5 ms after their due time
    max_late: float = 0.0  # seconds
    finished: bool = False


def _session_span(session: Session, t0: float) -> float:
    ends = [float(s.timestamps[-1]) for s in session.streams if len(s)]
    ends += [m.timestamp for m in session.markers]
    return max(ends, default=t0) - t0 + session.tr


def _chunk_bounds(rel: np.ndarray, chunk_seconds: float, per_sample: bool) -> np.ndarray:
    """Start indices of chunks: samples whose due times share one ``chunk_seconds`` bin."""
    n = rel.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if per_sample or chunk_seconds <= 0:
        return np.arange(n, dtype=np.int64)
    bins = np.floor(rel / chunk_seconds).astype(np.int64)
    return np.concatenate(([0], np.flatnonzero(np.diff(bins)) + 1)).astype(np.int64)


class Replayer:
    """Play sessions as LSL streams. Thread-based, usable in-process (``demo`` runs it in a
    thread) and from the ``replay`` command.

    ``tag`` is appended to every name and source_id (see
    :meth:`~emorecog_stream.adapters.lsl_inlet.InletSpec.for_role`); ``names`` and
    ``source_ids`` override single roles. ``roles`` limits which roles are replayed
    (default: all present, markers included when the sessions have any). ``require_fmri``:
    a replay without the fMRI role is a mistake, except beside the scanner bridge, which
    makes the fMRI stream itself (``demo --scanner``).
    """

    def __init__(
        self,
        sessions: Sequence[Session] | Session,
        *,
        speed: float = 1.0,
        loop: bool = False,
        tag: str = "",
        chunk_seconds: float = 0.02,
        names: Mapping[Role, str] | None = None,
        source_ids: Mapping[Role, str] | None = None,
        roles: Iterable[Role] | None = None,
        require_fmri: bool = True,
    ) -> None:
        if isinstance(sessions, Session):
            sessions = [sessions]
        if not sessions:
            raise ReplayError("nothing to replay: no sessions given")
        if not speed > 0:
            raise ReplayError(f"speed must be > 0, got {speed}")
        self.sessions = list(sessions)
        self.speed = float(speed)
        self.loop = loop
        self.chunk_seconds = chunk_seconds
        wanted = set(roles) if roles is not None else set(Role)
        self.descriptions = self._describe(tag, names or {}, source_ids or {}, wanted)
        if require_fmri and Role.FMRI not in self.descriptions:
            raise ReplayError("nothing to replay: the fMRI role is not selected")
        self._plans = [self._plan(s) for s in self.sessions]
        self._outlets: dict[Role, pylsl.StreamOutlet | None] = {}
        self._dropped_until: dict[Role, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = ReplayProgress(n_sessions=len(self.sessions))
        self.start_time: float | None = None
        self.error: BaseException | None = None

    # -- description and planning --------------------------------------------------------

    def _describe(
        self,
        tag: str,
        names: Mapping[Role, str],
        source_ids: Mapping[Role, str],
        wanted: set[Role],
    ) -> dict[Role, OutletDescription]:
        first: dict[Role, tuple[Session, SignalStream | None]] = {}
        for session in self.sessions:
            present: list[tuple[Role, SignalStream | None]] = [(s.role, s) for s in session.streams]
            if session.markers:
                present.append((Role.MARKERS, None))
            for role, stream in present:
                if role not in wanted:
                    continue
                if role not in first:
                    first[role] = (session, stream)
                    continue
                ref_session, ref = first[role]
                if stream is None or ref is None:
                    continue
                if stream.n_channels != ref.n_channels:
                    raise ReplayError(
                        f"session {session.participant!r} {role.value}: expected"
                        f" {ref.n_channels} channels (as in session {ref_session.participant!r}),"
                        f" found {stream.n_channels}"
                    )
                if not np.isclose(stream.nominal_srate, ref.nominal_srate):
                    raise ReplayError(
                        f"session {session.participant!r} {role.value}: expected a nominal rate"
                        f" of {ref.nominal_srate:g} Hz (as in session"
                        f" {ref_session.participant!r}), found {stream.nominal_srate:g} Hz"
                    )
        participants = list(dict.fromkeys(s.participant for s in self.sessions))
        descriptions: dict[Role, OutletDescription] = {}
        for role, (session, stream) in sorted(first.items(), key=lambda kv: _ROLE_ORDER[kv[0]]):
            name, type_, source_id = stream_identity(role, tag)
            n_ch = 1 if stream is None else stream.n_channels
            labels = tuple(stream.channel_labels) if stream is not None else ()
            units = tuple(stream.units) if stream is not None else ()
            if len(labels) != n_ch:
                labels = default_labels(role, n_ch)
            if len(units) != n_ch:
                units = default_units(role, n_ch)
            srate = 0.0 if stream is None else float(stream.nominal_srate) * self.speed
            descriptions[role] = OutletDescription(
                role=role,
                name=names.get(role, name),
                type=type_,
                source_id=source_ids.get(role, source_id),
                channel_count=n_ch,
                nominal_srate=srate,
                channel_labels=labels,
                units=units,
                participant=",".join(participants),
                tr=session.tr / self.speed,
                atlas=session.atlas if role is Role.FMRI else "",
                extra={"replay_speed": repr(self.speed), "source": "emorecog-stream replay"},
            )
        return descriptions

    def _plan(self, session: Session) -> _Plan:
        starts = [float(s.timestamps[0]) for s in session.streams if len(s)]
        starts += [m.timestamp for m in session.markers]
        t0 = min(starts, default=0.0)
        rel: dict[Role, np.ndarray] = {}
        data: dict[Role, np.ndarray | list[str]] = {}
        dues, roles, begins, ends = [], [], [], []
        sources: list[tuple[Role, np.ndarray, np.ndarray | list[str], bool]] = []
        for stream in session.streams:
            if stream.role not in self.descriptions:
                continue
            order = np.argsort(stream.timestamps, kind="stable")
            values = np.ascontiguousarray(stream.data[order], dtype=np.float32)
            per_sample = stream.nominal_srate * self.speed * self.chunk_seconds <= 1.0
            sources.append((stream.role, stream.timestamps[order], values, per_sample))
        if session.markers and Role.MARKERS in self.descriptions:
            markers = sorted(session.markers, key=lambda m: m.timestamp)
            ts = np.array([m.timestamp for m in markers], dtype=np.float64)
            sources.append((Role.MARKERS, ts, [m.text for m in markers], True))
        for role, ts, values, per_sample in sources:
            r = (ts - t0) / self.speed
            rel[role] = r
            data[role] = values
            b = _chunk_bounds(r, self.chunk_seconds, per_sample)
            e = np.append(b[1:], r.shape[0]).astype(np.int64)
            dues.append(r[e - 1] if len(b) else np.zeros(0))
            roles.append(np.full(len(b), _ROLES.index(role), dtype=np.int64))
            begins.append(b)
            ends.append(e)
        due = np.concatenate(dues) if dues else np.zeros(0)
        role_idx = np.concatenate(roles) if roles else np.zeros(0, dtype=np.int64)
        order = np.lexsort((np.array([_ROLE_ORDER[_ROLES[i]] for i in role_idx]), due))
        return _Plan(
            participant=session.participant,
            t0=t0,
            span=_session_span(session, t0) / self.speed,
            rel=rel,
            data=data,
            due=due[order],
            role=role_idx[order],
            begin=(np.concatenate(begins) if begins else np.zeros(0, dtype=np.int64))[order],
            end=(np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64))[order],
        )

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Create the outlets (visible to resolvers) without pushing anything yet."""
        with self._lock:
            for role, desc in self.descriptions.items():
                if self._outlets.get(role) is None and role not in self._dropped_until:
                    self._outlets[role] = pylsl.StreamOutlet(desc.stream_info())

    def wait_for_consumers(self, roles: Iterable[Role] | None = None, timeout: float = 5.0) -> bool:
        """Block until every outlet in ``roles`` (default all) has an inlet; False on timeout."""
        self.open()
        deadline = pylsl.local_clock() + timeout
        for role in roles if roles is not None else list(self.descriptions):
            outlet = self._outlets.get(role)
            if outlet is None:
                return False
            if not outlet.wait_for_consumers(max(0.0, deadline - pylsl.local_clock())):
                return False
        return True

    def start(self, delay: float = 0.0) -> None:
        """Open the outlets and start pushing; the first sample is due ``delay`` s from now."""
        if self._thread is not None:
            raise RuntimeError("Replayer already started")
        self.open()
        self.start_time = pylsl.local_clock() + delay
        self._thread = threading.Thread(target=self._run, name="lsl-replay", daemon=True)
        self._thread.start()

    def timestamp_of(self, t: float, session: int = 0, loop: int = 0) -> float:
        """The LSL timestamp a sample recorded at ``t`` in ``sessions[session]`` gets."""
        if self.start_time is None:
            raise RuntimeError("Replayer not started")
        base = loop * self.duration + sum(p.span for p in self._plans[:session])
        return self.start_time + base + (t - self._plans[session].t0) / self.speed

    def pushes(self, session: int = 0) -> Iterator[tuple[float, Role, Any, np.ndarray]]:
        """``sessions[session]``'s pushes in the order the scheduler makes them, without LSL:
        ``(due, role, values, timestamps)`` with times in seconds from the session's start
        (speed applied). ``rerun`` feeds the engine exactly these chunks."""
        plan = self._plans[session]
        for due, role_i, b, e in zip(
            plan.due.tolist(), plan.role.tolist(), plan.begin.tolist(), plan.end.tolist(),
            strict=True,
        ):  # fmt: skip
            role = _ROLES[role_i]
            yield due, role, plan.data[role][b:e], plan.rel[role][b:e]

    def recording_time(self, session: int = 0) -> float:
        """The recording time of ``sessions[session]``'s first sample (its offset 0)."""
        return self._plans[session].t0

    @property
    def duration(self) -> float:
        """Wall seconds one pass over all sessions takes."""
        return sum(p.span for p in self._plans)

    @property
    def session_spans(self) -> list[float]:
        """Wall seconds each session takes, in play order."""
        return [p.span for p in self._plans]

    def progress(self) -> ReplayProgress:
        with self._lock:
            p = self._progress
            return ReplayProgress(
                session_index=p.session_index,
                n_sessions=p.n_sessions,
                participant=p.participant,
                loop_index=p.loop_index,
                position=p.position,
                session_span=p.session_span,
                pushed=dict(p.pushed),
                dropped=dict(p.dropped),
                late_pushes=p.late_pushes,
                max_late=p.max_late,
                finished=p.finished,
            )

    def drop_stream(self, role: Role, for_seconds: float) -> None:
        """Make ``role``'s outlet vanish now and come back (same source_id) after ``for_seconds``.

        Samples due meanwhile are not sent (as when a device is unplugged); they are counted
        in ``progress().dropped``.
        """
        if role not in self.descriptions:
            raise KeyError(f"no {role.value} stream in this replay")
        with self._lock:
            outlet = self._outlets.pop(role, None)
            self._dropped_until[role] = pylsl.local_clock() + for_seconds
        del outlet  # destroying the outlet closes its connections: inlets see it go

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the end of the replay (never, with ``loop``, unless stopped)."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Stop pushing, join the thread and destroy the outlets (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self._outlets.clear()
        self._done.set()

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scheduler thread ----------------------------------------------------------------

    def _restore_due(self, now: float) -> float:
        """Re-create outlets whose drop has ended; return the next restore time (or inf)."""
        next_restore = float("inf")
        for role, until in list(self._dropped_until.items()):
            if now >= until:
                with self._lock:
                    self._outlets[role] = pylsl.StreamOutlet(self.descriptions[role].stream_info())
                    del self._dropped_until[role]
            else:
                next_restore = min(next_restore, until)
        return next_restore

    def _wait_until(self, due: float) -> bool:
        """Sleep until ``due`` (LSL clock), restoring dropped outlets on time; False if stopped."""
        while True:
            now = pylsl.local_clock()
            next_restore = self._restore_due(now) if self._dropped_until else float("inf")
            if now >= due:
                return not self._stop.is_set()
            if self._stop.wait(min(due, next_restore) - now):
                return False

    def _run(self) -> None:
        try:
            self._play()
        except BaseException as exc:  # surfaced via .error (the CLI prints it)
            self.error = exc
        finally:
            with self._lock:
                self._progress.finished = True
            self._done.set()

    def _play(self) -> None:
        assert self.start_time is not None
        base = self.start_time
        loop_index = 0
        while True:
            for index, plan in enumerate(self._plans):
                with self._lock:
                    p = self._progress
                    p.session_index, p.loop_index = index, loop_index
                    p.participant, p.session_span = plan.participant, plan.span
                if not self._play_session(plan, base):
                    return
                base += plan.span
            if not self.loop:
                return
            loop_index += 1

    def _play_session(self, plan: _Plan, base: float) -> bool:
        for due_rel, role_i, b, e in zip(
            plan.due.tolist(),
            plan.role.tolist(),
            plan.begin.tolist(),
            plan.end.tolist(),
            strict=True,
        ):
            due = base + due_rel
            if not self._wait_until(due):
                return False
            role = _ROLES[role_i]
            stamps = (base + plan.rel[role][b:e]).tolist()
            late = pylsl.local_clock() - due
            with self._lock:
                outlet = self._outlets.get(role)
                p = self._progress
                p.position = due_rel
                if outlet is None:
                    p.dropped[role] = p.dropped.get(role, 0) + (e - b)
                    continue
                values = plan.data[role]
                if role is Role.MARKERS:
                    for text, ts in zip(values[b:e], stamps, strict=True):
                        outlet.push_sample([text], ts)
                else:
                    assert isinstance(values, np.ndarray)
                    outlet.push_chunk(values[b:e], stamps)
                p.pushed[role] = p.pushed.get(role, 0) + (e - b)
                if late > 0.005:
                    p.late_pushes += 1
                p.max_late = max(p.max_late, late)
        return True


def replay_in_thread(sessions: Sequence[Session] | Session, **options: object) -> Replayer:
    """Start a :class:`Replayer` (``options`` as for its constructor) and return it running."""
    replayer = Replayer(sessions, **options)  # type: ignore[arg-type]
    replayer.start()
    return replayer


__all__ = ["ReplayError", "ReplayProgress", "Replayer", "replay_in_thread"]
