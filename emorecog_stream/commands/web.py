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


def web_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "mqtt.url": getattr(args, "mqtt", None),
        "web.session": getattr(args, "session", None),
        "web.port": getattr(args, "port", None),
        "web.host": getattr(args, "host", None),
    }


def server_for(config: Any, url: str, *, settings: Any = None) -> Any:
    """A :class:`~emorecog_stream.web.WebServer` for ``config``'s ``[web]`` section on ``url``."""
    import dataclasses

    from emorecog_stream.runner import mqtt_settings_for
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
    from emorecog_stream.runner import RunError

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
    from emorecog_stream.runner import RunError
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
