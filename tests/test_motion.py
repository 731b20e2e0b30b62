"""Head motion from the scanner bridge's ``Motion`` stream, and trial markers recorded by default.

Three layers, each with the real code: the timestamp matching on its own (``MotionTrack``);
the engine fed chunk by chunk as inlets deliver them (real aligner and model, a test clock, as
in ``test_engine.py``); and the whole ``run`` path with real LSL outlets on loopback written the
way the bridge writes them (a ``Motion`` sample with exactly its volume's timestamp, pushed just
before the volume), a real Mosquitto and an independent subscriber, checked against the JSON
Schemas and the JSONL log.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
import uuid
from typing import Any

import jsonschema
import numpy as np
import pylsl
import pytest

from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.config import apply_overrides, load_config
from emorecog_stream.core.motion import MATCH_TOLERANCE_S, MotionSample, MotionTrack
from emorecog_stream.core.streams import MOTION_CHANNELS, N_ROIS, Role
from emorecog_stream.engine.runner import RunHooks, run_engine
from emorecog_stream.engine.session import MOTION_WAIT_S, Engine
from emorecog_stream.model import load_model
from emorecog_stream.recordings.session import make_marker
from emorecog_stream.recordings.synth import SynthConfig, generate_session
from emorecog_stream.sinks.jsonl import read_log
from emorecog_stream.sinks.payload import load_schema
from tests.test_engine import Clock, chunk_events, make_engine

SHORT = SynthConfig(n_participants=1, n_trials=3, rest_s=5.0, lead_in_s=5.0)
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def session():
    return generate_session(1, SHORT)


def trajectory(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Six parameters and FD per volume: calm, with spikes above, at and just under 0.5 mm."""
    rng = np.random.default_rng(7)
    params = np.cumsum(rng.normal(0, 0.01, (n, 6)), axis=0)
    fd = np.full(n, 0.08)
    fd[[3, 17, 18, 40]] = [0.51, 0.93, 2.4, 0.75]
    fd[[5, 6]] = [0.5, 0.4999]  # at the threshold is not above it
    fd[0] = 0.0  # the first volume of a run has nothing to move from
    return params, fd


def motion_rows(params: np.ndarray, fd: np.ndarray) -> np.ndarray:
    return np.column_stack([params, fd]).astype(np.float32)


def with_motion(events, stamps, rows, *, late=frozenset(), lost=frozenset()):
    """Insert each volume's motion chunk just before its fMRI chunk (as the bridge pushes it),
    or just after it for volumes in ``late``; volumes in ``lost`` get none."""
    out = []
    k = 0
    for role, data, ts in events:
        if role is Role.FMRI:
            assert ts[0] == stamps[k]
            motion = (Role.MOTION, rows[k : k + 1], np.array([stamps[k]]))
            if k in lost:
                out.append((role, data, ts))
            elif k in late:
                out += [(role, data, ts), motion]
            else:
                out += [motion, (role, data, ts)]
            k += 1
        else:
            out.append((role, data, ts))
    return out


def feed(engine, clock, events, latency: float = 0.001):
    """Like test_engine.feed, and record which chunk produced each prediction."""
    made_by: dict[int, Role] = {}
    for role, data, ts in events:
        clock.t = max(clock.t, float(ts[-1]) + latency)
        for p in engine.process_chunk(role, data, ts, received=clock.t):
            made_by[p.sequence] = role
    return made_by


# --- matching on its own ------------------------------------------------------------------------


def test_track_matches_by_timestamp_within_the_tolerance() -> None:
    track = MotionTrack(capacity=8)
    rows = np.arange(4 * 7, dtype=float).reshape(4, 7)
    track.push(rows, np.array([10.0, 11.0, 12.0, 13.0]))
    hit = track.match(12.0 + MATCH_TOLERANCE_S / 2)  # another inlet's clock-correction jitter
    assert hit is not None and hit.timestamp == 12.0 and hit.framewise_displacement == 20.0
    assert hit.params == tuple(rows[2, :6])
    assert track.match(12.0 + 3 * MATCH_TOLERANCE_S) is None  # never a neighbour's sample
    assert track.match(14.0) is None  # not arrived yet
    assert track.match(10.0) is not None  # older ones are still there
    track.push(np.zeros((8, 7)), np.arange(20.0, 28.0))  # capacity: the oldest are gone
    assert track.match(10.0) is None and len(track) == 8 and track.received == 12


def test_a_non_finite_or_negative_displacement_is_unknown() -> None:
    row = np.array([0, 0, 0, 0, 0, 0, math.nan])
    assert MotionSample.from_row(1.0, row).framewise_displacement is None
    row[6] = -0.2
    assert MotionSample.from_row(1.0, row).framewise_displacement is None
    with pytest.raises(ValueError, match="expected 7 values"):
        MotionSample.from_row(1.0, np.zeros(6))


# --- the engine, chunk by chunk -----------------------------------------------------------------


def test_predictions_carry_fd_and_the_motion_flag_exactly_above_the_threshold(
    model, session
) -> None:
    n = session.n_volumes
    params, fd = trajectory(n)
    rows = motion_rows(params, fd)
    stamps = session.fmri.timestamps + 1000.0
    events = with_motion(chunk_events(session), stamps, rows)

    clock = Clock(999.0)
    engine, out = make_engine(model, clock, "m1")
    engine.register_stream(Role.MOTION, "motion", 1.0)
    feed(engine, clock, events)
    plain_clock = Clock(999.0)
    plain, plain_out = make_engine(model, plain_clock, "m0")  # the same session, no motion
    feed(plain, plain_clock, chunk_events(session))

    got = out.predictions
    assert len(got) == n
    np.testing.assert_allclose(
        [p.framewise_displacement for p in got], fd.astype(np.float32), rtol=0, atol=0
    )
    flagged = [p.tr_index for p in got if "motion" in p.flags]
    assert flagged == [int(i) for i in np.flatnonzero(fd.astype(np.float32) > THRESHOLD)]
    assert flagged == [3, 17, 18, 40]
    assert engine.counters.motion_flagged == 4 and engine.counters.motion_missing == 0
    np.testing.assert_array_equal([p.motion_params for p in got], rows[:, :6])
    assert not any("motion_missing" in p.flags for p in got)
    # motion is reported beside the model, never fed to it
    np.testing.assert_array_equal(
        [p.probabilities for p in got], [p.probabilities for p in plain_out.predictions]
    )
    assert [p.intensity for p in got] == [p.intensity for p in plain_out.predictions]
    assert all(p.framewise_displacement is None for p in plain_out.predictions)
    assert not any(f.startswith("motion") for p in plain_out.predictions for f in p.flags)
    assert out.states() == ["online"]


def test_the_threshold_comes_from_the_config(model, session) -> None:
    n = session.n_volumes
    params, fd = trajectory(n)
    stamps = session.fmri.timestamps + 1000.0
    events = with_motion(chunk_events(session), stamps, motion_rows(params, fd))
    clock = Clock(999.0)
    engine, out = make_engine(model, clock, "m2", **{"engine.fd_threshold": 0.8})
    engine.register_stream(Role.MOTION, "motion", 1.0)
    feed(engine, clock, events)
    assert [p.tr_index for p in out.predictions if "motion" in p.flags] == [17, 18]


def test_a_late_motion_sample_holds_its_prediction_briefly_and_a_lost_one_is_said(
    model, session
) -> None:
    """Without physiology a step is ready the moment its volume arrives. A motion sample that
    comes just after it (the two inlets race) holds the prediction back until it arrives, so a
    volume above the threshold is never published unflagged; one that never comes releases it
    after MOTION_WAIT_S with FD unknown. Order and numbering never change."""
    n = session.n_volumes
    params, fd = trajectory(n)
    stamps = session.fmri.timestamps + 1000.0
    fmri_only = [e for e in chunk_events(session) if e[0] is Role.FMRI]
    events = with_motion(fmri_only, stamps, motion_rows(params, fd), late={17, 30}, lost={31})
    clock = Clock(999.0)
    engine, out = make_engine(
        model, clock, "m3", **{"streams.ppg.enabled": False, "streams.resp.enabled": False}
    )
    engine.register_stream(Role.MOTION, "motion", 1.0)
    made_by = feed(engine, clock, events)
    got = out.predictions
    assert len(got) == n
    assert [p.sequence for p in got] == list(range(n))
    assert [p.tr_index for p in got] == list(range(n))
    by_seq = {p.sequence: p for p in got}
    # the late ones went out when their motion came, with it; the lost one when the next
    # volume's chunks came after its wait was over (that volume's motion sample leads)
    assert {s for s, role in made_by.items() if role is Role.MOTION} == {
        by_seq[k].sequence for k in (17, 30, 31)
    }
    assert got[17].framewise_displacement == pytest.approx(fd[17], abs=1e-6)
    assert ("motion" in got[17].flags) == (fd[17] > 0.5)
    # the lost one waited MOTION_WAIT_S and went out FD unknown
    assert [p.tr_index for p in got if p.framewise_displacement is None] == [31]
    assert [p.tr_index for p in got if "motion_missing" in p.flags] == [31]
    assert engine.counters.motion_missing == 1
    assert any("framewise displacement unknown" in note for note in out.steps[31].notes)
    assert got[31].latency_ms >= MOTION_WAIT_S * 1000 * 0.99  # the wait is in its latency


def test_wrong_motion_channel_count_is_rejected_and_the_engine_goes_on(model, session) -> None:
    stamps = session.fmri.timestamps + 1000.0
    fmri_only = [e for e in chunk_events(session) if e[0] is Role.FMRI]
    clock = Clock(999.0)
    engine, out = make_engine(
        model, clock, "m4", **{"streams.ppg.enabled": False, "streams.resp.enabled": False}
    )
    engine.register_stream(Role.MOTION, "motion", 1.0)
    for k, (role, data, ts) in enumerate(fmri_only[:20]):
        clock.t = float(ts[-1]) + 0.001
        width = 6 if k < 10 else 7  # a bridge sending 6 values, then fixed
        engine.process_chunk(Role.MOTION, np.full((1, width), 0.1), [stamps[k]], clock.t)
        engine.process_chunk(role, data, ts, clock.t)
    got = out.predictions
    assert len(got) == 20  # predictions went on throughout
    assert engine.counters.rejected_chunks == 10
    degraded = [s for s in out.statuses if s.state == "degraded"]
    assert degraded[0].reason == (
        "motion chunk rejected: expected (samples, 7) values, found shape (1, 6)"
    )
    assert all(p.framewise_displacement is None for p in got[:10])
    assert all(p.framewise_displacement == pytest.approx(0.1) for p in got[10:])
    assert out.states()[-1] == "online"  # good samples clear the error


def test_a_motion_stream_of_the_wrong_shape_degrades_the_status_with_the_reason(model) -> None:
    """What the runner does when the inlet reports the stream breaks its spec."""
    clock = Clock(10.0)
    engine, out = make_engine(
        model, clock, "m5", **{"streams.ppg.enabled": False, "streams.resp.enabled": False}
    )
    roi = np.zeros((1, N_ROIS), dtype=np.float32)
    engine.process_chunk(Role.FMRI, roi, [10.0], 10.001)
    reason = "motion stream: motion stream 'X' (source_id 'x'): expected 7 channels, found 6"
    engine.stream_absent(Role.MOTION, reason)
    clock.t = 11.001
    engine.process_chunk(Role.FMRI, roi, [11.0], 11.001)
    assert out.statuses[-1].state == "degraded"
    assert out.statuses[-1].reason == f"{reason}: framewise displacement unknown"
    assert len(out.predictions) == 2


def test_matching_uses_lsl_time_in_a_sped_up_replay(model, session) -> None:
    n = session.n_volumes
    params, fd = trajectory(n)
    stamps = session.fmri.timestamps + 1000.0
    fmri_only = [e for e in chunk_events(session) if e[0] is Role.FMRI]
    events = with_motion(fmri_only, stamps, motion_rows(params, fd))
    config = apply_overrides(
        load_config(None),
        {"session.id": "m6", "streams.ppg.enabled": False, "streams.resp.enabled": False},
    )
    from tests.test_engine import Collector

    clock = Clock(999.0)
    out = Collector()
    engine = Engine(config, model, [out], clock=clock, time_scale=10.0)
    engine.register_stream(Role.FMRI, "fmri", 10.0)
    engine.register_stream(Role.MOTION, "motion", 10.0)
    feed(engine, clock, events)
    assert len(out.predictions) == n
    # (volumes 1 s apart at 10x are 10 s apart in session time: each starts a new segment, so
    # the volumes are counted by sequence here)
    assert [p.sequence for p in out.predictions if "motion" in p.flags] == [3, 17, 18, 40]
    np.testing.assert_allclose(
        [p.framewise_displacement for p in out.predictions], fd.astype(np.float32), rtol=0
    )


# --- the run path: real LSL outlets, a real broker, the log --------------------------------------

TR = 0.25
N_VOLUMES = 16


def run_config(broker_url: str, tag: str, session_id: str, log: str) -> Any:
    """The defaults (markers and motion on), with this test's tagged stream names."""
    overrides: dict[str, Any] = {
        "session.id": session_id,
        "mqtt.url": broker_url,
        "output.dashboard": False,
        "output.log": log,
        "streams.ppg.enabled": False,  # the bridge's setup: fMRI and motion, no physiology
        "streams.resp.enabled": False,
    }
    for role in Role:
        name, _type, source_id = stream_identity(role, tag)
        overrides[f"streams.{role.value}.name"] = name
        overrides[f"streams.{role.value}.source_id"] = source_id
    return apply_overrides(load_config(None), overrides)


def make_outlet(role: Role, tag: str, channels: int, fmt: int = pylsl.cf_float32, rate=1 / TR):
    name, type_, source_id = stream_identity(role, tag)
    return pylsl.StreamOutlet(pylsl.StreamInfo(name, type_, channels, rate, fmt, source_id))


def run_bridge_session(
    model, broker_url: str, tmp_path, *, motion_channels: int | None, fd: np.ndarray
) -> dict[str, Any]:
    """Push N_VOLUMES volumes the way the scanner bridge does, with ``run`` reading them."""
    tag = "mo" + uuid.uuid4().hex[:8]
    session_id = f"motion-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "session.jsonl"
    config = run_config(broker_url, tag, session_id, str(log))
    fmri = make_outlet(Role.FMRI, tag, N_ROIS)
    motion = None if motion_channels is None else make_outlet(Role.MOTION, tag, motion_channels)
    markers = make_outlet(Role.MARKERS, tag, 1, pylsl.cf_string, 0.0)
    rng = np.random.default_rng(3)
    params = rng.normal(0, 0.05, (N_VOLUMES, 6))
    result: dict[str, Any] = {"session_id": session_id, "log": log, "stamps": [], "errors": []}
    out = io.StringIO()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_engine(engine: Engine) -> None:
            result["engine"] = engine

            def push() -> None:
                try:
                    assert fmri.wait_for_consumers(10.0) and markers.wait_for_consumers(10.0)
                    if motion is not None and motion_channels == len(MOTION_CHANNELS):
                        # the engine runs before the scan starts: its motion inlet is reading
                        # by volume 0. Here both start together, so wait until it reads (a
                        # sample stamped far from any volume, matched to none).
                        assert motion.wait_for_consumers(10.0)
                        motion.push_sample([0.0] * 7, pylsl.local_clock() - 100.0)
                        end = time.monotonic() + 10.0
                        while not engine.counters.samples.get("motion"):
                            assert time.monotonic() < end, "the engine never read motion"
                            time.sleep(0.02)
                    elif motion is not None:  # the inlet refuses it: wait for the verdict
                        end = time.monotonic() + 10.0
                        while engine.status.state != "degraded" and time.monotonic() < end:
                            time.sleep(0.02)
                    start = pylsl.local_clock()
                    for k in range(N_VOLUMES):
                        while pylsl.local_clock() < start + k * TR:
                            time.sleep(0.002)
                        t = pylsl.local_clock()  # the volume's trigger time
                        result["stamps"].append(t)
                        if k in (2, N_VOLUMES - 2):
                            event = "trial_start" if k == 2 else "trial_end"
                            markers.push_sample([make_marker(event, 0, 1, 2)], t)
                        if motion is not None:
                            row = [*params[k], fd[k]][:motion_channels]
                            motion.push_sample(row, t)  # just before the volume, same stamp
                        time.sleep(0.03)
                        fmri.push_sample(np.full(N_ROIS, 0.01 * k, dtype=np.float32), t)
                    end = time.monotonic() + 10.0
                    while engine.counters.predictions < N_VOLUMES and time.monotonic() < end:
                        time.sleep(0.02)
                    time.sleep(0.2)
                except BaseException as exc:  # reported by the test, not lost in a thread
                    result["errors"].append(exc)
                finally:
                    loop.call_soon_threadsafe(engine.stop)

            threading.Thread(target=push, daemon=True).start()

        await run_engine(
            config,
            model=model,
            hooks=RunHooks(on_engine=on_engine),
            out=out,
            install_signal_handlers=False,
        )

    asyncio.run(main())
    result["params"] = params
    result["printed"] = out.getvalue()
    assert not result["errors"], result["errors"]
    return result


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_run_with_a_motion_stream_publishes_and_logs_fd(
    model, mqtt_broker, mqtt_collector, tmp_path
) -> None:
    assert load_config(None).streams.markers.enabled  # issue 11: markers on by default
    fd = np.full(N_VOLUMES, 0.1)
    fd[[4, 9, 10]] = [0.7, 1.6, 0.55]
    fd[7] = 0.5
    sub = mqtt_collector(mqtt_broker, ["emorecog/+/#"])
    result = run_bridge_session(model, mqtt_broker.url, tmp_path, motion_channels=7, fd=fd)
    sid = result["session_id"]
    assert sub.wait_for(
        lambda m: any(
            x.topic == f"emorecog/{sid}/status" and x.json().get("state") == "offline" for x in m
        ),
        15,
    )
    mine = [m for m in sub.messages if m.topic.startswith(f"emorecog/{sid}/")]
    preds = [m.json() for m in mine if m.topic.endswith("/prediction")]
    physio = [m.json() for m in mine if m.topic.endswith("/physio")]
    assert len(preds) == N_VOLUMES == len(physio), result["printed"]
    fd32 = fd.astype(np.float32)
    assert [p["framewise_displacement"] for p in preds] == pytest.approx(fd32, abs=1e-7)
    assert [p["framewise_displacement"] for p in physio] == pytest.approx(fd32, abs=1e-7)
    flagged = [p["tr_index"] for p in preds if "motion" in p["flags"]]
    assert flagged == [4, 9, 10]  # exactly the volumes above 0.5 mm (0.5 itself is not)
    assert not any("motion_missing" in p["flags"] for p in preds)
    params32 = result["params"].astype(np.float32)
    for p, row in zip(physio, params32, strict=True):
        got = [p["motion"][c] for c in MOTION_CHANNELS[:6]]
        assert got == pytest.approx(row, abs=1e-7)
    # the volume's LSL timestamp is the one the bridge gave both samples
    stamps = [p["volume_timestamp"] for p in preds]
    np.testing.assert_allclose(stamps, result["stamps"], atol=1e-3)
    pred_schema, physio_schema = load_schema("prediction"), load_schema("physio")
    for p in preds:
        jsonschema.validate(p, pred_schema)
    for p in physio:
        jsonschema.validate(p, physio_schema)

    records = read_log(result["log"])
    logged = [r for r in records if r["kind"] == "prediction"]
    assert [r["framewise_displacement"] for r in logged] == [
        p["framewise_displacement"] for p in preds
    ]
    assert [r["flags"] for r in logged] == [p["flags"] for p in preds]
    # trial markers recorded without any markers setting (issue 11)
    marks = [r for r in records if r["kind"] == "marker"]
    assert [m["marker"]["event"] for m in marks] == ["trial_start", "trial_end"]
    np.testing.assert_allclose(
        [m["timestamp"] for m in marks], [result["stamps"][2], result["stamps"][-2]], atol=1e-3
    )
    # the headless line shows FD too
    lines = [ln for ln in result["printed"].splitlines() if " TR " in ln]
    assert len(lines) == N_VOLUMES and "FD 1.60 mm" in lines[9] and lines[9].endswith(",motion]")
    engine = result["engine"]
    assert engine.counters.motion_flagged == 3 and engine.counters.markers == 2


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_run_without_a_motion_stream_is_as_before(
    model, mqtt_broker, mqtt_collector, tmp_path
) -> None:
    sub = mqtt_collector(mqtt_broker, ["emorecog/+/#"])
    fd = np.zeros(N_VOLUMES)
    result = run_bridge_session(model, mqtt_broker.url, tmp_path, motion_channels=None, fd=fd)
    sid = result["session_id"]
    assert sub.wait_for(
        lambda m: any(
            x.topic == f"emorecog/{sid}/status" and x.json().get("state") == "offline" for x in m
        ),
        15,
    )
    mine = [m for m in sub.messages if m.topic.startswith(f"emorecog/{sid}/")]
    preds = [m.json() for m in mine if m.topic.endswith("/prediction")]
    physio = [m.json() for m in mine if m.topic.endswith("/physio")]
    states = [m.json()["state"] for m in mine if m.topic.endswith("/status")]
    assert len(preds) == N_VOLUMES == len(physio)
    assert all(p["framewise_displacement"] is None for p in preds)
    assert not any(f.startswith("motion") for p in preds for f in p["flags"])
    assert all(p["framewise_displacement"] is None and p["motion"] is None for p in physio)
    assert "degraded" not in states  # an absent motion stream is not a problem
    for p in preds:
        jsonschema.validate(p, load_schema("prediction"))
    for p in physio:
        jsonschema.validate(p, load_schema("physio"))
    logged = read_log(result["log"], kind="prediction")
    assert all(r["framewise_displacement"] is None for r in logged)
    assert "FD" not in result["printed"]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_run_with_a_motion_stream_of_six_channels_reports_it_and_goes_on(
    model, mqtt_broker, mqtt_collector, tmp_path
) -> None:
    sub = mqtt_collector(mqtt_broker, ["emorecog/+/#"])
    fd = np.full(N_VOLUMES, 0.9)
    result = run_bridge_session(model, mqtt_broker.url, tmp_path, motion_channels=6, fd=fd)
    sid = result["session_id"]
    assert sub.wait_for(
        lambda m: any(
            x.topic == f"emorecog/{sid}/status" and x.json().get("state") == "offline" for x in m
        ),
        15,
    )
    mine = [m for m in sub.messages if m.topic.startswith(f"emorecog/{sid}/")]
    preds = [m.json() for m in mine if m.topic.endswith("/prediction")]
    statuses = [m.json() for m in mine if m.topic.endswith("/status")]
    assert len(preds) == N_VOLUMES  # the engine went on
    assert all(p["framewise_displacement"] is None for p in preds)
    assert not any("motion" in p["flags"] for p in preds)
    degraded = [s for s in statuses if s["state"] == "degraded"]
    assert degraded, statuses
    reason = degraded[0]["reason"]
    assert "expected 7 channels, found 6" in reason, reason
    assert reason.endswith("framewise displacement unknown")
    assert stream_identity(Role.MOTION, "")[0] in reason  # names the stream


def test_dashboard_from_the_engine_shows_fd_and_the_motion_stream_state(model, session) -> None:
    from rich.console import Console

    from emorecog_stream.engine.telemetry import StreamState
    from emorecog_stream.sinks.dashboard import render

    n = 30
    params, fd = trajectory(session.n_volumes)
    stamps = session.fmri.timestamps + 1000.0
    fmri_only = [e for e in chunk_events(session) if e[0] is Role.FMRI][:n]
    events = with_motion(fmri_only, stamps, motion_rows(params, fd), lost=set(range(20, n)))
    clock = Clock(999.0)
    engine, out = make_engine(
        model, clock, "m7", **{"streams.ppg.enabled": False, "streams.resp.enabled": False}
    )
    engine.register_stream(Role.MOTION, "EmoRecog-Motion", 1.0)
    feed(engine, clock, events[: 2 * 18])  # volumes 0..17, each with its motion sample
    snap = engine.snapshot()
    assert snap.framewise_displacement == pytest.approx(fd[17]) and snap.fd_threshold == 0.5
    assert "motion" in snap.flags
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    console.print(render(snap))
    text = console.export_text()
    row = next(ln for ln in text.splitlines() if "Head FD" in ln)
    assert "0.93 mm" in row and "> 0.5 mm" in row
    assert "EmoRecog-Motion" in text  # the stream's own row
    states, _ = engine.stream_states()
    assert states["motion"] is StreamState.CONNECTED
    feed(engine, clock, events[2 * 18 :])  # the bridge stops sending motion after volume 19
    states, notes = engine.stream_states()
    assert states["motion"] is StreamState.STALLED
    assert notes["motion"] == "no motion sample for more than 2.5 TRs"
    assert engine.snapshot().framewise_displacement is None
    assert "motion_missing" in out.predictions[-1].flags
