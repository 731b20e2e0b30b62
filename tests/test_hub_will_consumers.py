"""A hub's Last Will as its consumers read it: the hub's ``offline`` on
``<prefix>/_hubs/<hub id>/status`` takes offline every session whose last status named it
(``details.hub``), in the web pages' state (and its server-sent events) and in ``listen``.

The unit tests drive :class:`~emorecog_stream.web.state.LiveState` and ``listen``'s printer
with the payloads the hub and its sessions publish; the last test has a real Mosquitto deliver
a real Last Will (a publisher process killed without a DISCONNECT) to the web server and to a
running ``listen``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from emorecog_stream.commands.listen import _Printer
from emorecog_stream.engine.hub import HUBS_LEVEL, hub_status_payload
from emorecog_stream.sinks.payload import encode, prediction_payload, status_payload
from emorecog_stream.web.bridge import subscription_topics
from emorecog_stream.web.state import LiveState, MessageError, split_topic
from tests.plugins.mqtt_broker import sample_prediction, unique_session

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
WILL_REASON = (
    "connection lost: the hub stopped without a clean disconnect; its sessions are offline"
)


def session_status(session: str, state: str, hub: str | None, reason: str = "") -> bytes:
    details = {"hub": hub} if hub is not None else None
    return encode(status_payload(session, state, reason, model_id="m", details=details))


def hub_status(hub: str, state: str, reason: str, sessions: list[str] | None = None) -> bytes:
    return encode(hub_status_payload(hub, state, reason, sessions or []))


def shown(state: LiveState, session: str) -> tuple[str, str, bool]:
    status = state.snapshot(session)[0]["status"]
    return status["state"], status["reason"], bool(status.get("derived_from_hub"))


# --------------------------------------------------------------------------- the state, no network


def test_a_hub_offline_takes_its_sessions_offline_until_they_publish_again() -> None:
    state = LiveState()
    p = "emorecog"
    online = hub_status("h1", "online", "hub started")
    assert state.receive(f"{p}/_hubs/h1/status", online, 1.0) == []
    for sid, st, hub in [("A", "online", "h1"), ("B", "degraded", "h1"), ("C", "online", "h2"),
                         ("D", "online", None), ("E", "offline", "h1")]:  # fmt: skip
        assert state.accept(f"{p}/{sid}/status", session_status(sid, st, hub, "own"), 2.0)
    state.accept(f"{p}/A/prediction", encode(prediction_payload(sample_prediction("A", 0))), 2.5)
    before = state.sessions["A"].counters.as_dict()

    will = hub_status("h1", "offline", WILL_REASON)
    updates = state.receive(f"{p}/_hubs/h1/status", will, 3.0)
    assert sorted(u.session for u in updates) == ["A", "B"]  # C: other hub; D: none; E: stopped
    for u in updates:
        event = u.event()
        assert event["type"] == "status" and event["received"] == 3.0
        assert event["payload"]["state"] == "offline"
        assert event["payload"]["reason"] == f"hub h1 offline: {WILL_REASON}"
        assert event["payload"]["derived_from_hub"] is True
        assert event["payload"]["details"] == {"hub": "h1"}
    assert shown(state, "A") == ("offline", f"hub h1 offline: {WILL_REASON}", True)
    assert shown(state, "B")[0] == "offline"
    assert shown(state, "C") == ("online", "own", False)
    assert shown(state, "D") == ("online", "own", False)
    assert shown(state, "E") == ("offline", "own", False)  # its own clean offline is kept
    assert state.sessions["A"].own_status["state"] == "online"  # what it said itself is kept
    assert state.sessions["A"].counters.as_dict() == before  # a derived status is no message
    assert "_hubs" not in state.sessions and "h1" not in state.sessions
    assert state.hub_snapshot()["h1"]["state"] == "offline"
    # the same will again (a reconnect redelivers the retained one): nothing new to show
    assert state.receive(f"{p}/_hubs/h1/status", will, 3.5) == []
    # the hub's next run counts from 0: sequence 0 is new again
    raw0 = encode(prediction_payload(sample_prediction("A", 0)))
    assert state.accept(f"{p}/A/prediction", raw0, 3.6) is not None

    # the hub is back: its sessions stay offline until they publish their own status again
    assert state.receive(f"{p}/_hubs/h1/status", online, 4.0) == []
    assert shown(state, "A")[2] is True
    update = state.accept(f"{p}/A/status", session_status("A", "starting", "h1", "waiting"), 5.0)
    assert update is not None and update.payload["state"] == "starting"
    assert "derived_from_hub" not in update.payload
    assert shown(state, "A") == ("starting", "waiting", False)
    assert shown(state, "B")[2] is True


def test_a_session_status_naming_an_offline_hub_arrives_offline() -> None:
    """Retained messages come in any order: the hub's will may be there before its sessions'."""
    state = LiveState(prefix="lab/3T")
    assert state.receive("lab/3T/_hubs/h9/status", hub_status("h9", "offline", "gone"), 1.0) == []
    update = state.accept("lab/3T/S1/status", session_status("S1", "online", "h9"), 2.0)
    assert update is not None and update.payload["derived_from_hub"] is True
    assert update.payload["reason"] == "hub h9 offline: gone"
    assert shown(state, "S1") == ("offline", "hub h9 offline: gone", True)
    # the same session served by another hub, or alone, is its own status again
    state.accept("lab/3T/S1/status", session_status("S1", "online", "h10"), 3.0)
    assert shown(state, "S1") == ("online", "", False)
    state.receive("lab/3T/_hubs/h9/status", hub_status("h9", "offline", "gone again"), 4.0)
    assert shown(state, "S1") == ("online", "", False)


def test_hub_topics_are_never_sessions() -> None:
    assert split_topic("emorecog/_hubs/h1/status") == ("hub", "h1", "status")
    assert split_topic("emorecog/S1/status") == ("session", "S1", "status")
    assert split_topic("lab/3T/_hubs/h1/status", "lab/3T") == ("hub", "h1", "status")
    assert split_topic("lab/3T/S1/prediction", "lab/3T") == ("session", "S1", "prediction")
    assert split_topic("a/b/S1/marker") == ("session", "S1", "marker")
    state = LiveState()
    cases = [
        ("emorecog/_hubs/status", session_status("_hubs", "online", None), "unexpected topic"),
        ("emorecog/_hubs/h1/prediction", b"{}", "unexpected topic"),
        ("emorecog/_hubs/h1/status", hub_status("h2", "offline", "x"), "does not match"),
        ("emorecog/_hubs/h1/status", b'{"hub": "h1"}', "without a state"),
        ("emorecog/_hubs/h1/status", b"[1]", "expected a JSON object"),
        ("emorecog/_hubs/h1/status", b"{nope", "not JSON"),
    ]
    for topic, raw, reason in cases:
        with pytest.raises(MessageError, match=reason):
            state.receive(topic, raw, 0.0)
    with pytest.raises(MessageError, match="not under"):
        LiveState(prefix="emorecog").receive("other/S1/status", b"{}", 0.0)
    assert state.sessions == {} and state.malformed == len(cases)
    assert HUBS_LEVEL == "_hubs"
    for session in (None, "S1"):
        topics = subscription_topics("emorecog", session)
        assert "emorecog/_hubs/+/status" in topics
        assert f"emorecog/{session or '+'}/status" in topics


def test_listen_prints_the_sessions_of_a_dead_hub_offline() -> None:
    printer = _Printer(as_json=False, prefix="emorecog")
    assert printer.handle("emorecog/_hubs/h1/status", hub_status("h1", "online", "up")) is None
    line = printer.handle("emorecog/A/status", session_status("A", "online", "h1"))
    assert line is not None and line.startswith("[A] status ONLINE")
    printer.handle("emorecog/B/status", session_status("B", "online", "h1"))
    printer.handle("emorecog/C/status", session_status("C", "online", None))
    first = encode(prediction_payload(sample_prediction("A", 0)))
    assert printer.handle("emorecog/A/prediction", first) is not None
    died = hub_status("h1", "offline", "died")
    out = printer.handle("emorecog/_hubs/h1/status", died)
    assert out is not None
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[A] status OFFLINE (hub h1 offline: died)  at ")
    assert lines[1].startswith("[B] status OFFLINE (hub h1 offline: died)")
    assert printer.handle("emorecog/_hubs/h1/status", died) is None  # redelivered
    assert printer.handle("emorecog/A/prediction", first) is not None  # the next run's sequence 0
    again = printer.handle("emorecog/B/status", session_status("B", "online", "h1"))
    assert again is not None and "OFFLINE (hub h1 offline: died)" in again
    printer.handle("emorecog/_hubs/h1/status", hub_status("h1", "online", "up"))
    back = printer.handle("emorecog/B/status", session_status("B", "starting", "h1", "waiting"))
    assert back is not None and "status STARTING (waiting)" in back

    js = _Printer(as_json=True, prefix="emorecog")
    js.handle("emorecog/A/status", session_status("A", "online", "h1"))
    (line,) = (js.handle("emorecog/_hubs/h1/status", died) or "").splitlines()
    payload = json.loads(line)
    assert payload["session"] == "A" and payload["state"] == "offline"
    assert payload["derived_from_hub"] is True and payload["reason"] == "hub h1 offline: died"


def test_listen_ignores_a_malformed_hub_status(capsys: pytest.CaptureFixture[str]) -> None:
    printer = _Printer(as_json=False, prefix="emorecog")
    assert printer.handle("emorecog/_hubs/h1/status", hub_status("h2", "offline", "x")) is None
    assert printer.handle("emorecog/_hubs/h1/status", b"{nope") is None
    assert capsys.readouterr().err.count("ignoring malformed message") == 2


# --------------------------------------------------------------------------- a real Last Will

# A stand-in for a hub process: one connection with the hub's Last Will, the hub's and its
# sessions' retained statuses, then it waits to be killed (no DISCONNECT: the broker sends the
# will).
FAKE_HUB = """
import json, sys, time
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
will, messages = json.loads(sys.argv[3]), json.loads(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
c.will_set(will[0], will[1], qos=1, retain=True)
c.connect(host, port, keepalive=30)
c.loop_start()
for topic, payload in messages:
    c.publish(topic, payload, qos=1, retain=topic.endswith("/status")).wait_for_publish(10)
print("ready", flush=True)
time.sleep(60)
"""


def start_fake_hub(
    broker: Any, hub: str, messages: list[tuple[str, bytes]]
) -> subprocess.Popen[str]:
    """The stand-in hub, once its messages are published (kill it to have the will sent)."""
    will = (f"emorecog/_hubs/{hub}/status", hub_status(hub, "offline", WILL_REASON))
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_HUB, broker.host, str(broker.port),
         json.dumps([will[0], will[1].decode()]),
         json.dumps([[t, p.decode()] for t, p in messages])],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
    return fake


class Lines:
    """The lines a text stream gives, collected by a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line if isinstance(line, str) else line.decode())
                self._cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True


def sse_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def derived(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest status derived from a hub, per session, among server-sent events."""
    return {
        e["session"]: e["payload"]
        for e in events
        if e["type"] == "status" and e["payload"].get("derived_from_hub")
    }


def test_a_real_last_will_reaches_the_pages_and_listen(mosquitto_broker: Any) -> None:
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.test_web_pages import ServerThread

    broker = mosquitto_broker
    hub, other_hub = f"hub-{unique_session()}", f"hub-{unique_session()}"
    s1, s2, s3 = unique_session(), unique_session(), unique_session()
    reason = f"hub {hub} offline: {WILL_REASON}"
    started = time.monotonic()
    listen = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "listen", "--mqtt", broker.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    fake = None
    try:
        assert listen.stderr is not None and listen.stderr.readline().startswith("listening on")
        listened = Lines(listen.stdout)
        with ServerThread(MqttSettings.from_url(broker.url)) as web:
            stream = urllib.request.urlopen(web.url("/events"), timeout=20)
            events = Lines(stream)
            assert events.wait(lambda ls: any('"type":"snapshot"' in line for line in ls))
            messages = [
                (f"emorecog/_hubs/{hub}/status", hub_status(hub, "online", "up", [s1, s2])),
                (f"emorecog/{s1}/status", session_status(s1, "online", hub, "serving")),
                (f"emorecog/{s2}/status", session_status(s2, "degraded", hub, "PPG lost")),
                (f"emorecog/{s3}/status", session_status(s3, "online", other_hub, "serving")),
            ]
            fake = start_fake_hub(broker, hub, messages)
            assert web.wait(lambda s: all(
                sid in s.state.sessions and s.state.sessions[sid].status is not None
                for sid in (s1, s2, s3)
            ))  # fmt: skip
            assert web.on_loop(lambda: shown(web.server.state, s1)) == ("online", "serving", False)

            fake.kill()  # no DISCONNECT: Mosquitto publishes the hub's will
            fake.wait(10)

            assert events.wait(lambda ls: len(derived(sse_events(ls))) >= 2), events.lines[-5:]
            got = derived(sse_events(events.lines))
            assert sorted(got) == sorted([s1, s2])
            assert all(p["state"] == "offline" and p["reason"] == reason for p in got.values())
            state = json.loads(urllib.request.urlopen(web.url("/api/state"), timeout=10).read())
            by_id = {s["session"]: s["status"] for s in state["sessions"]}
            assert "_hubs" not in by_id and hub not in by_id
            assert by_id[s1]["state"] == "offline" and by_id[s1]["reason"] == reason
            assert by_id[s2]["state"] == "offline" and by_id[s2]["derived_from_hub"] is True
            assert by_id[s3]["state"] == "online"
            assert state["hubs"][hub]["state"] == "offline"

            # a page opened now gets the combined state in its first (snapshot) event
            late = Lines(urllib.request.urlopen(web.url("/events", session=s1), timeout=20))
            assert late.wait(lambda ls: bool(sse_events(ls)))
            snap = sse_events(late.lines)[0]
            assert snap["type"] == "snapshot" and snap["sessions"][0]["status"]["reason"] == reason

        def offline_lines(ls: list[str]) -> list[str]:
            return [line for line in ls if f"status OFFLINE ({reason})" in line]

        assert listened.wait(lambda ls: len(offline_lines(ls)) >= 2), listened.lines
        assert {line.split("]")[0][1:] for line in offline_lines(listened.lines)} == {s1, s2}
        assert any(f"[{s3}] status ONLINE (serving)" in line for line in listened.lines)
    finally:
        for proc in (fake, listen):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert time.monotonic() - started < 15


def test_the_pages_show_a_dead_hubs_session_offline_with_the_reason(
    mosquitto_broker: Any,
) -> None:
    """In Chromium: the experimenter's row and detail say offline with the hub's reason, and
    the feedback display greys as for any offline session."""
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.test_web_pages import ServerThread, chromium, chromium_missing, wait_js

    if chromium_missing() is not None:
        pytest.skip(str(chromium_missing()))
    hub, session = f"hub-{unique_session()}", unique_session()
    reason = f"hub {hub} offline: {WILL_REASON}"
    prediction = encode(prediction_payload(sample_prediction(session, 0)))
    fake = None
    try:
        with (
            ServerThread(MqttSettings.from_url(mosquitto_broker.url)) as web,
            chromium(1400, 1000) as page,
        ):
            page.get(web.url("/feedback", session=session))
            wait_js(page, "window.__emorecog && window.__emorecog.config")
            feedback = page.current_window_handle
            page.switch_to.new_window("window")  # one browser, two windows (both drawn)
            page.get(web.url("/"))
            experimenter = page.current_window_handle
            fake = start_fake_hub(mosquitto_broker, hub, [
                (f"emorecog/_hubs/{hub}/status", hub_status(hub, "online", "up", [session])),
                (f"emorecog/{session}/status", session_status(session, "online", hub, "serving")),
                (f"emorecog/{session}/prediction", prediction),
            ])  # fmt: skip
            wait_js(page, "document.getElementById('d-state').textContent === 'online'")
            page.switch_to.window(feedback)
            wait_js(page, "document.body.dataset.state === 'live'")
            page.switch_to.window(experimenter)
            fake.kill()
            wait_js(page, "document.getElementById('d-state').textContent === 'offline'")
            shown_reason = "return document.getElementById('d-reason').textContent"
            assert page.execute_script(shown_reason) == reason
            cells = page.execute_script(
                "return [...document.querySelectorAll('#sessions tbody tr')]"
                ".map(tr => [...tr.children].slice(0, 3).map(td => td.textContent))"
            )
            assert cells == [[session, "offline", reason]]  # one row, none for "_hubs"
            page.switch_to.window(feedback)
            wait_js(page, "document.body.dataset.state === 'offline'")
            grey = "getComputedStyle(document.querySelector('.fill')).backgroundColor"
            wait_js(page, f"{grey} === 'rgb(90, 90, 90)'", timeout=5)  # after its fade
    finally:
        if fake is not None and fake.poll() is None:
            fake.kill()
            fake.wait(10)
