"""`emorecog-stream listen` against a real broker and publisher, and its line formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from emorecog_stream.commands.listen import _Printer, format_prediction, format_status
from emorecog_stream.sinks.mqtt import MqttPublisher, MqttSettings
from emorecog_stream.sinks.payload import encode, prediction_payload, status_payload
from tests.plugins.mqtt_broker import free_port, sample_prediction, unique_session

REPO = Path(__file__).resolve().parents[1]


def start_listen(*argv: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "listen", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # "listening on ..." once the broker confirmed the subscription
    assert first.startswith("listening on"), first + proc.stderr.read()
    return proc


async def publish(url: str, session: str, n: int) -> None:
    settings = MqttSettings.from_url(url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    async with MqttPublisher(settings, session) as pub:
        assert await pub.wait_connected(10)
        for i in range(n):
            pub.publish_prediction(sample_prediction(session, i))
        assert await pub.flush(10)


async def test_listen_prints_published_predictions_and_status(mqtt_broker: Any) -> None:
    session = unique_session()
    proc = start_listen("--mqtt", mqtt_broker.url, "--session", session, "--count", "3",
                        "--timeout", "30")  # fmt: skip
    try:
        await publish(mqtt_broker.url, session, 3)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert any(f"[{session}] status ONLINE" in line for line in lines)
    predictions = [line for line in lines if "#" in line and "TR" in line]
    assert len(predictions) == 3
    for i, line in enumerate(predictions):
        p = sample_prediction(session, i)
        assert f"#{i} " in line and p.category in line and f"intensity {p.intensity:+.2f}" in line
        assert "RR   -- /min" in line and "HR " in line


async def test_listen_json_mode_prints_the_payloads(mqtt_broker: Any) -> None:
    session = unique_session()
    proc = start_listen("--mqtt", mqtt_broker.url, "--session", session, "--count", "2",
                        "--json", "--timeout", "30")  # fmt: skip
    try:
        await publish(mqtt_broker.url, session, 2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    payloads = [json.loads(line) for line in out.splitlines()]
    predictions = [p for p in payloads if "probabilities" in p]
    assert [p["sequence"] for p in predictions] == [0, 1]
    assert predictions[1] == prediction_payload(sample_prediction(session, 1))


def test_listen_unreachable_broker_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emorecog_stream", "listen", "--mqtt",
         f"mqtt://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot reach MQTT broker at mqtt://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--session", "a/#"], "'#'"),
        (["--mqtt", "mqtt://u:pw@h"], "password in the URL"),
        (["--count", "0"], "--count must be >= 1"),
    ],
)
def test_listen_bad_arguments(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emorecog_stream", "listen", *argv],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_printer_deduplicates_by_sequence_until_the_session_goes_offline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    printer = _Printer(as_json=False)
    first = encode(prediction_payload(sample_prediction("s", 5)))
    assert printer.handle("emorecog/s/prediction", first) is not None
    assert printer.handle("emorecog/s/prediction", first) is None  # QoS 1 duplicate
    offline = encode(status_payload("s", "offline", "engine stopped"))
    assert "status OFFLINE (engine stopped)" in (printer.handle("emorecog/s/status", offline) or "")
    assert printer.handle("emorecog/s/prediction", first) is not None  # a new engine run
    assert printer.handle("emorecog/s/prediction", b"{not json") is None
    assert printer.handle("emorecog/s/prediction", b'{"session": "s"}') is None
    assert "ignoring malformed message" in capsys.readouterr().err


def test_format_lines() -> None:
    p = prediction_payload(sample_prediction("lab", 7, flags=("deadline_expired",)))
    line = format_prediction(p)
    assert line.startswith("[lab] #7 ")
    assert f"HR {p['heart_rate']:5.1f} bpm" in line and "flags deadline_expired" in line
    assert "(level +3)" in line
    assert format_status(status_payload("lab", "degraded", "PPG lost", utc="T")) == (
        "[lab] status DEGRADED (PPG lost)  at T"
    )


def test_listen_wrong_password_is_refused_without_printing_it(
    mqtt_broker_factory: Any, tmp_path: Path
) -> None:
    broker = mqtt_broker_factory(username="viewer", password="right-one")
    pw = tmp_path / "pw"
    pw.write_text("wrong-one-42\n")
    proc = subprocess.run(
        [sys.executable, "-m", "emorecog_stream", "listen", "--mqtt",
         f"mqtt://viewer@127.0.0.1:{broker.port}", "--password-file", str(pw)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refused the connection" in proc.stderr and "viewer" in proc.stderr
    assert "wrong-one-42" not in proc.stderr + proc.stdout


def test_format_lines_show_the_framewise_displacement_when_known() -> None:
    from emorecog_stream.commands.listen import format_physio
    from emorecog_stream.sinks.payload import physio_payload

    moved = sample_prediction("lab", 8, framewise_displacement=0.734, flags=("motion",))
    line = format_prediction(prediction_payload(moved))
    assert "FD 0.73 mm  latency" in line and "flags motion" in line
    assert "FD 0.73 mm" in format_physio(physio_payload(moved))
    still = sample_prediction("lab", 9)  # no Motion stream: the lines are as before
    assert "FD" not in format_prediction(prediction_payload(still))
    assert "FD" not in format_physio(physio_payload(still))
