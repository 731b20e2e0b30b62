"""`emorecog-stream web`: the participant's feedback page and the experimenter's page, live.

A local web server (127.0.0.1 unless ``--host``) that subscribes to the engine's MQTT topics
with the engine's own URL, password and TLS handling, and pushes every message to the browsers
(server-sent events). Works with any broker (no MQTT-over-WebSocket listener needed). On a
non-loopback address every URL needs a random token, printed at start. ``demo`` and
``run --web`` start the same server beside the engine. See docs/web.md.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_PORT = 8080


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config ([mqtt] and [web] are used)")
    parser.add_argument(
        "--mqtt", metavar="URL", help="broker mqtt://host:port or mqtts://... (default: config,"
        " else mqtt://127.0.0.1:1883)",
    )
    parser.add_argument(
        "--session", metavar="ID|+", help="only this session (default: every session, '+')"
    )
    parser.add_argument("--port", type=int, metavar="P", help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--host",
        metavar="H",
        help="address to listen on (default 127.0.0.1; any other needs the printed token)",
    )
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument(
        "--password-env", metavar="VAR", help="MQTT password from this environment variable"
    )
    parser.add_argument("--password-file", metavar="FILE", help="MQTT password from this file")
    parser.add_argument("--ca-file", metavar="FILE", help="CA certificate for mqtts://")


def web_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config keys from the flags (None: keep the file's). The URL's user name counts as
    ``[mqtt] username``, so ``--mqtt mqtt://lab@host --password-env VAR`` works as it reads."""
    from urllib.parse import unquote, urlsplit

    url = getattr(args, "mqtt", None)
    try:
        user = urlsplit(url).username if url else None
    except ValueError:
        user = None  # MqttSettings.from_url says what is wrong with the URL
    return {
        "mqtt.username": unquote(user) if user else None,
        "mqtt.url": getattr(args, "mqtt", None),
        "web.session": getattr(args, "session", None),
        "web.port": getattr(args, "port", None),
        "web.host": getattr(args, "host", None),
        "mqtt.password_env": getattr(args, "password_env", None),
        "mqtt.password_file": getattr(args, "password_file", None),
        "mqtt.tls_ca": getattr(args, "ca_file", None),
    }


def server_for(config: Any, url: str, *, settings: Any = None) -> Any:
    """A :class:`~emorecog_stream.web.WebServer` for ``config``'s ``[web]`` section on ``url``."""
    import dataclasses

    from emorecog_stream.engine.runner import mqtt_settings_for
    from emorecog_stream.web import FeedbackDefaults, WebServer

    w = config.web
    if settings is None:
        settings = mqtt_settings_for(config, url)
        # the engine's client id is its own: two clients with one id throw each other off
        settings = dataclasses.replace(settings, client_id=None)
    feedback = FeedbackDefaults(
        session="" if w.session in ("", "+") else w.session,
        target=w.target,
        smooth=w.smooth,
        shape=w.shape,
        color=w.color,
        background=w.background,
        track=w.track,
    )
    return WebServer(
        settings,
        host=w.host,
        port=w.port,
        session=w.session or None,
        history=w.history,
        feedback=feedback,
    )


async def start_server(server: Any, say: Any) -> None:
    """Start ``server``; a taken port is a RunError naming it; print the URLs."""
    from emorecog_stream.engine.runner import RunError

    try:
        await server.start()
    except OSError as exc:
        raise RunError(f"web server: {exc.strerror or exc} (choose another with --port)") from None
    for line in server.start_lines():
        say(line)


def main(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from emorecog_stream.cli import UsageError
    from emorecog_stream.config import ConfigError, apply_overrides, load_config
    from emorecog_stream.engine.runner import RunError
    from emorecog_stream.sinks.payload import PayloadError, validate_session_id

    if args.session not in (None, "+"):
        try:
            validate_session_id(args.session)
        except PayloadError as exc:
            raise UsageError(str(exc)) from None
    if args.duration is not None and not args.duration > 0:
        raise UsageError(f"--duration must be > 0, got {args.duration}")
    try:
        config = apply_overrides(load_config(args.config), web_overrides(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    url = config.mqtt.url or "mqtt://127.0.0.1:1883"

    async def serve() -> None:
        try:
            server = server_for(config, url)
        except ValueError as exc:  # RunError from the MQTT settings is caught below
            raise UsageError(str(exc)) from None
        await start_server(server, lambda line: print(line, flush=True))
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration)
        finally:
            await server.close()

    try:
        asyncio.run(serve())
    except RunError as exc:
        raise UsageError(str(exc)) from None
    return 0


class EngineWeb:
    """The web server beside an engine (``demo``, ``run --web``), for the engine's session.

    It starts when the engine knows its broker URL (``RunHooks.on_broker``, also the embedded
    broker's), prints the two URLs, and is closed after the engine. A taken port moves it to a
    free one (said so); any other failure to start is printed and the engine goes on, since
    the predictions matter more than their display.
    """

    def __init__(self, config: Any, say: Any) -> None:
        self.config = config
        self.say = say
        self.server: Any = None
        self._task: Any = None

    def on_broker(self, url: str) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self._start(url))

    async def _start(self, url: str) -> None:
        import dataclasses
        import errno

        from emorecog_stream.engine.runner import RunError

        config = self.config
        if not config.web.session:
            web = dataclasses.replace(config.web, session=config.session.id)
            config = dataclasses.replace(config, web=web)
        try:
            self.server = server_for(config, url)
            try:
                await start_server(self.server, self.say)
            except RunError:
                if config.web.port == 0:
                    raise
                self.say(f"web: port {config.web.port} is taken; using a free one")
                moved = dataclasses.replace(config, web=dataclasses.replace(config.web, port=0))
                self.server = server_for(moved, url)
                await start_server(self.server, self.say)
        except (RunError, ValueError, OSError) as exc:
            code = getattr(exc, "errno", None)
            detail = "address in use" if code == errno.EADDRINUSE else str(exc)
            self.say(f"web: the pages could not start ({detail}); the engine goes on without them")
            self.server = None

    async def close(self) -> None:
        import asyncio
        import contextlib

        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.server is not None:
            await self.server.close()
