"""Safe defaults for participant data: owner-only files, no code from checkpoints, no clear-text
passwords to remote brokers, TLS certificates checked.

Everything here goes through the real thing: files on disk with a real umask, a real pickle
payload that would write a file if it ran, the real command line, and a real Mosquitto with a TLS
listener whose certificate the client does not trust.
"""

from __future__ import annotations

import builtins
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from emorecog_stream.cli import main as cli_main
from emorecog_stream.model import load_model
from emorecog_stream.model.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    read_checkpoint,
    save_checkpoint,
)
from emorecog_stream.model.net import EmoRecogNet, NetConfig
from emorecog_stream.private_files import PRIVATE_MODE, open_private, replace_private
from emorecog_stream.sinks.jsonl import JsonlLog

KERAS_FIXTURES = Path(__file__).parent / "fixtures" / "keras_v1"


def tiny_net() -> EmoRecogNet:
    return EmoRecogNet(NetConfig(spatial_channels=4, temporal_channels=4, hidden=8))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[object]:
    """``umask(value)`` sets the process umask for the test; the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(value: int) -> None:
        os.umask(value)

    yield set_mask
    os.umask(old)


# --------------------------------------------------------------------------- owner-only files


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o600), (0o002, 0o600), (0o077, 0o600),
                                                (0o277, 0o400)])  # fmt: skip
def test_new_private_files_are_owner_only_or_what_a_stricter_umask_leaves(
    tmp_path: Path, umask, mask: int, expected: int
) -> None:
    umask(mask)
    with open_private(tmp_path / "a.jsonl", "ab") as f:
        f.write(b"x\n")
    with replace_private(tmp_path / "b.pt") as f:
        f.write(b"y")
    assert mode_of(tmp_path / "a.jsonl") == expected
    assert mode_of(tmp_path / "b.pt") == expected
    assert PRIVATE_MODE == 0o600


def test_replace_private_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk gone"), replace_private(target) as f:
        f.write(b"half of a new file")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no .part file left


def test_session_log_is_created_owner_only_and_an_existing_one_keeps_its_mode(
    tmp_path: Path, umask
) -> None:
    umask(0o022)  # the usual default, which would make a plain open() file world-readable
    path = tmp_path / "logs" / "p01.jsonl"
    with JsonlLog(path, session="p01") as log:
        log.write_status("online")
    assert mode_of(path) == 0o600
    shared = tmp_path / "shared.jsonl"
    shared.write_bytes(b"")
    shared.chmod(0o640)  # the lab shared this one with its group on purpose
    JsonlLog(shared, session="p01").close()
    assert mode_of(shared) == 0o640


def test_run_creates_its_log_owner_only_through_the_cli(tmp_path: Path, umask) -> None:
    """The real ``run`` opens the log before it looks for streams; none exist, so it stops."""
    umask(0o022)
    config = tmp_path / "lab.toml"
    config.write_text(
        '[engine]\nresolve_timeout = 0.5\n[streams.fmri]\nname = "no-such-stream-x71"\n'
    )
    log = tmp_path / "session.jsonl"
    assert cli_main(["run", "--config", str(config), "--log", str(log), "--no-dashboard"]) == 2
    assert log.is_file() and mode_of(log) == 0o600


def test_trained_checkpoint_is_written_owner_only_and_replaces_a_shared_one(
    tmp_path: Path, umask
) -> None:
    umask(0o022)
    net = tiny_net()
    out = tmp_path / "model.pt"
    out.write_bytes(b"an older file")
    out.chmod(0o644)
    model_id = save_checkpoint(net, out)
    assert mode_of(out) == 0o600
    assert load_model(out).model_id == model_id  # still an ordinary checkpoint


def test_convert_writes_the_checkpoint_owner_only(tmp_path: Path, umask) -> None:
    umask(0o022)
    out = tmp_path / "v1.pt"
    assert cli_main(["convert", str(KERAS_FIXTURES / "k2_full.h5"), "-o", str(out)]) == 0
    assert mode_of(out) == 0o600
    out.chmod(0o644)
    assert cli_main(["convert", str(KERAS_FIXTURES / "k2_full.h5"), "-o", str(out), "--force"]) == 0
    assert mode_of(out) == 0o600
    assert load_model(out).model_id.startswith("keras-v1:k2_full:")


# --------------------------------------------------------------------------- checkpoints with code


class _ShellPayload:
    """Unpickling this runs a shell command (``os.system``), as a booby-trapped .pt would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


class _ExecPayload:
    """Unpickling this runs Python source (``builtins.exec``) that writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _booby_trapped(tmp_path: Path, kind: str, legacy: bool = False) -> tuple[Path, Path]:
    """A .pt that looks like our checkpoint but carries a payload; returns (file, marker)."""
    marker = tmp_path / f"MARKER-{kind}{'-legacy' if legacy else ''}"
    payload = _ShellPayload(marker) if kind == "shell" else _ExecPayload(marker)
    path = tmp_path / f"evil-{kind}{'-legacy' if legacy else ''}.pt"
    checkpoint = {"format": "emorecog-net-stream", "format_version": 1, "config": payload}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path, marker


@pytest.mark.parametrize("kind", ["shell", "exec"])
def test_the_payload_is_real_when_loaded_unsafely(tmp_path: Path, kind: str) -> None:
    """Control: loading without weights_only runs the payload, so the refusals below mean it."""
    path, marker = _booby_trapped(tmp_path, kind)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("kind", ["shell", "exec"])
def test_load_model_refuses_a_checkpoint_that_holds_code(
    tmp_path: Path, kind: str, legacy: bool
) -> None:
    path, marker = _booby_trapped(tmp_path, kind, legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(path)
    text = str(info.value)
    assert str(path) in text and "refused" in text and "nothing was run" in text
    assert ("system" if kind == "shell" else "exec") in text
    assert "weights_only" not in text  # torch's advice to load it unsafely is not passed on
    with pytest.raises(UnsafeCheckpointError):
        load_model(f"keras-v1:{path}")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_cli_refuses_a_checkpoint_that_holds_code(tmp_path: Path, command: str, capsys) -> None:
    path, marker = _booby_trapped(tmp_path, "shell")
    argv = ["run", "--model", str(path)] if command == "run" else ["evaluate", str(path), "synth"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "refused: loading it would import and call 'posix.system'" in err
    assert "Traceback" not in err and "weights_only" not in err
    assert not marker.exists()


def test_run_in_a_fresh_process_refuses_the_payload(tmp_path: Path) -> None:
    path, marker = _booby_trapped(tmp_path, "exec")
    proc = subprocess.run(
        [sys.executable, "-m", "emorecog_stream", "run", "--model", str(path), "--no-dashboard"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refused: loading it would import and call 'exec'" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"", "found an empty file"),
        (b"hello, not a model\n", "found a text file starting with 'hello, not a model'"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "found an HDF5 file (a Keras model?"),
        (b"\x80\x04K\x01.", "found a bare pickle stream"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_what_was_expected_and_found(
    tmp_path: Path, content: bytes, found: str, capsys
) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="expected a PyTorch checkpoint") as info:
        read_checkpoint(path)
    assert found in str(info.value)
    assert cli_main(["evaluate", str(path), "synth"]) == 2
    err = capsys.readouterr().err
    assert "expected a PyTorch checkpoint" in err and found in err
    assert "Traceback" not in err and "weights_only" not in err and "\n" not in err.strip()


def test_an_npz_and_a_cut_off_checkpoint_are_named_as_such(tmp_path: Path) -> None:
    import numpy as np

    npz = tmp_path / "roi.npz"
    np.savez(npz, data=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"found a NumPy \.npz archive of arrays \['data'\]"):
        read_checkpoint(npz)
    whole = tmp_path / "whole.pt"
    save_checkpoint(tiny_net(), whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="found a damaged or cut-off zip archive"):
        read_checkpoint(cut)
