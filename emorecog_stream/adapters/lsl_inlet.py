"""Async LSL inlets: resolve, check, clock-correct, detect stalls, recover.

Threading model (why): liblsl calls block, and the engine must react to data the moment it
arrives rather than on a polling tick. So each inlet owns one reader thread that sits in a
blocking ``pull_chunk`` (GIL released inside liblsl) with a short timeout, wakes as soon as a
sample arrives, drains whatever else is already buffered and hands the chunk to the event loop
with ``loop.call_soon_threadsafe``. The loop only ever sees ready-made :class:`Chunk` objects
(and :class:`StreamEvent` state changes) on an ``asyncio.Queue``; it never calls liblsl itself
except for setup/teardown, which runs in a worker thread.

Processing flags per stream kind (see :func:`default_processing_flags`):

- every stream: ``clocksync`` (timestamps land on *our* ``local_clock``, the engine's single
  time base), ``monotonize`` (a buffer query never sees time run backwards) and ``threadsafe``
  (status and teardown touch the inlet from another thread than the reader).
- ``dejitter`` only for regularly sampled physiology (PPG, respiration): devices stamp chunks at
  push time, and the smoothing recovers the true regular sample clock, which the rate estimators
  rely on. It is *not* used for fMRI (a volume's timestamp is the scanner trigger, the thing a
  prediction is lined up with; at 1/TR the regression would need minutes to settle and a skipped
  volume would bend every later timestamp) nor for irregular streams (rates, markers), where
  liblsl ignores it anyway. liblsl's dejitter fits timestamp = a + b * sample count, so after a
  pause in a live outlet every post-gap timestamp would come out early by the pause length
  (measured: 2 s early after a 2 s pause). The reader therefore restarts the dejitter
  regression after any silence longer than ``max(0.25 s, 20 sample periods)``, before the
  first post-gap sample is pulled (post-processing happens at pull time).

States: ``connecting`` (looking for the stream) -> ``connected`` -> ``stalled`` (no sample for
``stall_timeout`` s after data had flowed; a stream silent since it was found stays
``connected``) -> ``lost`` (also no longer visible on the network) -> ``connected`` again
when data flows (liblsl reconnects to an outlet with the same ``source_id``; streams without a
source_id are re-resolved by the spec). ``error`` means the stream found does not match the
spec (it keeps looking in background mode). ``closed`` after :meth:`AsyncInlet.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import pylsl
from pylsl.lib import lib as _liblsl
from pylsl.util import LostError as _LostError
from pylsl.util import TimeoutError as _TimeoutError

from emorecog_stream.adapters.lsl_clock import local_clock
from emorecog_stream.adapters.lsl_info import (
    StreamMetadata,
    build_predicate,
    describe_info,
    describe_visible,
    format_name,
    parse_metadata,
    stream_identity,
)
from emorecog_stream.core.streams import MOTION_CHANNELS, N_ROIS, Role

log = logging.getLogger(__name__)


class LslAdapterError(Exception):
    """Base of the errors an inlet raises (each message names what was expected and found)."""


class StreamNotFoundError(LslAdapterError, LookupError):
    """No visible stream matches the spec; the message lists the streams that are visible."""


class StreamMismatchError(LslAdapterError, ValueError):
    """A stream matched the selectors but its channel count, format or rate is wrong."""


class AmbiguousStreamError(LslAdapterError, LookupError):
    """Several different streams match the selectors."""


class StreamState(str, Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    STALLED = "stalled"
    LOST = "lost"
    ERROR = "error"
    CLOSED = "closed"


DEFAULT_CHANNELS: dict[Role, int] = {
    Role.FMRI: N_ROIS,
    Role.PPG: 1,
    Role.RESP: 1,
    Role.RATES: 2,
    Role.MARKERS: 1,
    Role.MOTION: len(MOTION_CHANNELS),
}

_BASE_FLAGS = pylsl.proc_clocksync | pylsl.proc_monotonize | pylsl.proc_threadsafe


def default_processing_flags(role: Role) -> int:
    """liblsl post-processing flags per role (the module docstring says why)."""
    if role in (Role.PPG, Role.RESP):
        return _BASE_FLAGS | pylsl.proc_dejitter
    return _BASE_FLAGS


@dataclass(frozen=True)
class InletSpec:
    """Which stream to take for a role and what it must look like.

    Every non-empty selector (``name``, ``type``, ``source_id``) must match. ``channels``:
    required channel count (None: any). ``rate``: expected nominal rate in Hz, 0 for irregular
    (None: any), checked within the fraction ``rate_tolerance``. ``stall_timeout``: seconds
    without a sample before the stream counts as stalled (None: 2.5 sample periods for fMRI,
    2 s for physiology, never for irregular streams). ``lost_after``: seconds a stalled stream
    must stay invisible to the resolver before it counts as lost.
    """

    role: Role
    name: str = ""
    type: str = ""
    source_id: str = ""
    channels: int | None = None
    rate: float | None = None
    rate_tolerance: float = 0.05
    stall_timeout: float | None = None
    lost_after: float = 1.0
    processing_flags: int | None = None
    max_buflen: int = 60  # seconds of data liblsl keeps if the engine falls behind

    def __post_init__(self) -> None:
        build_predicate(self.name, self.type, self.source_id)  # raises on no selector
        if self.rate is not None and self.rate < 0:
            raise ValueError(f"{self.role.value}: rate must be >= 0 Hz, got {self.rate}")
        if not 0 <= self.rate_tolerance < 1:
            raise ValueError(
                f"{self.role.value}: rate_tolerance must be a fraction in [0, 1),"
                f" got {self.rate_tolerance}"
            )

    @classmethod
    def for_role(cls, role: Role, tag: str = "", **overrides: Any) -> InletSpec:
        """The spec a live setup uses for ``role`` (default name, type, source_id, channels).

        ``tag`` matches :class:`~emorecog_stream.adapters.replay.Replayer`'s ``tag``.
        """
        name, type_, source_id = stream_identity(role, tag)
        values: dict[str, Any] = {
            "name": name,
            "type": type_,
            "source_id": source_id,
            "channels": DEFAULT_CHANNELS[role],
        }
        values.update(overrides)
        return cls(role=role, **values)

    @property
    def predicate(self) -> str:
        return build_predicate(self.name, self.type, self.source_id)

    @property
    def flags(self) -> int:
        if self.processing_flags is not None:
            return self.processing_flags
        return default_processing_flags(self.role)

    def describe(self) -> str:
        parts = [
            f"{k}={v!r}"
            for k, v in (("name", self.name), ("type", self.type), ("source_id", self.source_id))
            if v
        ]
        return f"{self.role.value} stream ({' '.join(parts)})"

    def effective_stall_timeout(self, nominal_srate: float) -> float:
        if self.stall_timeout is not None:
            return self.stall_timeout
        if nominal_srate <= 0:
            return math.inf
        if self.role is Role.FMRI:
            return max(2.5 / nominal_srate, 1.0)
        return max(2.0, 5.0 / nominal_srate)


@dataclass(frozen=True)
class Chunk:
    """Samples that arrived together. ``data``: (n, channels) float64, or the marker strings.

    ``timestamps`` are on the local LSL clock (clock-corrected by liblsl); ``receipt_time`` is
    ``local_clock()`` when the reader thread got the chunk.
    """

    role: Role
    data: np.ndarray | list[str]
    timestamps: np.ndarray
    receipt_time: float

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])


@dataclass(frozen=True)
class StreamEvent:
    """A state change of one stream (delivered on the same queue as the chunks)."""

    role: Role
    state: StreamState
    previous: StreamState
    reason: str
    time: float  # local_clock()


@dataclass(frozen=True)
class StreamStatus:
    """A snapshot for status topics and the dashboard."""

    role: Role
    state: StreamState
    reason: str
    name: str
    source_id: str
    hostname: str
    nominal_srate: float | None
    measured_srate: float | None  # from sample timestamps over the last few seconds
    samples: int
    chunks: int
    last_timestamp: float | None
    last_receipt: float | None
    lag: float | None  # receipt time minus timestamp of the newest sample, last chunk
    idle: float | None  # seconds since the last chunk arrived
    clock_offset: float | None  # liblsl time correction (sender clock -> ours), seconds
    stalls: int
    recoveries: int


# ---------------------------------------------------------------------------------------------
# resolving and checking (plain blocking functions; the async API runs them in threads)


def _resolve(predicate: str, timeout: float) -> list[pylsl.StreamInfo]:
    # liblsl 1.18 waits ~5.5 s instead of 0.5 s for exactly timeout=0.5; avoid that value.
    if abs(timeout - 0.5) < 1e-9:
        timeout = 0.49
    return list(pylsl.resolve_bypred(predicate, 1, max(timeout, 0.0)))


def visible_streams(wait_time: float = 1.0) -> list[pylsl.StreamInfo]:
    """All streams the resolver sees within ``wait_time`` seconds."""
    return list(pylsl.resolve_streams(wait_time))


def check_info(spec: InletSpec, info: pylsl.StreamInfo) -> None:
    """Raise :class:`StreamMismatchError` when ``info`` breaks the spec (naming both sides)."""
    where = f"{spec.role.value} stream {info.name()!r} (source_id {info.source_id()!r})"
    n = info.channel_count()
    if spec.channels is not None and n != spec.channels:
        raise StreamMismatchError(
            f"{where}: expected {spec.channels} channel{'s' * (spec.channels != 1)}, found {n}"
        )
    fmt = info.channel_format()
    if spec.role is Role.MARKERS and fmt != pylsl.cf_string:
        raise StreamMismatchError(
            f"{where}: expected string channels for markers, found {format_name(fmt)}"
        )
    if spec.role is not Role.MARKERS and fmt == pylsl.cf_string:
        raise StreamMismatchError(f"{where}: expected numeric channels, found string")
    rate = info.nominal_srate()
    if spec.rate is not None:
        if spec.rate == 0:
            ok = rate == 0
        else:
            ok = rate > 0 and abs(rate - spec.rate) <= spec.rate_tolerance * spec.rate
        if not ok:
            want = "irregular (0 Hz)" if spec.rate == 0 else f"{spec.rate:g} Hz"
            got = "irregular (0 Hz)" if rate == 0 else f"{rate:g} Hz"
            raise StreamMismatchError(
                f"{where}: expected a nominal rate of {want}"
                f" (tolerance {spec.rate_tolerance:.0%}), found {got}"
            )


def pick_stream(spec: InletSpec, infos: Sequence[pylsl.StreamInfo]) -> pylsl.StreamInfo:
    """The one stream among resolver results, checked against the spec.

    Raises :class:`AmbiguousStreamError` or :class:`StreamMismatchError`.
    """
    distinct = {i.uid(): i for i in infos}
    if len(distinct) > 1:
        lines = "\n  ".join(sorted(describe_info(i) for i in distinct.values()))
        raise AmbiguousStreamError(
            f"{len(distinct)} streams match the {spec.describe()}; set name or source_id"
            f" to pick one:\n  {lines}"
        )
    info = infos[0]
    check_info(spec, info)
    return info


def not_found(spec: InletSpec, timeout: float, list_wait: float = 1.0) -> StreamNotFoundError:
    return StreamNotFoundError(
        f"no {spec.describe()} found within {timeout:g} s;"
        f" {describe_visible(visible_streams(list_wait))}"
    )


def resolve_one(spec: InletSpec, timeout: float) -> pylsl.StreamInfo:
    """Find the one stream matching ``spec`` within ``timeout`` seconds and check it (blocking).

    Raises :class:`StreamNotFoundError` (listing the visible streams),
    :class:`AmbiguousStreamError` or :class:`StreamMismatchError`.
    """
    infos = _resolve(spec.predicate, timeout)
    if not infos:
        raise not_found(spec, timeout)
    return pick_stream(spec, infos)


def _raw_strings_supported() -> bool:
    return "as_numpy" in inspect.signature(pylsl.StreamInlet.pull_chunk).parameters


_RAW_STRINGS = _raw_strings_supported()


def _pull_strings(inlet: pylsl.StreamInlet, timeout: float, max_samples: int) -> tuple[Any, Any]:
    """String samples, decoded here with U+FFFD for bytes that are not UTF-8.

    pylsl decodes strictly: one marker with a stray byte from a sender raised inside
    ``pull_chunk``, after liblsl had handed over the whole chunk, so every marker pulled with
    it was lost and the inlet was torn down and resolved again. (pylsl < 1.18 cannot return
    the raw bytes; it keeps the strict decoding.)
    """
    if not _RAW_STRINGS:
        return inlet.pull_chunk(timeout, max_samples)
    raw, ts = inlet.pull_chunk(timeout, max_samples, as_numpy=True)
    rows = [[_text(v) for v in row] for row in raw] if len(ts) else []
    return rows, ts


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# the inlet


_CLOSED = object()


@dataclass
class _Stats:
    samples: int = 0
    chunks: int = 0
    last_timestamp: float | None = None
    last_receipt: float | None = None
    lag: float | None = None
    clock_offset: float | None = None
    stalls: int = 0
    recoveries: int = 0
    window: deque[tuple[float, float, int]] = field(default_factory=deque)  # first, last, n


class AsyncInlet:
    """One LSL stream as an async source of :class:`Chunk` and :class:`StreamEvent` items.

    Use ``await inlet.open(timeout)`` to require the stream now (errors raise), or
    ``inlet.start()`` to look for it in the background (state changes arrive as events).
    Iterate with ``async for item in inlet`` (or pass a shared ``queue``: see
    :class:`InletGroup`). ``await inlet.close()`` stops and joins the reader thread.
    """

    def __init__(
        self,
        spec: InletSpec,
        queue: asyncio.Queue[Any] | None = None,
        *,
        pull_timeout: float = 0.05,
        max_chunk: int = 1024,
        rate_window: float = 5.0,
        info: pylsl.StreamInfo | None = None,
        pace: float = 0.0,
        urgent: threading.Event | None = None,
        needed: Callable[[], float] | None = None,
        on_chunk: Any = None,
    ) -> None:
        self.spec = spec
        # Pacing (the hub): after delivering a chunk, wait up to ``pace`` s for more samples to
        # gather unless ``urgent`` is set (a volume waits for this physiology): far fewer,
        # larger chunks for the event loop, and no added latency where it counts. With
        # ``needed()`` (an LSL timestamp), the reader clears ``urgent`` itself once it has
        # delivered a sample at or after it: the waiting volume then has what it needs.
        self._pace = pace
        self._urgent = urgent
        self._needed = needed
        self._on_chunk = on_chunk  # called in the reader thread before a chunk is handed over
        # a stream already found (the hub's one resolver, adapters/lsl_discovery.py): opened
        # directly, without a resolve of its own
        self._found = info
        self._queue: asyncio.Queue[Any] | None = queue
        self._own_queue = queue is None
        self._pull_timeout = pull_timeout
        self._max_chunk = max_chunk
        self._rate_window = rate_window
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = StreamState.CONNECTING
        self._reason = "not started"
        self._stats = _Stats()
        self._info: pylsl.StreamInfo | None = None
        self._metadata: StreamMetadata | None = None
        self._connected: asyncio.Future[StreamMetadata] | None = None
        self._inlet: pylsl.StreamInlet | None = None  # owned by the reader thread
        self._open_deadline: float | None = None  # set by open(): fail instead of waiting

    # -- public API ----------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.spec.role

    @property
    def metadata(self) -> StreamMetadata | None:
        """Full description of the connected stream (channel labels, units, participant, TR)."""
        return self._metadata

    @property
    def state(self) -> StreamState:
        return self._state

    @property
    def queue(self) -> asyncio.Queue[Any]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def start(self) -> None:
        """Start looking for the stream and reading it in the background; returns at once."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.queue  # noqa: B018 - create the queue on this loop
        self._connected = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, name=f"lsl-inlet-{self.spec.role.value}", daemon=True
        )
        self._thread.start()

    async def open(self, timeout: float = 5.0) -> StreamMetadata:
        """Resolve, check and connect within ``timeout`` seconds; raise if that fails.

        Raises :class:`StreamNotFoundError` (listing visible streams),
        :class:`StreamMismatchError` or :class:`AmbiguousStreamError`; the inlet is closed then.
        """
        self._open_deadline = timeout
        self.start()
        assert self._connected is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._connected), timeout + 5.0)
        except BaseException:
            await self.close()
            raise

    async def wait_connected(self, timeout: float) -> StreamMetadata:
        """After :meth:`start`: the stream's metadata once connected; raises what stopped it
        (:class:`StreamMismatchError`, ...) or :class:`asyncio.TimeoutError`."""
        assert self._connected is not None, "call start() first"
        return await asyncio.wait_for(asyncio.shield(self._connected), timeout)

    def status(self) -> StreamStatus:
        now = local_clock()
        with self._lock:
            s = self._stats
            info = self._info
            return StreamStatus(
                role=self.spec.role,
                state=self._state,
                reason=self._reason,
                name=info.name() if info else "",
                source_id=info.source_id() if info else "",
                hostname=info.hostname() if info else "",
                nominal_srate=info.nominal_srate() if info else None,
                measured_srate=self._measured_rate(),
                samples=s.samples,
                chunks=s.chunks,
                last_timestamp=s.last_timestamp,
                last_receipt=s.last_receipt,
                lag=s.lag,
                idle=None if s.last_receipt is None else now - s.last_receipt,
                clock_offset=s.clock_offset,
                stalls=s.stalls,
                recoveries=s.recoveries,
            )

    async def close(self) -> None:
        """Stop the reader thread, join it and drop the inlet (idempotent)."""
        self._stop.set()
        if self._urgent is not None:
            self._urgent.set()  # a paced reader waits on it: wake it to see the stop
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join)
        if self._state is not StreamState.CLOSED:
            self._set_state(StreamState.CLOSED, "closed")
        if self._own_queue and self._queue is not None:
            self._queue.put_nowait(_CLOSED)

    def __aiter__(self) -> AsyncIterator[Chunk | StreamEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk | StreamEvent]:
        queue = self.queue
        while True:
            item = await queue.get()
            if item is _CLOSED:
                return
            yield item

    async def __aenter__(self) -> AsyncInlet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reader thread -------------------------------------------------------------------

    def _emit(self, item: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:  # keep order with close()'s sentinel
            self.queue.put_nowait(item)
            return
        with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _set_state(self, state: StreamState, reason: str) -> None:
        with self._lock:
            previous = self._state
            if previous is state and self._reason == reason:
                return
            self._state = state
            self._reason = reason
        if previous is not state:
            self._emit(StreamEvent(self.spec.role, state, previous, reason, local_clock()))

    def _resolve_future(self, result: StreamMetadata | BaseException) -> None:
        fut, loop = self._connected, self._loop
        if fut is None or loop is None or loop.is_closed():
            return

        def settle() -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    def _connect(self) -> pylsl.StreamInlet | None:
        """Resolve + check + open (blocking, in the reader thread). None when stopped."""
        deadline = self._open_deadline
        started = local_clock()
        if self._found is not None:
            found, self._found = self._found, None
            try:
                check_info(self.spec, found)
                return self._make_inlet(found)
            except LslAdapterError as exc:  # the stream found is not what the spec wants
                self._set_state(StreamState.ERROR, str(exc))
                self._resolve_future(exc)
                self._stop.set()
                return None
        while not self._stop.is_set():
            try:
                remaining = None if deadline is None else deadline - (local_clock() - started)
                if remaining is not None and remaining <= 0:
                    raise not_found(self.spec, deadline)  # type: ignore[arg-type]
                # >= 1 s per attempt: liblsl re-sends queries every ~0.5 s, and concurrent
                # resolves (several inlets opening at once) often miss the first answer
                step = 1.0 if remaining is None else min(2.0, remaining)
                infos = _resolve(self.spec.predicate, step)
                if infos:
                    return self._make_inlet(pick_stream(self.spec, infos))
            except LslAdapterError as exc:
                if deadline is not None:
                    self._set_state(StreamState.ERROR, str(exc))
                    self._resolve_future(exc)
                    self._stop.set()
                    return None
                self._set_state(StreamState.ERROR, str(exc))
                self._stop.wait(2.0)  # background mode: a corrected stream may appear
        return None

    def _make_inlet(self, info: pylsl.StreamInfo) -> pylsl.StreamInlet:
        inlet = pylsl.StreamInlet(
            info,
            max_buflen=self.spec.max_buflen,
            recover=True,
            processing_flags=self.spec.flags,
        )
        full = inlet.info(5.0)
        inlet.open_stream(5.0)
        offset: float | None
        try:
            offset = inlet.time_correction(5.0)
        except Exception:  # a first estimate that times out is reported as unknown
            offset = None
        with self._lock:
            self._info = full
            self._metadata = parse_metadata(full)
            self._stats.clock_offset = offset
            self._stats.window.clear()
        return inlet

    def _measured_rate(self) -> float | None:
        window = self._stats.window
        if not window:
            return None
        samples = sum(n for _, _, n in window)
        span = window[-1][1] - window[0][0]
        if samples < 2 or span <= 0:
            return None
        return (samples - 1) / span

    def _run(self) -> None:
        self._set_state(StreamState.CONNECTING, "resolving " + self.spec.describe())
        try:
            inlet = self._connect()
        except Exception as exc:  # unexpected liblsl failure: surface it, do not die silently
            self._set_state(StreamState.ERROR, f"{type(exc).__name__}: {exc}")
            self._resolve_future(exc)
            return
        if inlet is None:
            return
        assert self._metadata is not None
        self._set_state(StreamState.CONNECTED, "connected to " + describe_info(inlet.info(1.0)))
        self._resolve_future(self._metadata)
        self._inlet = inlet
        del inlet  # self._inlet is the only reference: replacing it destroys the old inlet
        try:
            self._read()
        finally:
            with contextlib.suppress(Exception):
                if self._inlet is not None:
                    self._inlet.close_stream()
            self._inlet = None

    def _read(self) -> None:
        inlet = self._inlet
        info = self._info
        assert inlet is not None and info is not None
        is_string, buf = self._buffer_for(inlet)
        stall_timeout = self.spec.effective_stall_timeout(info.nominal_srate())
        window = (
            max(self._rate_window, 3.0 / info.nominal_srate())
            if info.nominal_srate() > 0
            else self._rate_window
        )
        srate = info.nominal_srate()
        gap_reset = max(0.25, 20.0 / srate) if srate > 0 else math.inf
        dejitter_fresh = True  # no sample pulled since the dejitter state was (re)started
        last_data = local_clock()
        resolver: pylsl.ContinuousResolver | None = None
        resolver_since = 0.0
        next_offset_query = last_data + 2.0
        while not self._stop.is_set():
            try:
                data, ts = self._pull(inlet, is_string, buf, self._pull_timeout)
            except _TimeoutError:
                # liblsl could not refresh the clock offset because the sender is gone (its
                # samples are still buffered here): drain them with the last known offset
                data, ts = self._drain_without_clocksync(inlet, is_string, buf)
            except Exception as exc:
                # _LostError: not recoverable by liblsl (no source_id); anything else is a
                # liblsl failure. Either way: report it and re-resolve by the spec.
                why = (
                    "stream lost (not recoverable by source_id)"
                    if isinstance(exc, _LostError)
                    else f"inlet failed ({type(exc).__name__}: {exc}); resolving again"
                )
                self._set_state(StreamState.LOST, why)
                self._inlet = inlet = None
                self._open_deadline = None
                new = self._connect()
                if new is None:
                    return
                self._inlet = inlet = new
                is_string, buf = self._buffer_for(inlet)
                last_data = local_clock()
                continue
            now = local_clock()
            if len(ts):
                timestamps = np.asarray(ts, dtype=np.float64)
                chunk = Chunk(self.spec.role, data, timestamps, now)
                with self._lock:
                    s = self._stats
                    s.samples += len(timestamps)
                    s.chunks += 1
                    s.last_timestamp = float(timestamps[-1])
                    s.last_receipt = now
                    s.lag = now - float(timestamps[-1])
                    s.window.append((float(timestamps[0]), float(timestamps[-1]), len(timestamps)))
                    while s.window and s.window[0][1] < timestamps[-1] - window:
                        s.window.popleft()
                    recovered = self._state in (StreamState.STALLED, StreamState.LOST)
                    if recovered:
                        s.recoveries += 1
                if recovered or self._state is not StreamState.CONNECTED:
                    self._set_state(StreamState.CONNECTED, "data flowing again")
                if self._on_chunk is not None:
                    try:
                        self._on_chunk(chunk)
                    except Exception:  # a hook's bug must not end the reader
                        log.exception("inlet %s: on_chunk hook failed", self.spec.describe())
                self._emit(chunk)
                last_data = now
                dejitter_fresh = False
                resolver = None
                if now >= next_offset_query:
                    next_offset_query = now + 2.0
                    with contextlib.suppress(Exception):
                        offset = inlet.time_correction(0.0)
                        with self._lock:
                            self._stats.clock_offset = offset
                if self._pace > 0 and self._urgent is not None:
                    self._gather(float(timestamps[-1]))
                continue
            idle = now - last_data
            if not dejitter_fresh and idle > gap_reset:
                # a pause: start a fresh dejitter regression before the first post-gap sample
                self._reset_dejitter(inlet)
                dejitter_fresh = True
            if (
                self._state is StreamState.CONNECTED
                and idle > stall_timeout
                and self._stats.samples > 0  # silent since connecting: waiting, not stalled
            ):
                with self._lock:
                    self._stats.stalls += 1
                    self._stats.window.clear()
                self._set_state(StreamState.STALLED, f"no sample for {idle:.1f} s")
                resolver = pylsl.ContinuousResolver(
                    pred=self._presence_predicate(), forget_after=2.0
                )
                resolver_since = now
            elif resolver is not None and now - resolver_since > self.spec.lost_after:
                results = resolver.results()
                current = self._metadata.uid if self._metadata else ""
                fresh = [r for r in results if r.uid() != current]
                if fresh:
                    # a restarted outlet (new uid): connect to it now rather than waiting for
                    # liblsl's own recovery, which retries only every ~2 s and meanwhile loses
                    # whatever the new outlet pushes
                    replacement = self._switch_inlet(fresh[0])
                    if replacement is not None:
                        self._inlet = inlet = replacement
                        is_string, buf = self._buffer_for(inlet)
                    resolver_since = now
                elif not results and self._state is StreamState.STALLED:
                    self._set_state(
                        StreamState.LOST, f"stream no longer visible; no sample for {idle:.1f} s"
                    )
                elif results and self._state is StreamState.LOST:
                    self._set_state(
                        StreamState.STALLED, f"visible again, no sample for {idle:.1f} s"
                    )

    def _gather(self, last: float) -> None:
        """Paced reading: let samples gather for up to ``pace`` s unless a volume waits for
        samples this stream has not delivered yet (``last``: its newest timestamp)."""
        urgent, needed = self._urgent, self._needed
        assert urgent is not None
        if needed is not None and urgent.is_set() and last >= needed():
            urgent.clear()
            if last < needed():  # a volume came between the check and the clear
                urgent.set()
        if not urgent.is_set():
            urgent.wait(self._pace)

    def _pull(
        self, inlet: pylsl.StreamInlet, is_string: bool, buf: np.ndarray | None, timeout: float
    ) -> tuple[np.ndarray | list[str], list[float]]:
        """Wait up to ``timeout`` for one sample, then take whatever else is already there."""
        if is_string:
            samples, ts = _pull_strings(inlet, timeout, 1)
            if len(ts):
                more, ts2 = _pull_strings(inlet, 0.0, self._max_chunk - 1)
                samples = list(samples) + list(more)
                ts = list(ts) + list(ts2)
            return [s[0] for s in samples], list(ts)
        assert buf is not None
        _, ts = inlet.pull_chunk(timeout, 1, buf)
        if len(ts):
            _, ts2 = inlet.pull_chunk(0.0, self._max_chunk - 1, buf[1:])
            ts = list(ts) + list(ts2)
        return buf[: len(ts)].astype(np.float64), list(ts)

    def _drain_without_clocksync(
        self, inlet: pylsl.StreamInlet, is_string: bool, buf: np.ndarray | None
    ) -> tuple[np.ndarray | list[str], list[float]]:
        flags = self.spec.flags
        offset = self._stats.clock_offset or 0.0
        _liblsl.lsl_set_postprocessing(inlet.obj, flags & ~pylsl.proc_clocksync)
        try:
            data, ts = self._pull(inlet, is_string, buf, 0.0)
        except Exception:
            return ([] if is_string else np.zeros((0, 1))), []
        finally:
            _liblsl.lsl_set_postprocessing(inlet.obj, flags)
        if flags & pylsl.proc_clocksync:
            ts = [t + offset for t in ts]
        return data, ts

    def _switch_inlet(self, info: pylsl.StreamInfo) -> pylsl.StreamInlet | None:
        """Open an inlet on a restarted outlet (checked against the spec first)."""
        try:
            check_info(self.spec, info)
            inlet = self._make_inlet(info)
        except StreamMismatchError as exc:
            self._set_state(StreamState.ERROR, str(exc))
            return None
        except Exception:  # it vanished again while connecting: keep waiting
            return None
        self._set_state(StreamState.STALLED, "reconnected to a restarted outlet, waiting for data")
        return inlet

    def _buffer_for(self, inlet: pylsl.StreamInlet) -> tuple[bool, np.ndarray | None]:
        info = self._info
        assert info is not None
        if info.channel_format() == pylsl.cf_string:
            return True, None
        dtype = _NP_DTYPE.get(info.channel_format(), np.float64)
        return False, np.empty((self._max_chunk, info.channel_count()), dtype=dtype)

    def _presence_predicate(self) -> str:
        info = self._info
        if info is not None and info.source_id():
            return build_predicate(source_id=info.source_id(), name=info.name())
        return self.spec.predicate

    def _reset_dejitter(self, inlet: pylsl.StreamInlet) -> None:
        flags = self.spec.flags
        if flags & pylsl.proc_dejitter:
            # toggling the flag makes liblsl start a fresh regression with the next sample
            _liblsl.lsl_set_postprocessing(inlet.obj, flags & ~pylsl.proc_dejitter)
            _liblsl.lsl_set_postprocessing(inlet.obj, flags)


_NP_DTYPE: dict[int, Any] = {
    pylsl.cf_float32: np.float32,
    pylsl.cf_double64: np.float64,
    pylsl.cf_int32: np.int32,
    pylsl.cf_int16: np.int16,
    pylsl.cf_int8: np.int8,
    pylsl.cf_int64: np.int64,
}


class InletGroup:
    """Several inlets feeding one queue: the engine's single source of chunks and events.

    ``await group.open(timeout)`` connects every spec concurrently (``required=False`` roles
    are started in the background instead, so a physiology stream may appear later).
    """

    def __init__(
        self,
        specs: Sequence[InletSpec],
        *,
        optional: Sequence[Role] = (),
        pull_timeout: float = 0.05,
    ) -> None:
        roles = [s.role for s in specs]
        if len(set(roles)) != len(roles):
            raise ValueError(f"one spec per role expected, got roles {[r.value for r in roles]}")
        self._queue: asyncio.Queue[Any] | None = None
        self._specs = list(specs)
        self._optional = set(optional)
        self._pull_timeout = pull_timeout
        self.inlets: dict[Role, AsyncInlet] = {}
        self._closed = False

    async def open(self, timeout: float = 5.0) -> dict[Role, StreamMetadata]:
        self._queue = asyncio.Queue()
        for spec in self._specs:
            self.inlets[spec.role] = AsyncInlet(spec, self._queue, pull_timeout=self._pull_timeout)
        required = [i for r, i in self.inlets.items() if r not in self._optional]
        results = await asyncio.gather(*(i.open(timeout) for i in required), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            if len(errors) == 1:
                raise errors[0]
            raise LslAdapterError("\n".join(str(e) for e in errors))
        for role, inlet in self.inlets.items():
            if role in self._optional:
                inlet.start()
        return {i.role: i.metadata for i in required if i.metadata is not None}

    def statuses(self) -> dict[Role, StreamStatus]:
        return {role: inlet.status() for role, inlet in self.inlets.items()}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(i.close() for i in self.inlets.values()))
        if self._queue is not None:
            self._queue.put_nowait(_CLOSED)

    def __aiter__(self) -> AsyncIterator[Chunk | StreamEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk | StreamEvent]:
        if self._queue is None:
            raise RuntimeError("InletGroup: call open() before iterating")
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                return
            yield item

    async def __aenter__(self) -> InletGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def spec_with(spec: InletSpec, **changes: Any) -> InletSpec:
    """A copy of ``spec`` with some fields changed (dataclasses.replace, re-validated)."""
    return replace(spec, **changes)


__all__ = [
    "AmbiguousStreamError",
    "AsyncInlet",
    "Chunk",
    "InletGroup",
    "InletSpec",
    "LslAdapterError",
    "StreamEvent",
    "StreamMismatchError",
    "StreamNotFoundError",
    "StreamState",
    "StreamStatus",
    "check_info",
    "default_processing_flags",
    "pick_stream",
    "resolve_one",
    "visible_streams",
]
