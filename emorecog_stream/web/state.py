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

Sessions served by a hub (``run --sessions``) share its one MQTT connection, so the Last Will
is the hub's: ``<prefix>/_hubs/<hub id>/status`` turns ``offline`` when the hub dies, while its
sessions' own retained statuses still say what they said last. :class:`HubWatch` combines the
two: a session whose last status names a hub (``details.hub``) whose latest status is
``offline`` is shown ``offline`` with the reason ``hub <id> offline: <hub reason>``, as a
status derived from its own and marked ``"derived_from_hub": true``. It stays so until the
session publishes a status of its own again while its hub is not offline. A session that had
already published its own ``offline`` (a clean stop) keeps it.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

KINDS = ("prediction", "physio", "status", "marker")
#: The reserved topic level of hubs' statuses, ``<prefix>/_hubs/<hub id>/status`` (the same as
#: :data:`emorecog_stream.engine.hub.HUBS_LEVEL`; not imported, to keep this module light).
HUBS_LEVEL = "_hubs"
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
    status: dict[str, Any] | None = None  # what the pages show (derived from a dead hub's)
    own_status: dict[str, Any] | None = None  # the last status the session itself published
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


def hub_of(status: dict[str, Any]) -> str | None:
    """The hub a session's status names (``details.hub``), or None."""
    details = status.get("details")
    hub = details.get("hub") if isinstance(details, dict) else None
    return hub if isinstance(hub, str) and hub else None


def split_topic(topic: str, prefix: str | None = None) -> tuple[str, str, str]:
    """``("hub", hub id, "status")`` or ``("session", session id, kind)``; MessageError else.

    With ``prefix`` the topic must be under it; without, the levels are read from the end
    (``.../_hubs/<id>/status`` is a hub's, ``.../<session>/<kind>`` a session's). ``_hubs`` is
    never a session.
    """
    levels = topic.split("/")
    if prefix is not None:
        head = prefix.split("/")
        if levels[: len(head)] != head:
            raise MessageError(f"unexpected topic {topic!r} (not under {prefix!r})")
        rest = levels[len(head) :]
    elif len(levels) >= 4 and levels[-3] == HUBS_LEVEL:
        rest = levels[-3:]
    else:
        rest = levels[-2:] if len(levels) >= 3 else []
    if len(rest) == 3 and rest[0] == HUBS_LEVEL and rest[2] == "status" and rest[1]:
        return ("hub", rest[1], "status")
    if len(rest) == 2 and rest[1] in KINDS and rest[0] and rest[0] != HUBS_LEVEL:
        return ("session", rest[0], rest[1])
    raise MessageError(f"unexpected topic {topic!r}")


def check_hub_status(topic: str, payload: Any, hub: str) -> dict[str, Any]:
    """``payload`` if it is a hub's status for ``hub`` (raises MessageError otherwise)."""
    if not isinstance(payload, dict):
        raise MessageError(f"{topic}: expected a JSON object, got {type(payload).__name__}")
    if payload.get("hub") != hub:
        raise MessageError(
            f"{topic}: payload hub {payload.get('hub')!r} does not match the topic's {hub!r}"
        )
    if not isinstance(payload.get("state"), str):
        raise MessageError(f"{topic}: hub status without a state")
    return payload


class HubWatch:
    """Which sessions died with their hub: the hubs' latest statuses, the sessions' own
    statuses that name a hub, and the derived ``offline`` in effect per session. No I/O; used
    by :class:`LiveState` (the web pages) and by ``listen``."""

    def __init__(self, max_hubs: int = 1024) -> None:
        self.max_hubs = int(max_hubs)
        self.hubs: dict[str, dict[str, Any]] = {}  # hub id -> its latest status
        self._own: dict[str, dict[str, Any]] = {}  # session -> its last status naming a hub
        self._down: dict[str, dict[str, Any]] = {}  # session -> the derived offline shown

    @staticmethod
    def derive(own: dict[str, Any], hub_status: dict[str, Any]) -> dict[str, Any]:
        """The session's status as shown while its hub is offline."""
        hub = hub_status.get("hub")
        reason = str(hub_status.get("reason") or "no reason given")
        out = {key: value for key, value in own.items() if key != "received"}
        out.update(
            state="offline",
            reason=f"hub {hub} offline: {reason}",
            utc=hub_status.get("utc", own.get("utc")),
            derived_from_hub=True,
        )
        return out

    def session_status(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Note a session's own status; returns the status to show (derived when its hub is
        offline and the session had not said ``offline`` itself)."""
        session = str(payload.get("session"))
        hub = hub_of(payload)
        if hub is None:
            self.forget(session)
            return payload
        self._own[session] = payload
        latest = self.hubs.get(hub)
        if (
            latest is not None
            and latest.get("state") == "offline"
            and payload.get("state") != "offline"
        ):
            derived = self._down[session] = self.derive(payload, latest)
            return derived
        self._down.pop(session, None)
        return payload

    def hub_status(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Note a hub's status; when ``offline``, the derived status of each session whose
        last status names this hub and is not ``offline`` (once: not again for a redelivered
        copy of the same hub status)."""
        hub = str(payload.get("hub"))
        self.hubs.pop(hub, None)
        self.hubs[hub] = payload
        while len(self.hubs) > self.max_hubs:
            del self.hubs[next(iter(self.hubs))]
        if payload.get("state") != "offline":
            return []  # a hub back online: its sessions' own next statuses are shown
        out: list[dict[str, Any]] = []
        for session, own in self._own.items():
            if hub_of(own) != hub or own.get("state") == "offline":
                continue
            derived = self.derive(own, payload)
            if self._down.get(session) == derived:
                continue
            self._down[session] = derived
            out.append(derived)
        return out

    def derived(self, session: str) -> dict[str, Any] | None:
        """The derived ``offline`` shown for ``session`` now, or None."""
        return self._down.get(session)

    def forget(self, session: str) -> None:
        self._own.pop(session, None)
        self._down.pop(session, None)


class LiveState:
    """Every session seen on the broker; :meth:`receive` turns a raw MQTT message into the
    :class:`Update` s to push (none for a duplicate; for a hub's ``offline``, one derived status
    per session of that hub) and raises :class:`MessageError` for junk. ``prefix``: the topic
    prefix (None: the levels are read from the topic's end)."""

    def __init__(
        self, history: int = 600, max_sessions: int = 256, prefix: str | None = None
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1 prediction, got {history}")
        self.history = int(history)
        self.max_sessions = int(max_sessions)
        self.prefix = prefix
        self.sessions: dict[str, SessionState] = {}
        self.hubs = HubWatch()
        self.malformed = 0
        self.last_malformed: str | None = None

    def accept(self, topic: str, raw: bytes, received: float) -> Update | None:
        """The message's own :class:`Update` (None for a duplicate or a hub's status); use
        :meth:`receive` to get the statuses a hub's ``offline`` derives for its sessions."""
        updates = self.receive(topic, raw, received)
        if not updates or split_topic(topic, self.prefix)[0] == "hub":
            return None
        return updates[0]

    def receive(self, topic: str, raw: bytes, received: float) -> list[Update]:
        """Every update a message makes: its own (none for a duplicate), or, for a hub's
        ``offline``, a derived ``offline`` status for each session that named the hub."""
        try:
            return self._receive(topic, raw, received)
        except MessageError as exc:
            self.malformed += 1
            self.last_malformed = str(exc)
            raise

    def _receive(self, topic: str, raw: bytes, received: float) -> list[Update]:
        what, name, kind = split_topic(topic, self.prefix)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"{topic}: not JSON ({exc})") from None
        if what == "hub":
            return self._hub(check_hub_status(topic, payload, name), received)
        update = self._accept(topic, name, kind, payload, received)
        return [] if update is None else [update]

    def _hub(self, payload: dict[str, Any], received: float) -> list[Update]:
        updates = []
        for derived in self.hubs.hub_status(payload):
            state = self.sessions.get(derived["session"])
            if state is None:
                continue
            state.forget_sequences()  # the hub's next run counts from 0 again
            state.status = {"received": received, **derived}
            updates.append(Update("status", state.session, derived, received))
        return updates

    def _accept(
        self, topic: str, topic_session: str, kind: str, payload: Any, received: float
    ) -> Update | None:
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
            shown = self.hubs.session_status(payload)
            if shown["state"] in ("offline", "starting"):
                state.forget_sequences()
            counters.statuses += 1
            state.own_status = {"received": received, **payload}
            state.status = {"received": received, **shown}
            counters.last_received = received
            return Update(kind, session, shown, received)
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
        self.hubs.forget(oldest.session)

    def hub_snapshot(self) -> dict[str, dict[str, Any]]:
        """Every hub's latest status, by hub id."""
        return dict(self.hubs.hubs)

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
