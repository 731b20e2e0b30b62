"""Many sessions in one process: one model, one resolver, one MQTT connection, batched steps.

Why: one ``run`` process per session holds a copy of the model, Python and numpy each
(~450 MB) while the engine's own work per session is ~1 % of a core at TR 1 s. A hub serves
every session of a centre or a replay farm from one process, and shares what can be shared:

* **One resolver.** A process-wide :class:`~emorecog_stream.adapters.lsl_discovery.
  StreamDirectory` sees every stream on the network; each session's inlets are opened on the
  streams it found (no resolve of their own). Per-inlet resolving (the first version) had every
  absent optional stream of every session query the network in a loop: at 32 sessions the
  queries alone kept the hub and the senders busy.
* **One MQTT connection.** Every session publishes through a
  :class:`~emorecog_stream.sinks.mqtt.SessionChannel` of one
  :class:`~emorecog_stream.sinks.mqtt.MqttPublisher`: one socket, one queue, one in-flight
  window. MQTT allows one Last Will per connection, so the will is the hub's: its retained
  status on ``<prefix>/_hubs/<hub id>/status`` goes ``offline`` if the process dies, and every
  session's status names its hub (``details.hub``), so a subscriber (``listen``, the web
  pages) knows which sessions died with it. A session that stops cleanly publishes its own
  ``offline``.
* **One model, batched steps.** One copy of the weights; each session has its own stepper
  state, and steps of sessions ready in the same turn of the event loop go through the network
  as one batch (:mod:`emorecog_stream.engine.batch`), equal to stepping each alone.

Each session is otherwise the single-session pipeline: its own
:class:`~emorecog_stream.engine.session.Engine` (aligner, status, GRU state, sequence numbers)
and JSONL log. A session whose stream is broken (wrong channel count: refused), whose input is
bad (NaN volumes: flagged), or whose engine raises ends or degrades alone; the others go on.

Which sessions: ``run --sessions FILE`` lists them (TOML; the file is read again when it
changes, so sessions can be added and removed while the hub runs)::

    [[session]]
    id = "scanner1"          # MQTT topics emorecog/scanner1/..., log <log_dir>/scanner1.jsonl
    tag = "scanner1"         # streams EmoRecog-fMRI-scanner1, source id emorecog-stream-fmri-...

``tag`` selects the session's streams the way ``replay --tag`` / ``replay --copies`` and the
scanner bridge name them (:func:`~emorecog_stream.adapters.lsl_info.stream_identity`).
``run --sessions auto`` serves every fMRI stream it finds, paired with physiology by the rule in
:mod:`emorecog_stream.adapters.lsl_discovery` (same host, same source id once the role word is
taken out); a session whose fMRI stream has been gone for ``linger`` seconds is stopped, and
starts again (same id, a new run in its log) if the stream comes back.

Several hubs on one broker split the sessions by giving each its own sessions file (or its own
``--include`` glob in auto mode); docs/hub.md says how a deployment grows past one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import tomllib

from emorecog_stream.config import Config, apply_overrides
from emorecog_stream.core.streams import DEFAULT_LSL_TYPE, Role

log = logging.getLogger(__name__)

#: ``run --sessions auto``
AUTO = "auto"
#: Seconds a new session waits for its physiology streams to become visible before it starts
#: without them (they join when they appear).
PHYSIO_GRACE_S = 2.0
#: Reserved topic level for hubs' own statuses: ``<prefix>/_hubs/<hub id>/status``.
HUBS_LEVEL = "_hubs"


class HubError(ValueError):
    """A sessions file that cannot be used (naming the file, the entry and what is wrong)."""


@dataclass(frozen=True)
class HubSession:
    """One session the hub serves: its id and the tag its streams carry."""

    id: str
    tag: str


@dataclass
class HubResult:
    """How one session ended: its engine's counters, or the error that ended it."""

    session_id: str
    counters: Any = None
    error: str | None = None


def load_sessions_file(path: str | Path) -> list[HubSession]:
    """``[[session]]`` entries with ``id`` and ``tag`` (default: the id); ids unique."""
    from emorecog_stream.sinks.payload import PayloadError, validate_session_id

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HubError(f"sessions file {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HubError(f"sessions file {str(path)!r}: not valid TOML: {exc}") from None
    entries = data.get("session")
    unknown = sorted(set(data) - {"session"})
    if unknown:
        raise HubError(f"sessions file {str(path)!r}: unknown key(s) {unknown}; expected"
                       " [[session]] tables")  # fmt: skip
    if not isinstance(entries, list) or not entries:
        raise HubError(f"sessions file {str(path)!r}: expected [[session]] tables, found none")
    sessions: list[HubSession] = []
    for i, entry in enumerate(entries, 1):
        where = f"sessions file {str(path)!r}, session {i}"
        if not isinstance(entry, dict):
            raise HubError(f"{where}: expected a table, found {type(entry).__name__}")
        extra = sorted(set(entry) - {"id", "tag"})
        if extra:
            raise HubError(f"{where}: unknown key(s) {extra}; valid: id, tag")
        sid = entry.get("id")
        tag = entry.get("tag", sid)
        if not isinstance(tag, str) or not tag:
            raise HubError(f"{where}: tag: expected a non-empty string, found {tag!r}")
        try:
            validate_session_id(sid)
        except PayloadError as exc:
            raise HubError(f"{where}: id: {exc}") from None
        if sid == HUBS_LEVEL:
            raise HubError(f"{where}: id: {HUBS_LEVEL!r} is reserved for the hubs' statuses")
        sessions.append(HubSession(str(sid), tag))
    ids = [s.id for s in sessions]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise HubError(f"sessions file {str(path)!r}: session id(s) {repeated} listed twice")
    return sessions


def session_config(base: Config, session: HubSession, log_dir: str | Path | None) -> Config:
    """``base`` with this session's id, stream selectors (by tag) and log path."""
    from emorecog_stream.adapters.lsl_info import stream_identity

    overrides: dict[str, Any] = {"session.id": session.id, "output.dashboard": False}
    for role in Role:
        name, _type, source_id = stream_identity(role, session.tag)
        overrides[f"streams.{role.value}.name"] = name
        overrides[f"streams.{role.value}.source_id"] = source_id
    if log_dir is not None:
        overrides["output.log"] = str(Path(log_dir) / f"{session.id}.jsonl")
    return apply_overrides(base, overrides)


def discovered_config(base: Config, found: Any, log_dir: str | Path | None) -> Config:
    """``base`` for a session found by ``--sessions auto``: its id, the exact streams found
    (name and source id per role; a role not found keeps no selector but its type, and is
    matched later by the same rule), and its log path."""
    overrides: dict[str, Any] = {"session.id": found.id, "output.dashboard": False}
    for role, sighting in found.streams.items():
        overrides[f"streams.{role.value}.name"] = sighting.name
        overrides[f"streams.{role.value}.source_id"] = sighting.source_id
    if log_dir is not None:
        overrides["output.log"] = str(Path(log_dir) / f"{found.id}.jsonl")
    return apply_overrides(base, overrides)


def default_hub_id() -> str:
    """``<hostname>-<pid>``: unique among the hubs on one broker, and says where it runs."""
    from emorecog_stream.sinks.payload import validate_session_id

    raw = f"{socket.gethostname()}-{os.getpid()}"
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)[:64]
    return validate_session_id(cleaned or f"hub-{uuid.uuid4().hex[:8]}")


def hub_status_payload(hub_id: str, state: str, reason: str, sessions: list[str]) -> dict:
    """The hub's retained status (and, ``offline``, its Last Will)."""
    from emorecog_stream.sinks.payload import SCHEMA_VERSION, utc_now

    return {
        "schema_version": SCHEMA_VERSION,
        "hub": hub_id,
        "state": state,
        "reason": reason,
        "utc": utc_now(),
        "sessions": sorted(sessions),
    }


#: Seconds a hub's physiology inlet lets samples gather between chunks while no volume waits.
PHYSIO_PACE_S = 0.5


class SessionInlets:
    """One session's inlets feeding one queue; streams are added as the directory finds them.

    Quacks like :class:`~emorecog_stream.adapters.lsl_inlet.InletGroup` where the runner's
    chunk loop needs it (``inlets``, async iteration).

    Why paced physiology: devices deliver PPG and respiration in small chunks (20 ms is
    common), so 64 sessions would hand the event loop ~6,400 chunks a second, each with its
    fixed cost. The physiology inlets instead let samples gather for up to
    :data:`PHYSIO_PACE_S` between chunks, except while a volume waits for them: the fMRI
    reader notes the newest volume's timestamp (:attr:`need_until`) and wakes them the moment
    it arrives, and each physiology reader hurries only until it has delivered a sample at or
    after that timestamp - all a step needs of it (the aligner's rule). The reader decides
    from the timestamps alone, not from how far the event loop has got: a loop that falls
    behind does not keep the physiology hurrying, which would feed it more, smaller chunks
    and keep it behind (the first version did: at 64 sessions a moment's stall became minutes).
    """

    def __init__(self, time_scale: float = 1.0) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.inlets: dict[Role, Any] = {}
        self.time_scale = time_scale  # a replay sped up: pacing in session seconds
        #: LSL timestamp of the newest volume received (-inf: none yet)
        self.need_until = -math.inf
        self._wakes: list[threading.Event] = []  # one per physiology reader
        self._closed = False

    def add(self, spec: Any, sighting: Any) -> Any:
        from emorecog_stream.adapters.lsl_inlet import AsyncInlet
        from emorecog_stream.engine.state import ROLE_RATES

        # an idle wake-up far longer than a lone run's 50 ms: a pull returns the moment data
        # comes, and hundreds of reader threads each waking 20 times a second for nothing
        # add up (each wake-up takes the GIL from the event loop)
        options: dict[str, Any] = {"pull_timeout": 0.25}
        if spec.role is Role.FMRI:
            options.update(on_chunk=self._volume_arrived, pull_timeout=1.0)
        elif spec.role in ROLE_RATES:
            wake = threading.Event()
            self._wakes.append(wake)
            options.update(pace=PHYSIO_PACE_S / self.time_scale, urgent=wake, needed=self.needed)
        inlet = AsyncInlet(spec, self.queue, info=sighting.info, **options)
        inlet.start()
        self.inlets[spec.role] = inlet
        return inlet

    def needed(self) -> float:
        """The timestamp the physiology must reach before it may gather again."""
        return self.need_until

    def _volume_arrived(self, chunk: Any) -> None:  # the fMRI reader thread
        if len(chunk.timestamps):
            self.need_until = max(self.need_until, float(chunk.timestamps[-1]))
        for wake in self._wakes:
            wake.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(i.close() for i in self.inlets.values()), return_exceptions=True)
        self.queue.put_nowait(_CLOSED)

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        while True:
            item = await self.queue.get()
            if item is _CLOSED:
                return
            yield item


_CLOSED = object()


@dataclass
class _Served:
    """A session the hub is serving (or starting)."""

    id: str
    config: Config
    specs: dict[Role, Any]
    inlets: SessionInlets
    task: asyncio.Task[HubResult] | None = None
    engine: Any = None
    fmri_uid: str = ""
    absent_since: float | None = None  # loop time its fMRI stream was last seen gone (auto)
    stopping: bool = False
    announced: set[Role] = field(default_factory=set)


class Hub:
    """Serves sessions (a list, a sessions file re-read on change, or ``auto``) until stopped.

    ``on_engine(session_id, engine)`` is called as each session's engine starts. ``out``:
    where the hub's lines go (stdout). :meth:`snapshots` is safe from any thread.
    """

    def __init__(
        self,
        base: Config,
        sessions: list[HubSession] | str | Path,
        *,
        model: Any = None,
        log_dir: str | Path | None = None,
        time_scale: float = 1.0,
        hub_id: str | None = None,
        include: str | None = None,
        linger: float = 30.0,
        on_engine: Callable[[str, Any], None] | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.base = base
        self.auto = isinstance(sessions, str) and sessions == AUTO
        self.sessions_file = (
            Path(sessions) if isinstance(sessions, (str, Path)) and not self.auto else None
        )
        self._listed: list[HubSession] = list(sessions) if isinstance(sessions, list) else []
        self._file_mtime: float | None = None
        self.model = model
        self.log_dir = log_dir
        self.time_scale = time_scale
        self.hub_id = hub_id or default_hub_id()
        self.include = include
        self.linger = linger
        self.on_engine = on_engine
        self.out = out
        self.results: list[HubResult] = []
        self._served: dict[str, _Served] = {}
        # session id -> the fMRI stream (uid) it ended on: not served again on that stream
        # (a new stream, e.g. the bridge restarted for the next run, starts it again)
        self._ended: dict[str, str] = {}
        self._assigned: dict[tuple[str, str], str] = {}
        self._first_seen: dict[str, float] = {}  # session id -> when its fMRI stream appeared
        self._said: set[str] = set()
        self._snapshots: dict[str, Any] = {}
        #: seconds between snapshot refreshes: the dashboard's frame period (a headless hub,
        #: which only prints a summary line now and then, sets it longer)
        self.snapshot_period = 0.25
        self._stop = asyncio.Event()
        self.batch: Any = None
        self.publisher: Any = None
        self.directory: Any = None

    # -- public -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every session and the hub (safe from a signal handler on the loop)."""
        self._stop.set()

    def snapshots(self) -> list[Any]:
        """The sessions' newest dashboard snapshots (refreshed on the loop; thread-safe)."""
        return list(self._snapshots.values())

    @property
    def served(self) -> list[str]:
        return sorted(self._served)

    async def run(self) -> list[HubResult]:
        """Serve until :meth:`stop`; returns how each session ended (in the order they did)."""
        from emorecog_stream.adapters.lsl_discovery import StreamDirectory
        from emorecog_stream.engine.batch import StepBatch
        from emorecog_stream.engine.gc_pause import freeze_long_lived
        from emorecog_stream.engine.runner import RunError, load_model_for, mqtt_settings_for
        from emorecog_stream.model.blas_threads import one_blas_thread
        from emorecog_stream.sinks.broker import BrokerStartError, EmbeddedBroker
        from emorecog_stream.sinks.mqtt import MqttPublisher

        if self.model is None:
            self.model = load_model_for(self.base)
        self.batch = StepBatch(self.model)
        async with contextlib.AsyncExitStack() as stack:
            url = self.base.mqtt.url
            if not url:
                broker = EmbeddedBroker()
                try:
                    url = await broker.start()
                except BrokerStartError as exc:
                    raise RunError(str(exc)) from None
                stack.push_async_callback(broker.stop)
                self._say(f"embedded MQTT broker listening on {url}")
            settings = mqtt_settings_for(self.base, url)
            self.settings = settings
            self._hub_topic = f"{settings.topic_prefix}/{HUBS_LEVEL}/{self.hub_id}/status"
            will = hub_status_payload(
                self.hub_id, "offline", "connection lost: the hub stopped without a clean"
                " disconnect; its sessions are offline", [],
            )  # fmt: skip
            self.publisher = MqttPublisher(
                settings, self.hub_id, model_id=str(self.model.model_id),
                initial_state=None, will=(self._hub_topic, will),
            )  # fmt: skip
            await self.publisher.start()
            self._publish_hub_status("online", "hub started")
            self.directory = StreamDirectory().start()
            stack.callback(self.directory.close)
            self._say(
                f"hub {self.hub_id}: model {self.model.model_id}; predictions on"
                f" {settings.url} ({settings.topic_prefix}/<session>/...); sessions: "
                + ("every fMRI stream found (auto)" if self.auto else "as listed")
            )
            if not self.auto:
                self._read_sessions_file(first=True)
            snapshots = asyncio.ensure_future(self._refresh_snapshots())
            # batched steps are small matrices: OpenBLAS's threads would cost more than they
            # save and spin beside the readers (model/blas_threads.py says what was measured)
            stack.enter_context(one_blas_thread())
            freeze_long_lived()  # set up: no full garbage collection in a step (gc_pause.py)
            try:
                await self._serve()
            finally:
                snapshots.cancel()
                await self._stop_all()
                self._publish_hub_status("offline", "hub stopped")
                # the broker gone, a long wait would only delay the stop: what is queued
                # cannot be delivered (the unsent count is reported)
                connected = self.publisher.stats.connected
                await self.publisher.close(timeout=10.0 if connected else 2.0, reason="hub stopped")
        return self.results

    # -- the reconcile loop -------------------------------------------------------------------

    async def _serve(self) -> None:
        generation = -1
        while not self._stop.is_set():
            self._reconcile()
            pause = 0.5 if self._first_seen else 2.0  # sooner while a session waits to start
            waiter = asyncio.ensure_future(self.directory.wait_change(generation, pause))
            stopper = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, stopper):
                task.cancel()
            if waiter in done and not waiter.cancelled():
                generation = waiter.result()

    def _reconcile(self) -> None:
        """Start, extend and stop sessions to match what is listed and what is visible."""
        sightings = self.directory.snapshot()
        self._collect_finished()
        if self.auto:
            wanted = self._wanted_auto(sightings)
        else:
            self._read_sessions_file()
            wanted = self._wanted_listed(sightings)
        now = asyncio.get_running_loop().time()
        for sid, (config, streams) in wanted.items():
            served = self._served.get(sid)
            fmri = streams.get(Role.FMRI)
            if served is None:
                if fmri is None or self._ended.get(sid) == fmri.uid:
                    self._first_seen.pop(sid, None)
                    continue
                # the resolver reports a host's streams over a moment: give the physiology
                # that much to show up, so the first steps wait for it as a lone run's do
                seen = self._first_seen.setdefault(sid, now)
                physio = [r for r in config.streams.enabled_roles() if r in (Role.PPG, Role.RESP)]
                if now - seen < PHYSIO_GRACE_S and not all(r in streams for r in physio):
                    continue
                self._first_seen.pop(sid, None)
                self._start(sid, config, streams)
                continue
            served.absent_since = None if fmri is not None else (served.absent_since or now)
            for role, sighting in streams.items():
                if role not in served.inlets.inlets and role in served.specs:
                    served.inlets.add(served.specs[role], sighting)
        for sid, served in list(self._served.items()):
            if served.stopping:
                continue
            if sid not in wanted and not self.auto:
                self._say(f"[{sid}] removed from the sessions file: stopping")
                self._stop_session(served)
            elif self.auto and sid not in wanted:
                served.absent_since = served.absent_since or now
            if (
                self.auto
                and served.absent_since is not None
                and now - served.absent_since >= self.linger
            ):
                self._say(f"[{sid}] fMRI stream gone for {self.linger:g} s: stopping")
                self._stop_session(served)

    def _wanted_auto(self, sightings: list[Any]) -> dict[str, tuple[Config, dict[Role, Any]]]:
        from emorecog_stream.adapters.lsl_discovery import group_sessions

        types = {role: getattr(self.base.streams, role.value).type or DEFAULT_LSL_TYPE[role]
                 for role in Role}  # fmt: skip
        found = group_sessions(sightings, types, include=self.include, assigned=self._assigned)
        self._assigned.update(found.assignments())
        for problem in found.problems:
            self._say_once(problem)
        wanted = {}
        for sid, session in found.sessions.items():
            served = self._served.get(sid)
            config = (
                served.config
                if served is not None
                else discovered_config(self.base, session, self.log_dir)
            )
            wanted[sid] = (config, dict(session.streams))
        # a served session whose streams vanished is still "wanted" until it lingered out
        for sid, served in self._served.items():
            wanted.setdefault(sid, (served.config, {}))
        return {sid: w for sid, w in wanted.items() if sid in found.sessions or sid in self._served}

    def _wanted_listed(self, sightings: list[Any]) -> dict[str, tuple[Config, dict[Role, Any]]]:
        from emorecog_stream.engine.runner import inlet_specs

        # sightings by name: a listed session's specs name their streams, so each looks at a
        # handful of candidates, not every stream of every session (O(sessions x streams))
        by_name: dict[str, list[Any]] = {}
        for sighting in sightings:
            by_name.setdefault(sighting.name, []).append(sighting)
        wanted = {}
        for session in self._listed:
            served = self._served.get(session.id)
            config = (
                served.config
                if served is not None
                else session_config(self.base, session, self.log_dir)
            )
            streams: dict[Role, Any] = {}
            for spec in served.specs.values() if served is not None else inlet_specs(config):
                candidates = by_name.get(spec.name, []) if spec.name else sightings
                matches = [s for s in candidates if _matches(spec, s)]
                uids = {s.uid for s in matches}
                if len(uids) == 1:
                    streams[spec.role] = matches[0]
                elif len(uids) > 1:
                    self._say_once(
                        f"[{session.id}] {len(uids)} streams match its {spec.describe()};"
                        " none is taken until only one is left"
                    )
            wanted[session.id] = (config, streams)
        return wanted

    def _read_sessions_file(self, first: bool = False) -> None:
        if self.sessions_file is None:
            return
        try:
            mtime = self.sessions_file.stat().st_mtime
        except OSError as exc:
            if first:
                raise HubError(f"sessions file {str(self.sessions_file)!r}: {exc}") from None
            self._say_once(f"sessions file {str(self.sessions_file)!r} unreadable: {exc};"
                           " serving the sessions it listed before")  # fmt: skip
            return
        if mtime == self._file_mtime:
            return
        try:
            listed = load_sessions_file(self.sessions_file)
        except HubError as exc:
            if first:
                raise
            self._say(f"{exc}; serving the sessions it listed before")
            self._file_mtime = mtime
            return
        if not first:
            before, after = {s.id for s in self._listed}, {s.id for s in listed}
            self._say(
                f"sessions file changed: {len(after)} session(s)"
                + (f", added {sorted(after - before)}" if after - before else "")
                + (f", removed {sorted(before - after)}" if before - after else "")
            )
        self._listed, self._file_mtime = listed, mtime

    # -- one session --------------------------------------------------------------------------

    def _start(self, sid: str, config: Config, streams: dict[Role, Any]) -> None:
        from emorecog_stream.engine.runner import RunError, inlet_specs

        try:
            specs = {spec.role: spec for spec in inlet_specs(config)}
        except RunError as exc:
            self._ended[sid] = streams[Role.FMRI].uid
            self.results.append(HubResult(sid, error=str(exc)))
            self._say(f"[{sid}] {exc}")
            return
        inlets = SessionInlets(self.time_scale)
        served = _Served(sid, config, specs, inlets, fmri_uid=streams[Role.FMRI].uid)
        for role, sighting in streams.items():
            if role in specs:
                served.inlets.add(specs[role], sighting)
        self._served[sid] = served
        served.task = asyncio.ensure_future(self._run_session(served))
        self._publish_hub_status("online", "sessions changed")

    def _stop_session(self, served: _Served) -> None:
        served.stopping = True
        if served.engine is not None:
            served.engine.stop()
        elif served.task is not None:
            served.task.cancel()

    async def _run_session(self, served: _Served) -> HubResult:
        from emorecog_stream.engine.runner import RunError

        sid = served.id
        try:
            counters = await self._session_pipeline(served)
        except asyncio.CancelledError:
            return HubResult(sid, error="stopped before it started")
        except RunError as exc:
            self._say(f"[{sid}] {exc}")
            return HubResult(sid, error=str(exc))
        except Exception as exc:  # one session's failure must not end the others
            log.exception("session %s failed", sid)
            return HubResult(sid, error=f"{type(exc).__name__}: {exc}")
        finally:
            await served.inlets.close()
        return HubResult(sid, counters=counters)

    async def _session_pipeline(self, served: _Served) -> Any:
        from emorecog_stream.adapters.lsl_inlet import LslAdapterError
        from emorecog_stream.engine.gc_pause import freeze_long_lived
        from emorecog_stream.engine.outputs import MarkerLog, MqttOutput, RunSummaryLog
        from emorecog_stream.engine.runner import RunError, engine_chunks, run_summary
        from emorecog_stream.engine.session import Engine
        from emorecog_stream.engine.state import ROLE_RATES
        from emorecog_stream.sinks.mqtt import SessionChannel

        config, sid = served.config, served.id
        fmri = served.inlets.inlets[Role.FMRI]
        try:
            meta = await fmri.wait_connected(config.engine.resolve_timeout)
        except LslAdapterError as exc:
            raise RunError(str(exc)) from None
        except asyncio.TimeoutError:
            raise RunError(
                f"fMRI stream found but not connected within {config.engine.resolve_timeout:g} s"
            ) from None
        # physiology found with the fMRI stream: connected before the first step, so the
        # first steps wait for it (as a single-session run does)
        physio = [r for r in served.inlets.inlets if r in ROLE_RATES]
        await _wait_connected(served.inlets, physio, 2.0)
        log_, resume = _open_log(config, self.model, self.settings.url, self.time_scale)
        channel = SessionChannel(
            self.publisher, sid, hub=self.hub_id, model_id=str(self.model.model_id),
            initial_state="starting", initial_reason="waiting for the fMRI stream",
        )  # fmt: skip
        await channel.start()
        outputs: list[Any] = [MqttOutput(channel)]
        box: list[Any] = []
        if log_ is not None:
            outputs.append(RunSummaryLog(log_, lambda: channel.stats, lambda: box[0].counters))
            outputs.append(log_)
            if config.streams.markers.enabled:
                outputs.append(MarkerLog(log_))
        engine = Engine(
            config, self.model, outputs, time_scale=self.time_scale,
            broker_url=self.settings.url, step_batch=self.batch,
        )  # fmt: skip
        box.append(engine)
        served.engine = engine
        if resume is not None and resume.last_sequence is not None:
            from emorecog_stream.engine.runner import restart_note

            engine.continue_from(resume.last_sequence + 1, restart_note(resume))
        if log_ is not None:
            log_.on_error = lambda text: engine.set_output_problem(
                "log", f"session log not written: {text}" if text else None
            )
        engine.register_stream(Role.FMRI, meta.name, meta.nominal_srate)
        for role in physio:
            inlet_meta = served.inlets.inlets[role].metadata
            if inlet_meta is not None:
                engine.register_stream(role, inlet_meta.name, inlet_meta.nominal_srate)
        self._say(f"[{sid}] serving {meta.name!r} (host {meta.hostname})"
                  + (f" with {', '.join(r.value for r in physio)}" if physio else ""))  # fmt: skip
        if served.stopping:
            engine.stop()
        if self.on_engine is not None:
            self.on_engine(sid, engine)
        freeze_long_lived()  # this session's engine, log and buffers live until it ends
        try:
            counters = await engine.run(engine_chunks(served.inlets, engine))
        finally:
            if log_ is not None:
                log_.close()
        # the MQTT counters are the hub's one connection's, not this session's own
        self._say(f"[{sid}] " + run_summary(engine, channel, log_).replace("MQTT", "hub MQTT", 1))
        return counters

    def _collect_finished(self) -> None:
        from emorecog_stream.engine.gc_pause import collect_released

        finished = False
        for sid, served in list(self._served.items()):
            if served.task is None or not served.task.done():
                continue
            del self._served[sid]
            self._snapshots.pop(sid, None)
            result = (
                HubResult(sid, error="stopped before it started")
                if served.task.cancelled()
                else served.task.result()
            )
            self.results.append(result)
            self._ended[sid] = served.fmri_uid
            self._publish_hub_status("online", "sessions changed")
            finished = True
        if finished:
            collect_released()  # the ended sessions' memory back (gc_pause.py)

    async def _stop_all(self) -> None:
        for served in self._served.values():
            self._stop_session(served)
        tasks = [s.task for s in self._served.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        self._collect_finished()

    # -- outputs of the hub itself ----------------------------------------------------------

    def _publish_hub_status(self, state: str, reason: str) -> None:
        if self.publisher is None:
            return
        payload = hub_status_payload(self.hub_id, state, reason, list(self._served))
        self.publisher._enqueue_status(payload, self._hub_topic)

    async def _refresh_snapshots(self) -> None:
        """Engine snapshots are taken on the loop (telemetry is not thread-safe) and swapped in
        whole, so the dashboard's thread only ever reads finished ones."""
        while True:
            fresh = {}
            for sid, served in list(self._served.items()):
                if served.engine is not None:
                    fresh[sid] = served.engine.snapshot(mqtt=self.publisher.stats)
                    # one session at a time: 64 snapshots in one go (percentiles of every
                    # session's latencies) held the loop for tens of ms, a step's p99
                    await asyncio.sleep(0)
            self._snapshots = fresh
            await asyncio.sleep(self.snapshot_period)

    def _say(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def _say_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self._say(text)


def _matches(spec: Any, sighting: Any) -> bool:
    """Does a visible stream fit an inlet spec's selectors (every non-empty one)?"""
    return (
        (not spec.name or spec.name == sighting.name)
        and (not spec.type or spec.type == sighting.type)
        and (not spec.source_id or spec.source_id == sighting.source_id)
    )


async def _wait_connected(inlets: SessionInlets, roles: list[Role], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if all(inlets.inlets[r].metadata is not None for r in roles):
            return
        await asyncio.sleep(0.02)


def _open_log(config: Config, model: Any, broker_url: str, time_scale: float) -> tuple[Any, Any]:
    """The session's JSONL log (None when not configured) and where an earlier run ended."""
    from emorecog_stream.engine.runner import RunError, log_resume_point
    from emorecog_stream.sinks.jsonl import JsonlLog, JsonlLogError

    if not config.output.log:
        return None, None
    resume = log_resume_point(config.output.log, config.session.id)
    meta: dict[str, Any] = {"broker": broker_url, "time_scale": time_scale}
    if resume is not None and resume.last_sequence is not None:
        meta["continues"] = {
            "last_sequence": resume.last_sequence,
            "previous_run": "clean stop" if resume.clean else "unclean stop",
        }
    try:
        log_ = JsonlLog(
            config.output.log, session=config.session.id, model_id=str(model.model_id), meta=meta
        )
    except JsonlLogError as exc:
        raise RunError(str(exc)) from None
    return log_, resume


async def run_hub(
    base: Config,
    sessions: list[HubSession] | str | Path,
    *,
    model: Any = None,
    log_dir: str | Path | None = None,
    time_scale: float = 1.0,
    on_engine: Any = None,
    stop: asyncio.Event | None = None,
    hub_id: str | None = None,
    include: str | None = None,
    linger: float = 30.0,
    on_hub: Callable[[Hub], None] | None = None,
) -> list[HubResult]:
    """Run a :class:`Hub` until ``stop`` is set; returns how each session ended.

    Sessions still listed but never found are reported as such.
    """
    hub = Hub(
        base, sessions, model=model, log_dir=log_dir, time_scale=time_scale, hub_id=hub_id,
        include=include, linger=linger, on_engine=on_engine,
    )  # fmt: skip
    if on_hub is not None:
        on_hub(hub)
    watcher = None
    if stop is not None:

        async def watch() -> None:
            await stop.wait()
            hub.stop()

        watcher = asyncio.ensure_future(watch())
    try:
        results = await hub.run()
    finally:
        if watcher is not None:
            watcher.cancel()
    ended = {r.session_id for r in results}
    for session in hub._listed:
        if session.id not in ended:
            results.append(HubResult(session.id, error="stopped before its streams were found"))
    return results


__all__ = [
    "AUTO",
    "Hub",
    "HubError",
    "HubResult",
    "HubSession",
    "SessionInlets",
    "load_sessions_file",
    "run_hub",
]
