"""MqttPublisher against real brokers (Mosquitto started per test, amqtt where it is missing)
and an independent paho-mqtt subscriber: delivery, order, schema, reconnect, LWT, auth, TLS."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from emorecog_stream.sinks.broker import EmbeddedBroker
from emorecog_stream.sinks.mqtt import MqttConfigError, MqttPublisher, MqttSettings
from emorecog_stream.sinks.payload import PayloadError, load_schema
from tests.plugins.mqtt_broker import (
    MqttCollector,
    free_port,
    sample_prediction,
    unique_session,
)

REPO = Path(__file__).resolve().parents[1]


def fast(url: str, **options: Any) -> MqttSettings:
    """Settings with a short backoff so tests see reconnects quickly."""
    options.setdefault("reconnect_min_s", 0.1)
    options.setdefault("reconnect_max_s", 0.5)
    return MqttSettings.from_url(url, **options)


def durable_prediction_subscriber(factory: Any, collector: Any) -> tuple[Any, str, Any]:
    """A persisting broker, a fresh session id and a subscriber whose session survives a broker
    restart (clean_session off), for the tests where messages must outlive the broker."""
    broker = factory(persistence=True)
    session = unique_session()
    sub = collector(
        broker,
        [f"emorecog/{session}/prediction"],
        clean_session=False,
        client_id=f"durable-{uuid.uuid4().hex[:8]}",
    )
    return broker, session, sub


async def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


async def test_predictions_arrive_in_order_valid_and_with_mqtt5_properties(
    mqtt_broker: Any, mqtt_collector: Any
) -> None:
    session = unique_session()
    v5 = 5 if mqtt_broker.kind == "mosquitto" else None  # amqtt speaks 3.1.1 only
    sub = mqtt_collector(mqtt_broker, [f"emorecog/{session}/#"], protocol=v5)
    n = 60
    async with MqttPublisher(fast(mqtt_broker.url), session, model_id="m1") as pub:
        assert await pub.wait_connected(10)
        for i in range(n):
            pub.publish_prediction(sample_prediction(session, i))
            pub.publish_physio(sample_prediction(session, i), heart_rate_quality=0.8)
        assert await pub.flush(10)
        assert pub.stats.sent == 2 * n + 1 and pub.stats.queued == 0 and pub.stats.dropped == 0
    assert pub.stats.state == "closed"
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= n and len(sub.of("status")) >= 2)

    predictions = sub.json("prediction")
    assert [p["sequence"] for p in predictions] == list(range(n))
    validator = jsonschema.Draft202012Validator(load_schema("prediction"))
    for i, payload in enumerate(predictions):
        validator.validate(payload)
        assert payload["intensity"] == sample_prediction(session, i).intensity
    physio_validator = jsonschema.Draft202012Validator(load_schema("physio"))
    for payload in sub.json("physio"):
        physio_validator.validate(payload)
    assert [p["sequence"] for p in sub.json("physio")] == list(range(n))
    states = [s["state"] for s in sub.json("status")]
    assert states[0] == "online" and states[-1] == "offline"
    if mqtt_broker.kind == "mosquitto":
        assert pub.stats.protocol == "5"
        props = sub.of("prediction")[0].properties
        assert props.get("ContentType") == "application/json"
        assert props.get("MessageExpiryInterval") == 300


@pytest.mark.slow
async def test_broker_killed_mid_stream_and_restarted_after_5_s_loses_nothing(
    mqtt_broker_factory: Any, mqtt_collector: Any
) -> None:
    broker, session, sub = durable_prediction_subscriber(mqtt_broker_factory, mqtt_collector)
    broker.wait_persisted()  # the durable subscription is on disk before any kill
    n, kill_at = 150, 30
    restarter: threading.Timer | None = None
    async with MqttPublisher(fast(broker.url, reconnect_max_s=1.0), session) as pub:
        assert await pub.wait_connected(10)
        for i in range(n):
            if i == kill_at:
                broker.stop()  # SIGKILL
                restarter = threading.Timer(5.0, broker.start)
                restarter.start()
            pub.publish_prediction(sample_prediction(session, i))
            await asyncio.sleep(0.05)
        assert pub.stats.queued > 0 or pub.stats.reconnects >= 1
        assert await pub.flush(20), pub.stats
        stats = pub.stats
    assert restarter is not None
    restarter.join()
    assert stats.reconnects >= 1 and stats.dropped == 0 and stats.last_error
    assert sub.wait_for(lambda _: len(sub.unique_by_sequence()) >= n, timeout=20)
    assert [p["sequence"] for p in sub.unique_by_sequence()] == list(range(n))


async def test_last_will_sets_status_offline_when_the_engine_is_killed(
    mqtt_broker: Any, mqtt_collector: Any
) -> None:
    session = unique_session()
    script = (
        "import asyncio, sys\n"
        "from emorecog_stream.sinks.mqtt import MqttPublisher, MqttSettings\n"
        "async def main():\n"
        "    pub = MqttPublisher(MqttSettings.from_url(sys.argv[1]), sys.argv[2])\n"
        "    await pub.start()\n"
        "    assert await pub.wait_connected(10) and await pub.flush(10)\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, mqtt_broker.url, session],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        sub = mqtt_collector(mqtt_broker, [f"emorecog/{session}/status"])
        assert sub.wait_for(lambda _: any(s["state"] == "online" for s in sub.json("status")))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert sub.wait_for(lambda _: sub.json("status")[-1]["state"] == "offline", timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "connection lost" in sub.json("status")[-1]["reason"]
    late = mqtt_collector(mqtt_broker, [f"emorecog/{session}/status"])  # a new subscriber
    assert late.wait_for(lambda msgs: len(msgs) >= 1)
    assert late.messages[-1].retain and late.messages[-1].json()["state"] == "offline"


async def test_unreachable_broker_at_start_queues_then_delivers_and_drops_oldest_when_full(
    mqtt_broker_factory: Any, mqtt_collector: Any
) -> None:
    broker, session, sub = durable_prediction_subscriber(mqtt_broker_factory, mqtt_collector)
    broker.wait_persisted()
    broker.stop()
    settings = fast(broker.url, queue_capacity=6, reconnect_max_s=0.3)
    pub = MqttPublisher(settings, session)
    await pub.start()  # not an error: the broker is down
    for i in range(8):
        pub.publish_prediction(sample_prediction(session, i))
    assert await wait_until(lambda: pub.stats.last_error is not None)
    stats = pub.stats
    assert stats.state == "disconnected" and not stats.connected
    assert "cannot reach MQTT broker" in (stats.last_error or "")
    # status + 8 predictions into 6 places: the three oldest predictions were dropped.
    assert stats.queued == 6 and stats.dropped == 3
    broker.start()
    assert await pub.flush(15)
    assert await pub.close(5)
    assert sub.wait_for(lambda _: len(sub.unique_by_sequence()) >= 5, timeout=15)
    assert [p["sequence"] for p in sub.unique_by_sequence()] == [3, 4, 5, 6, 7]


async def test_close_with_unreachable_broker_gives_up_after_the_timeout() -> None:
    pub = MqttPublisher(fast(f"mqtt://127.0.0.1:{free_port()}"), unique_session())
    await pub.start()
    pub.publish_prediction(sample_prediction(pub.session, 0))
    assert await pub.close(timeout=0.3) is False
    assert pub.stats.state == "closed" and pub.stats.unsent_at_close == 3  # online, 0, offline
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish_prediction(sample_prediction(pub.session, 1))


async def test_username_password_auth_and_a_clear_error_without_the_password(
    mqtt_broker_factory: Any, mqtt_collector: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex[:6]}"
    broker = mqtt_broker_factory(username="engine", password=secret)
    session = unique_session()
    sub = mqtt_collector(
        broker, [f"emorecog/{session}/prediction"], username="engine", password=secret
    )
    pw_file = tmp_path / "pw"
    pw_file.write_text(secret + "\n")
    good = fast(f"mqtt://engine@127.0.0.1:{broker.port}", password_file=pw_file)
    assert secret not in repr(good) and secret not in good.url
    async with MqttPublisher(good, session) as pub:
        pub.publish_prediction(sample_prediction(session, 0))
        assert await pub.flush(10)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) == 1)

    caplog.set_level(logging.DEBUG)
    os.environ["H6_TEST_WRONG_PW"] = secret + "-wrong"
    try:
        bad = fast(f"mqtt://engine@127.0.0.1:{broker.port}", password_env="H6_TEST_WRONG_PW")
    finally:
        del os.environ["H6_TEST_WRONG_PW"]
    pub = MqttPublisher(bad, session)
    await pub.start()
    assert await wait_until(lambda: pub.stats.state == "refused")
    error = pub.stats.last_error or ""
    await pub.close(timeout=0.2)
    assert "refused the connection" in error and "engine" in error
    assert any(word in error.lower() for word in ("not authorized", "bad user name", "password"))
    for text in (error, caplog.text, repr(bad), repr(pub), str(pub.stats)):
        assert secret not in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed for a test CA")
async def test_tls_with_a_private_ca(mqtt_broker_factory: Any, mqtt_collector: Any) -> None:
    broker = mqtt_broker_factory(tls=True)
    session = unique_session()
    sub = mqtt_collector(broker, [f"emorecog/{session}/prediction"])
    settings = fast(broker.url, ca_file=broker.tls_files.ca_cert)
    assert settings.tls and settings.url.startswith("mqtts://")
    async with MqttPublisher(settings, session) as pub:
        pub.publish_prediction(sample_prediction(session, 0))
        assert await pub.flush(10)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) == 1)

    untrusted = MqttPublisher(fast(broker.url), session)  # system CAs do not know ours
    await untrusted.start()
    assert await wait_until(lambda: untrusted.stats.last_error is not None)
    await untrusted.close(timeout=0.2)
    assert "TLS" in (untrusted.stats.last_error or "")
    assert "certificate verify failed" in (untrusted.stats.last_error or "").lower()


async def test_embedded_broker_with_publisher_and_paho_subscriber() -> None:
    session = unique_session()
    async with EmbeddedBroker(port=free_port()) as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        # The broker runs in this event loop: wait for the paho thread without blocking it.
        sub = MqttCollector(broker, [f"emorecog/{session}/#"])
        try:
            assert await asyncio.to_thread(sub.wait_connected, 10)
            async with MqttPublisher(fast(broker.url), session) as pub:
                assert await pub.wait_connected(10)
                for i in range(20):
                    pub.publish_prediction(sample_prediction(session, i))
                assert await pub.flush(10)
                assert pub.stats.protocol == "3.1.1"  # amqtt refuses MQTT 5: auto fallback
            got = await asyncio.to_thread(
                sub.wait_for,
                lambda _: len(sub.of("prediction")) >= 20 and len(sub.of("status")) >= 2,
                10,
            )
            assert got
            assert [p["sequence"] for p in sub.json("prediction")] == list(range(20))
            assert [s["state"] for s in sub.json("status")] == ["online", "offline"]
        finally:
            await asyncio.to_thread(sub.close)


async def test_embedded_broker_moves_to_a_free_port_when_taken() -> None:
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        async with EmbeddedBroker(port=taken) as broker:
            assert broker.moved and broker.port != taken
        strict = EmbeddedBroker(port=taken, fallback_to_free_port=False)
        from emorecog_stream.sinks.broker import BrokerStartError

        with pytest.raises(BrokerStartError, match=str(taken)):
            await strict.start()


async def test_prediction_of_another_session_is_refused() -> None:
    pub = MqttPublisher(fast(f"mqtt://127.0.0.1:{free_port()}"), "a")
    with pytest.raises(PayloadError, match="session 'b'"):
        pub.publish_prediction(sample_prediction("b", 0))
    with pytest.raises(PayloadError, match=r"\+"):
        MqttPublisher(fast("mqtt://127.0.0.1:1883"), "a+b")


def test_settings_from_url() -> None:
    s = MqttSettings.from_url("mqtts://alice@broker.lab:8884", qos=0)
    assert (s.host, s.port, s.tls, s.username, s.qos) == ("broker.lab", 8884, True, "alice", 0)
    assert MqttSettings.from_url("mqtt://h").port == 1883
    assert MqttSettings.from_url("mqtts://h").port == 8883
    assert s.url == "mqtts://alice@broker.lab:8884"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("mqtt://u:pw@h:1883", {}, "do not put the MQTT password in the URL"),
        ("http://h:1883", {}, "scheme must be mqtt or mqtts"),
        ("h:1883", {}, "must look like mqtt://host:port"),
        ("mqtt://h:99999", {}, "bad port"),
        ("mqtt://h:1883/topic", {}, "no path"),
        ("mqtt://h", {"ca_file": "/nonexistent/ca.pem"}, "does not exist"),
        ("mqtt://h", {"tls_insecure": True}, "need an mqtts:// URL"),
        ("mqtt://h", {"password_env": "H6_SURELY_UNSET_VAR"}, "H6_SURELY_UNSET_VAR is not set"),
        ("mqtt://h", {"password_file": "/nonexistent/pw"}, "cannot read MQTT password file"),
        ("mqtt://h", {"queue_capacity": 0}, "queue capacity"),
        ("mqtt://h", {"topic_prefix": "a/#"}, "'#'"),
        ("mqtt://h", {"protocol": "4"}, "protocol"),
    ],
)
def test_bad_settings_are_clear_errors(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(MqttConfigError, match=message):
        MqttSettings.from_url(url, **options)


def test_password_from_env_is_hidden_from_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("H6_PW", "hunter2-xyz")
    s = MqttSettings.from_url("mqtt://bob@localhost", password_env="H6_PW")
    assert s.password == "hunter2-xyz"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in s.url
