"""What the web pages show, kept in memory: per session, the latest status and the recent
predictions, physio and markers, plus counters for the health panel. No I/O.

Why in the server and not only in the browser: a page opened (or reloaded) in the middle of a
session must show the current state at once, with the plots already filled, and the retained
MQTT status arrives only once per subscription. So the bridge feeds every message here, and a
new browser gets :meth:`LiveState.snapshot` before the live events.

Each message is kept as the engine sent it (a parsed JSON object) plus ``received``, the
server's wall-clock time of arrival in seconds. The pages judge a prediction's age from
``received`` (and the server time sent with every heartbeat), not from the engine's ``utc``,
so a clock difference between the engine's computer and this one cannot make stale data look
live or live data look stale.

Duplicates (QoS 1 redelivers after a reconnect) are dropped by ``sequence``; a session whose
status turns ``offline`` or ``starting`` forgets the sequences it saw, because a restarted
engine counts from 0 again.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

KINDS = ("prediction", "physio", "status", "marker")
_SEEN_WINDOW = 4096


@dataclass
class SessionCounters:
    """Per-session message health for the experimenter page."""

    predictions: int = 0
    physio: int = 0
    markers: int = 0
    statuses: int = 0
    duplicates: int = 0
    gaps: int = 0  # sequences skipped (lost or dropped by a full engine queue)
    last_received: float | None = None  # server time of the last message of any kind

    def as_dict(self) -> dict[str, Any]:
        return {
            "predictions": self.predictions,
            "physio": self.physio,
            "markers": self.markers,
            "statuses": self.statuses,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
            "last_received": self.last_received,
        }


@dataclass
class SessionState:
    """One session's recent messages (bounded) and counters."""

    session: str
    history: int
    status: dict[str, Any] | None = None
    predictions: deque[dict[str, Any]] = field(init=False)
    physio: deque[dict[str, Any]] = field(init=False)
    markers: deque[dict[str, Any]] = field(init=False)
    counters: SessionCounters = field(default_factory=SessionCounters)
    _seen: dict[str, tuple[set[int], deque[int]]] = field(default_factory=dict)
    _last_sequence: int | None = None

    def __post_init__(self) -> None:
        self.predictions = deque(maxlen=self.history)
        self.physio = deque(maxlen=self.history)
        self.markers = deque(maxlen=max(64, self.history))

    def forget_sequences(self) -> None:
        self._seen.clear()
        self._last_sequence = None

    def is_new(self, kind: str, sequence: int) -> bool:
        seen, order = self._seen.setdefault(kind, (set(), deque()))
        if sequence in seen:
            return False
        seen.add(sequence)
        order.append(sequence)
        if len(order) > _SEEN_WINDOW:
            seen.discard(order.popleft())
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "status": self.status,
            "predictions": list(self.predictions),
            "physio": list(self.physio),
            "markers": list(self.markers),
            "counters": self.counters.as_dict(),
        }


@dataclass(frozen=True)
class Update:
    """One accepted message, ready to be pushed to the browsers."""

    kind: str
    session: str
    payload: dict[str, Any]
    received: float

    def event(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "session": self.session,
            "received": self.received,
            "payload": self.payload,
        }


class MessageError(ValueError):
    """A message on our topics that is not what the engine publishes (says what and why)."""


class LiveState:
    """Every session seen on the broker; :meth:`accept` turns a raw MQTT message into an
    :class:`Update` (or None for a duplicate) and raises :class:`MessageError` for junk."""

    def __init__(self, history: int = 600, max_sessions: int = 256) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1 prediction, got {history}")
        self.history = int(history)
        self.max_sessions = int(max_sessions)
        self.sessions: dict[str, SessionState] = {}
        self.malformed = 0
        self.last_malformed: str | None = None

    def accept(self, topic: str, raw: bytes, received: float) -> Update | None:
        try:
            return self._accept(topic, raw, received)
        except MessageError as exc:
            self.malformed += 1
            self.last_malformed = str(exc)
            raise

    def _accept(self, topic: str, raw: bytes, received: float) -> Update | None:
        parts = topic.rsplit("/", 2)
        if len(parts) != 3 or parts[2] not in KINDS:
            raise MessageError(f"unexpected topic {topic!r}")
        topic_session, kind = parts[1], parts[2]
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"{topic}: not JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise MessageError(f"{topic}: expected a JSON object, got {type(payload).__name__}")
        session = payload.get("session")
        if session != topic_session:
            raise MessageError(
                f"{topic}: payload session {session!r} does not match the topic's"
                f" {topic_session!r}"
            )
        state = self.sessions.get(session)
        if state is None:
            if len(self.sessions) >= self.max_sessions:
                self._evict_one()
            state = self.sessions[session] = SessionState(session, self.history)
        counters = state.counters
        if kind in ("prediction", "physio"):
            sequence = payload.get("sequence")
            if isinstance(sequence, bool) or not isinstance(sequence, int):
                raise MessageError(f"{topic}: sequence must be an integer, got {sequence!r}")
            if kind == "prediction" and not isinstance(payload.get("probabilities"), dict):
                raise MessageError(f"{topic}: probabilities must be an object")
            if not state.is_new(kind, sequence):
                counters.duplicates += 1
                return None
            if kind == "prediction":
                last = state._last_sequence
                if last is not None and sequence > last + 1:
                    counters.gaps += sequence - last - 1
                if last is None or sequence > last:
                    state._last_sequence = sequence
                counters.predictions += 1
                state.predictions.append({"received": received, **payload})
            else:
                counters.physio += 1
                state.physio.append({"received": received, **payload})
        elif kind == "status":
            if not isinstance(payload.get("state"), str):
                raise MessageError(f"{topic}: status without a state")
            if payload["state"] in ("offline", "starting"):
                state.forget_sequences()
            counters.statuses += 1
            state.status = {"received": received, **payload}
        else:
            if not isinstance(payload.get("text"), str):
                raise MessageError(f"{topic}: marker without a text")
            counters.markers += 1
            state.markers.append({"received": received, **payload})
        counters.last_received = received
        return Update(kind, session, payload, received)

    def _evict_one(self) -> None:
        """Make room: forget the session heard from least recently (offline ones first)."""

        def key(s: SessionState) -> tuple[int, float]:
            online = s.status is not None and s.status.get("state") != "offline"
            return (1 if online else 0, s.counters.last_received or 0.0)

        oldest = min(self.sessions.values(), key=key)
        del self.sessions[oldest.session]

    def snapshot(self, session: str | None = None) -> list[dict[str, Any]]:
        """Every session's state (or one session's, when ``session`` is given)."""
        if session is not None:
            state = self.sessions.get(session)
            return [] if state is None else [state.snapshot()]
        return [s.snapshot() for s in self.sessions.values()]

    def counters(self, session: str | None = None) -> dict[str, dict[str, Any]]:
        return {
            sid: s.counters.as_dict()
            for sid, s in self.sessions.items()
            if session is None or sid == session
        }
