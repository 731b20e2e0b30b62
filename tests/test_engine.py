"""The engine without sockets: real aligner, real model, chunks fed as an inlet would.

A controllable clock stands in for the LSL clock so the tests can say exactly when each chunk
"arrives"; everything else (aligner, physiology estimators, model, status logic) is the real
code. The LSL and MQTT paths are covered end to end in ``test_e2e.py``.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from emorecog_stream.config import apply_overrides, load_config
from emorecog_stream.core.aligner import align_session
from emorecog_stream.core.messages import AlignedStep, Prediction
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.session import Chunk, Engine
from emorecog_stream.engine.state import EngineStatus
from emorecog_stream.model import load_model
from emorecog_stream.recordings.synth import SynthConfig, generate_session

SHORT = SynthConfig(n_participants=1, n_trials=3, rest_s=5.0, lead_in_s=5.0)


@pytest.fixture(scope="module")
def model():
    return load_model()  # the shipped default checkpoint


@pytest.fixture(scope="module")
def session():
    return generate_session(1, SHORT)


@dataclass
class Collector:
    """A test output: keeps what the engine hands over."""

    predictions: list[Prediction] = field(default_factory=list)
    steps: list[AlignedStep] = field(default_factory=list)
    statuses: list[EngineStatus] = field(default_factory=list)
    closed: bool = False

    def on_prediction(self, prediction: Prediction, step: AlignedStep) -> None:
        self.predictions.append(prediction)
        self.steps.append(step)

    def on_status(self, status: EngineStatus) -> None:
        self.statuses.append(status)

    async def aclose(self) -> None:
        self.closed = True

    def states(self) -> list[str]:
        return [s.state for s in self.statuses]


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def chunk_events(session, chunk_s: float = 0.02, offset: float = 1000.0):
    """(role, data, timestamps) chunks in arrival order, as acquisition drivers deliver them."""
    events = []
    for role, stream in ((Role.PPG, session.ppg), (Role.RESP, session.resp)):
        ts = stream.timestamps + offset
        bounds = np.searchsorted(ts, np.arange(ts[0], ts[-1] + chunk_s, chunk_s), side="right")
        start = 0
        for stop in bounds:
            if stop > start:
                events.append((float(ts[stop - 1]), role, stream.data[start:stop], ts[start:stop]))
                start = stop
    for i, t in enumerate(session.fmri.timestamps + offset):
        events.append((float(t), Role.FMRI, session.fmri.data[i : i + 1], np.array([t])))
    order = {Role.FMRI: 0, Role.PPG: 1, Role.RESP: 2}
    events.sort(key=lambda e: (e[0], order[e[1]]))
    return [(role, data, ts) for _, role, data, ts in events]


def make_engine(model, clock, session_id="t1", **overrides):
    base = {"session.id": session_id, "streams.ppg.rate": 400.0, "streams.resp.rate": 50.0}
    base.update(overrides)
    config = apply_overrides(load_config(None), base)
    out = Collector()
    engine = Engine(config, model, [out], clock=clock)
    engine.register_stream(Role.FMRI, "fmri", 1.0)
    return engine, out


def feed(engine, clock, events, latency: float = 0.001, skip=None):
    for role, data, ts in events:
        if skip is not None and skip(role, float(ts[-1])):
            clock.t = max(clock.t, float(ts[-1]) + latency)
            engine._on_timer()  # what the armed timer does when nothing arrives
            continue
        clock.t = max(clock.t, float(ts[-1]) + latency)
        engine.process_chunk(role, data, ts, received=clock.t)


def offline(model, session):
    steps = align_session(session)
    roi = np.stack([s.roi for s in steps])
    hr = np.array([s.heart_rate for s in steps])
    rr = np.array([s.respiration_rate for s in steps])
    return steps, model.predict_sequence(roi, hr, rr)


def test_live_engine_equals_offline_predictions(model, session) -> None:
    clock = Clock(999.0)
    engine, out = make_engine(model, clock)
    feed(engine, clock, chunk_events(session))
    steps, expected = offline(model, session)
    got = out.predictions
    assert len(got) == session.n_volumes == len(steps)
    assert [p.sequence for p in got] == list(range(len(got)))
    assert [p.tr_index for p in got] == list(range(len(got)))
    np.testing.assert_allclose(
        [p.volume_timestamp for p in got], session.fmri.timestamps + 1000.0, atol=1e-9
    )
    probs = np.array([p.probabilities for p in got])
    np.testing.assert_allclose(probs, expected.probabilities, atol=1e-5)
    np.testing.assert_allclose([p.intensity for p in got], expected.intensity, atol=1e-5)
    hr_live = np.array([p.heart_rate if p.heart_rate_valid else np.nan for p in got])
    hr_off = np.array([s.heart_rate for s in steps])
    np.testing.assert_allclose(hr_live, hr_off, equal_nan=True)
    assert all(p.model_id == model.model_id for p in got)
    assert all(p.latency_ms >= 0 for p in got)
    assert out.states() == ["online"]  # never degraded: every stream delivered on time
    assert not any("deadline_expired" in p.flags for p in got)


def test_gap_longer_than_reset_limit_resets_state(model, session) -> None:
    clock = Clock(999.0)
    engine, out = make_engine(model, clock, **{"engine.reset_gap_trs": 3.0})
    first = chunk_events(session, offset=1000.0)
    second = chunk_events(session, offset=1000.0 + session.fmri.timestamps[-1] + 20.0)
    feed(engine, clock, first)
    n = len(out.predictions)
    clock.t += 10.0
    engine._on_timer()  # what the armed timer does while nothing arrives
    assert out.statuses[-1].state == "paused"
    assert "fMRI stream stalled" in out.statuses[-1].reason
    feed(engine, clock, second)
    after = out.predictions[n:]
    assert len(after) == session.n_volumes
    assert after[0].tr_index == 0 and "state_reset" in after[0].flags
    assert not any("state_reset" in p.flags for p in after[1:])
    assert [p.sequence for p in out.predictions] == list(range(len(out.predictions)))
    assert out.states()[-1] == "online"
    assert engine.counters.resets == 1


def test_ppg_vanishing_degrades_and_recovers(model, session) -> None:
    clock = Clock(999.0)
    engine, out = make_engine(model, clock)
    t0 = float(session.fmri.timestamps[0]) + 1000.0
    gone = (t0 + 40.0, t0 + 60.0)  # PPG unplugged for 20 s

    def skip(role, t):
        return role is Role.PPG and gone[0] <= t < gone[1]

    feed(engine, clock, chunk_events(session), skip=skip)
    preds = out.predictions
    assert len(preds) == session.n_volumes  # predictions went on: one per volume
    during = [p for p in preds if gone[0] + 2.5 <= p.volume_timestamp < gone[1]]
    assert during and all(not p.heart_rate_valid and p.heart_rate is None for p in during)
    assert all("heart_rate_missing" in p.flags for p in during)
    assert all(p.respiration_rate_valid for p in during[5:])
    degraded = [s for s in out.statuses if s.state == "degraded"]
    assert degraded and "PPG" in degraded[0].reason and "heart rate missing" in degraded[0].reason
    assert degraded[0].missing == ("heart_rate",)
    # stalled streams are not waited for: no step had to wait for its deadline
    assert not any("deadline_expired" in p.flags for p in during)
    # recovery: status online again and the heart rate comes back within the HR window
    assert out.states()[-1] == "online"
    late = [p for p in preds if p.volume_timestamp > gone[1] + 16.0]
    assert late and all(p.heart_rate_valid for p in late)


def test_bad_chunks_are_rejected_and_reported(model, session) -> None:
    clock = Clock(999.0)
    engine, out = make_engine(model, clock)
    events = chunk_events(session)
    feed(engine, clock, events[:200])
    n = len(out.predictions)
    clock.t += 0.001
    bad = engine.process_chunk(Role.FMRI, np.zeros((1, 100)), [clock.t - 0.0005], clock.t)
    assert bad == []
    assert engine.counters.rejected_chunks == 1
    assert out.statuses[-1].state == "degraded"
    assert "expected (samples, 246) values, found shape (1, 100)" in out.statuses[-1].reason
    engine.process_chunk(Role.PPG, np.zeros((3, 2)), [1.0, 2.0, 3.0], clock.t)
    assert "PPG chunk rejected" in out.statuses[-1].reason
    engine.process_chunk(Role.RESP, np.zeros(3), [1.0, 2.0], clock.t)
    assert "3 samples but 2 timestamps" in out.statuses[-1].reason
    feed(engine, clock, events[200:])
    assert len(out.predictions) == session.n_volumes  # nothing lost, nothing extra
    assert out.statuses[-1].state == "online"  # good chunks of every role cleared the errors
    assert out.predictions[n:]


def test_nan_input_is_flagged_never_published_as_a_number(model, session) -> None:
    clock = Clock(999.0)
    engine, out = make_engine(model, clock)
    events = []
    for role, data, ts in chunk_events(session):
        data = np.array(data, dtype=np.float64)
        if role is Role.FMRI and 30 <= ts[0] - 1000.0 < 33:
            data[0, :] = np.nan  # whole volumes lost
        if role is Role.FMRI and 40 <= ts[0] - 1000.0 < 41:
            data[0, :5] = np.inf  # a few broken ROIs
        if role is Role.PPG and 50 <= ts[0] - 1000.0 < 52:
            data[:] = np.nan
        events.append((role, data, ts))
    feed(engine, clock, events)
    preds = out.predictions
    assert len(preds) == session.n_volumes
    for p in preds:
        assert all(math.isfinite(v) for v in p.probabilities) and math.isfinite(p.intensity)
        assert p.heart_rate is None or math.isfinite(p.heart_rate)
    lost = [p for p in preds if 30 <= p.volume_timestamp - 1000.0 < 33]
    assert lost and all({"roi_nonfinite", "roi_invalid"} <= set(p.flags) for p in lost)
    few = [p for p in preds if 40 <= p.volume_timestamp - 1000.0 < 41]
    assert few and "roi_nonfinite" in few[0].flags and "roi_invalid" not in few[0].flags


async def test_timer_pauses_and_degrades_without_new_data(model, session) -> None:
    """Under a real event loop and clock: only fMRI flows, at 20x speed.

    The physiology never comes, so after the stall timeout (2 s engine time = 0.1 s real)
    the engine says degraded and stops waiting; then the fMRI stops and the timer (no data
    arrives to wake the engine) reports the pause.
    """
    import pylsl

    config = apply_overrides(
        load_config(None),
        {"session.id": "t6", "streams.ppg.rate": 400.0, "streams.resp.rate": 50.0},
    )
    out = Collector()
    engine = Engine(config, model, [out], time_scale=20.0)
    engine.register_stream(Role.FMRI, "fmri", 20.0)  # a 20x replay declares 20 Hz for TR 1 s
    vols = session.fmri.data[:20]

    async def source():
        start = pylsl.local_clock()
        for i, v in enumerate(vols):
            t = start + i / 20.0
            await asyncio.sleep(max(0.0, t - pylsl.local_clock()))
            yield Chunk(Role.FMRI, v[None, :], np.array([t]), pylsl.local_clock())
        await asyncio.sleep(0.5)  # 10 s engine time without a volume
        engine.stop()

    await engine.run(source())
    states = out.states()
    assert states[0] == "starting" and "degraded" in states and states[-1] == "offline"
    paused = [s for s in out.statuses if s.state == "paused"]
    assert paused and "predictions paused" in paused[0].reason
    assert len(out.predictions) == 20
    assert all(not p.heart_rate_valid and not p.respiration_rate_valid for p in out.predictions)
    assert out.closed


def test_keras_v1_window_model_waits_for_its_window(session) -> None:
    """The published model's rolling-window port answers ready=False until 25 volumes are in:
    nothing is published for those, and after that the engine equals offline stepping."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "keras_v1" / "k2_full.h5"
    keras = load_model(f"keras-v1:{fixture}")
    clock = Clock(999.0)
    engine, out = make_engine(keras, clock)
    feed(engine, clock, chunk_events(session))
    _steps, expected = offline(keras, session)
    assert engine.counters.warming_up == 24
    got = out.predictions
    assert len(got) == session.n_volumes - 24
    assert [p.sequence for p in got] == list(range(len(got)))  # no holes for the warm-up
    assert got[0].tr_index == 24 and got[0].model_id == keras.model_id
    assert all(p.level is not None and -4 <= p.level <= 4 for p in got)
    probs = np.array([p.probabilities for p in got])
    np.testing.assert_allclose(probs, expected.probabilities[24:], atol=1e-5)


def test_precomputed_rates_stream_feeds_heart_and_respiration_rate(model, session) -> None:
    """Data that carries only rates (e.g. ICBHI .mat trials): a 2-channel rates stream."""
    clock = Clock(999.0)
    engine, out = make_engine(
        model,
        clock,
        **{
            "streams.ppg.enabled": False,
            "streams.resp.enabled": False,
            "streams.rates.enabled": True,
        },
    )
    events = []
    for i, t in enumerate(session.fmri.timestamps[:30] + 1000.0):
        rates = np.array([[70.0 + i * 0.1, 15.0]])
        events.append((Role.RATES, rates, np.array([t - 0.2])))
        events.append((Role.FMRI, session.fmri.data[i : i + 1], np.array([t])))
    # the step of a volume waits for a rates sample after it (or for the deadline)
    events.append((Role.RATES, np.array([[73.0, 15.0]]), np.array([1000.0 + 30 - 0.2])))
    feed(engine, clock, events)
    preds = out.predictions
    assert len(preds) == 30
    assert all(p.heart_rate_valid and p.respiration_rate_valid for p in preds)
    assert preds[5].heart_rate == pytest.approx(70.5)
    assert out.steps[5].heart_rate_source == "rates"
    assert out.states() == ["online"]


def test_markers_reach_the_audit_log_not_the_model(model, tmp_path) -> None:
    from emorecog_stream.engine.outputs import MarkerLog
    from emorecog_stream.recordings.session import make_marker
    from emorecog_stream.sinks.jsonl import JsonlLog, read_log

    log = JsonlLog(tmp_path / "s.jsonl", session="t1", model_id=model.model_id)
    config = apply_overrides(load_config(None), {"session.id": "t1"})
    engine = Engine(config, model, [log, MarkerLog(log)], clock=Clock(5.0))
    text = make_marker("trial_start", 3, 1, 2)
    engine.process_chunk(Role.MARKERS, [[text], ["not json"]], [4.5, 4.7], 5.0)
    log.close()
    markers = read_log(tmp_path / "s.jsonl", kind="marker")
    assert [m["timestamp"] for m in markers] == [4.5, 4.7]
    assert markers[0]["marker"] == {
        "event": "trial_start",
        "trial": 3,
        "category": 1,
        "intensity": 2,
    }
    assert markers[1]["text"] == "not json" and "marker" not in markers[1]
    assert engine.counters.markers == 2 and engine.counters.steps == 0


class ThreadRecorder:
    """Wraps a stepper and notes which thread ran each step and reset."""

    def __init__(self, stepper) -> None:
        self.stepper = stepper
        self.threads: list[str] = []

    def step(self, roi, heart_rate, respiration_rate):
        self.threads.append(threading.current_thread().name)
        return self.stepper.step(roi, heart_rate, respiration_rate)

    def reset(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.stepper.reset()


async def run_events(engine, clock, events) -> None:
    """Like :func:`feed`, under :meth:`Engine.run` (so steps may go to the model thread)."""

    async def source():
        for role, data, ts in events:
            clock.t = max(clock.t, float(ts[-1]) + 0.001)
            yield Chunk(role, data, ts, clock.t)
            await asyncio.sleep(0)  # let finished model steps come back, as live input does

    await engine.run(source())


def two_segments(session):
    """A session, a gap that resets the model state, the same session again."""
    second = 1000.0 + float(session.fmri.timestamps[-1]) + 20.0
    return chunk_events(session) + chunk_events(session, offset=second)


def same_predictions(a: list[Prediction], b: list[Prediction]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.sequence, x.tr_index, x.volume_timestamp, x.flags) == (
            y.sequence,
            y.tr_index,
            y.volume_timestamp,
            y.flags,
        )
        assert x.probabilities == y.probabilities and x.intensity == y.intensity


async def test_slow_model_steps_in_the_model_thread_in_order(session) -> None:
    """A model other than the light NumPy stepper (here the Keras v1 port) steps in one worker
    thread under ``run``: predictions come back in order, numbered without holes, equal to
    stepping inline, and the reset at the gap happens in that thread between the right steps."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "keras_v1" / "k2_full.h5"
    keras = load_model(f"keras-v1:{fixture}")
    events = two_segments(session)

    clock = Clock(999.0)
    inline, inline_out = make_engine(keras, clock)
    feed(inline, clock, events)  # no event loop: inline

    clock = Clock(999.0)
    threaded, out = make_engine(keras, clock)
    recorder = ThreadRecorder(threaded.stepper)
    threaded.stepper = recorder
    await run_events(threaded, clock, events)

    assert threaded.counters.resets == 1 and threaded.counters.warming_up == 48
    assert set(recorder.threads) == {"emorecog-model_0"}
    assert len(recorder.threads) == 2 * session.n_volumes + 1  # steps and the one reset
    got = out.predictions
    assert len(got) == 2 * (session.n_volumes - 24)
    assert [p.sequence for p in got] == list(range(len(got)))
    stamps = [p.volume_timestamp for p in got]
    assert stamps == sorted(stamps)
    assert got[session.n_volumes - 24].tr_index == 24  # the window refilled after the reset
    same_predictions(got, inline_out.predictions)
    assert out.closed  # closed only after the last step came back


async def test_light_model_steps_inline_under_run(model, session) -> None:
    """The default NumPy stepper is not worth a thread hop: under ``run`` it steps on the
    event loop's own thread; ``model_thread = "always"`` moves it and changes nothing else."""
    events = chunk_events(session)
    clock = Clock(999.0)
    inline, inline_out = make_engine(model, clock)
    recorder = ThreadRecorder(inline.stepper)
    inline.stepper = recorder
    await run_events(inline, clock, events)
    assert set(recorder.threads) == {threading.current_thread().name}

    clock = Clock(999.0)
    forced, out = make_engine(model, clock, **{"engine.model_thread": "always"})
    recorder = ThreadRecorder(forced.stepper)
    forced.stepper = recorder
    await run_events(forced, clock, events)
    assert set(recorder.threads) == {"emorecog-model_0"}
    assert len(out.predictions) == session.n_volumes
    same_predictions(out.predictions, inline_out.predictions)


def test_a_failing_model_step_is_counted_not_fatal(model, session) -> None:
    clock = Clock(999.0)
    engine, out = make_engine(model, clock)
    real = engine.stepper
    calls = {"n": 0}

    class Flaky:
        def step(self, roi, heart_rate, respiration_rate):
            calls["n"] += 1
            if calls["n"] == 10:
                raise RuntimeError("boom")
            return real.step(roi, heart_rate, respiration_rate)

        def reset(self) -> None:
            real.reset()

    engine.stepper = Flaky()
    feed(engine, clock, chunk_events(session))
    assert engine.counters.model_errors == 1
    assert len(out.predictions) == session.n_volumes - 1
    assert [p.sequence for p in out.predictions] == list(range(session.n_volumes - 1))


def test_snapshot_shows_this_tr_and_the_engines_view_of_each_stream(model, session) -> None:
    """The dashboard's snapshot, taken by an output as each prediction is handed over, already
    holds that prediction; the stream rows carry the aligner's buffer fill and the engine's
    own state (PPG stalled, with the reason) rather than one guessed from the lag."""
    from emorecog_stream.engine.telemetry import StreamState

    clock = Clock(999.0)
    engine, _out = make_engine(model, clock)
    engine.register_stream(Role.PPG, "ppg", 400.0)
    engine.register_stream(Role.RESP, "resp", 50.0)
    seen: list[tuple[int, int | None, int]] = []

    class Snapshotter(Collector):
        def on_prediction(self, prediction, step) -> None:
            snap = engine.snapshot()
            seen.append((prediction.tr_index, snap.tr_index, snap.predictions))

    engine.outputs.append(Snapshotter())
    t0 = float(session.fmri.timestamps[0]) + 1000.0
    gone = (t0 + 40.0, t0 + 60.0)
    events = chunk_events(session)
    before = [e for e in events if float(e[2][-1]) < t0 + 50.0]
    feed(engine, clock, before, skip=lambda r, t: r is Role.PPG and gone[0] <= t < gone[1])

    rows = {s.role: s for s in engine.snapshot().streams}
    assert rows["ppg"].state is StreamState.STALLED
    assert "PPG stream stalled" in rows["ppg"].note
    assert rows["fmri"].state is StreamState.CONNECTED and rows["fmri"].note == ""
    assert rows["resp"].state is StreamState.CONNECTED
    assert rows["ppg"].buffer_fill is not None and rows["resp"].buffer_fill is not None
    assert rows["fmri"].buffer_fill is None  # volumes wait in the aligner, not a ring buffer

    feed(engine, clock, events[len(before) :])
    rows = {s.role: s for s in engine.snapshot().streams}
    assert {r.state for r in rows.values()} == {StreamState.CONNECTED}
    assert [s[0] for s in seen] == [s[1] for s in seen]  # snapshot on the same TR
    assert [s[2] for s in seen] == list(range(1, len(seen) + 1))
    assert len(seen) == session.n_volumes


def test_snapshot_marks_a_silent_fmri_stream_stalled_and_rejected_chunks(model, session) -> None:
    from emorecog_stream.engine.telemetry import StreamState

    clock = Clock(999.0)
    engine, _out = make_engine(model, clock)
    assert {s.role: s.state for s in engine.snapshot().streams} == {"fmri": StreamState.ABSENT}
    feed(engine, clock, chunk_events(session)[:300])
    clock.t += 10.0
    rows = {s.role: s for s in engine.snapshot().streams}
    assert rows["fmri"].state is StreamState.STALLED
    assert "no volume for more than 2.5 TRs" in rows["fmri"].note
    engine.process_chunk(Role.FMRI, np.zeros((1, 7)), [clock.t - 0.001], clock.t)
    rows = {s.role: s for s in engine.snapshot().streams}
    assert "expected (samples, 246) values, found shape (1, 7)" in rows["fmri"].note
