"""Turn timestamped samples of fMRI, PPG, respiration and rates into one step per fMRI volume.

Rule (the same live and offline): the step of the volume with timestamp ``t`` carries

- the ROI vector, non-finite values replaced by the ROI's last finite value (0 before any) and
  counted; ``roi_valid`` is False when more than ``max_roi_nonfinite_fraction`` were replaced;
- the heart rate over ``[t - hr_window_s, t]`` from the PPG samples with timestamps ``<= t``,
  the respiration rate likewise over ``rr_window_s`` (see :mod:`emorecog_stream.core.physio`);
- from a rates stream, the value at or just before ``t`` (no older than ``rates_max_age_s``),
  used where the waveform gives no valid rate (or there is no waveform).

Live (:class:`Aligner`): a step is emitted as soon as every *expected* stream has a sample with
a timestamp ``>= t`` (so all of its samples up to ``t`` have arrived, given in-order arrival), or
when ``now >= t + deadline_s``; then ``deadline_expired`` is set and the late stream's rate is
computed from what has arrived (valid only if its window is still covered well enough, else
flagged missing). Steps come out in volume order. A late sample newer than the last one a step
consumed is kept (the next step uses it); an older one can no longer be used and is dropped and
counted (see :class:`~emorecog_stream.core.buffers.RingBuffer`). A volume older than the last
emitted step, or with a non-finite timestamp, is dropped and counted.

Offline (:func:`align_session`) feeds a whole recording through the same :class:`Aligner`
in time order, so for any chunking, interleaving and arrival jitter, the live steps equal the
offline steps exactly (bit for bit) provided each stream arrives in order and every sample
arrives before the deadline of the volumes that need it (the property test pins this).

Why lazy: physiology is only filtered when a step needs it (``consume`` up to ``t``), so every
sample is processed once, in order, and the cost per step is O(new samples).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from emorecog_stream.core.buffers import RingBuffer
from emorecog_stream.core.messages import AlignedStep, RateEstimate
from emorecog_stream.core.physio import HEART, RESPIRATION, PeakRateTracker
from emorecog_stream.core.streams import N_ROIS, Role
from emorecog_stream.recordings.session import Session, SignalStream

__all__ = ["Aligner", "AlignerConfig", "AlignerStats", "StreamStats", "align_session"]

_PHYSIO = (Role.PPG, Role.RESP)


@dataclass(frozen=True)
class AlignerConfig:
    """How steps are formed. Defaults follow the benchmark (TR 1 s) and the physiology."""

    hr_window_s: float = 15.0  # heart-rate window ending at the volume
    rr_window_s: float = 30.0  # respiration window: 8 breaths/min needs ~30 s for 3 intervals
    deadline_s: float = 2.0  # emit a step at t + deadline even if physiology is late
    expected: tuple[Role, ...] = (Role.PPG, Role.RESP)  # streams a step waits for
    ppg_srate: float | None = None  # Hz; required when PPG is pushed
    resp_srate: float | None = None  # Hz; required when respiration is pushed
    buffer_s: float = 60.0  # ring-buffer length per physiology stream
    rates_max_age_s: float = 30.0  # a rates sample older than this is stale
    max_roi_nonfinite_fraction: float = 0.1  # more replaced ROI values -> roi_valid False
    max_pending: int = 512  # volumes waiting for physiology; beyond, the oldest is forced out
    n_rois: int = N_ROIS

    def __post_init__(self) -> None:
        for name in ("hr_window_s", "rr_window_s", "buffer_s", "rates_max_age_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"AlignerConfig.{name}: expected a number > 0, got {value!r}")
        if not (isinstance(self.deadline_s, (int, float)) and self.deadline_s >= 0):
            raise ValueError(f"AlignerConfig.deadline_s: expected >= 0, got {self.deadline_s!r}")
        roles = tuple(Role(r) for r in self.expected)
        bad = [r for r in roles if r not in (Role.PPG, Role.RESP, Role.RATES)]
        if bad:
            raise ValueError(
                "AlignerConfig.expected: roles must be among ppg, resp, rates;"
                f" got {[r.value for r in bad]}"
            )
        object.__setattr__(self, "expected", roles)
        for role, rate in ((Role.PPG, self.ppg_srate), (Role.RESP, self.resp_srate)):
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"AlignerConfig.{role.value}_srate: expected Hz > 0, got {rate}")
            if role in roles and rate is None:
                raise ValueError(
                    f"AlignerConfig: {role.value} is expected but {role.value}_srate is not set"
                    " (the band-pass filter needs the sampling rate)"
                )
        if not 0 <= self.max_roi_nonfinite_fraction <= 1:
            raise ValueError(
                "AlignerConfig.max_roi_nonfinite_fraction: expected 0..1,"
                f" got {self.max_roi_nonfinite_fraction}"
            )
        if int(self.max_pending) < 1:
            raise ValueError(f"AlignerConfig.max_pending: expected >= 1, got {self.max_pending}")


@dataclass(frozen=True)
class StreamStats:
    """Counters of one input stream, for the status topic."""

    samples: int = 0  # samples pushed
    latest_timestamp: float | None = None
    buffer_fill: float = 0.0
    overflow: int = 0  # samples lost before they were used (buffer too small / consumer late)
    dropped_late: int = 0  # samples for a time already passed, or with a non-finite timestamp
    nonfinite: int = 0  # non-finite sample values seen by the rate estimator
    gaps: int = 0  # timestamp gaps seen by the rate estimator


@dataclass(frozen=True)
class AlignerStats:
    """Counters and quality of the aligner so far."""

    volumes_received: int
    volumes_dropped: int  # arrived after later volumes had been emitted, or bad timestamp
    pending: int
    steps: int
    steps_on_deadline: int
    roi_nonfinite: int  # ROI values replaced
    heart_rate_valid: int  # steps with a valid heart rate
    respiration_rate_valid: int
    streams: dict[str, StreamStats] = field(default_factory=dict)


class Aligner:
    """Live aligner: :meth:`push` samples as they arrive, :meth:`poll` for finished steps."""

    def __init__(self, config: AlignerConfig | None = None) -> None:
        self.config = config or AlignerConfig()
        cfg = self.config
        self._expected = cfg.expected
        self._deadline = float(cfg.deadline_s)
        self._max_pending = int(cfg.max_pending)
        self._n_rois = int(cfg.n_rois)
        self._pend_t: list[float] = []
        self._pend_roi: list[np.ndarray] = []
        self._last_emitted = -math.inf
        self._last_roi = np.zeros(self._n_rois, dtype=np.float32)
        self._roi_limit = cfg.max_roi_nonfinite_fraction * self._n_rois
        self._buffers: dict[Role, RingBuffer] = {}
        self._trackers: dict[Role, PeakRateTracker] = {}
        self._latest: dict[Role, float] = {r: -math.inf for r in (*_PHYSIO, Role.RATES)}
        self._room: dict[Role, int] = {}  # unconsumed rows beyond which _make_room runs
        # the same objects as in _buffers/_trackers, for the per-step path (no dict lookups)
        self._hr_tracker: PeakRateTracker | None = None
        self._rr_tracker: PeakRateTracker | None = None
        self._hr_buffer: RingBuffer | None = None
        self._rr_buffer: RingBuffer | None = None
        self._rates_buffer: RingBuffer | None = None
        self._volumes = 0
        self._volumes_dropped = 0
        self._steps = 0
        self._steps_deadline = 0
        self._roi_nonfinite = 0
        self._hr_valid = 0
        self._rr_valid = 0
        for role in cfg.expected:
            if role in _PHYSIO or role is Role.RATES:
                self._buffer(role)

    # ------------------------------------------------------------------ input
    def _buffer(self, role: Role) -> RingBuffer:
        buf = self._buffers.get(role)
        if buf is not None:
            return buf
        cfg = self.config
        if role is Role.RATES:
            buf = RingBuffer(4096, 2)
            self._rates_buffer = buf
        else:
            fs = cfg.ppg_srate if role is Role.PPG else cfg.resp_srate
            if fs is None:
                raise ValueError(
                    f"{role.value} samples pushed but AlignerConfig.{role.value}_srate is not set"
                )
            buf = RingBuffer(max(16, math.ceil(fs * cfg.buffer_s)), 1)
            if role is Role.PPG:
                tracker = PeakRateTracker(fs, HEART, cfg.hr_window_s)
                self._hr_tracker, self._hr_buffer = tracker, buf
            else:
                tracker = PeakRateTracker(fs, RESPIRATION, cfg.rr_window_s)
                self._rr_tracker, self._rr_buffer = tracker, buf
            self._trackers[role] = tracker
        self._buffers[role] = buf
        self._room[role] = buf.capacity * 3 // 4
        return buf

    @property
    def expected(self) -> tuple[Role, ...]:
        """The streams a step waits for (the deadline applies to these)."""
        return self._expected

    def set_expected(self, roles: tuple[Role, ...] | list[Role]) -> None:
        """Change which streams steps wait for, e.g. stop waiting for a stream found stalled.

        Steps emitted while a stream is not waited for can differ from :func:`align_session`.
        """
        roles = tuple(Role(r) for r in roles)
        for role in roles:
            if role not in (Role.PPG, Role.RESP, Role.RATES):
                raise ValueError(f"expected roles must be among ppg, resp, rates; got {role.value}")
            self._buffer(role)  # raises when a sampling rate is still unknown
        self._expected = roles

    def set_srate(self, role: Role, fs: float) -> None:
        """Give a physiology stream's sampling rate once it is known (before its first push)."""
        role = Role(role)
        if role not in (Role.PPG, Role.RESP):
            raise ValueError(f"only ppg and resp have a sampling rate, got {role.value}")
        key = f"{role.value}_srate"
        if getattr(self.config, key) == fs:
            return
        if role in self._buffers:
            raise ValueError(f"{role.value}: sampling rate already in use; cannot change it")
        self.config = replace(self.config, **{key: float(fs)})

    def buffer(self, role: Role) -> RingBuffer | None:
        """The ring buffer of a physiology or rates stream (for display), if it exists."""
        return self._buffers.get(Role(role))

    def push(self, role: Role | str, data: np.ndarray, timestamps: np.ndarray) -> None:
        """Add a chunk: fMRI (n, n_rois), PPG/respiration (n, 1) or (n,), rates (n, 2).

        Raises ValueError naming the stream, the expected and the received shape on bad input.
        """
        buf = self._buffers.get(role)  # physiology and rates: the hot path
        if buf is None:  # fMRI, a stream's first chunk, or not a role
            if role is not Role.FMRI:  # (Role(role) is a Python-level call: ~1 us)
                role = Role(role)
            if role is Role.FMRI:
                self._push_fmri(data, timestamps)
                return
            if role is Role.MARKERS:
                raise ValueError("markers are not aligned: pass them to the engine")
            buf = self._buffer(role)
        elif type(role) is not Role:
            role = Role(role)
        try:
            buf.append(data, timestamps)
        except ValueError as exc:
            raise ValueError(f"{role.value}: {exc}") from None
        self._latest[role] = buf.newest
        if buf.unconsumed > self._room[role]:
            self._make_room(role, buf)

    def _make_room(self, role: Role, buf: RingBuffer) -> None:
        """Physiology piles up unconsumed (fMRI lags or stopped): process it before the buffer
        overwrites it, up to the oldest waiting volume or, with none, up to ``deadline_s``
        before the newest sample. (A volume arriving later than that for an older time gets
        a rate from slightly more data than :func:`align_session` would use.)"""
        newest = buf.latest_timestamp
        if newest is None:
            return
        horizon = self._pend_t[0] if self._pend_t else newest - self._deadline
        tracker = self._trackers.get(role)
        data, ts = buf.consume(horizon)
        if tracker is not None and ts.shape[0]:
            tracker.feed(ts, data[:, 0])

    def _push_fmri(self, data: np.ndarray, timestamps: np.ndarray) -> None:
        if (
            type(data) is np.ndarray
            and type(timestamps) is np.ndarray
            and data.shape == (1, self._n_rois)
            and timestamps.shape == (1,)
        ):  # one volume, the usual case: fewer numpy calls
            t = float(timestamps.item(0))
            self._volumes += 1
            if not (math.isfinite(t) and t > self._last_emitted):
                self._volumes_dropped += 1
                return
            roi = data[0].astype(np.float32)  # a copy: the caller may reuse its array
            pend_t = self._pend_t
            if not pend_t or t >= pend_t[-1]:
                pend_t.append(t)
                self._pend_roi.append(roi)
            else:
                k = bisect.bisect_right(pend_t, t)
                pend_t.insert(k, t)
                self._pend_roi.insert(k, roi)
            return
        x = np.array(data, dtype=np.float32)  # a copy: the caller may reuse its array
        if x.ndim == 1:
            x = x[None, :]
        ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self._n_rois:
            raise ValueError(
                f"fmri: expected volumes of shape (n, {self._n_rois}), got {np.shape(data)}"
            )
        if ts.shape[0] != x.shape[0]:
            raise ValueError(
                f"fmri: expected one timestamp per volume, got {ts.shape[0]} for {x.shape[0]}"
            )
        pend_t, pend_roi = self._pend_t, self._pend_roi
        for i in range(x.shape[0]):
            t = float(ts[i])
            self._volumes += 1
            if not (math.isfinite(t) and t > self._last_emitted):
                self._volumes_dropped += 1
                continue
            if not pend_t or t >= pend_t[-1]:
                pend_t.append(t)
                pend_roi.append(x[i])
            else:
                k = bisect.bisect_right(pend_t, t)
                pend_t.insert(k, t)
                pend_roi.insert(k, x[i])

    # ----------------------------------------------------------------- output
    def next_deadline(self) -> float | None:
        """When the oldest waiting volume will be emitted regardless (None if none waits)."""
        return self._pend_t[0] + self._deadline if self._pend_t else None

    @property
    def pending(self) -> int:
        """Volumes waiting for physiology."""
        return len(self._pend_t)

    def ready(self, t: float) -> bool:
        """True when every expected stream has a sample at or after ``t``."""
        latest = self._latest
        return all(latest[r] >= t for r in self._expected)

    def poll(self, now: float) -> list[AlignedStep]:
        """Steps that are complete, or whose deadline passed by ``now``, in volume order."""
        pend_t = self._pend_t
        if not pend_t:
            return []
        latest = self._latest
        deadline = self._deadline
        t = pend_t[0]
        force = len(pend_t) - self._max_pending
        if force <= 0 and now < t + deadline:  # the usual answer: still waiting (not NaN)
            for r in self._expected:
                if latest[r] < t:
                    return []
        if now != now:
            raise ValueError("poll: now must be a time in seconds, got NaN")
        expected = self._expected
        out: list[AlignedStep] = []
        while pend_t:
            t = pend_t[0]
            ready = True
            for r in expected:
                if latest[r] < t:
                    ready = False
                    break
            if not ready and now < t + deadline and force <= 0:
                break
            force -= 1
            pend_t.pop(0)
            out.append(self._emit(t, self._pend_roi.pop(0), not ready))
        return out

    def flush(self) -> list[AlignedStep]:
        """Emit every waiting volume now (end of a recording or of a session)."""
        return self.poll(math.inf)

    def _emit(self, t: float, roi: np.ndarray, expired: bool) -> AlignedStep:
        notes: list[str] = []
        # ROI: replace non-finite values by the ROI's last finite value.
        n_bad = 0
        # one dot product is NaN or Inf when a value is (or, harmlessly, when it overflows)
        if math.isfinite(roi.dot(roi)):
            self._last_roi = roi
        else:
            finite = np.isfinite(roi)
            n_bad = int(roi.shape[0] - np.count_nonzero(finite))
            if n_bad:
                roi = np.where(finite, roi, self._last_roi)
                self._roi_nonfinite += n_bad
                notes.append(f"fmri: {n_bad} non-finite ROI values replaced")
            self._last_roi = roi
        if expired:
            self._steps_deadline += 1
            late = [r.value for r in self._expected if self._latest[r] < t]
            notes.append("deadline passed waiting for " + ", ".join(late))
        hr_v, hr_q, hr_src = math.nan, 0.0, ""
        rr_v, rr_q, rr_src = math.nan, 0.0, ""
        tracker = self._hr_tracker
        if tracker is not None:
            est = _rate(tracker, self._hr_buffer, t, notes, "ppg")
            if est.value is None:
                notes.append(est.reason)
            else:
                hr_v, hr_q, hr_src = est.value, est.quality, "ppg"
                if est.reason:
                    notes.append(est.reason)
        tracker = self._rr_tracker
        if tracker is not None:
            est = _rate(tracker, self._rr_buffer, t, notes, "resp")
            if est.value is None:
                notes.append(est.reason)
            else:
                rr_v, rr_q, rr_src = est.value, est.quality, "resp"
                if est.reason:
                    notes.append(est.reason)
        rates = self._rates_buffer
        if rates is not None:
            rates.consume(t)  # used: later samples for before t are late
            if hr_v != hr_v or rr_v != rr_v:
                got = rates.value_at(t)
                if got is None:
                    notes.append("rates: none at or before the volume")
                elif t - got[1] > self.config.rates_max_age_s:
                    notes.append(f"rates: latest is {t - got[1]:.1f} s old")
                else:
                    value = got[0]
                    if hr_v != hr_v and math.isfinite(value[0]) and value[0] > 0:
                        hr_v, hr_q, hr_src = float(value[0]), 1.0, "rates"
                    if rr_v != rr_v and math.isfinite(value[1]) and value[1] > 0:
                        rr_v, rr_q, rr_src = float(value[1]), 1.0, "rates"
        hr_ok = hr_v == hr_v
        rr_ok = rr_v == rr_v
        self._hr_valid += hr_ok
        self._rr_valid += rr_ok
        self._last_emitted = t
        index = self._steps
        self._steps = index + 1
        return _new_step(
            {
                "index": index,
                "timestamp": t,
                "roi": roi,
                "heart_rate": hr_v,
                "respiration_rate": rr_v,
                "roi_valid": n_bad <= self._roi_limit,
                "heart_rate_valid": hr_ok,
                "respiration_rate_valid": rr_ok,
                "heart_rate_quality": hr_q,
                "respiration_rate_quality": rr_q,
                "roi_nonfinite": n_bad,
                "deadline_expired": expired,
                "heart_rate_source": hr_src,
                "respiration_rate_source": rr_src,
                "notes": tuple(notes),
            }
        )

    # ----------------------------------------------------------------- status
    def stats(self) -> AlignerStats:
        """A snapshot of the counters (cheap; call it for each status message)."""
        streams: dict[str, StreamStats] = {}
        for role, buf in self._buffers.items():
            tracker = self._trackers.get(role)
            streams[role.value] = StreamStats(
                samples=buf.appended,
                latest_timestamp=buf.latest_timestamp,
                buffer_fill=buf.fill,
                overflow=buf.overflow,
                dropped_late=buf.dropped_late + buf.dropped_bad_time,
                nonfinite=tracker.nonfinite if tracker else 0,
                gaps=tracker.gaps if tracker else 0,
            )
        return AlignerStats(
            volumes_received=self._volumes,
            volumes_dropped=self._volumes_dropped,
            pending=len(self._pend_t),
            steps=self._steps,
            steps_on_deadline=self._steps_deadline,
            roi_nonfinite=self._roi_nonfinite,
            heart_rate_valid=self._hr_valid,
            respiration_rate_valid=self._rr_valid,
            streams=streams,
        )


def _rate(
    tracker: PeakRateTracker, buf: RingBuffer, t: float, notes: list[str], name: str
) -> RateEstimate:
    """Feed the tracker the samples up to ``t`` not fed yet, then ask it for the rate."""
    nonfinite = tracker.nonfinite
    data, ts = buf.consume(t)
    if ts.shape[0]:
        tracker.feed(ts, data[:, 0])  # sorted, finite timestamps
    if tracker.nonfinite != nonfinite:
        notes.append(f"{name}: {tracker.nonfinite - nonfinite} non-finite samples")
    return tracker.estimate(t)


_STEP_FIELDS = [
    "index",
    "timestamp",
    "roi",
    "heart_rate",
    "respiration_rate",
    "roi_valid",
    "heart_rate_valid",
    "respiration_rate_valid",
    "heart_rate_quality",
    "respiration_rate_quality",
    "roi_nonfinite",
    "deadline_expired",
    "heart_rate_source",
    "respiration_rate_source",
    "notes",
]
_object_new = object.__new__


def _new_step(values: dict) -> AlignedStep:
    """An :class:`AlignedStep` from all of its fields, without the frozen dataclass
    ``__init__`` (one ``object.__setattr__`` per field: about 2 us of the ~65 us a step costs;
    filling the instance dict costs a tenth of that). Same object, same frozen behaviour."""
    step = _object_new(AlignedStep)
    step.__dict__.update(values)
    return step


if not (
    [f.name for f in fields(AlignedStep)] == _STEP_FIELDS
    and hasattr(AlignedStep, "__dict__")
    and "__slots__" not in vars(AlignedStep)
    and "__post_init__" not in vars(AlignedStep)
):  # pragma: no cover - AlignedStep changed shape: use its own constructor

    def _new_step(values: dict) -> AlignedStep:
        return AlignedStep(**values)


def _srate(stream: SignalStream) -> float:
    if stream.nominal_srate and stream.nominal_srate > 0:
        return float(stream.nominal_srate)
    ts = stream.timestamps[np.isfinite(stream.timestamps)]
    if ts.shape[0] < 2 or not ts[-1] > ts[0]:
        raise ValueError(
            f"stream {stream.name!r}: no nominal rate and too few timestamps to estimate one"
        )
    return (ts.shape[0] - 1) / float(ts[-1] - ts[0])


def session_config(session: Session, config: AlignerConfig | None = None) -> AlignerConfig:
    """``config`` completed from a session: sampling rates, and the streams it has as expected."""
    present = tuple(
        role
        for role, stream in ((Role.PPG, session.ppg), (Role.RESP, session.resp))
        if stream is not None and len(stream) > 0
    )
    if session.rates is not None and len(session.rates) > 0:
        present = (*present, Role.RATES)
    ppg = _srate(session.ppg) if session.ppg is not None and len(session.ppg) > 0 else None
    resp = _srate(session.resp) if session.resp is not None and len(session.resp) > 0 else None
    if config is None:
        return AlignerConfig(expected=present, ppg_srate=ppg, resp_srate=resp)
    return replace(
        config,
        ppg_srate=config.ppg_srate if config.ppg_srate is not None else ppg,
        resp_srate=config.resp_srate if config.resp_srate is not None else resp,
    )


def align_session(session: Session, config: AlignerConfig | None = None) -> list[AlignedStep]:
    """Offline twin of :class:`Aligner`: one step per volume of a recorded session.

    The recording is fed through an :class:`Aligner` in time order, each physiology stream up
    to its first sample at or after each volume, so the result is what a live aligner gives
    when every sample arrives before its deadline. With ``config=None`` the streams the
    session has are the expected ones and the sampling rates come from the session.
    """
    cfg = session_config(session, config)
    aligner = Aligner(cfg)
    feeds: list[tuple[Role, np.ndarray, np.ndarray]] = []
    sources = ((Role.PPG, session.ppg), (Role.RESP, session.resp), (Role.RATES, session.rates))
    for role, stream in sources:
        if stream is None or len(stream) == 0:
            continue
        ts = stream.timestamps
        order = np.argsort(ts, kind="stable")
        feeds.append((role, stream.data[order], ts[order]))
    cursor = [0] * len(feeds)
    vol_t = session.fmri.timestamps
    vol_order = np.argsort(vol_t, kind="stable")
    steps: list[AlignedStep] = []
    for v in vol_order.tolist():
        t = float(vol_t[v])
        aligner.push(Role.FMRI, session.fmri.data[v : v + 1], vol_t[v : v + 1])
        if math.isfinite(t):
            for k, (role, data, ts) in enumerate(feeds):
                stop = min(int(np.searchsorted(ts, t, side="left")) + 1, ts.shape[0])
                if stop > cursor[k]:
                    aligner.push(role, data[cursor[k] : stop], ts[cursor[k] : stop])
                    cursor[k] = stop
        steps.extend(aligner.poll(-math.inf))
    steps.extend(aligner.flush())
    return steps
