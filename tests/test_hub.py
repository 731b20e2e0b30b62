"""The hub: several sessions in one process and one model, on real LSL and a real Mosquitto.

Each session's predictions must equal what ``rerun`` gives for its recording (which in turn
equals a real-time replay through a single-session ``run``: tests/test_rerun.py), and a
session whose streams do not exist must fail alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from emorecog_stream.adapters.replay_group import ReplayGroup
from emorecog_stream.config import apply_overrides, load_config
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.hub import HubError, HubSession, load_sessions_file, run_hub
from emorecog_stream.model import load_model
from emorecog_stream.recordings.synth import generate_session
from emorecog_stream.sinks.jsonl import read_log
from tests.test_e2e import off_grid
from tests.test_rerun import SHORT, assert_same_predictions, rerun_payloads

SPEED = 10.0
N = 4


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hub_serves_sessions_alone_and_together(
    tmp_path: Path, model, mosquitto_broker, mqtt_collector
) -> None:
    config_n = replace(SHORT, n_participants=N)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(N)]
    run = uuid.uuid4().hex[:6]
    ids = [f"hub{run}-{i}" for i in range(N)]
    group = ReplayGroup(recordings, ids, tag=f"t{run}", speed=SPEED)
    sessions = [HubSession(sid, m.tag) for sid, m in zip(ids, group.members, strict=True)]
    broken = HubSession(f"hub{run}-missing", f"t{run}-nobody")  # no such streams
    base = apply_overrides(
        load_config(None),
        {"mqtt.url": mosquitto_broker.url, "engine.resolve_timeout": 10.0},
    )
    sub = mqtt_collector(mosquitto_broker, [f"emorecog/{sid}/#" for sid in ids])
    engines: dict[str, object] = {}

    async def main():
        loop = asyncio.get_running_loop()

        def on_engine(session_id, engine) -> None:
            engines[session_id] = engine
            if len(engines) == N:
                threading.Thread(target=play, daemon=True).start()

        def play() -> None:
            assert group.wait_for_consumers([Role.FMRI, Role.PPG, Role.RESP], timeout=10.0)
            group.start(delay=0.2)
            group.join()
            time.sleep(3.0 / SPEED + 0.5)
            for engine in engines.values():
                loop.call_soon_threadsafe(engine.stop)

        group.open()
        return await run_hub(
            base, [*sessions, broken], model=model, log_dir=tmp_path, time_scale=SPEED,
            on_engine=on_engine,
        )  # fmt: skip

    try:
        results = asyncio.run(main())
    finally:
        group.stop()
    by_id = {r.session_id: r for r in results}
    assert by_id[broken.id].error and "fMRI" in by_id[broken.id].error
    for sid in ids:
        assert by_id[sid].error is None
    offline = {sid for sid in ids}

    def all_offline(messages) -> bool:
        done = {m.topic.split("/")[1] for m in messages if m.json().get("state") == "offline"}
        return offline <= done

    assert sub.wait_for(all_offline, 20)
    for i, sid in enumerate(ids):
        live = [m.json() for m in sub.of("prediction") if m.topic == f"emorecog/{sid}/prediction"]
        assert [p["sequence"] for p in live] == list(range(recordings[i].n_volumes))
        expected = rerun_payloads(recordings[i], model, sid)
        replayer = group.members[i].replayer
        assert_same_predictions(live, expected, replayer.timestamp_of)
        logged = read_log(tmp_path / f"{sid}.jsonl", "prediction")
        assert [p["sequence"] for p in logged] == [p["sequence"] for p in live]


def test_sessions_file(tmp_path: Path) -> None:
    path = tmp_path / "sessions.toml"
    path.write_text('[[session]]\nid = "s1"\n\n[[session]]\nid = "s2"\ntag = "scanner2"\n')
    assert load_sessions_file(path) == [HubSession("s1", "s1"), HubSession("s2", "scanner2")]
    path.write_text('[[session]]\nid = "s1"\n[[session]]\nid = "s1"\n')
    with pytest.raises(HubError, match="listed twice"):
        load_sessions_file(path)
    path.write_text('[[session]]\nid = "a/b"\n')
    with pytest.raises(HubError, match="id"):
        load_sessions_file(path)
    path.write_text('[[session]]\nid = "s1"\nname = "x"\n')
    with pytest.raises(HubError, match="unknown key"):
        load_sessions_file(path)
    with pytest.raises(HubError, match="sessions file"):
        load_sessions_file(tmp_path / "missing.toml")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_hubs_on_one_broker_split_sessions_without_overlap(
    tmp_path: Path, mosquitto_broker, mqtt_collector
) -> None:
    """Two ``run --sessions`` processes, each with its own file, on one broker: every session
    is served by exactly one of them (its log in that hub's folder only, each prediction
    published once), and SIGTERM stops each hub with its sessions offline."""
    import signal
    import subprocess
    import sys

    config_n = replace(SHORT, n_participants=N)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(N)]
    run = uuid.uuid4().hex[:6]
    ids = [f"two{run}-{i}" for i in range(N)]
    group = ReplayGroup(recordings, ids, tag=f"u{run}", speed=SPEED)
    group.open()
    halves = {"a": group.members[: N // 2], "b": group.members[N // 2 :]}
    sub = mqtt_collector(mosquitto_broker, [f"emorecog/{sid}/#" for sid in ids])
    procs = {}
    try:
        for name, members in halves.items():
            toml = tmp_path / f"{name}.toml"
            toml.write_text("".join(
                f'[[session]]\nid = "{m.session_id}"\ntag = "{m.tag}"\n\n' for m in members
            ))  # fmt: skip
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "emorecog_stream", "run", "--sessions", str(toml),
                 "--mqtt", mosquitto_broker.url, "--replay-speed", str(SPEED),
                 "--log", str(tmp_path / f"logs-{name}"), "--no-dashboard"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        assert group.wait_for_consumers([Role.FMRI, Role.PPG, Role.RESP], timeout=60.0)
        group.start(delay=0.2)
        assert group.join(60.0)
        time.sleep(3.0 / SPEED + 1.0)
        outputs = {}
        for name, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
            outputs[name] = proc.communicate(timeout=30)[0]
            assert proc.returncode == 0, outputs[name]
    finally:
        group.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, members in halves.items():
        logs = sorted(p.name for p in (tmp_path / f"logs-{name}").iterdir())
        assert logs == sorted(f"{m.session_id}.jsonl" for m in members), outputs[name]

    def all_offline(messages) -> bool:
        done = {m.topic.split("/")[1] for m in messages if m.json().get("state") == "offline"}
        return set(ids) <= done

    assert sub.wait_for(all_offline, 20)
    for i, sid in enumerate(ids):
        got = [m.json() for m in sub.of("prediction") if m.topic == f"emorecog/{sid}/prediction"]
        # published once each: one hub served the session
        assert [p["sequence"] for p in got] == list(range(recordings[i].n_volumes)), sid


def test_stop_ends_sessions_still_looking_for_their_streams(model) -> None:
    """Ctrl-C / SIGTERM of a hub whose session has no streams yet ends it at once, not after
    the resolve timeout (30 s here)."""
    base = apply_overrides(
        load_config(None), {"mqtt.url": "mqtt://127.0.0.1:1", "engine.resolve_timeout": 30.0}
    )
    missing = HubSession("nobody", f"none{uuid.uuid4().hex[:6]}")

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        t0 = time.monotonic()
        results = await run_hub(base, [missing], model=model, stop=stop)
        return results, time.monotonic() - t0

    results, seconds = asyncio.run(main())
    assert seconds < 10.0
    assert results[0].session_id == "nobody" and "stopped" in results[0].error


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bad_input_in_one_session_leaves_the_others_alone(
    tmp_path: Path, model, mosquitto_broker, mqtt_collector
) -> None:
    """Beside two good sessions: one whose fMRI stream has the wrong channel count (refused
    alone, with the counts named) and one whose volumes carry NaNs (served, flagged). The good
    sessions' sequences stay contiguous and equal their re-runs."""
    import numpy as np
    import pylsl

    from emorecog_stream.adapters.lsl_info import stream_identity

    config_n = replace(SHORT, n_participants=3)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(3)]
    nan_rec = recordings[2]
    nan_rec.fmri.data = nan_rec.fmri.data.copy()
    nan_rec.fmri.data[10:20, :5] = np.nan  # a few ROIs missing in ten volumes
    run = uuid.uuid4().hex[:6]
    ids = [f"bad{run}-{i}" for i in range(3)]
    group = ReplayGroup(recordings, ids, tag=f"v{run}", speed=SPEED)
    sessions = [HubSession(sid, m.tag) for sid, m in zip(ids, group.members, strict=True)]
    wrong = HubSession(f"bad{run}-wrong", f"v{run}-wrong")
    name, type_, source_id = stream_identity(Role.FMRI, wrong.tag)
    wrong_outlet = pylsl.StreamOutlet(
        pylsl.StreamInfo(name, type_, 100, 1.0, pylsl.cf_float32, source_id)
    )
    base = apply_overrides(
        load_config(None), {"mqtt.url": mosquitto_broker.url, "engine.resolve_timeout": 10.0}
    )
    sub = mqtt_collector(mosquitto_broker, [f"emorecog/{sid}/#" for sid in ids])
    engines: dict[str, object] = {}

    async def main():
        loop = asyncio.get_running_loop()

        def on_engine(session_id, engine) -> None:
            engines[session_id] = engine
            if len(engines) == len(ids):
                threading.Thread(target=play, daemon=True).start()

        def play() -> None:
            assert group.wait_for_consumers([Role.FMRI, Role.PPG, Role.RESP], timeout=10.0)
            group.start(delay=0.2)
            group.join()
            time.sleep(3.0 / SPEED + 0.5)
            for engine in engines.values():
                loop.call_soon_threadsafe(engine.stop)

        group.open()
        return await run_hub(
            base, [*sessions, wrong], model=model, log_dir=tmp_path, time_scale=SPEED,
            on_engine=on_engine,
        )  # fmt: skip

    try:
        results = asyncio.run(main())
    finally:
        group.stop()
        del wrong_outlet
    by_id = {r.session_id: r for r in results}
    assert "246" in by_id[wrong.id].error and "100" in by_id[wrong.id].error

    def all_offline(messages) -> bool:
        done = {m.topic.split("/")[1] for m in messages if m.json().get("state") == "offline"}
        return set(ids) <= done

    assert sub.wait_for(all_offline, 20)
    for i, sid in enumerate(ids):
        assert by_id[sid].error is None
        live = [m.json() for m in sub.of("prediction") if m.topic == f"emorecog/{sid}/prediction"]
        assert [p["sequence"] for p in live] == list(range(recordings[i].n_volumes)), sid
        expected = rerun_payloads(recordings[i], model, sid)
        assert_same_predictions(live, expected, group.members[i].replayer.timestamp_of)
    flagged = [p for p in sub.json("prediction") if "roi_nonfinite" in p["flags"]]
    assert {p["session"] for p in flagged} == {ids[2]} and len(flagged) == 10
