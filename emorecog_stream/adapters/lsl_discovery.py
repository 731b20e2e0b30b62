"""Find the sessions on the network: which fMRI stream goes with which physiology streams.

``emorecog-stream run --sessions auto`` serves every session it finds. A *session* is one fMRI
stream plus the physiology streams (PPG, respiration, rates, markers, motion) that belong to
it. This module decides which streams belong together, and keeps one list of the visible
streams for the whole process.

How streams are paired (the rule, for lab users)
-------------------------------------------------

1. **Role by type.** A stream's LSL *type* says what it is: ``fMRI``, ``PPG``, ``Respiration``,
   ``PhysioRates``, ``Markers``, ``Motion`` by default (or the ``type`` configured in
   ``[streams.<role>]``), compared without regard to case. Streams of other types are ignored.

2. **Session key from the identity.** The identity of a stream is its ``source_id`` or, when
   that is empty, its ``name``. It is split into words at ``-``, ``_``, ``.``, ``:`` and
   spaces, and the words that name the stream's *own* role are removed:

   ======== ==========================================
   role     words removed (any case)
   ======== ==========================================
   fMRI     ``fmri``, ``bold``, ``roi``
   PPG      ``ppg``, ``pulse``
   resp     ``resp``, ``respiration``, ``breathing``
   rates    ``rates``
   markers  ``markers``, ``marker``, ``events``
   motion   ``motion``
   ======== ==========================================

   What is left, joined with ``-``, is the *session key* (case is kept, and matters). So
   ``scanner1_fmri`` and ``scanner1_ppg`` share the key ``scanner1``; ``Scanner1-PPG`` does
   not (capital ``S``). Our own streams (``emorecog-stream-<role>-<tag>``, as
   ``replay --tag`` and ``replay --copies`` make them; names ``EmoRecog-<Role>-<tag>`` when
   there is no source id) only lose the role word after the ``emorecog[-stream]`` prefix, and
   their tag is kept as written, so any tag works, even one such as ``resp-pilot``.

3. **Same computer.** Streams pair only when they also come from the same *hostname* (the
   computer the LSL outlet runs on). Physiology recorded on another computer than the one
   sending the fMRI stream is not paired automatically: list such sessions in a sessions file
   (``run --sessions FILE``) instead.

4. **One session per fMRI stream.** Each fMRI stream starts a session; the other streams with
   its (hostname, key) join it. A physiology stream without an fMRI stream is simply waiting
   (its scanner may not have started yet); it is not an error.

5. **Session id** (the MQTT topic level and log file name): the key without a leading
   ``emorecog-stream`` or ``emorecog``, so ``emorecog-stream-fmri-P15`` gives ``P15`` and our
   untagged default streams give ``default``. Characters that cannot go into a topic level or
   a file name become ``-``. If another computer already has a session with that id, the new
   one gets ``<id>-<hostname>``. An id, once given, stays with its (hostname, key) for as long
   as the hub runs, even while the streams are briefly gone.

Ambiguity is reported, never guessed: two fMRI streams with the same hostname and key form no
session at all (which one would the predictions be about?), and two streams of one physiology
role for one session mean the session runs without that role. Each case is one sentence in
:attr:`DiscoveryResult.problems` naming the streams; give each scanner's streams their own
source id (e.g. ``scanner2_fmri``, ``scanner2_ppg``) to resolve it.

Why one resolver
----------------

Every LSL resolve sends multicast/broadcast queries that every outlet on the network answers.
A hub serving 32 sessions with 5 inlets each, every inlet resolving in its own loop, would
send hundreds of queries a second and make every outlet answer each of them.
:class:`StreamDirectory` runs one ``pylsl.ContinuousResolver`` for the whole process (a few
queries a second, whatever the number of sessions) and hands out the ``StreamInfo`` each
sighting came with, so an inlet opens on exactly that stream without resolving again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pylsl

from emorecog_stream.core.streams import DEFAULT_LSL_TYPE, Role
from emorecog_stream.sinks.payload import MAX_SESSION_ID_LENGTH, validate_session_id

log = logging.getLogger(__name__)

ROLE_WORDS: dict[Role, frozenset[str]] = {
    Role.FMRI: frozenset({"fmri", "bold", "roi"}),
    Role.PPG: frozenset({"ppg", "pulse"}),
    Role.RESP: frozenset({"resp", "respiration", "breathing"}),
    Role.RATES: frozenset({"rates"}),
    Role.MARKERS: frozenset({"markers", "marker", "events"}),
    Role.MOTION: frozenset({"motion"}),
}
"""Words (lower case) that name a role inside a source id or name; see the module docstring."""

DEFAULT_SESSION_ID = "default"
"""Session id of streams whose key is empty (our untagged default streams)."""

_SEPARATORS = "-_.: "
_SPLIT = re.compile(f"[{re.escape(_SEPARATORS)}]+")
_SEP = f"[{re.escape(_SEPARATORS)}]"
_OURS = re.compile(
    rf"^(?P<prefix>emorecog(?:{_SEP}stream)?){_SEP}(?P<role>[^{re.escape(_SEPARATORS)}]+)"
    rf"(?:{_SEP}(?P<tag>.+))?$",
    re.IGNORECASE | re.DOTALL,
)
_OUR_PREFIX = re.compile(rf"^emorecog(?:{_SEP}stream)?(?:{_SEP}+|$)", re.IGNORECASE)
_UNSAFE = re.compile(r"[^\w.\-]+")


# ---------------------------------------------------------------------------------------------
# sightings and the pure pairing rule


@dataclass(frozen=True)
class StreamSighting:
    """One visible stream's core fields, plus the ``StreamInfo`` it was seen with.

    ``info`` is kept so the hub can open an inlet on exactly this stream (no second resolve);
    it takes no part in equality.
    """

    name: str
    type: str
    source_id: str
    hostname: str
    uid: str
    channel_count: int
    nominal_srate: float
    info: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_info(cls, info: pylsl.StreamInfo) -> StreamSighting:
        return cls(
            name=info.name(),
            type=info.type(),
            source_id=info.source_id(),
            hostname=info.hostname(),
            uid=info.uid(),
            channel_count=info.channel_count(),
            nominal_srate=info.nominal_srate(),
            info=info,
        )

    @property
    def identity(self) -> str:
        """What the pairing rule reads: the source id, or the name when there is none."""
        return self.source_id or self.name

    def describe(self) -> str:
        return f"name={self.name!r} source_id={self.source_id!r} uid={self.uid!r}"


def _words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text) if w]


def role_of(s: StreamSighting, types: Mapping[Role, str] = DEFAULT_LSL_TYPE) -> Role | None:
    """The role of a stream by its LSL type (any case); None for types we do not use.

    ``types`` are the configured types; roles missing there keep their default type. If
    several roles share one type, the role word in the identity decides (None if it cannot).
    """
    wanted = {**DEFAULT_LSL_TYPE, **types}
    found = s.type.casefold()
    candidates = [r for r in Role if wanted[r] and wanted[r].casefold() == found]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    words = {w.casefold() for w in _words(s.identity)}
    named = [r for r in candidates if ROLE_WORDS[r] & words]
    return named[0] if len(named) == 1 else None


def session_key(s: StreamSighting, role: Role) -> str:
    """The key a stream pairs by: its identity without the words of its own role.

    Our own naming (``emorecog[-stream]-<role word>-<tag>``) keeps the tag as written.
    """
    identity = s.identity
    ours = _OURS.match(identity)
    if ours and ours["role"].casefold() in ROLE_WORDS[role]:
        prefix = "-".join(_words(ours["prefix"]))
        return f"{prefix}-{ours['tag']}" if ours["tag"] else prefix
    own = ROLE_WORDS[role]
    return "-".join(w for w in _words(identity) if w.casefold() not in own)


def _sanitise(text: str) -> str:
    safe = _UNSAFE.sub("-", text).strip("-")[:MAX_SESSION_ID_LENGTH].strip("-")
    return validate_session_id(safe or DEFAULT_SESSION_ID)


def session_id_for(key: str, hostname: str | None = None) -> str:
    """The session id of a key: without a leading ``emorecog[-stream]``, ``default`` if empty,
    ``<id>-<hostname>`` when ``hostname`` is given (how a collision between hosts is broken);
    always a valid MQTT topic level and file name (other characters become ``-``)."""
    base = _OUR_PREFIX.sub("", key, count=1) or DEFAULT_SESSION_ID
    base = _sanitise(base)
    return _sanitise(f"{base}-{hostname}") if hostname else base


@dataclass(frozen=True)
class DiscoveredSession:
    """One session: an fMRI stream and the physiology streams that joined it."""

    id: str
    hostname: str
    key: str
    streams: dict[Role, StreamSighting]

    @property
    def place(self) -> tuple[str, str]:
        """(hostname, key): what identifies the session across discoveries."""
        return (self.hostname, self.key)


@dataclass
class DiscoveryResult:
    """Sessions by id, and one sentence per ambiguity found (in a repeatable order)."""

    sessions: dict[str, DiscoveredSession] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def assignments(self) -> dict[tuple[str, str], str]:
        """(hostname, key) -> id of these sessions: merge into the next call's ``assigned``."""
        return {s.place: s.id for s in self.sessions.values()}


Place = tuple[str, str]


def _included(s: StreamSighting, include: str | None) -> bool:
    if include is None:
        return True
    return any(fnmatch.fnmatchcase(text, include) for text in (s.source_id, s.name) if text)


def _by_place(
    sightings: Iterable[StreamSighting], types: Mapping[Role, str]
) -> dict[Place, dict[Role, list[StreamSighting]]]:
    places: dict[Place, dict[Role, list[StreamSighting]]] = {}
    seen: set[str] = set()
    for s in sightings:
        if s.uid in seen:
            continue  # the same stream reported twice is one stream
        seen.add(s.uid)
        role = role_of(s, types)
        if role is None:
            continue
        place = (s.hostname, session_key(s, role))
        places.setdefault(place, {}).setdefault(role, []).append(s)
    return places


def _listing(found: Sequence[StreamSighting]) -> str:
    return "; ".join(s.describe() for s in sorted(found, key=lambda s: (s.name, s.uid)))


def _assign_ids(places: Sequence[Place], assigned: Mapping[Place, str]) -> dict[Place, str]:
    """Ids for ``places``: earlier ids kept; new ones avoid every id given before."""
    reserved = set(assigned.values())
    ids: dict[Place, str] = {}
    taken: set[str] = set()
    for place in places:
        given = assigned.get(place)
        if given is not None and given not in taken:
            ids[place] = given
            taken.add(given)
    for hostname, key in places:
        if (hostname, key) in ids:
            continue
        plain, qualified = session_id_for(key), session_id_for(key, hostname)
        candidates = [plain, qualified]
        candidates += [f"{qualified[: MAX_SESSION_ID_LENGTH - 8]}-{n}" for n in range(2, 10_000)]
        chosen = next(c for c in candidates if c not in taken and c not in reserved)
        ids[(hostname, key)] = chosen
        taken.add(chosen)
    return ids


def group_sessions(
    sightings: Iterable[StreamSighting],
    types: Mapping[Role, str] = DEFAULT_LSL_TYPE,
    *,
    include: str | None = None,
    assigned: Mapping[tuple[str, str], str] | None = None,
) -> DiscoveryResult:
    """Sessions from visible streams by the module's rule (pure: no I/O).

    ``include``: a glob (``fnmatch``, case-sensitive) an fMRI stream's source id or name must
    match to start a session. ``assigned``: (hostname, key) -> id from earlier calls, kept so a
    session's MQTT topics do not move when streams come and go.
    """
    places = _by_place(sightings, types)
    problems: list[str] = []
    formed: dict[Place, dict[Role, StreamSighting]] = {}
    doubled: dict[Place, dict[Role, list[StreamSighting]]] = {}
    for place in sorted(places):
        roles = places[place]
        fmri = [s for s in roles.get(Role.FMRI, []) if _included(s, include)]
        if len(fmri) > 1:
            problems.append(
                f"{len(fmri)} fMRI streams on host {place[0]!r} share the session key"
                f" {place[1]!r} ({_listing(fmri)}); no session is formed while they do:"
                " give each scanner's streams their own source id"
            )
        if len(fmri) != 1:
            continue
        formed[place] = {r: found[0] for r, found in roles.items() if len(found) == 1}
        formed[place][Role.FMRI] = fmri[0]
        doubled[place] = {r: f for r, f in roles.items() if len(f) > 1 and r is not Role.FMRI}
    ids = _assign_ids(list(formed), assigned or {})
    result = DiscoveryResult(problems=problems)
    for place, streams in formed.items():
        sid = ids[place]
        result.sessions[sid] = DiscoveredSession(sid, place[0], place[1], streams)
        for role, found in sorted(doubled[place].items(), key=lambda kv: kv[0].value):
            problems.append(
                f"session {sid!r} (host {place[0]!r}): {len(found)} {role.value} streams match"
                f" ({_listing(found)}); none is taken until only one is left"
            )
    return result


# ---------------------------------------------------------------------------------------------
# the process-wide resolver


class StreamDirectory:
    """The streams visible on the network, kept fresh by ONE background resolver.

    A daemon thread holds a ``pylsl.ContinuousResolver`` and copies its results every
    ``period`` seconds; a stream gone for ``forget_after`` seconds drops out. ``generation``
    increases whenever the set of visible stream uids changes, so a caller re-groups only
    then (:meth:`wait_change` from an event loop).
    """

    def __init__(self, *, forget_after: float = 5.0, period: float = 0.5) -> None:
        if forget_after <= 0 or period <= 0:
            raise ValueError(
                f"forget_after and period must be > 0 s, got {forget_after} and {period}"
            )
        self.forget_after = forget_after
        self.period = period
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sightings: list[StreamSighting] = []
        self._uids: frozenset[str] = frozenset()
        self._generation = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        self._resolver: pylsl.ContinuousResolver | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> StreamDirectory:
        """Create the resolver (errors raise here, not in the thread) and start refreshing."""
        if self._thread is not None:
            return self
        self._resolver = pylsl.ContinuousResolver(forget_after=self.forget_after)
        self._thread = threading.Thread(target=self._run, name="lsl-discovery", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (joined), drop the resolver, wake every waiter."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._resolver = None
        self._wake_waiters()

    def __enter__(self) -> StreamDirectory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    # reading ---------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def snapshot(self) -> list[StreamSighting]:
        """The streams visible at the last refresh (a copy, sorted by host, name, uid)."""
        with self._lock:
            return list(self._sightings)

    async def wait_change(self, after_generation: int, timeout: float | None = None) -> int:
        """Wait until ``generation`` differs from ``after_generation`` (or ``timeout`` s pass,
        or the directory closes); returns the generation then. Costs nothing while waiting:
        the thread wakes the loop with ``call_soon_threadsafe``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if self._generation != after_generation or self.closed:
                return self._generation
            self._waiters.append(entry)
        try:
            await asyncio.wait({future}, timeout=timeout)
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return self.generation

    # the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._refresh()
            except Exception:  # a liblsl hiccup must not end discovery for the whole hub
                log.exception("LSL discovery: reading the resolver failed; trying again")
            self._stop.wait(self.period)

    def _refresh(self) -> None:
        resolver = self._resolver
        if resolver is None:
            return
        # one call per stream for its uid; the other fields only for a stream not seen before
        # (reading every field of 200 streams twice a second was a fifth of a busy hub's time)
        known = {s.uid: s for s in self._sightings}
        sightings = []
        for info in resolver.results():
            uid = info.uid()
            sightings.append(known.get(uid) or StreamSighting.from_info(info))
        uids = frozenset(s.uid for s in sightings)
        if uids == self._uids:
            return
        sightings.sort(key=lambda s: (s.hostname, s.name, s.uid))
        with self._lock:
            self._sightings = sightings
            changed = uids != self._uids
            if changed:
                self._uids = uids
                self._generation += 1
        if changed:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve_future, future)


def _resolve_future(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = [
    "DEFAULT_SESSION_ID",
    "ROLE_WORDS",
    "DiscoveredSession",
    "DiscoveryResult",
    "StreamDirectory",
    "StreamSighting",
    "group_sessions",
    "role_of",
    "session_id_for",
    "session_key",
]
