"""Telemetry figures on inputs whose answers are known by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from emorecog_stream.core.messages import Prediction
from emorecog_stream.engine.telemetry import (
    EngineSnapshot,
    LatencyStats,
    MqttStats,
    RateMeter,
    StreamMonitor,
    StreamState,
    TelemetryRecorder,
    stream_state,
)


def _pred(i: int, **kw: object) -> Prediction:
    base: dict[str, object] = dict(
        session="S01",
        sequence=i,
        tr_index=i,
        volume_timestamp=100.0 + i,
        utc="2026-11-25T10:00:00.000Z",
        probabilities=(0.2, 0.3, 0.5),
        category="positive",
        intensity=1.5,
        heart_rate=70.0,
        heart_rate_valid=True,
        respiration_rate=15.0,
        respiration_rate_valid=True,
        model_id="test-model",
        latency_ms=float(i + 1),
    )
    base.update(kw)
    return Prediction(**base)  # type: ignore[arg-type]


# --- RateMeter -------------------------------------------------------------------------------


def test_rate_meter_regular_stream_reads_its_rate() -> None:
    m = RateMeter(window_s=5.0)
    ts = np.arange(0, 2000) / 100.0  # 100 Hz for 20 s
    for chunk in np.array_split(ts, 37):  # uneven chunks, as LSL delivers them
        m.add(chunk)
    assert m.rate() == pytest.approx(100.0, rel=1e-9)
    assert m.total == 2000
    assert m.last == pytest.approx(19.99)


def test_rate_meter_is_none_before_two_samples_and_zero_after_silence() -> None:
    m = RateMeter(window_s=2.0)
    assert m.rate(0.0) is None
    m.add(0.0)
    assert m.rate(0.5) is None
    m.add([0.5, 1.0])
    assert m.rate(1.0) == pytest.approx(2.0)
    assert m.rate(10.0) == 0.0  # every sample aged out of the window


def test_rate_meter_decays_while_the_stream_is_silent() -> None:
    m = RateMeter(window_s=10.0)
    m.add(np.arange(0.0, 10.0))  # 1 Hz, samples 0..9
    assert m.rate(9.5) == pytest.approx(1.0)  # next sample not yet due
    # 2 s late at t=12: window holds samples 2..9 (8 samples, 7 intervals of 1 s);
    # span stretched to now - first - interval = 12 - 2 - 1 = 9 s
    assert m.rate(12.0) == pytest.approx(7 / 9)


def test_rate_meter_trims_inside_a_chunk() -> None:
    m = RateMeter(window_s=1.0)
    m.add(np.arange(0, 192) / 64.0)  # one 3 s chunk at 64 Hz (exact in binary)
    # only samples in [127/64, 191/64] remain: 65 samples over 1 s
    assert m.rate() == pytest.approx(64.0)
    assert m._count == 65


def test_rate_meter_restarts_when_time_goes_backwards() -> None:
    m = RateMeter(window_s=10.0)
    m.add(np.arange(500.0, 510.0, 0.5))  # 2 Hz
    m.add(np.arange(0.0, 3.0, 0.25))  # the outlet restarted on another clock, now 4 Hz
    assert m.restarts == 1
    assert m.rate() == pytest.approx(4.0)
    assert m.total == 20 + 12


@pytest.mark.parametrize("window", [0.0, -1.0, math.nan, math.inf])
def test_rate_meter_rejects_bad_window(window: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        RateMeter(window)


def test_rate_meter_rejects_2d_timestamps() -> None:
    with pytest.raises(ValueError, match="1-D"):
        RateMeter().add(np.zeros((2, 2)))


# --- LatencyStats ----------------------------------------------------------------------------


def test_latency_percentiles_on_known_values() -> None:
    s = LatencyStats(capacity=1000)
    assert s.p50_ms is None and s.summary().p99_ms is None
    for v in range(1, 101):
        s.add(v)
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.max_ms == 100
    summ = s.summary()
    assert (summ.count, summ.last_ms, summ.max_ever_ms) == (100, 100, 100)
    assert summ.p50_ms == pytest.approx(50.5) and summ.p99_ms == pytest.approx(99.01)


def test_latency_history_is_bounded_but_count_and_max_ever_are_not() -> None:
    s = LatencyStats(capacity=1000)
    for v in range(2000, 0, -1):  # 2000 .. 1: the largest values leave the history first
        s.add(v)
    assert s.count == 2000
    assert s.p50_ms == pytest.approx(500.5)  # over 1..1000
    assert s.max_ms == 1000
    assert s.max_ever_ms == 2000


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_latency_rejects_impossible_values(bad: float) -> None:
    with pytest.raises(ValueError, match="finite number of ms"):
        LatencyStats().add(bad)


# --- stream state and monitor ----------------------------------------------------------------


def test_stream_state_thresholds() -> None:
    kw = dict(stall_after_s=2.0, lost_after_s=10.0)
    assert stream_state(None, **kw) is StreamState.ABSENT
    assert stream_state(0.5, **kw) is StreamState.CONNECTED
    assert stream_state(2.5, **kw) is StreamState.STALLED
    assert stream_state(10.5, **kw) is StreamState.LOST
    with pytest.raises(ValueError, match="stall_after_s"):
        stream_state(1.0, stall_after_s=5.0, lost_after_s=1.0)


def test_monitor_counts_gaps_within_and_across_chunks() -> None:
    mon = StreamMonitor("fmri", "EmoRecog-fMRI", 1.0)
    assert mon.add(np.arange(0.0, 10.0)) == 0
    assert mon.add([14.0, 15.0]) == 1  # 9 -> 14 across the chunk boundary
    assert mon.last_gap_s == pytest.approx(5.0)
    assert mon.add([16.0, 30.0, 31.0]) == 1  # inside the chunk
    assert mon.gaps == 2
    assert mon.last_gap_s == pytest.approx(14.0)


def test_monitor_never_counts_gaps_on_irregular_streams() -> None:
    mon = StreamMonitor("rates", "EmoRecog-Rates", 0.0)
    mon.add([0.0, 50.0, 51.0])
    assert mon.gaps == 0
    s = mon.stats(51.0)
    assert s.nominal_rate == 0.0 and s.samples == 3


def test_monitor_stats_derive_lag_and_state() -> None:
    mon = StreamMonitor("ppg", "EmoRecog-PPG", 400.0, window_s=5.0)
    mon.add(np.arange(0, 4000) / 400.0)  # 10 s
    last = 3999 / 400.0
    ok = mon.stats(last + 0.001, buffer_fill=0.25, overflows=2)
    assert ok.state is StreamState.CONNECTED
    assert ok.lag_s == pytest.approx(0.001)
    assert ok.measured_rate == pytest.approx(400.0)
    assert (ok.buffer_fill, ok.overflows, ok.samples, ok.gaps) == (0.25, 2, 4000, 0)
    stalled = mon.stats(last + 2.0)  # default stall timeout: max(1 s, 3 intervals)
    assert stalled.state is StreamState.STALLED
    assert stalled.measured_rate is not None and stalled.measured_rate < 400.0
    assert mon.stats(last + 6.0).state is StreamState.LOST  # default loss: 5 x stall
    told = mon.stats(last, state=StreamState.LOST, note="outlet gone", buffer_fill=3.0)
    assert told.state is StreamState.LOST and told.note == "outlet gone"
    assert told.buffer_fill == 1.0  # clamped


def test_monitor_never_seen_is_absent() -> None:
    s = StreamMonitor("resp", "EmoRecog-Resp", 50.0).stats(123.0)
    assert s.state is StreamState.ABSENT and s.lag_s is None and s.measured_rate is None


def test_monitor_rejects_bad_nominal_rate() -> None:
    with pytest.raises(ValueError, match="nominal rate of stream 'x'"):
        StreamMonitor("ppg", "x", -5.0)


# --- recorder and snapshot -------------------------------------------------------------------


def test_recorder_snapshot_reflects_predictions_and_status() -> None:
    rec = TelemetryRecorder(
        session_id="S01", model_id="m1", broker_url="mqtt://127.0.0.1:1", history=5, started_at=10.0
    )
    rec.add_stream("fmri", "EmoRecog-fMRI", 1.0).add(np.arange(0.0, 8.0))
    assert rec.set_status("online") is True
    assert rec.set_status("online") is False
    assert rec.set_status("degraded", "PPG stalled") is True
    intensities = [-9.0, -2.0, 0.0, 1.0, 2.0, 3.0, 9.0]
    for i, v in enumerate(intensities):
        rec.record_prediction(_pred(i, intensity=v), heart_rate_quality=0.8)
    rec.record_prediction(
        _pred(7, heart_rate=math.nan, heart_rate_valid=False, flags=("heart_rate_missing",))
    )
    mq = MqttStats(state="connected", sent=8)
    snap = rec.snapshot(17.5, mqtt=mq)
    assert snap.session_id == "S01" and snap.model_id == "m1"
    assert (snap.status, snap.status_reason) == ("degraded", "PPG stalled")
    assert snap.tr_index == 7 and snap.predictions == 8
    assert snap.intensity_history == (1.0, 2.0, 3.0, 4.0, 1.5)  # last 5, clipped to -4..+4
    assert snap.heart_rate is None and snap.heart_rate_valid is False
    assert snap.heart_rate_quality is None
    assert snap.respiration_rate == 15.0 and snap.respiration_rate_valid
    assert snap.probabilities == (0.2, 0.3, 0.5) and snap.category == "positive"
    assert snap.flags == ("heart_rate_missing",)
    assert snap.latency.count == 8 and snap.latency.max_ms == 8.0
    assert snap.mqtt is mq and snap.broker_url == "mqtt://127.0.0.1:1"
    assert snap.uptime_s == pytest.approx(7.5)
    (fmri,) = snap.streams
    assert fmri.role == "fmri" and fmri.samples == 8


def test_snapshot_is_frozen_and_independent_of_later_updates() -> None:
    rec = TelemetryRecorder(session_id="S01")
    rec.record_prediction(_pred(0))
    before = rec.snapshot(1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.status = "x"  # type: ignore[misc]
    rec.record_prediction(_pred(1, intensity=-3.0))
    rec.set_status("paused", "fMRI lost")
    assert before.intensity_history == (1.5,)
    assert before.status == "starting" and before.predictions == 1
    after = before.with_updates(status="online")
    assert after.status == "online" and before.status == "starting"


def test_empty_snapshot_defaults() -> None:
    snap = TelemetryRecorder().snapshot(0.0)
    assert snap == EngineSnapshot(latency=snap.latency, uptime_s=0.0)
    assert snap.probabilities is None and snap.tr_index is None and snap.streams == ()


def test_snapshot_takes_buffer_figures_states_and_notes_from_the_engine() -> None:
    """The aligner's own per-stream stats fill the buffer columns (a real Aligner here)."""
    from emorecog_stream.core.aligner import Aligner, AlignerConfig
    from emorecog_stream.core.streams import Role

    aligner = Aligner(AlignerConfig(ppg_srate=400.0, resp_srate=50.0))
    rec = TelemetryRecorder()
    ts = np.arange(0, 4000) / 400.0
    aligner.push(Role.PPG, np.zeros((4000, 1)), ts)
    rec.add_stream("ppg", "EmoRecog-PPG", 400.0).add(ts)
    rec.add_stream("fmri", "EmoRecog-fMRI", 1.0).add(np.arange(0.0, 10.0))
    snap = rec.snapshot(
        10.0,
        buffers=aligner.stats().streams,
        states={"ppg": StreamState.STALLED},
        notes={"ppg": "test says so"},
    )
    ppg, fmri = snap.streams
    expected = aligner.stats().streams["ppg"]
    assert ppg.buffer_fill == pytest.approx(expected.buffer_fill) and ppg.buffer_fill > 0
    assert ppg.overflows == expected.overflow
    assert ppg.state is StreamState.STALLED and ppg.note == "test says so"
    assert fmri.buffer_fill is None  # the aligner keeps no ring buffer for volumes
    assert fmri.state is StreamState.CONNECTED  # derived from its lag
