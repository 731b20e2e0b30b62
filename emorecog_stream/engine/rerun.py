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
the model once, and each worker re-runs its share together (:func:`rerun_group`): one
:class:`~emorecog_stream.engine.batch.StepBatch` takes every session's ready step in one pass
through the model. The sessions take turns: each runs on (chunks and timer wake-ups, in its own
order, on its own clock) until it has handed a step to the batch, then the batch is flushed and
every step published before its session does anything else. So each engine sees exactly the
calls, at exactly the clock values, of a re-run alone, and a pass holds about one step of
every session still running.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorecog_stream.config import Config, apply_overrides, load_config
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.batch import StepBatch
from emorecog_stream.engine.session import Engine, EngineCounters, Output
from emorecog_stream.model.blas_threads import one_blas_thread
from emorecog_stream.recordings.session import Session

#: The live timer fires this long after the moment it was armed for (see Engine._reschedule).
TIMER_LAG_S = 1e-4
#: The default chunk length: one push per stream per second, as an inlet pulled once a second
#: would get them. The engine's output does not depend on it while it is shorter than the
#: aligner's deadline (tests/test_rerun.py checks 20 ms against this); its speed does.
DEFAULT_CHUNK_S = 1.0
#: Wake-ups the engine may ask for at one moment before the re-run moves on (a safety stop).
_MAX_WAKEUPS_AT_ONCE = 1000
#: Sessions one worker re-runs at once (each holds its log file and broker connection open).
GROUP_SESSIONS = 64


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
        deadline = self.aligner.next_deadline()
        change = self.status_tracker.next_change(self.now(), self.session.tr)
        if deadline is None or change is None:
            return change if deadline is None else deadline
        return min(deadline, change)

    def wake(self) -> None:
        """What the live timer does when it fires (the clock is already at that moment)."""
        self._on_timer()

    def wakeups(self, clock: DataClock, t: float) -> Iterator[None]:
        """Fire every wake-up due before ``t``, each at its own moment, yielding after each
        (a driver that batches steps publishes them there, before the clock moves on); then
        set the clock to ``t``."""
        for _ in range(_MAX_WAKEUPS_AT_ONCE):
            when = self.next_wakeup()
            if when is None or when + TIMER_LAG_S > t:
                break
            clock.now = max(clock.now, when + TIMER_LAG_S)
            before = (self.aligner.pending, self.status)
            self.wake()
            yield
            if (self.aligner.pending, self.status) == before and self.next_wakeup() == when:
                break  # nothing changed and the same moment is asked for again
        clock.now = max(clock.now, t)

    def advance_to(self, clock: DataClock, t: float) -> None:
        """Fire every wake-up due before ``t``, each at its own moment, then set the clock to
        ``t``."""
        for _ in self.wakeups(clock, t):
            pass


@dataclass(frozen=True)
class BatchStats:
    """The step batch of one worker's sessions (shared by every session re-run in it)."""

    group: int  # which worker's share (0, 1, ... in the order of the sessions)
    sessions: int  # sessions re-run together
    passes: int  # passes through the model
    steps: int  # steps taken in them
    largest: int  # the largest pass

    @property
    def mean_size(self) -> float:
        """Steps per pass (1.0: no batching)."""
        return self.steps / self.passes if self.passes else 0.0


@dataclass
class RerunResult:
    """One re-run session: where its log went and what the engine counted."""

    session_id: str
    participant: str
    log_path: str | None
    volumes: int
    counters: EngineCounters
    # wall seconds of the re-run itself (model loading not included); re-run with others, this
    # session's share of their wall time (by volumes), so a worker's shares add up to its time
    seconds: float
    mqtt_sent: int | None = None
    mqtt_dropped: int | None = None
    predictions: list[Any] = field(default_factory=list)  # kept only when asked (tests)
    batch: BatchStats | None = None  # re-run with others: their step batch


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


class _DrivenBatch(StepBatch):
    """A :class:`StepBatch` flushed by the re-run's driver only: never scheduled on the event
    loop the re-run happens to run in (the driver knows when each engine must be answered)."""

    def submit(self, engine: Engine, pending: Any) -> None:
        self._queue.append((engine, pending))


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


@dataclass(frozen=True)
class RerunJob:
    """One session to re-run: the session, its id, where its log and messages go."""

    session_id: str
    session: Session
    log_path: str | None
    mqtt_url: str | None
    chunk_seconds: float
    config: Config | None = None


class _SessionRun:
    """One session on its way through a :class:`DataDrivenEngine`: its chunk plan, clock and
    outputs. :meth:`plan` checks the recording (nothing opened yet), :meth:`open` creates the
    engine and its outputs, :meth:`events` feeds it, :meth:`close` closes it."""

    def __init__(self, job: RerunJob) -> None:
        from emorecog_stream.adapters.replay import Replayer, ReplayError

        self.job = job
        config = job.config
        if config is None:
            config = config_for(job.session_id)
        elif config.session.id != job.session_id:
            config = apply_overrides(config, {"session.id": job.session_id})
        self.config = config
        try:
            self.replayer = Replayer(job.session, speed=1.0, chunk_seconds=job.chunk_seconds)
        except ReplayError as exc:
            raise RerunError(f"session {job.session.participant!r}: {exc}") from None
        self.base = self.replayer.recording_time()
        self.pushes = list(self.replayer.pushes())
        self.clock = DataClock(self.base + (self.pushes[0][0] if self.pushes else 0.0))
        self.publisher: Any = None
        self.collect: _Collect | None = None
        self.engine: DataDrivenEngine | None = None

    async def open(
        self,
        model: Any,
        *,
        keep_predictions: bool = False,
        outputs: Sequence[Output] = (),
        step_batch: StepBatch | None = None,
    ) -> DataDrivenEngine:
        from emorecog_stream.engine.outputs import MarkerLog, MqttOutput, RunSummaryLog
        from emorecog_stream.sinks.jsonl import JsonlLog

        job, config = self.job, self.config
        all_outputs: list[Output] = list(outputs)
        if keep_predictions:
            self.collect = _Collect()
            all_outputs.append(self.collect)
        engine_box: list[Engine] = []
        if job.mqtt_url:
            from emorecog_stream.engine.runner import mqtt_settings_for
            from emorecog_stream.sinks.mqtt import MqttPublisher

            settings = mqtt_settings_for(config, job.mqtt_url)
            self.publisher = MqttPublisher(settings, job.session_id, model_id=str(model.model_id))
            await self.publisher.start()
            all_outputs.append(MqttOutput(self.publisher))
        if job.log_path is not None:
            meta = {
                "rerun": True,
                "participant": job.session.participant,
                "chunk_s": job.chunk_seconds,
            }
            log = JsonlLog(
                job.log_path, session=job.session_id, model_id=str(model.model_id), meta=meta
            )
            if self.publisher is not None:
                stats = self.publisher
                all_outputs.append(
                    RunSummaryLog(log, lambda: stats.stats, lambda: engine_box[0].counters)
                )
            all_outputs.append(log)
            all_outputs.append(MarkerLog(log))

        engine = DataDrivenEngine(
            config, model, all_outputs, clock=self.clock, step_batch=step_batch
        )
        engine_box.append(engine)
        for role, desc in self.replayer.descriptions.items():
            engine.register_stream(role, desc.name, desc.nominal_srate)
        for output in all_outputs:
            output.on_status(engine.status)
        engine._update_status()  # as Engine.run does before the first chunk
        self.engine = engine
        return engine

    def events(self) -> Iterator[None]:
        """Feed the engine every chunk and timer wake-up, in order; yields after each one that
        made a step (with a step batch: handed it in, to be answered before the next event).
        Live, each chunk is handed over at its due time, every wake-up due by then first."""
        engine, clock, base = self.engine, self.clock, self.base
        assert engine is not None, "open() first"
        counters = engine.counters
        for due, role, values, stamps in self.pushes:
            t = base + due
            when = engine.next_wakeup()
            if when is not None and when + TIMER_LAG_S <= t:
                steps = counters.steps
                for _ in engine.wakeups(clock, t):
                    if counters.steps != steps:
                        steps = counters.steps
                        yield
            clock.now = max(clock.now, t)
            steps = counters.steps
            engine.process_chunk(role, _chunk_data(role, values), base + stamps, t)
            if counters.steps != steps:
                yield
        # the end of the recording: what the live engine does while the replay lingers
        end = base + self.replayer.duration + self.config.aligner.deadline + 1.0
        steps = counters.steps
        for _ in engine.wakeups(clock, end):
            if counters.steps != steps:
                steps = counters.steps
                yield

    @property
    def backlogged(self) -> bool:
        """The MQTT queue is over half full: wait for the broker (a full one would drop)."""
        pub = self.publisher
        return pub is not None and pub.stats.queued > pub.settings.queue_capacity // 2

    async def close(self, seconds: float, batch: BatchStats | None = None) -> RerunResult:
        engine, job = self.engine, self.job
        assert engine is not None
        await engine.aclose()
        stats = self.publisher.stats if self.publisher is not None else None
        return RerunResult(
            session_id=job.session_id,
            participant=job.session.participant,
            log_path=job.log_path,
            volumes=job.session.n_volumes,
            counters=engine.counters,
            seconds=seconds,
            mqtt_sent=None if stats is None else stats.sent,
            mqtt_dropped=None if stats is None else stats.dropped,
            predictions=self.collect.predictions if self.collect is not None else [],
            batch=batch,
        )


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
    """Feed one recorded session through a live :class:`Engine` at full speed, alone (the
    model stepped inline, as a live ``run`` does).

    ``chunk_seconds`` is the replay's chunk length (``replay --chunk-ms``); the engine's
    output does not depend on it (the aligner waits for each volume's physiology, whatever
    the chunks), only the speed does. ``config``: the engine configuration (default: the
    defaults, with ``session_id``).
    """
    job = RerunJob(
        session_id=session_id or session_ids([session])[0],
        session=session,
        log_path=None if log_path is None else str(log_path),
        mqtt_url=mqtt_url,
        chunk_seconds=chunk_seconds,
        config=config,
    )
    run = _SessionRun(job)
    await run.open(model, keep_predictions=keep_predictions, outputs=outputs)
    t_start = time.perf_counter()
    for n, _ in enumerate(run.events()):
        if n % 32 == 0:
            while run.backlogged:
                await asyncio.sleep(0.002)
    seconds = time.perf_counter() - t_start
    return await run.close(seconds)


async def rerun_group(
    jobs: Sequence[RerunJob],
    model: Any,
    *,
    keep_predictions: bool = False,
    group: int = 0,
    together: int = GROUP_SESSIONS,
) -> list[RerunResult]:
    """Re-run several sessions together in this process, their model steps batched (one
    :class:`StepBatch`); results in the order of ``jobs``.

    The sessions take turns: each runs its own events (:meth:`_SessionRun.events`) until it has
    handed the batch a step, then one flush steps every handed-in step as one pass and each
    engine publishes its answers, before its session's next event moves its clock. Each
    session's predictions are those of :func:`rerun_session` on it alone. At most
    ``together`` sessions are open at once (each holds its log file and broker connection
    open); the next one starts as one ends.
    """
    runs = [_SessionRun(job) for job in jobs]  # every recording checked before anything opens
    batch = _DrivenBatch(model)
    waiting = list(reversed(runs))
    turns: list[tuple[_SessionRun, Iterator[None]]] = []
    results: dict[int, RerunResult] = {}
    ended: list[_SessionRun] = []

    async def start_more() -> None:
        while waiting and len(turns) < max(1, together):
            run = waiting.pop()
            await run.open(model, keep_predictions=keep_predictions, step_batch=batch)
            turns.append((run, run.events()))

    await start_more()
    t_start = time.perf_counter()
    rounds = 0
    with one_blas_thread():
        while turns:
            going = []
            for run, events in turns:
                if next(events, _DONE) is _DONE:
                    ended.append(run)
                else:
                    going.append((run, events))
            turns[:] = going
            batch.flush()
            if ended and waiting:  # make room: close the finished ones now
                for run in ended:
                    results[id(run)] = await run.close(0.0)
                ended.clear()
                await start_more()
            rounds += 1
            if rounds % 8 == 0:
                for run, _ in turns:
                    while run.backlogged:
                        await asyncio.sleep(0.002)
    for result, run in zip(
        await asyncio.gather(*(run.close(0.0) for run in ended)), ended, strict=True
    ):
        results[id(run)] = result
    seconds = time.perf_counter() - t_start
    stats = BatchStats(
        group=group,
        sessions=len(runs),
        passes=batch.flushes,
        steps=batch.steps,
        largest=batch.largest,
    )
    volumes = sum(run.job.session.n_volumes for run in runs) or 1
    out = []
    for run in runs:
        result = results[id(run)]
        result.seconds = seconds * run.job.session.n_volumes / volumes
        result.batch = stats
        out.append(result)
    return out


_DONE = object()


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


def run_job(job: RerunJob) -> RerunResult:
    """Re-run one job, alone, in a worker started with :func:`load_worker_model`."""
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


def run_group(jobs: Sequence[RerunJob], group: int = 0) -> list[RerunResult]:
    """Re-run a worker's share of the sessions together (:func:`rerun_group`), in a worker
    started with :func:`load_worker_model`."""
    assert _WORKER_MODEL is not None, "worker started without its model"
    return asyncio.run(rerun_group(jobs, _WORKER_MODEL, group=group))


def split_jobs(jobs: Sequence[RerunJob], workers: int) -> list[list[int]]:
    """Indices of ``jobs`` for each of ``workers`` (none empty): the longest sessions first,
    each to the worker with the fewest volumes so far, each share in the original order."""
    workers = max(1, min(workers, len(jobs)))
    shares: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i].session.n_volumes):
        w = load.index(min(load))
        shares[w].append(i)
        load[w] += jobs[i].session.n_volumes
    return [sorted(share) for share in shares]


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

    ``jobs`` worker processes (each loads the model once) share the sessions out, each
    re-running its share together (:func:`rerun_group`); ``jobs=1`` runs in this process
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
    if not job_list:
        return []
    if jobs <= 1 or len(job_list) <= 1:
        if model is None:
            from emorecog_stream.model import load_model

            model = load_model(model_path or None)
        return asyncio.run(rerun_group(job_list, model))
    shares = split_jobs(job_list, jobs)
    # spawned, not forked: a fork of a process with threads (an MQTT client, LSL) can
    # inherit a lock held by one of them and hang
    with ProcessPoolExecutor(
        max_workers=len(shares),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=load_worker_model,
        initargs=(model_path,),
    ) as pool:
        done = pool.map(
            run_group, [[job_list[i] for i in share] for share in shares], range(len(shares))
        )
        results: list[RerunResult | None] = [None] * len(job_list)
        for share, share_results in zip(shares, done, strict=True):
            for i, result in zip(share, share_results, strict=True):
                results[i] = result
    return [r for r in results if r is not None]


__all__ = [
    "DEFAULT_CHUNK_S",
    "GROUP_SESSIONS",
    "BatchStats",
    "DataClock",
    "DataDrivenEngine",
    "RerunError",
    "RerunJob",
    "RerunResult",
    "config_for",
    "load_worker_model",
    "rerun_group",
    "rerun_many",
    "rerun_session",
    "run_group",
    "run_job",
    "session_ids",
    "split_jobs",
]
