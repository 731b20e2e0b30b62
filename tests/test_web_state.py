"""The web server without a browser: what it keeps (``LiveState``), what it serves over HTTP,
and who may ask (loopback Host check, token off loopback). A real Mosquitto feeds it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from emorecog_stream.recordings.session import make_marker
from emorecog_stream.sinks.mqtt import MqttSettings
from emorecog_stream.sinks.payload import encode, marker_payload, prediction_payload
from emorecog_stream.web.state import LiveState, MessageError
from tests.plugins.mqtt_broker import sample_prediction, unique_session
from tests.test_web_pages import ServerThread

pytestmark = pytest.mark.timeout(90)


def raw_prediction(session: str, i: int) -> bytes:
    return encode(prediction_payload(sample_prediction(session, i)))


def test_live_state_drops_duplicates_counts_gaps_and_forgets_on_restart() -> None:
    state = LiveState(history=5)
    topic = "emorecog/S1/prediction"
    assert state.accept(topic, raw_prediction("S1", 0), 1.0) is not None
    assert state.accept(topic, raw_prediction("S1", 0), 1.1) is None  # QoS 1 redelivery
    state.accept(topic, raw_prediction("S1", 3), 1.2)  # 1 and 2 lost
    s = state.sessions["S1"]
    assert s.counters.duplicates == 1 and s.counters.gaps == 2 and s.counters.predictions == 2
    for i in range(4, 12):
        state.accept(topic, raw_prediction("S1", i), 2.0 + i)
    snap = state.snapshot("S1")[0]
    assert [p["sequence"] for p in snap["predictions"]] == [7, 8, 9, 10, 11]  # history 5
    assert snap["predictions"][-1]["received"] == 13.0
    offline = {"schema_version": 1, "session": "S1", "state": "offline", "reason": "", "utc": "x"}
    state.accept("emorecog/S1/status", json.dumps(offline).encode(), 20.0)
    assert state.accept(topic, raw_prediction("S1", 0), 21.0) is not None  # a new engine run


def test_live_state_refuses_junk_with_a_reason() -> None:
    state = LiveState()
    cases = [
        ("emorecog/S1/prediction", b"{not json", "not JSON"),
        ("emorecog/S1/prediction", b"[1, 2]", "expected a JSON object"),
        ("emorecog/S1/prediction", raw_prediction("S2", 0), "does not match the topic"),
        ("emorecog/S1/prediction", b'{"session": "S1", "sequence": "7"}', "sequence must be"),
        ("emorecog/S1/marker", b'{"session": "S1", "timestamp": 1}', "marker without a text"),
    ]
    for topic, raw, reason in cases:
        with pytest.raises(MessageError, match=reason):
            state.accept(topic, raw, 0.0)
    assert state.malformed == len(cases)
    marker = encode(marker_payload("S1", 5.0, make_marker("trial_start", 1, 0, 0)))
    update = state.accept("emorecog/S1/marker", marker, 6.0)
    assert update is not None and update.event()["payload"]["marker"]["trial"] == 1


def get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_loopback_server_serves_pages_assets_and_state(mqtt_broker: Any) -> None:
    session = unique_session()
    with ServerThread(MqttSettings.from_url(mqtt_broker.url)) as web:
        assert web.server.token is None and not web.server.require_token
        web.publish(session, [sample_prediction(session, i) for i in range(3)])
        assert web.wait(lambda s: s.state.sessions.get(session) is not None
                        and s.state.sessions[session].counters.predictions == 3)
        status, headers, body = get(web.url("/"))
        assert status == 200 and b"static/experimenter.js" in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert get(web.url("/feedback"))[0] == 200
        for name in ("common.js", "feedback.js", "experimenter.js", "feedback.css"):
            status, headers, _ = get(web.url(f"/static/{name}"))
            assert status == 200, name
        assert get(web.url("/static/..%2Fserver.py"))[0] == 404
        assert get(web.url("/static/nothing.js"))[0] == 404
        state = json.loads(get(web.url("/api/state", session=session))[2])
        assert [p["sequence"] for p in state["sessions"][0]["predictions"]] == [0, 1, 2]
        assert state["mqtt"]["connected"] is True
        # DNS rebinding: a loopback server answers only to loopback host names
        assert get(web.url("/"), host="attacker.example:80")[0] == 421
        assert get(web.url("/"), host=f"localhost:{web.server.bound_port}")[0] == 200


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_non_loopback_host_requires_the_token(mqtt_broker: Any) -> None:
    with ServerThread(MqttSettings.from_url(mqtt_broker.url), host="0.0.0.0") as web:
        server = web.server
        assert server.require_token and server.token and len(server.token) >= 20
        lines = "\n".join(server.start_lines())
        assert f"token={server.token}" in lines and "needs ?token=" in lines
        bare = f"http://127.0.0.1:{server.bound_port}"
        for path in ("/", "/feedback", "/events", "/api/state", "/static/common.js"):
            status, _, body = get(bare + path)
            assert status == 403, path
            assert b"token" in body
        assert get(bare + "/?token=wrong")[0] == 403
        status, headers, _ = get(f"{bare}/?token={server.token}")
        assert status == 200 and "HttpOnly" in headers.get("Set-Cookie", "")
        address = non_loopback_address()
        if address is not None:  # reached by the machine's network address too, and guarded
            assert get(f"http://{address}:{server.bound_port}/")[0] == 403
            assert get(f"http://{address}:{server.bound_port}/?token={server.token}")[0] == 200


def test_web_command_prints_both_urls_and_refuses_a_bad_session(mqtt_broker: Any) -> None:
    cmd = [sys.executable, "-m", "emorecog_stream", "web", "--mqtt", mqtt_broker.url]
    bad = subprocess.run([*cmd, "--session", "a/b"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "session id must be one topic level" in bad.stderr
    started = time.monotonic()
    done = subprocess.run(
        [*cmd, "--port", "0", "--duration", "1", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"web: experimenter page http://{socket.gethostname()}:" in done.stdout
    assert "web: feedback page" in done.stdout and "/feedback?token=" in done.stdout
    assert "not loopback" in done.stdout
    assert time.monotonic() - started < 60


def test_run_with_web_prints_the_urls_and_closes_them_when_the_engine_stops(
    mqtt_broker: Any, tmp_path: Any
) -> None:
    """``run --web`` starts the pages as soon as the broker is known; here no fMRI stream
    exists, so the engine stops with its error and the pages close with it."""
    config = tmp_path / "lab.toml"
    config.write_text(
        "[engine]\nresolve_timeout = 1.0\n"
        f'[streams.fmri]\nname = "no-such-stream-{unique_session()}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "emorecog_stream", "run", "--config", str(config), "--web",
         "--web-port", "0", "--mqtt", mqtt_broker.url, "--no-dashboard", "--session", "S01"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "web: experimenter page http://127.0.0.1:" in done.stdout
    assert "web: feedback page" in done.stdout and "emorecog/S01/prediction" in done.stdout
    assert "fMRI" in done.stderr


def test_web_command_with_a_password_broker_and_a_taken_port(mqtt_broker_factory: Any) -> None:
    broker = mqtt_broker_factory(username="lab", password="s3cret-pw")
    host, port = broker.host, broker.port
    env = {**__import__("os").environ, "WEB_TEST_PW": "s3cret-pw"}
    cmd = [sys.executable, "-m", "emorecog_stream", "web", "--mqtt", f"mqtt://lab@{host}:{port}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        refused = subprocess.run(
            [*cmd, "--password-env", "WEB_TEST_PW", "--port", str(busy), "--duration", "1"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
    assert refused.returncode == 2 and f"127.0.0.1:{busy}" in refused.stderr
    assert "--port" in refused.stderr
    with ServerThread(
        MqttSettings.from_url(f"mqtt://lab@{host}:{port}", password="s3cret-pw")
    ) as web:
        assert web.server.bridge.health.connected_since is not None
    missing = subprocess.run(
        [*cmd, "--password-env", "NO_SUCH_VAR_FOR_WEB", "--duration", "1"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert missing.returncode == 2 and "NO_SUCH_VAR_FOR_WEB is not set" in missing.stderr
    assert "s3cret" not in missing.stderr + refused.stderr
