"""Real MQTT brokers and a real subscriber for tests (registered in ``tests/conftest.py``).

Brokers
-------
``mqtt_broker`` (fixture) -> a started :class:`MosquittoBroker` on 127.0.0.1 and a free port,
anonymous, no persistence. Where no ``mosquitto`` binary is found (``/usr/sbin/mosquitto`` or
on PATH), or ``EMORECOG_TEST_BROKER=amqtt`` is set, it is an :class:`EmbeddedTestBroker` (amqtt
in a background thread) instead, and a warning says so; tests that need Mosquitto-only features
(passwords, TLS, persistence) are then skipped with that reason. Both have the same API::

    broker.url            # "mqtt://127.0.0.1:PORT" (mqtts:// for TLS)
    broker.host, broker.port, broker.kind   # kind: "mosquitto" | "amqtt"
    broker.stop()         # kill it (SIGKILL for mosquitto: clients see the TCP connection die)
    broker.start()        # start again on the same port
    broker.restart(delay) # stop, sleep delay seconds, start

Other fixtures: ``mqtt_broker_factory(**options)`` makes more brokers (``username`` /
``password`` via ``mosquitto_passwd``, ``tls=True`` with a throwaway CA from ``openssl``,
``persistence=True``); ``mosquitto_broker`` is like ``mqtt_broker`` but skips without
Mosquitto; ``mqtt_collector(broker, topics)`` makes a :class:`MqttCollector`.

Kill-and-restart tests: a broker without persistence forgets subscriptions when it dies, so a
subscriber could miss messages published before it reconnects. For such tests use
``mqtt_broker_factory(persistence=True)`` (Mosquitto saves its state every second to a temp
dir) and a collector with ``clean_session=False``: the subscription and the messages queued for
it survive the restart, whichever client reconnects first. Call ``broker.wait_persisted()``
after subscribing and before killing the broker, so the subscription is on disk.

Subscriber
----------
:class:`MqttCollector` is an independent paho-mqtt client on its own network thread::

    sub = mqtt_collector(broker, ["emorecog/s1/#"])
    sub.wait_for(lambda msgs: len(sub.json("prediction")) >= 10, timeout=10)
    sub.json("prediction")          # decoded JSON payloads whose topic ends with /prediction
    sub.unique_by_sequence("prediction")   # de-duplicated by "sequence", in arrival order
    sub.messages                    # every Received(topic, payload, retain, qos, properties, t)
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emorecog_stream.sinks.broker import free_port

PERSIST_SETTLE_S = 2.5
"""A fixed wait for a persistent Mosquitto to save a new subscription (autosave every 1 s).
Prefer ``MosquittoBroker.wait_persisted()``, which waits for the actual save."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None (also None when ``EMORECOG_TEST_BROKER=amqtt``,
    which runs the broker tests on the embedded fallback even where Mosquitto is installed)."""
    if os.environ.get("EMORECOG_TEST_BROKER", "").lower() == "amqtt":
        return None
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def _wait_listening(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("broker process exited during start")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"broker did not listen on {host}:{port} within {timeout} s")


@dataclass
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (made with openssl)."""

    ca_cert: str
    server_cert: str
    server_key: str


def make_tls_files(directory: Path) -> TlsFiles:
    """Create a CA and a CA-signed server certificate; needs the ``openssl`` binary."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not installed")
    d = Path(directory)
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
         ca_crt, "-days", "2", "-subj", "/CN=emorecog-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
         "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext],
    ]  # fmt: skip
    for cmd in run:
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60)
    return TlsFiles(str(ca_crt), str(crt), str(key))


class MosquittoBroker:
    """A real Mosquitto on 127.0.0.1:``port`` with a temp config; same port across restarts."""

    kind = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        persistence: bool = False,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.username, self.password = username, password
        self.tls_files = make_tls_files(self.workdir) if tls else None
        self.persistence = persistence
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls_files else 'mqtt'}://{self.host}:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            f"user {getpass.getuser()}",  # when run as root, do not drop to 'mosquitto'
            f"persistence {'true' if self.persistence else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
        ]
        if self.persistence:
            lines += [
                f"persistence_location {self.workdir}/",
                "autosave_interval 1",
                "autosave_on_changes false",
            ]
        if self.username is not None:
            pw_file = self.workdir / "passwords"
            passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            subprocess.run(
                [passwd, "-b", "-c", str(pw_file), self.username, self.password or ""],
                check=True,
                capture_output=True,
                timeout=30,
            )
            lines += ["allow_anonymous false", f"password_file {pw_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls_files:
            lines += [
                f"cafile {self.tls_files.ca_cert}",
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_listening(self.host, self.port, timeout, lambda: self.running)
        except Exception as exc:
            stderr = b""
            if self._proc.poll() is not None and self._proc.stderr is not None:
                stderr = self._proc.stderr.read()
            log = self.log_path.read_text() if self.log_path.exists() else ""
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start on port {self.port}: {exc}\n{stderr.decode()}\n{log}"
            ) from exc

    def stop(self) -> None:
        """SIGKILL (a crash, as far as clients can tell) and wait for the process to go."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self, delay: float = 0.0) -> None:
        self.stop()
        time.sleep(delay)
        self.start()

    def wait_persisted(self, timeout: float = 10.0) -> None:
        """Block until the broker saved its state to disk *after* this call began.

        Call it once a durable subscriber is subscribed: the next autosave (every second)
        holds the subscription, so it survives a SIGKILL. Needs ``persistence=True``.
        """
        if not self.persistence:
            raise RuntimeError("wait_persisted needs a broker made with persistence=True")
        db = self.workdir / "mosquitto.db"
        start = time.time_ns()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if db.stat().st_mtime_ns > start:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not save {db} within {timeout} s")


class EmbeddedTestBroker:
    """The amqtt broker (``emorecog_stream.sinks.broker``) on a thread of its own, same API.

    amqtt has no password file, TLS or persistence options here, and speaks MQTT 3.1.1 only.
    """

    kind = "amqtt"

    def __init__(self, *, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.username = self.password = None
        self.tls_files = None
        self._thread: threading.Thread | None = None
        self._stop: Any = None
        self._loop: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        import asyncio

        from emorecog_stream.sinks.broker import EmbeddedBroker

        if self.running:
            return
        ready = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            self._stop = asyncio.Event()
            broker = EmbeddedBroker(self.host, self.port, fallback_to_free_port=False)
            try:
                await broker.start()
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await broker.stop()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(serve())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=main, name="amqtt-test-broker", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if errors:
            self._thread.join(5)
            raise RuntimeError(f"embedded broker did not start: {errors[0]}")
        _wait_listening(self.host, self.port, timeout, lambda: self.running)

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(15)

    def restart(self, delay: float = 0.0) -> None:
        self.stop()
        time.sleep(delay)
        self.start()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: dict[str, Any]
    t: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.payload)


class MqttCollector:
    """An independent paho-mqtt subscriber that collects every message on its topics.

    It reconnects by itself (0.1..0.5 s) and re-subscribes on every connection.
    ``clean_session=False`` keeps its session on the broker across disconnects.
    """

    def __init__(
        self,
        broker: Any,
        topics: list[str],
        *,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        client_id: str | None = None,
        protocol: int | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.broker = broker
        self.topics = list(topics)
        self.qos = qos
        self.messages: list[Received] = []
        self.connects = 0
        self._cond = threading.Condition()
        self._connected = threading.Event()
        protocol = protocol if protocol is not None else mqtt.MQTTv311
        v5 = protocol == mqtt.MQTTv5
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{uuid.uuid4().hex[:10]}",
            clean_session=None if v5 else clean_session,
            protocol=protocol,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        tls_files = getattr(broker, "tls_files", None)
        if tls_files is not None:
            self._client.tls_set(ca_certs=tls_files.ca_cert)
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        connect_options: dict[str, Any] = {}
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            connect_options["clean_start"] = clean_session
            if not clean_session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
                connect_options["properties"] = props
        self._client.connect_async(broker.host, broker.port, keepalive=10, **connect_options)
        self._client.loop_start()

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None
    ) -> None:
        if getattr(rc, "is_failure", False):
            return
        self.connects += 1
        client.subscribe([(topic, self.qos) for topic in self.topics])

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: Any, codes: Any, props: Any = None
    ) -> None:
        if not any(getattr(code, "is_failure", False) for code in codes):
            self._connected.set()  # connected *and* the broker confirmed every subscription

    def _on_disconnect(self, *args: Any) -> None:
        self._connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props: dict[str, Any] = {}
        if msg.properties is not None:
            with contextlib.suppress(Exception):
                props = msg.properties.json()
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), msg.qos, props))
            self._cond.notify_all()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """True once connected and the broker acknowledged the subscriptions (SUBACK)."""
        return self._connected.wait(timeout)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def of(self, kind: str) -> list[Received]:
        """Messages whose topic ends with ``/<kind>`` (prediction, status, physio)."""
        with self._cond:
            return [m for m in self.messages if m.topic.endswith("/" + kind)]

    def json(self, kind: str) -> list[Any]:
        return [m.json() for m in self.of(kind)]

    def unique_by_sequence(self, kind: str = "prediction") -> list[Any]:
        seen: set[int] = set()
        out = []
        for payload in self.json(kind):
            if payload["sequence"] not in seen:
                seen.add(payload["sequence"])
                out.append(payload)
        return out

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# --------------------------------------------------------------------------- fixtures


def _make_broker(workdir: Path, **options: Any) -> Any:
    if find_mosquitto() is None:
        if options.get("username") or options.get("tls") or options.get("persistence"):
            pytest.skip(f"needs Mosquitto ({sorted(options)}); it is not installed or not selected")
        warnings.warn(
            "mosquitto not found (or EMORECOG_TEST_BROKER=amqtt): using the embedded amqtt"
            " broker instead",
            stacklevel=2,
        )
        return EmbeddedTestBroker(port=options.get("port"))
    return MosquittoBroker(workdir, **options)


@pytest.fixture
def mqtt_broker_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``factory(**options)`` -> a started broker; all are stopped at teardown."""
    brokers: list[Any] = []

    def make(**options: Any) -> Any:
        broker = _make_broker(tmp_path / f"broker{len(brokers)}", **options)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mqtt_broker(mqtt_broker_factory: Callable[..., Any]) -> Any:
    """A started anonymous broker (Mosquitto, or amqtt where Mosquitto is missing)."""
    return mqtt_broker_factory()


@pytest.fixture
def mosquitto_broker(mqtt_broker_factory: Callable[..., Any]) -> Any:
    """Like ``mqtt_broker`` but a real Mosquitto, else the test is skipped."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    return mqtt_broker_factory()


@pytest.fixture
def mqtt_collector() -> Iterator[Callable[..., MqttCollector]]:
    """``make(broker, topics, **options)`` -> a connected :class:`MqttCollector`."""
    made: list[MqttCollector] = []

    def make(broker: Any, topics: list[str], **options: Any) -> MqttCollector:
        collector = MqttCollector(broker, topics, **options)
        made.append(collector)
        if not collector.wait_connected(10):
            raise TimeoutError(f"test subscriber could not connect to {broker.url}")
        return collector

    yield make
    for collector in made:
        collector.close()


def unique_session() -> str:
    """A session id no other test (or parallel helper) uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


def sample_prediction(session: str, sequence: int, **overrides: Any) -> Any:
    """A valid ``Prediction`` whose values depend on ``sequence`` (for publisher tests)."""
    from emorecog_stream.core.messages import Prediction

    a = (sequence % 7) / 20.0
    probs = (round(0.2 + a / 2, 6), round(0.5 - a, 6), 0.0)
    probs = (probs[0], probs[1], round(1.0 - probs[0] - probs[1], 6))
    fields: dict[str, Any] = {
        "session": session,
        "sequence": sequence,
        "tr_index": sequence,
        "volume_timestamp": 1000.0 + sequence,
        "utc": "2026-01-01T00:00:00.000Z",
        "probabilities": probs,
        "category": ("negative", "neutral", "positive")[max(range(3), key=probs.__getitem__)],
        "intensity": round(-4.0 + (sequence % 9), 3),
        "heart_rate": 60.0 + sequence % 20,
        "heart_rate_valid": True,
        "respiration_rate": None,
        "respiration_rate_valid": False,
        "model_id": "test-model",
        "latency_ms": 1.5,
        "level": sequence % 9 - 4,
        "flags": ("respiration_rate_missing",),
    }
    fields.update(overrides)
    return Prediction(**fields)
