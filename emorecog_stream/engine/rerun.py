"""Recorded sessions through the live pipeline as fast as the machine allows (``rerun``).

Why not ``evaluate`` or a real-time replay: ``evaluate`` runs the offline code path
(:func:`~emorecog_stream.core.aligner.align_session`), and a replay through ``run`` is bound to the
wall clock. A re-run answers "what would the live engine have published for this recording?"
in seconds, with the live parts themselves:

* **The same chunks.** Each session's samples are cut exactly as
  :class:`~emorecog_stream.adapters.replay.Replayer` pushes them to LSL (its chunk plan, at
  its ``chunk_seconds``), and handed to :meth:`Engine.process_chunk` in the scheduler's order.
  No LSL in between: timestamps are the recording's own, so there is no clock correction.
* **The data's clock.** The engine's clock is :class:`DataClock`, set to each chunk's due time
  before it is handed over. The engine's timer (the aligner's deadline, a stream going stale)
  is not an asyncio timer here: before each chunk, every wake-up due by then is fired at the
  moment the live timer would have fired (:class:`DataDrivenEngine`). Latencies come out as 0.
* **The same engine, aligner, stepper and outputs**: JSONL log and MQTT payloads are the
  live ones. The MQTT queue is kept below half full (the re-run waits for the broker), so a
  fast re-run never drops a message the way a live outage would.

Many sessions: :func:`rerun_many` spreads them over worker processes (``jobs``), each loading
the model once; the engine's per-step model cost (~0.04 ms) is small beside the physiology
work, so processes, not batching, are what use both cores.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorecog_stream.config import Config, apply_overrides, load_config
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.session import Engine, EngineCounters, Output
from emorecog_stream.recordings.session import Session

#: The live timer fires this long after the moment it was armed for (see Engine._reschedule).
TIMER_LAG_S = 1e-4
#: The default chunk length: one push per stream per second, as an inlet pulled once a second
#: would get them. The engine's output does not depend on it while it is shorter than the
#: aligner's deadline (tests/test_rerun.py checks 20 ms against this); its speed does.
DEFAULT_CHUNK_S = 1.0
#: Wake-ups the engine may ask for at one moment before the re-run moves on (a safety stop).
_MAX_WAKEUPS_AT_ONCE = 1000


class RerunError(ValueError):
    """A recording that cannot be re-run (naming the recording and what is wrong)."""


class DataClock:
    """The engine's clock during a re-run: whatever time the data says it is."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now


class DataDrivenEngine(Engine):
    """An :class:`Engine` whose timer is driven by the caller instead of an event loop.

    Live, :meth:`Engine._reschedule` arms one asyncio timer for the earliest of the aligner's
    next deadline, the next status change and the end of ``--duration``; with no loop (a
    re-run never calls :meth:`Engine.run`) nothing is armed, and the driver asks
    :meth:`next_wakeup` and calls :meth:`wake` instead.
    """

    def next_wakeup(self) -> float | None:
        """The engine time the live timer would be armed for now (None: nothing to wait for)."""
        now = self.now()
        candidates = [
            t
            for t in (
                self.aligner.next_deadline(),
                self.status_tracker.next_change(now, self.session.tr),
            )
            if t is not None
        ]
        return min(candidates) if candidates else None

    def wake(self) -> None:
        """What the live timer does when it fires (the clock is already at that moment)."""
        self._on_timer()

    def advance_to(self, clock: DataClock, t: float) -> None:
        """Fire every wake-up due before ``t``, each at its own moment, then set the clock to
        ``t``."""
        for _ in range(_MAX_WAKEUPS_AT_ONCE):
            when = self.next_wakeup()
            if when is None or when + TIMER_LAG_S > t:
                break
            fire_at = max(clock.now, when + TIMER_LAG_S)
            clock.now = fire_at
            before = (self.aligner.pending, self.status)
            self.wake()
            if (self.aligner.pending, self.status) == before and self.next_wakeup() == when:
                break  # nothing changed and the same moment is asked for again
        clock.now = max(clock.now, t)


@dataclass
class RerunResult:
    """One re-run session: where its log went and what the engine counted."""

    session_id: str
    participant: str
    log_path: str | None
    volumes: int
    counters: EngineCounters
    seconds: float  # wall time of the re-run itself (model loading not included)
    mqtt_sent: int | None = None
    mqtt_dropped: int | None = None
    predictions: list[Any] = field(default_factory=list)  # kept only when asked (tests)


class _Collect:
    """An output keeping every prediction (for tests and for the caller's own checks)."""

    def __init__(self) -> None:
        self.predictions: list[Any] = []

    def on_prediction(self, prediction: Any, step: Any) -> None:
        self.predictions.append(prediction)

    def on_status(self, status: Any) -> None:
        pass

    async def aclose(self) -> None:
        pass


def session_ids(sessions: Sequence[Session]) -> list[str]:
    """A unique, topic-safe session id per session: the participant id, with ``-2``, ``-3``
    ... appended when it repeats (the same recording given twice, or two runs of one
    participant)."""
    seen: dict[str, int] = {}
    ids = []
    for session in sessions:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", session.participant).strip("_") or "session"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


def config_for(session_id: str, base: Config | None = None, **overrides: Any) -> Config:
    """The engine configuration of one re-run session (no dashboard; the caller's log)."""
    base = base if base is not None else load_config(None)
    values: dict[str, Any] = {"session.id": session_id, "output.dashboard": False}
    values.update(overrides)
    return apply_overrides(base, values)


async def rerun_session(
    session: Session,
    model: Any,
    *,
    session_id: str | None = None,
    config: Config | None = None,
    log_path: str | os.PathLike[str] | None = None,
    mqtt_url: str | None = None,
    chunk_seconds: float = DEFAULT_CHUNK_S,
    keep_predictions: bool = False,
    outputs: Sequence[Output] = (),
) -> RerunResult:
    """Feed one recorded session through a live :class:`Engine` at full speed.

    ``chunk_seconds`` is the replay's chunk length (``replay --chunk-ms``); the engine's
    output does not depend on it (the aligner waits for each volume's physiology, whatever
    the chunks), only the speed does. ``config``: the engine configuration (default: the
    defaults, with ``session_id``).
    """
    from emorecog_stream.adapters.replay import Replayer, ReplayError
    from emorecog_stream.engine.outputs import MarkerLog, MqttOutput, RunSummaryLog
    from emorecog_stream.sinks.jsonl import JsonlLog

    session_id = session_id or session_ids([session])[0]
    if config is None:
        config = config_for(session_id)
    elif config.session.id != session_id:
        config = apply_overrides(config, {"session.id": session_id})
    try:
        replayer = Replayer(session, speed=1.0, chunk_seconds=chunk_seconds)
    except ReplayError as exc:
        raise RerunError(f"session {session.participant!r}: {exc}") from None
    base = replayer.recording_time()
    pushes = list(replayer.pushes())
    clock = DataClock(base + (pushes[0][0] if pushes else 0.0))

    all_outputs: list[Output] = list(outputs)
    collect = _Collect() if keep_predictions else None
    if collect is not None:
        all_outputs.append(collect)
    publisher = None
    engine_box: list[Engine] = []
    if mqtt_url:
        from emorecog_stream.engine.runner import mqtt_settings_for
        from emorecog_stream.sinks.mqtt import MqttPublisher

        settings = mqtt_settings_for(config, mqtt_url)
        publisher = MqttPublisher(settings, session_id, model_id=str(model.model_id))
        await publisher.start()
        all_outputs.append(MqttOutput(publisher))
    log = None
    if log_path is not None:
        meta = {"rerun": True, "participant": session.participant, "chunk_s": chunk_seconds}
        log = JsonlLog(log_path, session=session_id, model_id=str(model.model_id), meta=meta)
        if publisher is not None:
            stats = publisher
            all_outputs.append(
                RunSummaryLog(log, lambda: stats.stats, lambda: engine_box[0].counters)
            )
        all_outputs.append(log)
        all_outputs.append(MarkerLog(log))

    engine = DataDrivenEngine(config, model, all_outputs, clock=clock)
    engine_box.append(engine)
    for role, desc in replayer.descriptions.items():
        engine.register_stream(role, desc.name, desc.nominal_srate)
    for output in all_outputs:
        output.on_status(engine.status)
    engine._update_status()  # as Engine.run does before the first chunk

    capacity = publisher.settings.queue_capacity if publisher is not None else 0
    t_start = time.perf_counter()
    for n, (due, role, values, stamps) in enumerate(pushes):
        t = base + due
        engine.advance_to(clock, t)
        engine.process_chunk(role, _chunk_data(role, values), base + stamps, t)
        if publisher is not None and n % 64 == 0:
            # never faster than the broker takes it: a full queue would drop predictions
            while publisher.stats.queued > capacity // 2:
                await asyncio.sleep(0.002)
    # the end of the recording: what the live engine does while the replay lingers
    end = base + replayer.duration + config.aligner.deadline + 1.0
    engine.advance_to(clock, end)
    seconds = time.perf_counter() - t_start
    await engine.aclose()
    stats = publisher.stats if publisher is not None else None
    return RerunResult(
        session_id=session_id,
        participant=session.participant,
        log_path=None if log_path is None else str(log_path),
        volumes=session.n_volumes,
        counters=engine.counters,
        seconds=seconds,
        mqtt_sent=None if stats is None else stats.sent,
        mqtt_dropped=None if stats is None else stats.dropped,
        predictions=collect.predictions if collect is not None else [],
    )


def _chunk_data(role: Role, values: Any) -> Any:
    """Markers as the LSL inlet hands them over: one row (a list of one string) per sample."""
    if role is Role.MARKERS:
        return [[text] for text in values]
    return values


# -- many sessions over worker processes ------------------------------------------------------

_WORKER_MODEL: Any = None


def load_worker_model(model_path: str | None) -> None:
    """A worker process's initializer: load the model once for every job it runs."""
    global _WORKER_MODEL
    from emorecog_stream.model import load_model

    _WORKER_MODEL = load_model(model_path or None)


@dataclass(frozen=True)
class RerunJob:
    """One session to re-run in a worker: the session itself or where to load it from."""

    session_id: str
    session: Session
    log_path: str | None
    mqtt_url: str | None
    chunk_seconds: float
    config: Config | None = None


def run_job(job: RerunJob) -> RerunResult:
    """Re-run one job in a worker started with :func:`load_worker_model`."""
    assert _WORKER_MODEL is not None, "worker started without its model"
    return asyncio.run(
        rerun_session(
            job.session,
            _WORKER_MODEL,
            session_id=job.session_id,
            config=job.config,
            log_path=job.log_path,
            mqtt_url=job.mqtt_url,
            chunk_seconds=job.chunk_seconds,
        )
    )


def rerun_many(
    sessions: Sequence[Session],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    mqtt_url: str | None = None,
    model_path: str | None = None,
    jobs: int = 1,
    chunk_seconds: float = DEFAULT_CHUNK_S,
    config: Config | None = None,
    model: Any = None,
) -> list[RerunResult]:
    """Re-run every session; logs go to ``out_dir/<session id>.jsonl``.

    ``jobs`` worker processes (each loads the model once); ``jobs=1`` runs in this process
    (with ``model`` if given). Results come back in the order of ``sessions``.
    """
    ids = session_ids(sessions)
    out = Path(out_dir) if out_dir is not None else None
    job_list = [
        RerunJob(
            session_id=sid,
            session=s,
            log_path=None if out is None else str(out / f"{sid}.jsonl"),
            mqtt_url=mqtt_url,
            chunk_seconds=chunk_seconds,
            config=None if config is None else apply_overrides(config, {"session.id": sid}),
        )
        for sid, s in zip(ids, sessions, strict=True)
    ]
    if jobs <= 1 or len(job_list) <= 1:
        if model is None:
            from emorecog_stream.model import load_model

            model = load_model(model_path or None)

        async def serial() -> list[RerunResult]:
            return [
                await rerun_session(
                    j.session,
                    model,
                    session_id=j.session_id,
                    config=j.config,
                    log_path=j.log_path,
                    mqtt_url=j.mqtt_url,
                    chunk_seconds=j.chunk_seconds,
                )
                for j in job_list
            ]

        return asyncio.run(serial())
    # spawned, not forked: a fork of a process with threads (an MQTT client, LSL) can
    # inherit a lock held by one of them and hang
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(job_list)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=load_worker_model,
        initargs=(model_path,),
    ) as pool:
        return list(pool.map(run_job, job_list))


__all__ = [
    "DEFAULT_CHUNK_S",
    "DataClock",
    "DataDrivenEngine",
    "RerunError",
    "RerunJob",
    "RerunResult",
    "config_for",
    "load_worker_model",
    "rerun_many",
    "rerun_session",
    "run_job",
    "session_ids",
]
