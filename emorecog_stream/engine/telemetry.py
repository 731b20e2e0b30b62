"""Live measurements of the engine, for the dashboard and the headless log (pure, no I/O).

The engine owns one :class:`TelemetryRecorder`; it feeds it sample timestamps per stream,
predictions and status changes, and asks it for an :class:`EngineSnapshot` whenever the screen
should change. The snapshot is frozen (tuples only), so a dashboard thread can render it while
the engine goes on mutating the recorder: nothing is shared but immutable data.

All times are seconds on one clock chosen by the caller (live: ``pylsl.local_clock()``, the
same clock the time-corrected sample timestamps are on); latencies are milliseconds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import numpy as np

from emorecog_stream.core.messages import Prediction
from emorecog_stream.core.streams import INTENSITY_RANGE

__all__ = [
    "EngineSnapshot",
    "LatencyStats",
    "MqttStats",
    "MqttStatsLike",
    "RateMeter",
    "StreamMonitor",
    "StreamState",
    "StreamStats",
    "TelemetryRecorder",
    "stream_state",
]


class StreamState(str, Enum):
    """What the engine knows about one input stream right now."""

    CONNECTED = "connected"  # samples are arriving on time
    STALLED = "stalled"  # the inlet is open but no sample for longer than the stall timeout
    LOST = "lost"  # no sample for longer than the loss timeout, or the outlet disappeared
    ABSENT = "absent"  # never seen (not resolved yet, or not configured)


def stream_state(
    lag_s: float | None,
    *,
    stall_after_s: float,
    lost_after_s: float,
) -> StreamState:
    """Classify a stream from its lag (now - last sample time); ``None`` lag means never seen.

    A helper for engines that have no better signal (an inlet that reports the outlet gone may
    set ``LOST`` directly).
    """
    if stall_after_s <= 0 or lost_after_s < stall_after_s:
        raise ValueError(
            "expected 0 < stall_after_s <= lost_after_s, "
            f"got stall_after_s={stall_after_s}, lost_after_s={lost_after_s}"
        )
    if lag_s is None:
        return StreamState.ABSENT
    if lag_s > lost_after_s:
        return StreamState.LOST
    if lag_s > stall_after_s:
        return StreamState.STALLED
    return StreamState.CONNECTED


class RateMeter:
    """Measured sample rate of a stream over a sliding time window.

    Fed with sample timestamps (or arrival times) as chunks arrive; memory is bounded by the
    samples inside the window. The rate is ``(N - 1) / span`` over the N samples in the
    window, where span is the time between the first and the last of them; once the stream
    falls silent for longer than its own mean interval, the span is stretched to ``now`` so the
    rate decays instead of showing the last good value until the window empties.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(
                f"RateMeter window must be a positive number of seconds, got {window_s}"
            )
        self.window_s = float(window_s)
        self._chunks: deque[np.ndarray] = deque()
        self._count = 0  # samples currently held
        self.total = 0  # samples ever added
        self.restarts = 0  # times the timestamps went backwards and the window was cleared

    def add(self, timestamps: float | Sequence[float] | np.ndarray) -> None:
        """Record samples at these times (ascending within a chunk).

        A chunk that starts before the newest sample already held means the clock went
        backwards; the window is cleared and the rate measured afresh from this chunk.
        """
        ts = np.atleast_1d(np.asarray(timestamps, dtype=np.float64))
        if ts.ndim != 1:
            raise ValueError(
                f"RateMeter.add expects a scalar or 1-D timestamps, got shape {ts.shape}"
            )
        if ts.size == 0:
            return
        last = self.last
        if last is not None and ts[0] < last:
            # time went backwards (a restarted outlet, a clock reset): measure afresh
            self._chunks.clear()
            self._count = 0
            self.restarts += 1
        self._chunks.append(ts.copy())
        self._count += int(ts.size)
        self.total += int(ts.size)
        self._trim(float(ts[-1]))

    @property
    def last(self) -> float | None:
        """Timestamp of the newest sample, or None before the first."""
        return float(self._chunks[-1][-1]) if self._chunks else None

    def _trim(self, now: float) -> None:
        start = now - self.window_s
        while self._chunks:
            head = self._chunks[0]
            if head[-1] < start:
                self._chunks.popleft()
                self._count -= int(head.size)
                continue
            if head[0] < start:
                keep = head[np.searchsorted(head, start, side="left") :]
                self._count -= int(head.size - keep.size)
                self._chunks[0] = keep
            break

    def rate(self, now: float | None = None) -> float | None:
        """Samples per second over ``[now - window, now]``; None until two samples were seen.

        ``now`` defaults to the newest sample's time (the rate while data flows).
        """
        if self.total < 2:
            return None
        if now is None:
            now = self.last
            assert now is not None
        self._trim(now)
        if self._count < 2:
            return 0.0
        first = float(self._chunks[0][0])
        last = float(self._chunks[-1][-1])
        span = last - first
        if span <= 0:
            return None
        interval = span / (self._count - 1)
        stretched = now - first - interval  # equals span when the next sample is just due
        return (self._count - 1) / max(span, stretched)


class LatencyStats:
    """Bounded history of per-step latencies (ms) with percentiles.

    p50/p99/max describe the last ``capacity`` steps (what the screen should show now);
    ``max_ever_ms`` and ``count`` cover the whole run.
    """

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"LatencyStats capacity must be >= 1, got {capacity}")
        self._values: deque[float] = deque(maxlen=capacity)
        self.count = 0
        self.max_ever_ms: float | None = None

    def add(self, latency_ms: float) -> None:
        v = float(latency_ms)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"latency must be a finite number of ms >= 0, got {latency_ms!r}")
        self._values.append(v)
        self.count += 1
        self.max_ever_ms = v if self.max_ever_ms is None else max(self.max_ever_ms, v)

    def percentile(self, q: float) -> float | None:
        """Linear-interpolated percentile (0..100) of the history; None when empty."""
        if not self._values:
            return None
        return float(np.percentile(np.fromiter(self._values, dtype=np.float64), q))

    @property
    def last_ms(self) -> float | None:
        return self._values[-1] if self._values else None

    @property
    def p50_ms(self) -> float | None:
        return self.percentile(50)

    @property
    def p99_ms(self) -> float | None:
        return self.percentile(99)

    @property
    def max_ms(self) -> float | None:
        return max(self._values) if self._values else None

    def summary(self) -> LatencySummary:
        """An immutable copy of the figures, for a snapshot."""
        if not self._values:
            return LatencySummary(count=self.count)
        arr = np.fromiter(self._values, dtype=np.float64)
        p50, p99 = np.percentile(arr, [50, 99])
        return LatencySummary(
            count=self.count,
            last_ms=self._values[-1],
            p50_ms=float(p50),
            p99_ms=float(p99),
            max_ms=float(arr.max()),
            max_ever_ms=self.max_ever_ms,
        )


@dataclass(frozen=True)
class LatencySummary:
    """Latency figures at one moment; None where no step has been measured yet."""

    count: int = 0
    last_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    max_ever_ms: float | None = None


@dataclass(frozen=True)
class StreamStats:
    """One input stream as the dashboard shows it.

    ``nominal_rate`` 0 means irregular (LSL convention); ``lag_s`` is now - last sample time
    (None before the first sample); ``buffer_fill`` is the ring buffer's fill fraction 0..1
    (None where the engine keeps no buffer for the stream, or did not say).
    """

    role: str
    name: str
    nominal_rate: float
    measured_rate: float | None = None
    lag_s: float | None = None
    buffer_fill: float | None = None
    overflows: int = 0
    gaps: int = 0
    state: StreamState = StreamState.ABSENT
    samples: int = 0
    note: str = ""  # why it is stalled/lost, or a channel/rate mismatch


@runtime_checkable
class MqttStatsLike(Protocol):
    """What the dashboard reads of a publisher's counters.

    ``sinks.mqtt.MqttPublisher.stats`` (a frozen dataclass with more fields) satisfies it, so the
    engine can put it into a snapshot as it is.
    """

    @property
    def state(self) -> str: ...
    @property
    def sent(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...


@dataclass(frozen=True)
class MqttStats:
    """Publisher counters as a plain immutable copy; the default means "no MQTT output".

    ``state`` is the publisher's word for its connection (``sinks.mqtt`` uses idle,
    connecting, connected, disconnected, refused, closed; "disabled" here means no
    publisher); ``queued`` is the backlog waiting for the broker (or in flight).
    """

    state: str = "disabled"
    sent: int = 0
    queued: int = 0
    dropped: int = 0
    reconnects: int = 0
    last_error: str | None = None

    @classmethod
    def copy_of(cls, stats: MqttStatsLike) -> MqttStats:
        """A plain copy of any publisher's stats object (for a publisher whose stats mutate)."""
        return cls(
            state=str(stats.state),
            sent=int(stats.sent),
            queued=int(stats.queued),
            dropped=int(stats.dropped),
            reconnects=int(stats.reconnects),
            last_error=stats.last_error,
        )


class StreamMonitor:
    """Per-stream bookkeeping the engine updates on every chunk: rate, last sample, gaps.

    A gap is counted when two consecutive samples of a regular stream are further apart than
    ``gap_factor`` nominal intervals (e.g. a dropped fMRI volume, a PPG outage).
    """

    def __init__(
        self,
        role: str,
        name: str,
        nominal_rate: float,
        *,
        window_s: float = 10.0,
        gap_factor: float = 2.5,
    ) -> None:
        if nominal_rate < 0 or not math.isfinite(nominal_rate):
            raise ValueError(
                f"nominal rate of stream {name!r} must be >= 0 (0 = irregular), got {nominal_rate}"
            )
        if gap_factor <= 1:
            raise ValueError(f"gap_factor must be > 1, got {gap_factor}")
        self.role = role
        self.name = name
        self.nominal_rate = float(nominal_rate)
        self.gap_factor = float(gap_factor)
        self.meter = RateMeter(window_s)
        self.gaps = 0
        self.last_gap_s: float | None = None  # length of the most recent gap

    def add(self, timestamps: float | Sequence[float] | np.ndarray) -> int:
        """Record a chunk's sample timestamps; return the gaps found in it."""
        ts = np.atleast_1d(np.asarray(timestamps, dtype=np.float64))
        if ts.size == 0:
            return 0
        found = 0
        if self.nominal_rate > 0 and ts.ndim == 1:  # (other shapes: the meter refuses them)
            # the step from the previous chunk's last sample, then those inside the chunk: the
            # same steps as np.diff over both, without copying the chunk (runs for every chunk)
            limit = self.gap_factor / self.nominal_rate
            prev = self.meter.last
            if prev is not None and float(ts[0]) - prev > limit:
                found = 1
                self.last_gap_s = float(ts[0]) - prev
            if ts.size >= 2:
                steps = ts[1:] - ts[:-1]
                if not steps.max() <= limit:  # (a NaN step: counted as the original did)
                    big = steps > limit
                    inside = int(np.count_nonzero(big))
                    if inside:
                        found += inside
                        self.last_gap_s = float(steps[big][-1])
        self.gaps += found
        self.meter.add(ts)
        return found

    def stats(
        self,
        now: float,
        *,
        state: StreamState | None = None,
        buffer_fill: float | None = None,
        overflows: int = 0,
        stall_after_s: float | None = None,
        lost_after_s: float | None = None,
        note: str = "",
    ) -> StreamStats:
        """The stream's figures at ``now``.

        ``state`` wins when given (the inlet knows best); otherwise it is derived from the lag
        with ``stall_after_s`` (default 3 nominal intervals, at least 1 s) and ``lost_after_s``
        (default 5 x the stall timeout).
        """
        last = self.meter.last
        lag = None if last is None else max(0.0, now - last)
        if state is None:
            interval = 1.0 / self.nominal_rate if self.nominal_rate > 0 else 1.0
            stall = stall_after_s if stall_after_s is not None else max(1.0, 3 * interval)
            lost = lost_after_s if lost_after_s is not None else max(stall, 5 * stall)
            state = stream_state(lag, stall_after_s=stall, lost_after_s=lost)
        return StreamStats(
            role=self.role,
            name=self.name,
            nominal_rate=self.nominal_rate,
            measured_rate=self.meter.rate(now),
            lag_s=lag,
            buffer_fill=None if buffer_fill is None else min(1.0, max(0.0, float(buffer_fill))),
            overflows=int(overflows),
            gaps=self.gaps,
            state=state,
            samples=self.meter.total,
            note=note,
        )


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything the dashboard shows, frozen at one moment (safe to hand to another thread).

    Rates are None when missing; ``probabilities`` is (negative, neutral, positive) of the
    last prediction, None before the first; ``intensity_history`` holds the last N
    intensities (oldest first) for the trend.
    """

    session_id: str = ""
    model_id: str = ""
    status: str = "starting"
    status_reason: str = ""
    tr_index: int | None = None
    streams: tuple[StreamStats, ...] = ()
    heart_rate: float | None = None
    heart_rate_valid: bool = False
    heart_rate_quality: float | None = None
    respiration_rate: float | None = None
    respiration_rate_valid: bool = False
    respiration_rate_quality: float | None = None
    probabilities: tuple[float, float, float] | None = None
    category: str | None = None
    intensity: float | None = None
    intensity_history: tuple[float, ...] = ()
    latency: LatencySummary = field(default_factory=LatencySummary)
    mqtt: MqttStatsLike = field(default_factory=MqttStats)  # must be immutable
    broker_url: str | None = None
    uptime_s: float = 0.0
    predictions: int = 0
    flags: tuple[str, ...] = ()
    utc: str | None = None  # UTC time of the last prediction
    volume_timestamp: float | None = None  # LSL timestamp of the last prediction's volume
    framewise_displacement: float | None = None  # mm, of the last prediction's volume
    fd_threshold: float | None = None  # mm; None while no Motion stream is known

    def with_updates(self, **changes: object) -> EngineSnapshot:
        """A copy with some fields replaced (the snapshot itself never changes)."""
        return replace(self, **changes)  # type: ignore[arg-type]


class TelemetryRecorder:
    """The engine's mutable side of the telemetry: fed as things happen, read as snapshots.

    Not thread-safe by design: only the engine's event loop touches it; other threads get
    :meth:`snapshot` results, which are immutable.
    """

    def __init__(
        self,
        *,
        session_id: str = "",
        model_id: str = "",
        broker_url: str | None = None,
        history: int = 60,
        latency_capacity: int = 1000,
        started_at: float = 0.0,
    ) -> None:
        if history < 1:
            raise ValueError(f"intensity history length must be >= 1, got {history}")
        self.session_id = session_id
        self.model_id = model_id
        self.broker_url = broker_url
        self.started_at = float(started_at)
        self.status = "starting"
        self.status_reason = ""
        self.latency = LatencyStats(latency_capacity)
        self.intensities: deque[float] = deque(maxlen=history)
        self.predictions = 0
        self.monitors: dict[str, StreamMonitor] = {}
        self.mqtt: MqttStatsLike = MqttStats()
        self._last: Prediction | None = None
        self.fd_threshold: float | None = None  # set by the engine once a Motion stream is found
        self._hr_quality: float | None = None
        self._rr_quality: float | None = None

    def add_stream(self, role: str, name: str, nominal_rate: float, **kw: float) -> StreamMonitor:
        """Register (or replace, e.g. after a re-resolve) the monitor for one role."""
        mon = StreamMonitor(role, name, nominal_rate, **kw)
        self.monitors[role] = mon
        return mon

    def set_status(self, status: str, reason: str = "") -> bool:
        """Record the engine status; return True when it changed (worth logging/publishing)."""
        changed = (status, reason) != (self.status, self.status_reason)
        self.status, self.status_reason = status, reason
        return changed

    def record_prediction(
        self,
        pred: Prediction,
        *,
        heart_rate_quality: float | None = None,
        respiration_rate_quality: float | None = None,
    ) -> None:
        """Account for one published prediction (latency, trend, last values)."""
        self.latency.add(pred.latency_ms)
        lo, hi = INTENSITY_RANGE
        self.intensities.append(min(hi, max(lo, float(pred.intensity))))
        self.predictions += 1
        self._last = pred
        self._hr_quality = heart_rate_quality
        self._rr_quality = respiration_rate_quality

    def snapshot(
        self,
        now: float,
        *,
        streams: Iterable[StreamStats] | None = None,
        mqtt: MqttStatsLike | None = None,
        buffers: Mapping[str, Any] | None = None,
        states: Mapping[str, StreamState] | None = None,
        notes: Mapping[str, str] | None = None,
    ) -> EngineSnapshot:
        """Freeze the current figures.

        ``streams`` defaults to the monitors' own view at ``now``, completed per role from
        ``buffers`` (objects with ``buffer_fill`` and ``overflow``, e.g.
        ``Aligner.stats().streams``), ``states`` (the engine's verdict; otherwise derived from
        the lag) and ``notes`` (why a stream is stalled or missing). ``mqtt`` (e.g.
        ``MqttPublisher.stats``, already a frozen copy) replaces the stats kept from the
        previous call; it must not change after it is handed over.
        """
        if mqtt is not None:
            self.mqtt = mqtt
        if streams is None:
            buffers = buffers or {}
            states = states or {}
            notes = notes or {}
            streams = []
            for role, mon in self.monitors.items():
                buf = buffers.get(role)
                streams.append(
                    mon.stats(
                        now,
                        state=states.get(role),
                        buffer_fill=None if buf is None else buf.buffer_fill,
                        overflows=0 if buf is None else buf.overflow,
                        note=notes.get(role, ""),
                    )
                )
        p = self._last
        return EngineSnapshot(
            session_id=self.session_id,
            model_id=self.model_id,
            status=self.status,
            status_reason=self.status_reason,
            tr_index=None if p is None else p.tr_index,
            streams=tuple(streams),
            heart_rate=None if p is None or not p.heart_rate_valid else p.heart_rate,
            heart_rate_valid=bool(p and p.heart_rate_valid),
            heart_rate_quality=self._hr_quality,
            respiration_rate=(
                None if p is None or not p.respiration_rate_valid else p.respiration_rate
            ),
            respiration_rate_valid=bool(p and p.respiration_rate_valid),
            respiration_rate_quality=self._rr_quality,
            probabilities=None if p is None else tuple(p.probabilities),  # type: ignore[arg-type]
            category=None if p is None else p.category,
            intensity=None if p is None else p.intensity,
            intensity_history=tuple(self.intensities),
            latency=self.latency.summary(),
            mqtt=self.mqtt,
            broker_url=self.broker_url,
            uptime_s=max(0.0, now - self.started_at),
            predictions=self.predictions,
            flags=() if p is None else tuple(p.flags),
            utc=None if p is None else p.utc,
            volume_timestamp=None if p is None else p.volume_timestamp,
            framewise_displacement=None if p is None else p.framewise_displacement,
            fd_threshold=self.fd_threshold,
        )
