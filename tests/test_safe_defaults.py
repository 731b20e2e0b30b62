"""Safe defaults for participant data: owner-only files, no code from checkpoints, no clear-text
passwords to remote brokers, TLS certificates checked.

Everything here goes through the real thing: files on disk with a real umask, a real pickle
payload that would write a file if it ran, the real command line, and a real Mosquitto with a TLS
listener whose certificate the client does not trust.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import shutil
import socket
import ssl
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
from emorecog_stream.sinks.mqtt import (
    MqttConfigError,
    MqttPublisher,
    MqttSettings,
    is_loopback_host,
)
from tests.plugins.mqtt_broker import (
    MosquittoBroker,
    MqttCollector,
    TlsFiles,
    find_mosquitto,
    sample_prediction,
)

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


@pytest.mark.slow
def test_run_creates_its_log_owner_only_through_the_cli(tmp_path: Path, umask) -> None:
    """The real ``run`` opens the log before it looks for streams; none exist, so it stops."""
    umask(0o022)
    config = tmp_path / "lab.toml"
    config.write_text(
        '[engine]\nresolve_timeout = 0.5\n[streams.fmri]\nname = "no-such-stream-x71"\n'
    )
    log = tmp_path / "session.jsonl"
    argv = ["run", "--config", str(config), "--log", str(log), "--no-dashboard"]
    assert cli_main(argv) == 2  # the fMRI stream is not found, after the log was created
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- passwords and TLS


SECRET = "s3cret-pw-471"


def _lan_address() -> str | None:
    """This machine's address on its default route (not loopback), or None where it has none."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.254", 9))  # UDP: picks the route, sends nothing
        address = s.getsockname()[0]
        return None if is_loopback_host(address) else address
    return None


class _MosquittoOn(MosquittoBroker):
    """A real Mosquitto on ``host`` (a LAN address) and/or with given TLS files."""

    def __init__(self, workdir: Path, host: str, tls_files: TlsFiles | None = None, **kw) -> None:
        super().__init__(workdir, **kw)
        self.host = host
        self.tls_files = tls_files
        self._write_config()


@pytest.fixture
def brokers() -> Iterator[list[MosquittoBroker]]:
    made: list[MosquittoBroker] = []
    yield made
    for broker in made:
        broker.stop()


def _start(brokers: list[MosquittoBroker], broker: MosquittoBroker) -> MosquittoBroker:
    brokers.append(broker)
    broker.start()
    return broker


@pytest.mark.parametrize(
    "host", ["10.0.0.5", "192.168.1.20", "broker.lab", "2001:db8::1", "localhost.evil.example"]
)
def test_a_clear_text_password_to_a_host_off_this_machine_is_refused(host: str) -> None:
    url = f"mqtt://alice@[{host}]:1883" if ":" in host else f"mqtt://alice@{host}:1883"
    with pytest.raises(MqttConfigError, match="refusing to send the MQTT password") as info:
        MqttSettings.from_url(url, password=SECRET)
    assert SECRET not in str(info.value) and "--allow-insecure" in str(info.value)
    assert MqttSettings.from_url(url, password=SECRET, allow_insecure=True).password == SECRET
    tls_url = url.replace("mqtt://", "mqtts://")
    assert MqttSettings.from_url(tls_url, password=SECRET).password == SECRET  # encrypted: fine
    assert MqttSettings.from_url(url).username == "alice"  # a user name alone is no secret


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "[::1]"])
def test_loopback_brokers_may_get_a_password_in_clear(host: str) -> None:
    settings = MqttSettings.from_url(f"mqtt://alice@{host}:1883", password=SECRET)
    assert settings.password == SECRET and is_loopback_host(settings.host)


def _run_config(tmp_path: Path, **mqtt: object) -> Path:
    lines = ['[engine]\nresolve_timeout = 0.5\n[streams.fmri]\nname = "no-such-stream-x72"\n']
    lines.append('[mqtt]\nusername = "alice"\npassword_env = "EMORECOG_TEST_PW"\n')
    lines += [f"{key} = {str(value).lower()}\n" for key, value in mqtt.items()]
    path = tmp_path / f"lab{len(list(tmp_path.glob('lab*.toml')))}.toml"
    path.write_text("".join(lines))
    return path


@pytest.mark.slow
@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")
async def test_run_and_listen_refuse_a_clear_password_to_a_lan_broker_unless_allowed(
    tmp_path: Path, brokers: list[MosquittoBroker], monkeypatch, capsys
) -> None:
    lan = _lan_address()
    if lan is None:
        pytest.skip("this machine has no non-loopback address")
    broker = _start(brokers, _MosquittoOn(tmp_path / "lan", lan, username="alice", password=SECRET))
    monkeypatch.setenv("EMORECOG_TEST_PW", SECRET)

    # refused before anything connects: a plain socket on the LAN address counts connections
    with socket.create_server((lan, 0)) as trap:
        trap.setblocking(False)
        trap_url = f"mqtt://alice@{lan}:{trap.getsockname()[1]}"
        run = ["run", "--mqtt", trap_url, "--config", str(_run_config(tmp_path))]
        assert await asyncio.to_thread(cli_main, run) == 2
        err = capsys.readouterr().err
        assert f"refusing to send the MQTT password for user 'alice' in clear text to {lan}" in err
        listen = ["listen", "--mqtt", trap_url, "--password-env", "EMORECOG_TEST_PW"]
        assert await asyncio.to_thread(cli_main, [*listen, "--timeout", "2"]) == 2
        err += capsys.readouterr().err
        assert "refusing to send the MQTT password" in err and SECRET not in err
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody knocked

    url = f"mqtt://alice@{lan}:{broker.port}"
    listen = ["listen", "--mqtt", url, "--password-env", "EMORECOG_TEST_PW", "--timeout", "2"]
    # --allow-insecure and [mqtt] allow_insecure get past the check (run then stops at the
    # missing fMRI stream, which it looks for before it connects to the broker)
    for argv in (
        ["run", "--mqtt", url, "--config", str(_run_config(tmp_path)), "--allow-insecure"],
        ["run", "--mqtt", url, "--config", str(_run_config(tmp_path, allow_insecure=True))],
    ):
        assert await asyncio.to_thread(cli_main, argv) == 2
        err = capsys.readouterr().err
        assert "refusing" not in err and "no-such-stream-x72" in err, err
    assert await asyncio.to_thread(cli_main, [*listen, "--allow-insecure"]) == 0
    assert f"listening on mqtt://alice@{lan}:{broker.port}" in capsys.readouterr().err

    # and the publisher really delivers with the password once allowed
    settings = MqttSettings.from_url(url, password=SECRET, allow_insecure=True,
                                     reconnect_min_s=0.05, reconnect_max_s=0.2)  # fmt: skip
    sub = MqttCollector(broker, ["emorecog/lan-1/prediction"], username="alice", password=SECRET)
    try:
        assert sub.wait_connected(10)
        async with MqttPublisher(settings, "lan-1") as pub:
            pub.publish_prediction(sample_prediction("lan-1", 0))
            assert await pub.flush(10)
        assert sub.wait_for(lambda _: len(sub.of("prediction")) == 1, timeout=10)
    finally:
        sub.close()


def _self_signed(directory: Path, san: str) -> TlsFiles:
    """A self-signed server certificate (its own CA) made with the openssl binary."""
    directory.mkdir(parents=True, exist_ok=True)
    key, crt = directory / "self.key", directory / "self.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
         str(crt), "-days", "2", "-subj", "/CN=emorecog-self-signed", "-addext",
         f"subjectAltName={san}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return TlsFiles(str(crt), str(crt), str(key))


def test_tls_checks_certificates_and_host_names_by_default() -> None:
    context = MqttSettings.from_url("mqtts://broker.lab").ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.skipif(find_mosquitto() is None or shutil.which("openssl") is None,
                    reason="needs mosquitto and openssl")  # fmt: skip
async def test_a_self_signed_broker_is_refused_unless_its_certificate_is_given(
    tmp_path: Path, brokers: list[MosquittoBroker], capsys
) -> None:
    files = _self_signed(tmp_path / "pki", "IP:127.0.0.1,DNS:localhost")
    broker = _start(brokers, _MosquittoOn(tmp_path / "tls", "127.0.0.1", tls_files=files))
    assert broker.url.startswith("mqtts://127.0.0.1:")
    sub = MqttCollector(broker, ["emorecog/tls-1/prediction"])  # trusts the certificate
    fast = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "connect_timeout_s": 2.0}
    try:
        assert sub.wait_connected(10)
        untrusting = MqttPublisher(MqttSettings.from_url(broker.url, **fast), "tls-1")
        await untrusting.start()
        untrusting.publish_prediction(sample_prediction("tls-1", 0))
        for _ in range(100):
            if untrusting.stats.last_error:
                break
            await asyncio.sleep(0.05)
        await untrusting.close(timeout=0.2)
        assert "certificate verify failed" in (untrusting.stats.last_error or "").lower()
        assert untrusting.stats.sent == 0 and sub.of("prediction") == []

        trusting = MqttSettings.from_url(broker.url, ca_file=files.ca_cert, **fast)
        async with MqttPublisher(trusting, "tls-1") as pub:
            pub.publish_prediction(sample_prediction("tls-1", 1))
            assert await pub.flush(10)
        assert sub.wait_for(lambda _: len(sub.of("prediction")) == 1, timeout=10)
        assert sub.json("prediction")[0]["sequence"] == 1
    finally:
        sub.close()

    listen = ["listen", "--mqtt", broker.url, "--timeout", "1"]
    assert await asyncio.to_thread(cli_main, listen) == 2
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    assert await asyncio.to_thread(cli_main, [*listen, "--ca-file", files.ca_cert]) == 0
    assert f"listening on {broker.url}" in capsys.readouterr().err


@pytest.mark.skipif(find_mosquitto() is None or shutil.which("openssl") is None,
                    reason="needs mosquitto and openssl")  # fmt: skip
async def test_a_certificate_for_another_host_is_refused_even_with_its_ca(
    tmp_path: Path, brokers: list[MosquittoBroker]
) -> None:
    files = _self_signed(tmp_path / "pki", "DNS:other-host.example")
    broker = _start(brokers, _MosquittoOn(tmp_path / "tls", "127.0.0.1", tls_files=files))
    settings = MqttSettings.from_url(
        broker.url, ca_file=files.ca_cert, reconnect_min_s=0.05, reconnect_max_s=0.2
    )
    pub = MqttPublisher(settings, "tls-2")
    await pub.start()
    for _ in range(100):
        if pub.stats.last_error:
            break
        await asyncio.sleep(0.05)
    await pub.close(timeout=0.2)
    error = (pub.stats.last_error or "").lower()
    assert "certificate verify failed" in error and "mismatch" in error, error
    assert pub.stats.sent == 0


def test_the_config_key_and_the_flag_reach_the_mqtt_settings(tmp_path: Path, monkeypatch) -> None:
    """``[mqtt] allow_insecure`` and ``run --allow-insecure`` end up in the publisher settings."""
    from emorecog_stream.cli import build_parser
    from emorecog_stream.commands.run import load_config_with_flags
    from emorecog_stream.engine.runner import RunError, mqtt_settings_for

    monkeypatch.setenv("EMORECOG_TEST_PW", SECRET)
    url = "mqtt://alice@10.1.2.3:1883"
    parser = build_parser()
    plain = load_config_with_flags(parser.parse_args(["run", "--config",
                                                      str(_run_config(tmp_path))]))  # fmt: skip
    with pytest.raises(RunError, match="refusing to send the MQTT password"):
        mqtt_settings_for(plain, url)
    for argv in (
        ["run", "--config", str(_run_config(tmp_path)), "--allow-insecure"],
        ["run", "--config", str(_run_config(tmp_path, allow_insecure=True))],
    ):
        config = load_config_with_flags(parser.parse_args(argv))
        assert config.mqtt.allow_insecure is True
        assert mqtt_settings_for(config, url).password == SECRET
