"""MQTT publisher (aiomqtt, MQTT 5 with a 3.1.1 fallback): predictions, physio and status.

Why it looks like this: predictions must reach every subscriber even when the network or the
broker hiccups, and the engine must never block on the network. So the engine hands messages to
:class:`MqttPublisher` synchronously (``publish_prediction`` returns at once) and a background
task owns the connection:

* **Queue.** Every message goes into a bounded FIFO (``queue_capacity`` messages, predictions,
  physio and status together). A message leaves the queue only after the broker acknowledged it
  (PUBACK for QoS 1), so a message in flight when the connection drops is sent again after the
  reconnect: delivery is *at least once* and subscribers de-duplicate on ``sequence``.
  Up to ``max_inflight`` messages are on the wire at once; the rest wait, in order.
* **Queue full.** When the queue already holds ``queue_capacity`` messages, the *oldest waiting
  (not in flight) prediction or physio message is dropped* and counted in ``dropped``; status
  messages are dropped only if nothing else is left. Why the oldest: after a long outage the
  newest predictions matter most to a live display, and the JSONL log keeps the full audit
  record. With the default 10 000 messages and two messages per TR at TR 1 s this is more than
  80 minutes of outage.
* **Reconnect.** Exponential backoff from ``reconnect_min_s`` to ``reconnect_max_s`` (with a
  little jitter); after each reconnect the current status is re-published (retained) and the
  queue is delivered in order. A broker that is unreachable at start is not an error: the state
  says ``disconnected`` with the reason in ``last_error``, and messages are queued.
* **Status.** Retained on ``<prefix>/<session>/status``; the connection registers a Last Will
  that sets it ``offline`` if the engine dies without a clean disconnect. :meth:`close`
  publishes ``offline`` itself, waits up to its timeout for the queue to drain, then
  disconnects cleanly.
* **Secrets.** The password comes from an environment variable or a file (never from the URL
  or the command line); ``repr`` of the settings and every message this module logs leave it out.
  A password is never sent in clear (``mqtt://``) to a broker off this machine unless
  ``allow_insecure`` says so: the settings refuse it before anything connects. TLS
  (``mqtts://``) checks the broker's certificate and host name against the system CAs or
  ``ca_file``; only ``tls_insecure`` turns that off.

MQTT 5 properties: content type ``application/json`` on every message and a message expiry
interval (``message_expiry_s``) on predictions and physio. ``protocol="auto"`` tries MQTT 5 and
falls back to 3.1.1 (no properties) when the broker refuses the protocol version, as the
embedded amqtt broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import random
import re
import ssl
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from emorecog_stream.core.messages import Prediction
from emorecog_stream.sinks.payload import (
    DEFAULT_TOPIC_PREFIX,
    PayloadError,
    Topics,
    encode,
    marker_payload,
    physio_payload,
    prediction_payload,
    status_payload,
    utc_now,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "mqtt://127.0.0.1:1883"
Protocol = Literal["auto", "5", "3.1.1"]
_REFUSED_PROTOCOL_CODES = {1, 132}  # 3.1.1 "unacceptable protocol version"; MQTT 5 0x84


class _StaleSocketFilter(logging.Filter):
    """Drop asyncio's traceback for aiomqtt registering a writer on a socket that just died.

    When the broker vanishes, paho asks aiomqtt to watch the (already closed) socket for
    writability; asyncio then logs "Exception in callback ...add_writer" with EBADF. The
    publisher already reports the lost connection in ``last_error``, so that traceback only
    alarms users. Likewise "Future exception was never retrieved" for aiomqtt's own publish
    futures, failed with "Unexpected disconnection" after the publisher had given up on them
    (a broker that hung: seen after SIGSTOP/SIGCONT). Nothing else from the ``asyncio``
    logger is touched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = str(record.msg % record.args if record.args else record.msg)
        stale = isinstance(exc, OSError) and exc.errno == errno.EBADF and "add_writer" in text
        orphan = (
            exc is not None
            and type(exc).__module__.startswith("aiomqtt")
            and text.startswith("Future exception was never retrieved")
        )
        return not (stale or orphan)


_STALE_SOCKET_FILTER = _StaleSocketFilter()


class MqttConfigError(ValueError):
    """A broker URL, credential or TLS setting that cannot work (says which and why)."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1), which never leave
    this machine. Names are not resolved: a name that merely resolves to 127.0.0.1 today is a
    remote host as far as sending a password is concerned."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped is not None and mapped.is_loopback)


def read_password(env: str | None = None, file: str | os.PathLike[str] | None = None) -> str | None:
    """The broker password from the environment variable ``env`` or the file ``file``.

    One trailing newline of the file is removed. Errors name the variable or the file, never
    the value.
    """
    if env and file:
        raise MqttConfigError("give the MQTT password by environment variable or by file, not both")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise MqttConfigError(f"MQTT password environment variable {env} is not set")
        if value == "":
            raise MqttConfigError(f"MQTT password environment variable {env} is empty")
        return value
    if file:
        path = Path(file)
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MqttConfigError(
                f"cannot read MQTT password file {path}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError as exc:  # its message would quote a byte of the password
            raise MqttConfigError(
                f"MQTT password file {path} is not UTF-8 text (byte {exc.start} is not)"
            ) from None
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
        if value == "":
            raise MqttConfigError(f"MQTT password file {path} is empty")
        return value
    return None


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to publish. Build it with :meth:`from_url`; ``repr`` hides the password."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip certificate and host-name checks (testing only)
    allow_insecure: bool = False  # allow a password in clear (mqtt://) to a non-loopback host
    client_id: str | None = None  # default: emorecog-<session>-<random>
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    qos: int = 1  # predictions and physio; status is always QoS 1
    keepalive: int = 15  # seconds; a dead engine is noticed (Last Will) after 1.5x this
    queue_capacity: int = 10_000
    max_inflight: int = 64
    message_expiry_s: int | None = 300  # MQTT 5 expiry of predictions/physio; None: never
    protocol: Protocol = "auto"
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    publish_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (bool(self.host), f"MQTT host must not be empty, got {self.host!r}"),
            (0 < self.port < 65536, f"MQTT port must be 1..65535, got {self.port}"),
            (self.qos in (0, 1, 2), f"MQTT qos must be 0, 1 or 2, got {self.qos}"),
            (self.keepalive >= 1, f"MQTT keepalive must be >= 1 s, got {self.keepalive}"),
            (self.queue_capacity >= 1, f"queue capacity must be >= 1, got {self.queue_capacity}"),
            (self.max_inflight >= 1, f"max_inflight must be >= 1, got {self.max_inflight}"),
            (
                self.protocol in ("auto", "5", "3.1.1"),
                f"MQTT protocol must be auto, 5 or 3.1.1, got {self.protocol!r}",
            ),
            (
                0 < self.reconnect_min_s <= self.reconnect_max_s,
                "reconnect backoff needs 0 < reconnect_min_s <= reconnect_max_s, got"
                f" {self.reconnect_min_s} and {self.reconnect_max_s}",
            ),
            (self.connect_timeout_s > 0, "connect_timeout_s must be > 0"),
            (self.publish_timeout_s > 0, "publish_timeout_s must be > 0"),
            (
                self.message_expiry_s is None or self.message_expiry_s > 0,
                f"message_expiry_s must be > 0 or None, got {self.message_expiry_s}",
            ),
            (
                self.password is None or self.username is not None,
                "an MQTT password was given without a username",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MqttConfigError(message)
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise MqttConfigError(f"TLS {name.replace('_', ' ')} {value} does not exist")
        if (self.ca_file or self.cert_file or self.tls_insecure) and not self.tls:
            raise MqttConfigError("TLS options need an mqtts:// URL")
        if (
            self.password is not None
            and not self.tls
            and not self.allow_insecure
            and not is_loopback_host(self.host)
        ):
            raise MqttConfigError(
                f"refusing to send the MQTT password for user {self.username!r} in clear text to"
                f" {self.host}:{self.port} (mqtt:// has no encryption and the broker is not on"
                " this machine): use mqtts:// (TLS), or allow it with --allow-insecure"
                " ([mqtt] allow_insecure = true) on a network you trust"
            )
        if self.key_file and not self.cert_file:
            raise MqttConfigError("a TLS key file needs a certificate file (cert_file)")
        try:
            Topics.for_session("probe", self.topic_prefix)
        except PayloadError as exc:
            raise MqttConfigError(str(exc)) from None

    @classmethod
    def from_url(
        cls,
        url: str = DEFAULT_URL,
        *,
        password_env: str | None = None,
        password_file: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> MqttSettings:
        """Settings from ``mqtt://[user@]host[:port]`` or ``mqtts://...`` plus keyword options.

        A password inside the URL is refused (it would land in shell history and process
        lists): use ``password_env`` or ``password_file``.
        """
        if not isinstance(url, str) or "://" not in url:
            raise MqttConfigError(f"MQTT URL must look like mqtt://host:port, got {url!r}")
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unclosed '['
            shown = re.sub(r"//[^/@]*@", "//...@", url)  # never echo a user name or password
            raise MqttConfigError(f"MQTT URL cannot be parsed ({exc}): {shown!r}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("mqtt", "mqtts"):
            raise MqttConfigError(f"MQTT URL scheme must be mqtt or mqtts, got {parts.scheme!r}")
        if parts.password is not None:
            raise MqttConfigError(
                "do not put the MQTT password in the URL: give it by environment variable or file"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise MqttConfigError(
                f"MQTT URL must have no path, query or fragment: mqtt://host:port, got {url!r}"
            )
        try:
            port = parts.port
        except ValueError:
            raise MqttConfigError(f"MQTT URL has a bad port: {url!r}") from None
        if not parts.hostname:
            raise MqttConfigError(f"MQTT URL has no host: {url!r}")
        tls = scheme == "mqtts"
        option_user = options.pop("username", None)  # a user in the URL wins over the option
        username = unquote(parts.username) if parts.username else option_user
        password = read_password(password_env, password_file)
        if "password" in options:
            password = options.pop("password")
        return cls(
            host=parts.hostname,
            port=port if port is not None else (8883 if tls else 1883),
            tls=tls,
            username=username,
            password=password,
            **options,
        )

    @property
    def url(self) -> str:
        """The broker URL without any password (safe to print)."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (None for plain mqtt://); files are read here, once."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise MqttConfigError(f"cannot load TLS files for {self.url}: {exc}") from None
        if self.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass(frozen=True)
class MqttStats:
    """Connection state and counters, for the dashboard and the status line."""

    url: str
    state: str  # idle | connecting | connected | disconnected | refused | closed
    connected: bool
    protocol: str | None  # "5" or "3.1.1" once connected
    sent: int  # acknowledged by the broker
    queued: int  # waiting or in flight
    inflight: int
    dropped: int  # removed from a full queue (oldest first)
    reconnects: int  # successful connections after the first
    last_error: str | None
    last_error_utc: str | None
    unsent_at_close: int


@dataclass(eq=False)  # identity: two equal status payloads are still two messages
class _Outgoing:
    kind: str  # prediction | physio | marker | status
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttPublisher:
    """Publishes one session's predictions, physio and status; owns the connection task.

    Use as ``async with MqttPublisher(settings, session) as pub:`` or call :meth:`start` and
    :meth:`close`. ``publish_*`` and :meth:`set_status` never block and never raise for network
    problems (only for a payload that cannot be published, as :class:`PayloadError`).
    """

    def __init__(
        self,
        settings: MqttSettings,
        session: str,
        *,
        model_id: str | None = None,
        initial_state: str | None = "online",
        initial_reason: str = "engine started",
        will: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics.for_session(session, settings.topic_prefix)
        self.session = session
        self.model_id = model_id
        self._ssl_context = settings.ssl_context()
        self._client_id = settings.client_id or f"emorecog-{session}-{uuid.uuid4().hex[:8]}"
        self._initial = (
            None
            if initial_state is None
            else status_payload(session, initial_state, initial_reason, model_id=model_id)
        )
        self._waiting: deque[_Outgoing] = deque()
        self._inflight: deque[tuple[_Outgoing, asyncio.Task[None]]] = deque()
        # the newest retained status per topic: sent again after a reconnect (a broker
        # restarted without persistence forgets retained messages)
        self._statuses: dict[str, _Outgoing] = {}
        # Last Will: this session's status (default), or the hub's status topic (engine/hub.py)
        self._will = will or (
            self.topics.status,
            status_payload(
                session,
                "offline",
                "connection lost: the engine stopped without a clean disconnect",
                model_id=model_id,
            ),
        )
        self._client: Any = None
        self._protocol_in_use: str | None = None
        self._state = "idle"
        self._sent = 0
        self._dropped = 0
        self._reconnects = 0
        self._ever_connected = False
        self._last_error: str | None = None
        self._last_error_utc: str | None = None
        self._unsent_at_close = 0
        self._task: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None
        self._connected_event: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._failure: asyncio.Future[str] | None = None

    # ----------------------------------------------------------------- public API

    def __repr__(self) -> str:
        return f"MqttPublisher({self.settings.url}, session={self.session!r}, state={self._state})"

    @property
    def stats(self) -> MqttStats:
        return MqttStats(
            url=self.settings.url,
            state=self._state,
            connected=self._state == "connected",
            protocol=self._protocol_in_use,
            sent=self._sent,
            queued=len(self._waiting) + len(self._inflight),
            inflight=len(self._inflight),
            dropped=self._dropped,
            reconnects=self._reconnects,
            last_error=self._last_error,
            last_error_utc=self._last_error_utc,
            unsent_at_close=self._unsent_at_close,
        )

    async def start(self) -> None:
        """Start the connection task (returns at once, even if the broker is unreachable)."""
        if self._task is not None:
            return
        logging.getLogger("asyncio").addFilter(_STALE_SOCKET_FILTER)  # idempotent
        self._drained = asyncio.Event()
        self._drained.set()
        self._connected_event = asyncio.Event()
        self._closing = asyncio.Event()
        if self._initial is not None:
            self._enqueue_status(self._initial)
        self._state = "connecting"
        self._task = asyncio.create_task(self._run(), name=f"mqtt-publisher-{self.session}")

    def publish_prediction(self, prediction: Prediction) -> None:
        """Queue one prediction (QoS ``settings.qos``) on ``<prefix>/<session>/prediction``."""
        self._check_session(prediction)
        payload = encode(prediction_payload(prediction))
        self._enqueue(
            _Outgoing("prediction", self.topics.prediction, payload, self.settings.qos, False)
        )

    def publish_physio(
        self,
        prediction: Prediction,
        *,
        heart_rate_quality: float | None = None,
        respiration_rate_quality: float | None = None,
    ) -> None:
        """Queue the TR's heart and respiration rate on ``<prefix>/<session>/physio``."""
        self._check_session(prediction)
        payload = encode(
            physio_payload(
                prediction,
                heart_rate_quality=heart_rate_quality,
                respiration_rate_quality=respiration_rate_quality,
            )
        )
        self._enqueue(_Outgoing("physio", self.topics.physio, payload, self.settings.qos, False))

    def publish_marker(self, timestamp: float, text: str) -> None:
        """Queue a trial marker (QoS ``settings.qos``) on ``<prefix>/<session>/marker``."""
        payload = encode(marker_payload(self.session, timestamp, text))
        self._enqueue(_Outgoing("marker", self.topics.marker, payload, self.settings.qos, False))

    def set_status(
        self, state: str, reason: str = "", details: dict[str, Any] | None = None
    ) -> None:
        """Queue a retained status (``online``, ``degraded``, ``paused``, ...; QoS 1)."""
        self._enqueue_status(
            status_payload(self.session, state, reason, model_id=self.model_id, details=details)
        )

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected (True) or ``timeout`` seconds (False)."""
        if self._connected_event is None:
            raise RuntimeError("MqttPublisher.start() was not called")
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued message was acknowledged (True) or ``timeout`` (False)."""
        if self._drained is None:
            raise RuntimeError("MqttPublisher.start() was not called")
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0, reason: str = "engine stopped") -> bool:
        """Publish status ``offline``, deliver the queue (up to ``timeout`` s), disconnect.

        Returns True when everything was delivered; otherwise the count of what was not is in
        ``stats.unsent_at_close`` and a warning is logged.
        """
        if self._task is None or self._closing is None:
            return True
        if self._closing.is_set():
            await asyncio.gather(self._task, return_exceptions=True)
            return self._unsent_at_close == 0
        self._enqueue_status(
            status_payload(self.session, "offline", reason, model_id=self.model_id)
        )
        delivered = await self.flush(timeout)
        self._closing.set()
        # connected: let the clean disconnect happen; not connected, the task may be inside a
        # connect attempt (up to connect_timeout_s) that can no longer deliver anything, so a
        # stop with the broker gone takes `timeout` plus about a second, not twice as long
        grace = max(1.0, timeout) if self._state == "connected" else 1.0
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace)
        except (asyncio.TimeoutError, Exception):
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        unsent = len(self._waiting) + len(self._inflight)
        self._unsent_at_close = unsent
        if unsent:
            log.warning(
                "MQTT publisher closed with %d message(s) not delivered to %s (%s)",
                unsent,
                self.settings.url,
                self._last_error or "timeout",
            )
        self._state = "closed"
        return delivered and unsent == 0

    async def __aenter__(self) -> MqttPublisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(
            reason="engine stopped" if exc is None else f"engine error: {exc_type.__name__}"
        )

    # ----------------------------------------------------------------- queue

    def _check_session(self, prediction: Prediction) -> None:
        if prediction.session != self.session:
            raise PayloadError(
                f"prediction for session {prediction.session!r} given to the publisher of"
                f" session {self.session!r}"
            )

    def _enqueue_status(self, payload: dict[str, Any], topic: str | None = None) -> _Outgoing:
        msg = _Outgoing("status", topic or self.topics.status, encode(payload), 1, True)
        self._statuses[msg.topic] = msg
        self._enqueue(msg)
        return msg

    def _enqueue(self, msg: _Outgoing) -> None:
        if self._closing is not None and self._closing.is_set():
            raise RuntimeError("MqttPublisher is closed")
        while len(self._waiting) + len(self._inflight) >= self.settings.queue_capacity:
            if not self._drop_oldest():
                break
        self._waiting.append(msg)
        if self._drained is not None:
            self._drained.clear()
        self._launch()

    def _drop_oldest(self) -> bool:
        victim = next((m for m in self._waiting if m.kind != "status"), None)
        if victim is None:
            victim = self._waiting[0] if self._waiting else None
        if victim is None:
            return False
        self._waiting.remove(victim)
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 100 == 0:
            log.warning(
                "MQTT queue full (%d messages): dropped %d oldest message(s) so far",
                self.settings.queue_capacity,
                self._dropped,
            )
        return True

    def _launch(self) -> None:
        """Put waiting messages on the wire while connected and the in-flight window allows."""
        client = self._client
        if client is None or self._failure is None or self._failure.done():
            return
        window = min(self.settings.max_inflight, self.settings.queue_capacity)
        while self._waiting and len(self._inflight) < window:
            msg = self._waiting.popleft()
            task = asyncio.ensure_future(self._publish(client, msg))
            self._inflight.append((msg, task))
            task.add_done_callback(self._on_published)

    async def _publish(self, client: Any, msg: _Outgoing) -> None:
        await client.publish(
            msg.topic,
            msg.payload,
            qos=msg.qos,
            retain=msg.retain,
            properties=self._properties(msg.kind),
            timeout=self.settings.publish_timeout_s,
        )

    def _on_published(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return  # the connection went away; _requeue_inflight put the message back
        exc = task.exception()
        if exc is not None:
            if self._failure is not None and not self._failure.done():
                self._failure.set_result(f"publish failed: {exc}")
            return
        for i, (_msg, t) in enumerate(self._inflight):
            if t is task:
                del self._inflight[i]
                self._sent += 1
                break
        if not self._waiting and not self._inflight and self._drained is not None:
            self._drained.set()
        self._launch()

    def _requeue_inflight(self) -> None:
        """Put unacknowledged messages back at the front, in their original order."""
        pending = list(self._inflight)
        self._inflight.clear()
        for _msg, task in pending:
            task.remove_done_callback(self._on_published)
            task.cancel()
        self._waiting.extendleft(msg for msg, _ in reversed(pending))

    # ----------------------------------------------------------------- connection

    def _properties(self, kind: str) -> Any:
        if self._protocol_in_use != "5":
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if kind != "status" and self.settings.message_expiry_s:
            props.MessageExpiryInterval = int(self.settings.message_expiry_s)
        return props

    def _make_client(self, protocol: str) -> Any:
        import aiomqtt

        will_topic, will_payload = self._will[0], encode(self._will[1])
        s = self.settings
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5
            if protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            # No will properties: brokers that only speak 3.1.1 (amqtt) then fail to parse the
            # CONNECT instead of refusing the protocol version, and the fallback never happens.
            will=aiomqtt.Will(will_topic, will_payload, 1, True),
            timeout=s.connect_timeout_s,
            keepalive=s.keepalive,
            tls_context=self._ssl_context,
            tls_insecure=True if (s.tls and s.tls_insecure) else None,
            logger=logging.getLogger(f"{__name__}.client"),
        )
        # aiomqtt warns above this many unacknowledged calls; our window is the real bound.
        client.pending_calls_threshold = s.max_inflight + 10
        return client

    async def _broker_speaks_mqtt5(self) -> bool:
        """Probe with a minimal MQTT 5 CONNECT (no will, no credentials), then disconnect.

        Why a probe: a 3.1.1-only broker (amqtt) parses an MQTT 5 CONNECT as 3.1.1; with a will
        or credentials it can misread a length and wait for bytes that never come, instead of
        refusing the version. A minimal CONNECT is always refused cleanly (code 1 or 132). Any
        other answer, including "not authorized", comes from an MQTT 5 broker. Network errors
        propagate to the normal reconnect handling.
        """
        import aiomqtt
        from aiomqtt.exceptions import MqttConnectError

        probe = aiomqtt.Client(
            self.settings.host,
            self.settings.port,
            identifier=f"emorecog-probe-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self.settings.connect_timeout_s,
            tls_context=self._ssl_context,
            tls_insecure=True if (self.settings.tls and self.settings.tls_insecure) else None,
            logger=logging.getLogger(f"{__name__}.client"),
        )
        try:
            await probe.__aenter__()
        except MqttConnectError as exc:
            return getattr(exc.rc, "value", exc.rc) not in _REFUSED_PROTOCOL_CODES
        with contextlib.suppress(aiomqtt.MqttError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(probe.__aexit__(None, None, None), 2.0)
        return True

    def _set_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("MQTT %s: %s", self.settings.url, message)
        self._last_error = message
        self._last_error_utc = utc_now()

    def _describe(self, exc: BaseException) -> str:
        from aiomqtt.exceptions import MqttConnectError

        if isinstance(exc, MqttConnectError):
            user = f" (user {self.settings.username!r})" if self.settings.username else ""
            return f"broker {self.settings.url} refused the connection: {exc}{user}"
        text = str(exc) or type(exc).__name__
        if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(exc, ssl.SSLError):
            return f"TLS handshake with {self.settings.url} failed: {text}"
        return f"cannot reach MQTT broker at {self.settings.url}: {text}"

    async def _run(self) -> None:
        import aiomqtt
        from aiomqtt.exceptions import MqttConnectError

        assert self._closing is not None
        protocol: str | None = None if self.settings.protocol == "auto" else self.settings.protocol
        attempt = 0
        while not self._closing.is_set():
            self._state = "connecting"
            try:
                if protocol is None:
                    protocol = "5" if await self._broker_speaks_mqtt5() else "3.1.1"
                    log.info("MQTT %s: using MQTT %s", self.settings.url, protocol)
                client = self._make_client(protocol)
                await client.__aenter__()
            except MqttConnectError as exc:
                code = getattr(exc.rc, "value", exc.rc)
                if (
                    self.settings.protocol == "auto"
                    and protocol == "5"
                    and code in _REFUSED_PROTOCOL_CODES
                ):
                    log.info("MQTT %s refused MQTT 5; using 3.1.1", self.settings.url)
                    protocol = "3.1.1"
                    continue
                self._state = "refused"
                self._set_error(self._describe(exc))
            except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
                self._state = "disconnected"
                self._set_error(self._describe(exc))
            except Exception as exc:  # a bug must not silently stop delivery: log and retry
                log.exception("MQTT connection attempt to %s failed", self.settings.url)
                self._state = "disconnected"
                self._set_error(f"unexpected error connecting to {self.settings.url}: {exc!r}")
            else:
                attempt = 0
                try:
                    await self._serve(client, protocol)
                except Exception as exc:
                    log.exception("MQTT connection to %s failed", self.settings.url)
                    self._set_error(f"unexpected error on {self.settings.url}: {exc!r}")
                if self._closing.is_set():
                    break
            attempt += 1
            delay = min(
                self.settings.reconnect_max_s, self.settings.reconnect_min_s * 2 ** (attempt - 1)
            ) * random.uniform(0.8, 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        self._state = "closed"

    async def _serve(self, client: Any, protocol: str) -> None:
        """One connected period: deliver the queue until the connection fails or we close."""
        import aiomqtt

        assert self._closing is not None and self._connected_event is not None
        self._protocol_in_use = protocol
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        self._state = "connected"
        self._connected_event.set()
        self._failure = asyncio.get_running_loop().create_future()
        # The retained status may be gone (a broker restart without persistence): send it again.
        resend = [m for m in self._statuses.values() if m not in self._waiting]
        if resend:
            self._waiting.extendleft(reversed(resend))
            if self._drained is not None:
                self._drained.clear()
        self._client = client
        log.info("MQTT connected to %s (MQTT %s)", self.settings.url, protocol)
        self._launch()

        async def watch_disconnect() -> None:
            async for _ in client.messages:  # we subscribe to nothing: this ends on disconnect
                pass

        watcher = asyncio.ensure_future(watch_disconnect())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait(
                {watcher, closing, self._failure}, return_when=asyncio.FIRST_COMPLETED
            )
            if watcher in done:
                exc = watcher.exception() if not watcher.cancelled() else None
                cause = exc.__cause__ if exc is not None and exc.__cause__ else exc
                self._set_error(f"connection to {self.settings.url} lost: {cause or 'closed'}")
            elif self._failure in done:
                self._set_error(self._failure.result())
        finally:
            self._client = None
            for fut in (watcher, closing):
                fut.cancel()
            if not self._failure.done():
                self._failure.set_result("connection ended")
            self._connected_event.clear()
            self._requeue_inflight()
            self._state = "disconnected"
            with contextlib.suppress(
                aiomqtt.MqttError, OSError, asyncio.TimeoutError, RuntimeError
            ):
                await asyncio.wait_for(client.__aexit__(None, None, None), 2.0)


class SessionChannel:
    """One session's topics on a connection shared by many sessions (the hub's).

    Why: a hub serving 64 sessions with one connection each would hold 64 sockets, 64
    keep-alive timers and 64 publisher tasks; the sessions' messages go through one
    :class:`MqttPublisher` (one queue, one in-flight window, in order) instead. The channel has
    the publisher's interface for one session (``publish_*``, ``set_status``, ``stats``,
    ``start``, ``close``), so an engine cannot tell the difference; its statuses say which hub
    serves it (``hub`` in the status details), because the connection's Last Will is the hub's
    (one will per connection): a subscriber that sees the hub's status go ``offline`` knows
    every session whose status names that hub is offline too.
    """

    def __init__(
        self,
        publisher: MqttPublisher,
        session: str,
        *,
        hub: str,
        model_id: str | None = None,
        initial_state: str | None = "starting",
        initial_reason: str = "waiting for the fMRI stream",
    ) -> None:
        self.publisher = publisher
        self.settings = publisher.settings
        self.session = session
        self.hub = hub
        self.model_id = model_id
        self.topics = Topics.for_session(session, publisher.settings.topic_prefix)
        self._initial = (initial_state, initial_reason) if initial_state is not None else None
        self._closed = False
        self._last_status: _Outgoing | None = None

    @property
    def stats(self) -> MqttStats:
        """The shared connection's state and counters."""
        return self.publisher.stats

    async def start(self) -> None:
        if self._initial is not None:
            self.set_status(*self._initial)

    def publish_prediction(self, prediction: Prediction) -> None:
        self._check_session(prediction)
        payload = encode(prediction_payload(prediction))
        topic, qos = self.topics.prediction, self.settings.qos
        self.publisher._enqueue(_Outgoing("prediction", topic, payload, qos, False))

    def publish_physio(
        self,
        prediction: Prediction,
        *,
        heart_rate_quality: float | None = None,
        respiration_rate_quality: float | None = None,
    ) -> None:
        self._check_session(prediction)
        payload = encode(
            physio_payload(
                prediction,
                heart_rate_quality=heart_rate_quality,
                respiration_rate_quality=respiration_rate_quality,
            )
        )
        qos = self.settings.qos
        self.publisher._enqueue(_Outgoing("physio", self.topics.physio, payload, qos, False))

    def publish_marker(self, timestamp: float, text: str) -> None:
        payload = encode(marker_payload(self.session, timestamp, text))
        qos = self.settings.qos
        self.publisher._enqueue(_Outgoing("marker", self.topics.marker, payload, qos, False))

    def set_status(
        self, state: str, reason: str = "", details: dict[str, Any] | None = None
    ) -> None:
        if self._closed:
            return
        payload = status_payload(
            self.session,
            state,
            reason,
            model_id=self.model_id,
            details={**(details or {}), "hub": self.hub},
        )
        self._last_status = self.publisher._enqueue_status(payload, self.topics.status)

    async def close(self, timeout: float = 5.0, reason: str = "engine stopped") -> bool:
        """Publish this session's ``offline`` and wait (up to ``timeout``) until the broker
        has it; the shared connection stays up for the other sessions."""
        if self._closed:
            return True
        self.set_status("offline", reason)
        self._closed = True
        offline = self._last_status
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            queued = offline in self.publisher._waiting or any(
                m is offline for m, _ in self.publisher._inflight
            )
            if not queued or self.publisher._state == "closed":
                return not queued
            await asyncio.sleep(0.02)
        return False

    def _check_session(self, prediction: Prediction) -> None:
        if prediction.session != self.session:
            raise PayloadError(
                f"prediction for session {prediction.session!r} given to the channel of"
                f" session {self.session!r}"
            )
