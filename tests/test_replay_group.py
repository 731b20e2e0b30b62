"""Many sessions replayed at once, each its own set of real LSL streams (``replay --copies``)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pylsl
import pytest

from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.adapters.replay import ReplayError
from emorecog_stream.adapters.replay_group import ReplayGroup, session_tag
from emorecog_stream.cli import main as cli_main
from emorecog_stream.core.streams import N_ROIS, Role
from emorecog_stream.recordings.xdf import write_xdf
from tests.plugins.lsl import make_session

pytestmark = pytest.mark.timeout(60)


def resolve_one(role: Role, tag: str, timeout: float = 10.0) -> pylsl.StreamInfo:
    _name, _type, source_id = stream_identity(role, tag)
    found = pylsl.resolve_byprop("source_id", source_id, 1, timeout)
    assert found, f"no stream with source_id {source_id}"
    return found[0]


def pull_all(inlet: pylsl.StreamInlet, n: int, timeout: float = 20.0) -> np.ndarray:
    rows: list[list[float]] = []
    end = pylsl.local_clock() + timeout
    while len(rows) < n and pylsl.local_clock() < end:
        chunk, _ = inlet.pull_chunk(timeout=0.2)
        rows.extend(chunk)
    return np.asarray(rows)


def test_sessions_at_once_have_their_own_streams() -> None:
    base = "grp" + uuid.uuid4().hex[:6]
    sessions = [make_session(8, participant="P01", seed=s) for s in range(3)]
    ids = ["P01", "P01-2", "P01-3"]
    with ReplayGroup(sessions, ids, tag=base, speed=4.0) as group:
        group.open()
        tags = [m.tag for m in group.members]
        assert tags == [session_tag(i, base) for i in ids]
        # every stream of a session shares its suffix; no two sessions share a source id
        source_ids = [d.source_id for r in group.replayers for d in r.descriptions.values()]
        assert len(set(source_ids)) == len(source_ids) == 3 * 4
        inlets = {
            tag: (
                pylsl.StreamInlet(resolve_one(Role.FMRI, tag)),
                pylsl.StreamInlet(resolve_one(Role.PPG, tag)),
            )
            for tag in tags
        }
        for fmri, ppg in inlets.values():
            fmri.open_stream(5.0)
            ppg.open_stream(5.0)
        assert group.wait_for_consumers([Role.FMRI, Role.PPG], timeout=10.0)
        group.start(delay=0.2)
        got = {tag: (pull_all(f, 8), pull_all(p, 8 * 400)) for tag, (f, p) in inlets.items()}
        assert group.join(10.0)
        assert group.error is None
    for session, tag in zip(sessions, tags, strict=True):
        volumes, ppg = got[tag]
        assert volumes.shape == (8, N_ROIS)
        np.testing.assert_array_equal(volumes, session.fmri.data)
        assert ppg.shape[0] == session.ppg.data.shape[0]
        np.testing.assert_allclose(ppg[:, 0], session.ppg.data.reshape(-1), rtol=1e-6)


def test_group_refuses_repeated_ids() -> None:
    s = make_session(4)
    with pytest.raises(ReplayError, match="unique"):
        ReplayGroup([s, s], ["P15", "P15"])


def test_replay_command_copies(tmp_path: Path, capsys) -> None:
    path = write_xdf(make_session(6, participant="P07"), tmp_path / "P07.xdf")
    tag = "cp" + uuid.uuid4().hex[:6]
    codes: list[int] = []
    argv = ["replay", str(path), "--copies", "2", "--tag", tag, "--speed", "4",
            "--no-progress", "--wait-for-consumer", "--linger", "0.5"]  # fmt: skip
    thread = threading.Thread(target=lambda: codes.append(cli_main(argv)))
    thread.start()
    try:
        infos = [resolve_one(Role.FMRI, f"{tag}-{sid}") for sid in ("P07", "P07-2")]
        inlets = [pylsl.StreamInlet(info) for info in infos]
        for inlet in inlets:
            inlet.open_stream(5.0)
        volumes = [pull_all(inlet, 6) for inlet in inlets]
    finally:
        thread.join(30)
    assert codes == [0]
    for v in volumes:
        assert v.shape == (6, N_ROIS)
    printed = capsys.readouterr().err  # the replay command talks on stderr (rich console)
    assert "replayed 2 session(s) at once" in printed
    assert f"{tag}-P07-2" in printed
    assert cli_main(["replay", str(path), "--copies", "0"]) == 2
    assert "--copies" in capsys.readouterr().err
