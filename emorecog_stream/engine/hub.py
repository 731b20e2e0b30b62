"""Several sessions in one process: one model in memory, one live pipeline per session.

Why: one ``run`` process per session holds a copy of the model, Python and numpy each
(~450 MB); the engine's own work per session is ~1 % of a core at TR 1 s. The hub runs every
session's pipeline (:func:`~emorecog_stream.engine.runner.run_engine`: its inlets, engine,
GRU state, status topic and JSONL log) as a task on one event loop, all sharing one loaded model
(each engine takes its own stepper from it, so GRU states never mix).

Isolation: a session whose streams cannot be found or whose pipeline fails ends alone (its
status goes offline, the error is reported with its id); the other tasks go on.

Sessions are listed in a TOML file (``run --sessions FILE``)::

    [[session]]
    id = "scanner1"          # MQTT topics emorecog/scanner1/..., log <log_dir>/scanner1.jsonl
    tag = "scanner1"         # streams EmoRecog-fMRI-scanner1, source id emorecog-fmri-scanner1 ...

    [[session]]
    id = "scanner2"
    tag = "scanner2"

``tag`` selects the session's streams the way ``replay --tag`` / ``replay --copies`` names
them (:func:`~emorecog_stream.adapters.lsl_info.stream_identity`): every stream of a session
shares the suffix, no other session's does. Two hubs on one broker split the sessions by
giving each its own file; a session listed in both would be served twice.

Not done yet (issue 10): one MQTT connection for all sessions (each session has its own
publisher and Last Will today), ``--sessions auto`` discovery, batched model steps across
sessions, and a sessions table in the dashboard.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from emorecog_stream.config import Config, apply_overrides
from emorecog_stream.core.streams import Role

log = logging.getLogger(__name__)


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


async def run_hub(
    base: Config,
    sessions: list[HubSession],
    *,
    model: Any = None,
    log_dir: str | Path | None = None,
    time_scale: float = 1.0,
    on_engine: Any = None,
    stop: asyncio.Event | None = None,
) -> list[HubResult]:
    """Serve ``sessions`` until each one stops; returns how each ended, in order.

    ``base.mqtt.url`` must be set (the sessions share one broker; an embedded one is started
    here when it is not). ``on_engine(session_id, engine)`` is called as each engine starts.
    Setting ``stop`` stops every session: running engines stop (status offline, logs closed),
    sessions still looking for their streams are cancelled.
    """
    from emorecog_stream.engine.runner import RunError, RunHooks, load_model_for, run_engine

    if model is None:
        model = load_model_for(base)
    broker = None
    if not base.mqtt.url:
        from emorecog_stream.sinks.broker import EmbeddedBroker

        broker = EmbeddedBroker()
        base = apply_overrides(base, {"mqtt.url": await broker.start()})

    engines: dict[str, Any] = {}

    def started(session_id: str, engine: Any) -> None:
        engines[session_id] = engine
        if stop is not None and stop.is_set():
            engine.stop()
        if on_engine is not None:
            on_engine(session_id, engine)

    async def one(session: HubSession) -> HubResult:
        config = session_config(base, session, log_dir)
        hooks = RunHooks(on_engine=lambda e: started(session.id, e))
        out = _Prefixed(session.id)
        try:
            counters = await run_engine(
                config,
                model=model,
                time_scale=time_scale,
                hooks=hooks,
                out=out,  # type: ignore[arg-type]
                install_signal_handlers=False,
            )
        except asyncio.CancelledError:
            return HubResult(session.id, error="stopped before its streams were found")
        except RunError as exc:
            log.error("session %s: %s", session.id, exc)
            return HubResult(session.id, error=str(exc))
        except Exception as exc:  # one session's failure must not end the others
            log.exception("session %s failed", session.id)
            return HubResult(session.id, error=f"{type(exc).__name__}: {exc}")
        return HubResult(session.id, counters=counters)

    tasks = {s.id: asyncio.ensure_future(one(s)) for s in sessions}

    async def watch_stop() -> None:
        assert stop is not None
        await stop.wait()
        for session_id, task in tasks.items():
            engine = engines.get(session_id)
            if engine is not None:
                engine.stop()
            else:
                task.cancel()

    watcher = asyncio.ensure_future(watch_stop()) if stop is not None else None
    try:
        await asyncio.wait(tasks.values())
        return [
            HubResult(sid, error="stopped before it started") if t.cancelled() else t.result()
            for sid, t in tasks.items()
        ]
    finally:
        if watcher is not None:
            watcher.cancel()
        if broker is not None:
            await broker.stop()


class _Prefixed(io.TextIOBase):
    """Each session's start-up and log lines, prefixed with its id, on stdout."""

    def __init__(self, session_id: str) -> None:
        self.prefix = f"[{session_id}] "

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                print(self.prefix + line, flush=True)
        return len(text)

    def isatty(self) -> bool:
        return False


__all__ = ["HubError", "HubResult", "HubSession", "load_sessions_file", "run_hub"]
