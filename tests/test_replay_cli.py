"""`emorecog-stream replay` as a user runs it: a real process pushing to a real inlet."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from emorecog_stream.adapters.lsl_inlet import Chunk, InletGroup, InletSpec
from emorecog_stream.cli import main as cli_main
from emorecog_stream.core.streams import Role
from emorecog_stream.recordings.xdf import write_xdf
from tests.plugins.lsl import make_session

pytestmark = pytest.mark.timeout(90)


async def test_replay_command_streams_an_xdf_file(tmp_path, lsl_tag):
    session = make_session(n_volumes=6)
    path = write_xdf(session, tmp_path / "P15.xdf")
    proc = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "replay", str(path), "--speed", "20",
         "--tag", lsl_tag, "--wait-for-consumer", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        async with InletGroup([InletSpec.for_role(Role.FMRI, lsl_tag)]) as group:
            meta = await group.open(30.0)  # the process needs a moment to import and load
            got: list[Chunk] = []

            async def read() -> None:
                async for item in group:
                    if isinstance(item, Chunk):
                        got.append(item)
                        if sum(len(c) for c in got) >= 6:
                            return

            await asyncio.wait_for(read(), 30.0)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert meta[Role.FMRI].participant == "P15"
    data = np.concatenate([c.data for c in got])
    np.testing.assert_array_equal(data, session.fmri.data.astype(np.float64))
    ts = np.concatenate([c.timestamps for c in got])
    np.testing.assert_allclose(np.diff(ts), 1.0 / 20, atol=1e-4)
    assert f"EmoRecog-fMRI-{lsl_tag}" in err and "samples pushed: fmri 6" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "/nonexistent/rec.xdf"], "cannot replay /nonexistent/rec.xdf"),
        (["replay", "x.xdf", "--speed", "0"], "--speed: expected a number > 0, got 0.0"),
        (["replay", "x.xdf", "--roles", "fmri,eeg"], "unknown role 'eeg'"),
    ],
)
def test_replay_command_user_errors(argv, message, capsys):
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_replay_command_broken_file(tmp_path, capsys):
    broken = tmp_path / "broken.xdf"
    broken.write_bytes(b"XDF:" + b"\x01\x02garbage")
    assert cli_main(["replay", str(broken)]) == 2
    assert f"cannot replay {broken}" in capsys.readouterr().err


def test_replay_command_maps_a_lab_recordings_streams_to_roles(tmp_path, lsl_tag):
    """A LabRecorder file whose pulse stream is called "Pleth" (type "Pleth"): without --map the
    PPG role is not found, with --map ppg=name=Pleth it is replayed as the engine's PPG stream."""
    session = make_session(n_volumes=4)
    assert session.ppg is not None
    session.ppg.name = session.ppg.type = "Pleth"
    path = write_xdf(session, tmp_path / "lab.xdf")
    base = ["replay", str(path), "--speed", "50", "--tag", lsl_tag, "--no-progress",
            "--linger", "0"]  # fmt: skip

    def outlets(argv: list[str]) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "emorecog_stream", *argv],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert f"EmoRecog-PPG-{lsl_tag}" not in outlets(base)
    mapped = outlets([*base, "--map", "ppg=name=Pleth"])
    assert f"EmoRecog-PPG-{lsl_tag} type=PPG" in mapped


def test_replay_command_bad_map_is_a_user_error(tmp_path, capsys):
    path = write_xdf(make_session(n_volumes=2), tmp_path / "s.xdf")
    assert cli_main(["replay", str(path), "--map", "pleth"]) == 2
    assert "expected role=selector" in capsys.readouterr().err
