"""`emorecog-stream run`: the engine on live LSL streams, publishing predictions over MQTT.

Everything a flag sets can also live in a TOML file (``--config``, see
``examples/config.toml``); flags win over the file. Without ``--mqtt`` (and no ``[mqtt] url``)
an embedded broker is started on 127.0.0.1:1883, or on a free port if that one is taken.
"""

from __future__ import annotations

import argparse
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    parser.add_argument(
        "--mqtt",
        metavar="URL",
        help="broker URL mqtt://host:port or mqtts://host:port (default: embedded broker)",
    )
    parser.add_argument("--session", metavar="ID", help="session id, used in the MQTT topics")
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="model checkpoint (.pt) or keras-v1:PATH.h5 (default: the shipped checkpoint)",
    )
    parser.add_argument("--log", metavar="FILE", help="append a JSONL audit log of predictions")
    parser.add_argument(
        "--web", action="store_true", help="also serve the live web pages (docs/web.md)"
    )
    parser.add_argument(
        "--web-port", type=int, metavar="P", help="port of the web pages (default 8080)"
    )
    parser.add_argument(
        "--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)"
    )
    parser.add_argument(
        "--no-dashboard",
        action="store_true",
        help="print one log line per TR instead of the terminal dashboard",
    )
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow sending the MQTT password in clear (mqtt://) to a broker off this machine",
    )
    parser.add_argument(
        "--replay-speed",
        type=float,
        default=1.0,
        metavar="X",
        help="the streams are a replay sped up X times (`replay --speed X`; soak tests, demos):"
        " windows, deadlines and stall timeouts stay in session seconds (default 1: live)",
    )
    parser.add_argument(
        "--sessions",
        metavar="FILE|auto",
        help="a hub: serve every session listed in FILE ([[session]] id, tag; read again when"
        " it changes), or with 'auto' every fMRI stream found on the network, in this one"
        " process with one model and one MQTT connection (docs/hub.md); --log then names a"
        " folder for <id>.jsonl",
    )
    parser.add_argument(
        "--include",
        metavar="GLOB",
        help="with --sessions auto: only fMRI streams whose source id or name match GLOB"
        " (e.g. 'emorecog-stream-fmri-scanner*'), so hubs can split a network's sessions",
    )
    parser.add_argument(
        "--hub-id",
        metavar="ID",
        help="with --sessions: the hub's name on MQTT (<prefix>/_hubs/<ID>/status and its Last"
        " Will; default <hostname>-<pid>)",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=30.0,
        metavar="S",
        help="with --sessions auto: stop a session whose fMRI stream has been gone S seconds"
        " (default 30)",
    )


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags set (None = not given, keep the file's value)."""
    return {
        "mqtt.url": args.mqtt,
        "session.id": args.session,
        "model.path": args.model,
        "output.log": args.log,
        "session.duration": args.duration,
        "output.dashboard": False if args.no_dashboard else None,
        "web.enabled": True if getattr(args, "web", False) else None,
        "web.port": getattr(args, "web_port", None),
        "mqtt.allow_insecure": True if args.allow_insecure else None,
    }


def load_config_with_flags(args: argparse.Namespace) -> Any:
    """The validated config: file (if any), then flags; a mistake is a UsageError."""
    from emorecog_stream.cli import UsageError
    from emorecog_stream.config import ConfigError, apply_overrides, load_config

    try:
        config = load_config(args.config)
        return apply_overrides(config, overrides_from(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def main(args: argparse.Namespace) -> int:
    import asyncio

    from emorecog_stream.adapters.lsl_log import quiet_liblsl
    from emorecog_stream.cli import UsageError
    from emorecog_stream.engine.runner import RunError, run_engine

    config = load_config_with_flags(args)
    speed = float(args.replay_speed)
    if not (speed > 0 and speed < float("inf")):
        raise UsageError(f"--replay-speed: expected a number > 0, found {args.replay_speed}")
    quiet_liblsl()  # before the first LSL call: liblsl's INFO lines would cover the dashboard
    if getattr(args, "sessions", None):
        from emorecog_stream.commands.run_hub import run_sessions_file

        return run_sessions_file(config, args.sessions, speed, args)
    for flag in ("include", "hub_id"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-')} goes with --sessions")
    try:
        asyncio.run(_run(config, speed, run_engine))
    except RunError as exc:
        raise UsageError(str(exc)) from None
    return 0


async def _run(config: Any, speed: float, run_engine: Any) -> None:
    """The engine, and beside it the live web pages when ``[web] enabled`` (``--web``)."""
    from emorecog_stream.commands.web import EngineWeb
    from emorecog_stream.engine.runner import RunHooks

    if not config.web.enabled:
        await run_engine(config, time_scale=speed)
        return
    web = EngineWeb(config, lambda line: print(line, flush=True))
    try:
        await run_engine(config, time_scale=speed, hooks=RunHooks(on_broker=web.on_broker))
    finally:
        await web.close()
