"""The web server's MQTT side: subscribe to the engine's topics and hand each message on.

Why a plain MQTT subscription in the server (and not MQTT over WebSocket in the browser): the
pages must work with whatever broker the engine uses, and many lab brokers have no WebSocket
listener, or have TLS and passwords that must not reach a browser. So this process holds the
one MQTT connection (aiomqtt, MQTT 3.1.1, which every broker speaks, the embedded amqtt one
included), with the same URL, password and TLS handling as the engine
(:class:`~emorecog_stream.sinks.mqtt.MqttSettings`), and the browsers get server-sent events.

The connection is kept up by itself: a lost or refused connection is retried with a backoff
(0.2 s doubling to 5 s), every subscription is made again, and the retained statuses come again
with it. :attr:`health` says at any time what the state is, for the experimenter page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emorecog_stream.sinks.mqtt import MqttSettings
from emorecog_stream.web.state import HUBS_LEVEL, KINDS

log = logging.getLogger(__name__)


@dataclass
class BridgeHealth:
    """The subscriber's connection, as the experimenter page shows it."""

    url: str
    state: str = "idle"  # idle | connecting | connected | disconnected | refused | closed
    connects: int = 0
    messages: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    connected_since: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "connected": self.state == "connected",
            "connects": self.connects,
            "messages": self.messages,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "connected_since": self.connected_since,
        }


def subscription_topics(prefix: str, session: str | None) -> list[str]:
    """``<prefix>/<session or +>/<kind>`` for every kind the pages use, and every hub's status
    (``<prefix>/_hubs/+/status``: a hub's Last Will says its sessions are offline)."""
    level = "+" if session in (None, "", "+") else session
    return [f"{prefix}/{level}/{kind}" for kind in KINDS] + [f"{prefix}/{HUBS_LEVEL}/+/status"]


class MqttBridge:
    """Subscribes with ``settings`` and calls ``on_message(topic, payload, received)`` for each
    message (``received`` = wall-clock seconds), on the event loop's thread."""

    def __init__(
        self,
        settings: MqttSettings,
        on_message: Callable[[str, bytes, float], None],
        *,
        session: str | None = None,
        on_health: Callable[[BridgeHealth], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = subscription_topics(settings.topic_prefix, session)
        self.on_message = on_message
        self.on_health = on_health
        self.health = BridgeHealth(url=settings.url)
        self._ssl_context = settings.ssl_context()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        """Start the connection task; returns at once, whether the broker is there or not."""
        if self._task is None:
            from emorecog_stream.sinks.mqtt import _STALE_SOCKET_FILTER

            logging.getLogger("asyncio").addFilter(_STALE_SOCKET_FILTER)
            self._task = asyncio.create_task(self._run(), name="web-mqtt-bridge")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._set_state("closed")

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.health.state = state
        if error is not None:
            self.health.last_error = error
            self.health.last_error_time = time.time()
        if state != "connected":
            self._connected.clear()
            self.health.connected_since = None
        if self.on_health is not None:
            self.on_health(self.health)

    def _client(self) -> Any:
        import aiomqtt
        from aiomqtt.client import ProtocolVersion

        s = self.settings
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=f"emorecog-web-{uuid.uuid4().hex[:8]}",
            protocol=ProtocolVersion.V311,
            clean_session=True,
            keepalive=s.keepalive,
            timeout=s.connect_timeout_s,
            tls_context=self._ssl_context,
            tls_insecure=s.tls_insecure if s.tls else None,
        )

    async def _run(self) -> None:
        import aiomqtt
        from aiomqtt.exceptions import MqttConnectError

        delay = self.settings.reconnect_min_s
        while True:
            self._set_state("connecting")
            try:
                async with self._client() as client:
                    await client.subscribe([(topic, 1) for topic in self.topics])
                    delay = self.settings.reconnect_min_s
                    self.health.connects += 1
                    self.health.connected_since = time.time()
                    self._set_state("connected")
                    self._connected.set()
                    log.info("web: subscribed on %s to %s", self.settings.url, self.topics)
                    async for message in client.messages:
                        self.health.messages += 1
                        payload = message.payload
                        if isinstance(payload, str):
                            payload = payload.encode()
                        elif not isinstance(payload, (bytes, bytearray)):
                            payload = b""
                        try:
                            self.on_message(str(message.topic), bytes(payload), time.time())
                        except Exception:  # a bug here must not end the subscription
                            log.exception("web: handling a message on %s failed", message.topic)
                self._set_state("disconnected", f"connection to {self.settings.url} closed")
            except MqttConnectError as exc:
                user = f" (user {self.settings.username!r})" if self.settings.username else ""
                self._set_state(
                    "refused", f"broker {self.settings.url} refused the connection: {exc}{user}"
                )
            except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
                self._set_state(
                    "disconnected", f"cannot reach MQTT broker at {self.settings.url}: {exc}"
                )
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            delay = min(self.settings.reconnect_max_s, delay * 2)
