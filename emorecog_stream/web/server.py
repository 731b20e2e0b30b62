"""The local web server: the two pages, their assets, and the live feed as server-sent events.

Why aiohttp: the server must live in the same asyncio loop as the MQTT subscriber (and, for
``run --web`` and ``demo``, as the engine), serve a handful of files and one long-lived event
stream per browser. aiohttp does exactly that in one well-kept library. starlette needs uvicorn
(and anyio, h11, click) beside it and uvicorn expects to own the loop and the signals; the
standard library has no asyncio HTTP server, and writing our own request parser for a page
that may face a lab network is not a place to save a dependency.

Why server-sent events and not WebSocket: the data flows one way, ``EventSource`` reconnects by
itself after the server or the network comes back, and it is plain HTTP.

Endpoints: ``/`` (experimenter page), ``/feedback`` (participant's display), ``/static/<file>``
(the shipped assets, read once at start, nothing else on disk is reachable), ``/events``
(``?session=ID`` for one session; first a ``snapshot`` event with the current state, then every
message, and a ``health`` event each second) and ``/api/state`` (the snapshot as JSON). A hub's
``offline`` (its Last Will) reaches the pages as a ``status`` event for each of its sessions,
derived by :class:`~emorecog_stream.web.state.HubWatch` (``"derived_from_hub": true``), so
the pages need no notion of hubs; the snapshot lists the hubs' statuses under ``hubs``.

Safety: loopback only unless told otherwise. On any other address every request needs the
random token, as ``?token=`` (it is then kept in a same-site, HTTP-only cookie for the page's
assets and event stream). On loopback the ``Host`` header must name a loopback address, so a
web page elsewhere cannot reach the server through DNS rebinding. Every response carries a
Content-Security-Policy that allows only this server's own scripts (no inline script): even a
marker that got into the page as markup could not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from emorecog_stream.web.bridge import MqttBridge
from emorecog_stream.web.state import LiveState, MessageError, Update

log = logging.getLogger(__name__)

TOKEN_COOKIE = "emorecog_web_token"
HEARTBEAT_S = 1.0
CLIENT_QUEUE = 2048  # events waiting for one slow browser before it is cut off (it reconnects)

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SHAPES = ("thermometer", "bar", "circle")
TARGETS = ("negative", "neutral", "positive", "intensity")


@dataclass(frozen=True)
class FeedbackDefaults:
    """The feedback page's settings when its URL does not give them (``[web]`` config)."""

    session: str = ""
    target: str = "positive"
    smooth: int = 3
    shape: str = "thermometer"
    color: str = "#4fb3d9"
    background: str = "#000000"
    track: str = "#1c1c1c"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"feedback target must be one of {TARGETS}, got {self.target!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"feedback shape must be one of {SHAPES}, got {self.shape!r}")
        if not 1 <= self.smooth <= 100:
            raise ValueError(f"feedback smoothing must be 1..100 TRs, got {self.smooth}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _load_assets() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("emorecog_stream.web").joinpath("static")
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _CONTENT_TYPES:
            assets[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return assets


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class _Client:
    """One browser's event stream: a bounded queue of encoded events."""

    def __init__(self, session: str | None) -> None:
        self.session = session
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)
        self.overflowed = False

    def offer(self, data: bytes | None) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.overflowed = True  # the handler ends the stream; EventSource reconnects


class WebServer:
    """The web pages for the sessions on one broker. ``async with WebServer(...) as web:``.

    ``host``/``port``: where to listen (port 0: a free one). ``session``: only this session
    (None: every session on the broker). ``token``: required on non-loopback hosts (a random
    one is made when not given); ignored on loopback unless ``require_token``.
    """

    def __init__(
        self,
        settings: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        session: str | None = None,
        history: int = 600,
        feedback: FeedbackDefaults | None = None,
        token: str | None = None,
        require_token: bool | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = int(port)
        self.session = None if session in (None, "", "+") else session
        self.feedback = feedback or FeedbackDefaults()
        self.require_token = (not is_loopback(host)) if require_token is None else require_token
        self.token = (token or secrets.token_urlsafe(18)) if self.require_token else None
        self.state = LiveState(history=history, prefix=settings.topic_prefix)
        self.bridge = MqttBridge(settings, self._on_mqtt, session=self.session)
        self._assets = _load_assets()
        self._clients: set[_Client] = set()
        self._runner: Any = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.bound_port: int | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # every address: name the machine for the others
            import socket

            host = socket.gethostname()
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.bound_port or self.port}"

    def url(self, path: str = "/", **query: str) -> str:
        """A page's URL (with the token when one is required)."""
        from urllib.parse import urlencode

        params = dict(query)
        if self.token is not None:
            params["token"] = self.token
        return self.base_url + path + (f"?{urlencode(params)}" if params else "")

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page("experimenter.html"))
        app.router.add_get("/feedback", self._page("feedback.html"))
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/events", self._events)
        app.router.add_get("/api/state", self._api_state)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                exc.errno, f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        addresses = self._runner.addresses  # (host, port, ...) of each listening socket
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        await self.bridge.start()
        self._heartbeat = asyncio.create_task(self._beat(), name="web-heartbeat")

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for client in list(self._clients):
            client.offer(None)
        await self.bridge.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start_lines(self) -> list[str]:
        """What to print at start: the two URLs and, off loopback, that a token is needed."""
        lines = [
            f"web: experimenter page {self.url('/')}",
            f"web: feedback page     {self.url('/feedback')}",
            f"web: reading {self.settings.url} ({', '.join(self.bridge.topics)})",
        ]
        if self.require_token:
            lines.append(
                f"web: listening on {self.host}, not loopback: every URL needs ?token=... as"
                " above (anyone with the token can watch the session)"
            )
        return lines

    # ----------------------------------------------------------------- MQTT -> browsers

    def _on_mqtt(self, topic: str, raw: bytes, received: float) -> None:
        try:
            updates = self.state.receive(topic, raw, received)
        except MessageError as exc:
            if self.state.malformed == 1 or self.state.malformed % 100 == 0:
                log.warning(
                    "web: ignoring a message (%d so far): %s", self.state.malformed, exc
                )
            return
        for update in updates:  # a hub's offline: a derived status for each of its sessions
            self._broadcast(update)

    def _broadcast(self, update: Update) -> None:
        try:
            data = _sse(update.event())
        except ValueError:  # a NaN smuggled into a payload: JSON cannot carry it
            log.warning("web: ignoring a %s message with a non-finite number", update.kind)
            return
        for client in self._clients:
            if client.session is None or client.session == update.session:
                client.offer(data)

    def _health(self, session: str | None) -> dict[str, Any]:
        return {
            "type": "health",
            "server_time": time.time(),
            "mqtt": self.bridge.health.as_dict(),
            "malformed": self.state.malformed,
            "last_malformed": self.state.last_malformed,
            "sessions": self.state.counters(session),
        }

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for client in list(self._clients):
                client.offer(_sse(self._health(client.session)))

    def snapshot(self, session: str | None) -> dict[str, Any]:
        return {
            **self._health(session),
            "type": "snapshot",
            "filter": session,
            "feedback": asdict(self.feedback),
            "sessions": self.state.snapshot(session),
            "hubs": self.state.hub_snapshot(),
        }

    # ----------------------------------------------------------------- HTTP

    def _token_ok(self, request: Any) -> bool:
        if self.token is None:
            return True
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _host_ok(self, request: Any) -> bool:
        if self.require_token:
            return True  # the token guards it; the host name may be anything the lab uses
        from urllib.parse import urlsplit

        try:
            host = urlsplit("//" + request.host).hostname or ""
        except ValueError:
            return False
        return is_loopback(host)

    @property
    def _guard(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def guard(request: Any, handler: Any) -> Any:
            if not self._host_ok(request):
                response = web.Response(status=421, text="wrong Host header for a loopback server")
            elif not self._token_ok(request):
                response = web.Response(
                    status=403, text="this server needs ?token=... in the URL (printed at start)"
                )
            else:
                response = await handler(request)
                if self.token is not None and request.query.get("token") == self.token:
                    response.set_cookie(
                        TOKEN_COOKIE, self.token, httponly=True, samesite="Strict", path="/"
                    )
            for key, value in _SECURITY_HEADERS.items():
                response.headers.setdefault(key, value)
            return response

        return guard

    def _page(self, name: str) -> Any:
        from aiohttp import web

        async def handler(request: Any) -> Any:
            body, content_type = self._assets[name]
            return web.Response(body=body, headers={"Content-Type": content_type})

        return handler

    async def _static(self, request: Any) -> Any:
        from aiohttp import web

        asset = self._assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound()
        return web.Response(body=asset[0], headers={"Content-Type": asset[1]})

    def _session_filter(self, request: Any) -> str | None:
        wanted = request.query.get("session") or None
        return self.session if wanted is None else wanted

    async def _api_state(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.snapshot(self._session_filter(request)))

    async def _events(self, request: Any) -> Any:
        from aiohttp import web

        session = self._session_filter(request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        for key, value in _SECURITY_HEADERS.items():
            response.headers[key] = value
        await response.prepare(request)
        client = _Client(session)
        self._clients.add(client)
        try:
            await response.write(b"retry: 1000\n\n" + _sse(self.snapshot(session)))
            while not client.overflowed:
                data = await client.queue.get()
                if data is None:
                    break
                await response.write(data)
        except ConnectionError:
            pass  # the browser went away
        finally:
            self._clients.discard(client)
        with contextlib.suppress(Exception):
            await response.write_eof()
        return response
