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
N = 8


@pytest.fixture(scope="module")
def model():
    return load_model()


def hub_config(url: str):
    """The hub's config for a sped-up replay: the aligner's deadline and the physiology stall
    timeout at 6 s of session time (0.6 s of real time at speed 10) instead of 2 s, so that a
    busy CI machine's pause of a few hundred ms is not taken for missing or stalled physiology
    (seen: a session's step flagged heart and respiration rate missing while another session's
    outlets were being torn down). It changes nothing else: a step goes out the moment its
    physiology is there, and the re-runs compared with never reach a deadline or a stall."""
    return apply_overrides(
        load_config(None),
        {"mqtt.url": url, "aligner.deadline": 6.0, "engine.stall_timeout": 6.0},
    )


def serve(base, sessions, group, model, log_dir, *, expect, ready=None, during=None, **kw):
    """Run a hub on ``sessions`` while ``group`` replays; returns (results, hub).

    The replay starts once ``expect`` engines exist and the ``ready`` members' (default all)
    streams have consumers; ``during(loop, hub)`` runs in the replay thread after the start;
    the hub is stopped 3 TRs after the replay ended (or if the replay thread fails).
    """
    engines: dict[str, object] = {}
    boxes: list = []
    problems: list[BaseException] = []

    async def main():
        loop = asyncio.get_running_loop()

        def on_engine(session_id, engine) -> None:
            engines[session_id] = engine
            if len(engines) == expect:
                threading.Thread(target=play, daemon=True).start()

        def play() -> None:
            try:
                for member in ready if ready is not None else group.members:
                    assert member.replayer.wait_for_consumers(
                        [Role.FMRI, Role.PPG, Role.RESP], timeout=20.0
                    ), member.session_id
                group.start(delay=0.2)
                if during is not None:
                    during(loop, boxes[0])
                group.join()
                time.sleep(3.0 / group.speed + 0.5)
            except BaseException as exc:  # reported by the test, never a hang
                problems.append(exc)
            finally:
                loop.call_soon_threadsafe(boxes[0].stop)

        group.open()
        return await run_hub(
            base, sessions, model=model, log_dir=log_dir, time_scale=group.speed,
            on_engine=on_engine, on_hub=boxes.append, **kw,
        )  # fmt: skip

    try:
        results = asyncio.run(main())
    finally:
        group.stop()
    assert not problems, problems
    return {r.session_id: r for r in results}, boxes[0]


def live_predictions(sub, sid):
    return [m.json() for m in sub.of("prediction") if m.topic == f"emorecog/{sid}/prediction"]


def wait_offline(sub, ids) -> None:
    def all_offline(messages) -> bool:
        done = {m.topic.split("/")[1] for m in messages if m.json().get("state") == "offline"}
        return set(ids) <= done

    assert sub.wait_for(all_offline, 20)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_hub_serves_eight_sessions_each_as_a_single_run_would(
    tmp_path: Path, model, mosquitto_broker, mqtt_collector
) -> None:
    """8 sessions replayed at once on real LSL and a real Mosquitto through one hub (one
    model, one MQTT connection, steps batched): every session's predictions arrive on its own
    topics, in order, equal to ``rerun`` of its recording (itself equal to a single-session
    ``run``: tests/test_rerun.py); a ninth listed session whose streams never appear waits
    without disturbing them; each status names the hub, whose own status goes offline last."""
    config_n = replace(SHORT, n_participants=N)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(N)]
    run = uuid.uuid4().hex[:6]
    ids = [f"hub{run}-{i}" for i in range(N)]
    # half the other tests' speed: 8 sessions at once, and a step's 2 s deadline is 0.4 s of
    # real time here, which a busy 2-core machine can otherwise eat
    group = ReplayGroup(recordings, ids, tag=f"t{run}", speed=SPEED / 2)
    sessions = [HubSession(sid, m.tag) for sid, m in zip(ids, group.members, strict=True)]
    missing = HubSession(f"hub{run}-missing", f"t{run}-nobody")  # no such streams
    base = hub_config(mosquitto_broker.url)
    sub = mqtt_collector(
        mosquitto_broker, [f"emorecog/{sid}/#" for sid in ids] + ["emorecog/_hubs/#"]
    )
    by_id, hub = serve(
        base, [*sessions, missing], group, model, tmp_path, expect=N, hub_id=f"h{run}"
    )
    assert "streams were found" in by_id[missing.id].error
    wait_offline(sub, ids)
    for i, sid in enumerate(ids):
        assert by_id[sid].error is None
        live = live_predictions(sub, sid)
        assert [p["sequence"] for p in live] == list(range(recordings[i].n_volumes))
        expected = rerun_payloads(recordings[i], model, sid)
        assert_same_predictions(live, expected, group.members[i].replayer.timestamp_of)
        logged = read_log(tmp_path / f"{sid}.jsonl", "prediction")
        assert [p["sequence"] for p in logged] == [p["sequence"] for p in live]
    statuses = [m.json() for m in sub.of("status") if not m.topic.startswith("emorecog/_hubs")]
    assert statuses and all(s["details"]["hub"] == f"h{run}" for s in statuses)
    hub_status = [m.json() for m in sub.messages if m.topic == f"emorecog/_hubs/h{run}/status"]
    assert hub_status[0]["state"] == "online" and hub_status[-1]["state"] == "offline"
    assert set(ids) <= {sid for s in hub_status for sid in s["sessions"]}
    assert hub.batch.steps == N * recordings[0].n_volumes


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sessions_added_and_removed_while_others_run(
    tmp_path: Path, model, mosquitto_broker, mqtt_collector
) -> None:
    """The sessions file is edited while the hub serves it: a session added mid-run starts
    at sequence 0, one removed goes offline after a contiguous prefix, and the session that
    stays has no gap, no reset and no duplicate (equal to its re-run)."""
    config_n = replace(SHORT, n_participants=3)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(3)]
    run = uuid.uuid4().hex[:6]
    ids = [f"add{run}-{i}" for i in range(3)]
    group = ReplayGroup(recordings, ids, tag=f"w{run}", speed=SPEED)
    stays, removed, added = group.members
    listing = tmp_path / "sessions.toml"

    def write(members) -> None:
        text = "".join(f'[[session]]\nid = "{m.session_id}"\ntag = "{m.tag}"\n\n' for m in members)
        tmp = listing.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(listing)  # atomic, as an editor saves

    write([stays, removed])
    base = hub_config(mosquitto_broker.url)
    sub = mqtt_collector(mosquitto_broker, [f"emorecog/{sid}/#" for sid in ids])

    def during(loop, hub) -> None:
        time.sleep(3.0)  # 30 TRs at speed 10
        write([stays, added])

    by_id, _hub = serve(
        base, listing, group, model, tmp_path, expect=2, ready=[stays, removed],
        during=during,
    )  # fmt: skip
    wait_offline(sub, ids)
    full = live_predictions(sub, stays.session_id)
    assert [p["sequence"] for p in full] == list(range(recordings[0].n_volumes))
    assert not any("state_reset" in p["flags"] for p in full[1:])
    assert_same_predictions(
        full, rerun_payloads(recordings[0], model, stays.session_id), stays.replayer.timestamp_of
    )
    cut = live_predictions(sub, removed.session_id)
    assert 10 < len(cut) < recordings[1].n_volumes
    assert [p["sequence"] for p in cut] == list(range(len(cut)))
    late = live_predictions(sub, added.session_id)
    assert 10 < len(late) < recordings[2].n_volumes
    assert [p["sequence"] for p in late] == list(range(len(late)))
    assert by_id[removed.session_id].error is None and by_id[added.session_id].error is None


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
    """Ctrl-C / SIGTERM of a hub whose listed session has no streams yet ends at once; the
    session is reported as never found."""
    base = apply_overrides(load_config(None), {"mqtt.url": "mqtt://127.0.0.1:1"})
    missing = HubSession("nobody", f"none{uuid.uuid4().hex[:6]}")

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        t0 = time.monotonic()
        results = await run_hub(base, [missing], model=model, stop=stop)
        return results, time.monotonic() - t0

    results, seconds = asyncio.run(main())
    assert seconds < 10.0
    assert results[0].session_id == "nobody" and "streams were found" in results[0].error


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bad_input_and_a_dying_stream_leave_the_others_alone(
    tmp_path: Path, model, mosquitto_broker, mqtt_collector
) -> None:
    """Beside two good sessions: one whose fMRI stream has the wrong channel count (refused
    alone, with the counts named), one whose volumes carry NaNs (served, flagged) and one
    whose streams die mid-run (its outlets destroyed: it pauses, then goes offline with the
    hub). The good sessions' sequences stay contiguous and equal their re-runs."""
    import numpy as np
    import pylsl

    from emorecog_stream.adapters.lsl_info import stream_identity

    config_n = replace(SHORT, n_participants=4)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(4)]
    nan_rec = recordings[2]
    nan_rec.fmri.data = nan_rec.fmri.data.copy()
    nan_rec.fmri.data[10:20, :5] = np.nan  # a few ROIs missing in ten volumes
    run = uuid.uuid4().hex[:6]
    ids = [f"bad{run}-{i}" for i in range(4)]
    group = ReplayGroup(recordings, ids, tag=f"v{run}", speed=SPEED)
    sessions = [HubSession(sid, m.tag) for sid, m in zip(ids, group.members, strict=True)]
    wrong = HubSession(f"bad{run}-wrong", f"v{run}-wrong")
    name, type_, source_id = stream_identity(Role.FMRI, wrong.tag)
    wrong_outlet = pylsl.StreamOutlet(
        pylsl.StreamInfo(name, type_, 100, 1.0, pylsl.cf_float32, source_id)
    )
    base = hub_config(mosquitto_broker.url)
    sub = mqtt_collector(mosquitto_broker, [f"emorecog/{sid}/#" for sid in ids])
    dying = group.members[3]

    def during(loop, hub) -> None:
        time.sleep(3.0)  # ~30 TRs in
        dying.replayer.stop()  # outlets destroyed: the scanner PC went away

    try:
        by_id, _hub = serve(
            base, [*sessions, wrong], group, model, tmp_path, expect=4, during=during
        )
    finally:
        del wrong_outlet
    assert "246" in by_id[wrong.id].error and "100" in by_id[wrong.id].error
    wait_offline(sub, ids)
    for i in (0, 1, 2):
        sid = ids[i]
        assert by_id[sid].error is None
        live = live_predictions(sub, sid)
        assert [p["sequence"] for p in live] == list(range(recordings[i].n_volumes)), sid
        expected = rerun_payloads(recordings[i], model, sid)
        assert_same_predictions(live, expected, group.members[i].replayer.timestamp_of)
    flagged = [p for p in sub.json("prediction") if "roi_nonfinite" in p["flags"]]
    assert {p["session"] for p in flagged} == {ids[2]} and len(flagged) == 10
    died = live_predictions(sub, dying.session_id)
    assert 10 < len(died) < recordings[3].n_volumes
    assert [p["sequence"] for p in died] == list(range(len(died)))
    states = [m.json()["state"] for m in sub.of("status") if f"/{dying.session_id}/" in m.topic]
    assert "paused" in states and states[-1] == "offline"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_auto_serves_every_fmri_stream_it_finds(
    tmp_path: Path, model, mosquitto_broker, mqtt_collector
) -> None:
    """``--sessions auto``: each fMRI stream on the network (here those matching the test's
    ``include`` glob) becomes a session named by its tag, paired with the physiology of the
    same host and source-id stem; its predictions equal its re-run."""
    config_n = replace(SHORT, n_participants=3)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(3)]
    run = uuid.uuid4().hex[:6]
    group = ReplayGroup(recordings, ["a", "b", "c"], tag=f"x{run}", speed=SPEED)
    tags = [m.tag for m in group.members]  # x<run>-a, ...: the session ids auto gives
    base = hub_config(mosquitto_broker.url)
    sub = mqtt_collector(mosquitto_broker, [f"emorecog/{tag}/#" for tag in tags])
    by_id, _hub = serve(base, "auto", group, model, tmp_path, expect=3, include=f"*-x{run}-*")
    assert sorted(by_id) == sorted(tags)
    wait_offline(sub, tags)
    for i, tag in enumerate(tags):
        live = live_predictions(sub, tag)
        assert [p["sequence"] for p in live] == list(range(recordings[i].n_volumes))
        expected = rerun_payloads(recordings[i], model, tag)
        assert_same_predictions(live, expected, group.members[i].replayer.timestamp_of)
    assert (tmp_path / f"{tags[0]}.jsonl").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_hubs_last_will_says_its_sessions_are_offline(
    tmp_path: Path, mosquitto_broker, mqtt_collector
) -> None:
    """A hub process killed outright (SIGKILL: no clean disconnect) leaves its Last Will: the
    hub's retained status goes offline, and every session's status names that hub."""
    import signal
    import subprocess
    import sys

    config_n = replace(SHORT, n_participants=2)
    recordings = [off_grid(generate_session(i + 1, config_n)) for i in range(2)]
    run = uuid.uuid4().hex[:6]
    group = ReplayGroup(recordings, ["a", "b"], tag=f"k{run}", speed=SPEED)
    group.open()
    tags = [m.tag for m in group.members]
    hub_id = f"killed{run}"
    sub = mqtt_collector(
        mosquitto_broker, [f"emorecog/{t}/#" for t in tags] + [f"emorecog/_hubs/{hub_id}/#"]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "run", "--sessions", "auto",
         "--include", f"*-k{run}-*", "--hub-id", hub_id, "--mqtt", mosquitto_broker.url,
         "--replay-speed", str(SPEED), "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert group.wait_for_consumers([Role.FMRI, Role.PPG, Role.RESP], timeout=60.0)
        group.start(delay=0.2)

        def predicting(messages) -> bool:
            return {
                m.topic.split("/")[1] for m in messages if m.topic.endswith("prediction")
            } >= set(tags)

        assert sub.wait_for(predicting, 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        def will(messages) -> bool:
            return any(
                m.topic == f"emorecog/_hubs/{hub_id}/status" and m.json()["state"] == "offline"
                for m in messages
            )

        assert sub.wait_for(will, 20)
    finally:
        group.stop()
        if proc.poll() is None:
            proc.kill()
    last = {}
    for m in sub.of("status"):
        if not m.topic.startswith("emorecog/_hubs"):
            last[m.topic.split("/")[1]] = m.json()
    assert set(last) == set(tags)
    assert all(s["details"]["hub"] == hub_id and s["state"] != "offline" for s in last.values())


def test_a_volume_sets_what_the_physiology_must_reach_and_wakes_its_readers() -> None:
    """The fMRI reader's hook (its thread) notes the newest volume's timestamp and wakes every
    physiology reader of the session, each through its own event (one may be covered while
    the other is not)."""
    from emorecog_stream.adapters.lsl_inlet import Chunk
    from emorecog_stream.engine.hub import SessionInlets

    inlets = SessionInlets()
    wakes = [threading.Event(), threading.Event()]
    inlets._wakes.extend(wakes)
    assert inlets.needed() == float("-inf")
    volume = Chunk(Role.FMRI, [[0.0] * 246], [12.5], 12.6)
    inlets._volume_arrived(volume)
    assert inlets.needed() == 12.5 and all(w.is_set() for w in wakes)
    wakes[0].clear()
    inlets._volume_arrived(Chunk(Role.FMRI, [[0.0] * 246], [11.0], 12.7))  # an older one
    assert inlets.needed() == 12.5 and wakes[0].is_set()


def test_freezing_long_lived_objects_keeps_them_from_full_collections() -> None:
    """engine/gc_pause.py: what lives at set-up is moved out of the collector's sight (a full
    collection then walks only what came since), and later garbage cycles are still freed."""
    import gc
    import weakref

    from emorecog_stream.engine.gc_pause import freeze_long_lived

    try:
        freeze_long_lived()
        assert gc.get_freeze_count() > 1000

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_memory_frozen_with_a_session_is_freed_when_it_ends() -> None:
    """A cycle frozen while its session ran (engine, buffers) is freed by collect_released,
    which the hub calls when sessions end: a hub serving for weeks keeps no ended session."""
    import gc
    import weakref

    from emorecog_stream.engine.gc_pause import collect_released, freeze_long_lived

    class Engineish:
        pass

    try:
        a, b = Engineish(), Engineish()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        freeze_long_lived()  # the session started: its objects frozen
        del a, b  # the session ended
        gc.collect()
        assert gone() is not None  # frozen: a full collection does not see it
        collect_released()
        assert gone() is None
        assert gc.get_freeze_count() > 1000  # and the rest is frozen again
    finally:
        gc.unfreeze()
