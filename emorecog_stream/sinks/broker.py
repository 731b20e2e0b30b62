"""Embedded MQTT broker (amqtt, in-process, asyncio) for ``demo`` and ``run`` without ``--mqtt``.

Why: a fresh machine has no broker, and the one-command demo must still publish somewhere that
``emorecog-stream listen`` and ``mosquitto_sub`` can read. The broker listens on
``127.0.0.1:1883``; if that port is taken (e.g. a system Mosquitto), it picks a free port and
:attr:`EmbeddedBroker.url` says which. It listens on loopback only and allows anonymous clients,
so it is a local convenience, not a production broker: for a lab network use a real broker
(Mosquitto, EMQX, ...) with TLS and passwords and pass its URL.

amqtt speaks MQTT 3.1.1 only, so the publisher falls back from MQTT 5 (its ``protocol="auto"``
setting) and publishes without MQTT 5 properties there.

    async with EmbeddedBroker() as broker:
        print(broker.url)   # mqtt://127.0.0.1:1883 (or another port)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from types import TracebackType
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883

log = logging.getLogger(__name__)


class BrokerStartError(RuntimeError):
    """The embedded broker could not listen (names the address and the cause)."""


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (SO_REUSEADDR, as servers use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous auth: no $SYS publisher and no per-packet logging plugins.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class EmbeddedBroker:
    """An amqtt broker in this event loop, on ``host:port`` or a free port if that is taken.

    ``fallback_to_free_port=False`` makes a taken port an error instead (used for restarts on the
    same port). ``quiet=True`` lowers amqtt's own loggers to ERROR: it logs every connection, and a
    warning for each MQTT 5 probe that it refuses (the publisher then falls back to 3.1.1).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        fallback_to_free_port: bool = True,
        quiet: bool = True,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.fallback_to_free_port = fallback_to_free_port
        self._broker: Any = None
        if quiet:
            for name in ("amqtt", "transitions"):
                logging.getLogger(name).setLevel(logging.ERROR)

    @property
    def url(self) -> str:
        """``mqtt://host:port`` once started."""
        if self.port is None:
            raise RuntimeError("the embedded broker is not started")
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def moved(self) -> bool:
        """True when the requested port was taken and another one is used."""
        return self.port is not None and self.port != self.requested_port

    async def start(self) -> str:
        """Start listening; return the URL. Raises :class:`BrokerStartError` with the cause."""
        if self._broker is not None:
            return self.url
        from amqtt.broker import Broker

        candidates = [self.requested_port]
        if self.fallback_to_free_port:
            candidates += [0, 0, 0]  # 0: ask the OS for a free port (retried on a race)
        last_exc: BaseException | None = None
        for candidate in candidates:
            port = candidate
            if candidate == 0:
                port = free_port(self.host)
            elif self.fallback_to_free_port and not port_is_free(self.host, port):
                last_exc = OSError(errno.EADDRINUSE, f"port {port} is in use")
                continue
            broker = Broker(_config(self.host, port))
            try:
                await broker.start()
            except Exception as exc:
                last_exc = exc
                with contextlib.suppress(Exception):
                    await broker.shutdown()
                continue
            self._broker = broker
            self.port = port
            if self.moved:
                log.info(
                    "port %d is taken; embedded broker listens on %s", self.requested_port, self.url
                )
            return self.url
        raise BrokerStartError(
            f"embedded MQTT broker could not listen on {self.host}:{self.requested_port}"
            f"{' or a free port' if self.fallback_to_free_port else ''}: {last_exc}"
        )

    async def stop(self) -> None:
        """Close the listener and every client connection (idempotent)."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=10.0)
        except Exception as exc:  # a broken shutdown must not hide the caller's own error
            log.warning("embedded broker shutdown: %s", exc)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
