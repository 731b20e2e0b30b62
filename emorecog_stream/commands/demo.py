"""`emorecog-stream demo`: the whole system on one machine with no arguments.

An embedded MQTT broker, an in-process replay of a shipped synthetic session as real LSL
streams, the engine reading them exactly as it reads a live scanner, and the dashboard. The
session comes from ``replay_data/`` next to the package (a source checkout); where that folder
is not there (an installed wheel), the same session is generated in memory from its recorded
seed, which takes a fraction of a second and gives identical data.

The replay runs ``--speed`` times faster than real time; the engine is told, and stretches its
clock back, so heart rates, windows and deadlines mean what they mean in a real scan.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

DEFAULT_PARTICIPANT = 15  # P15: held out from the default model's training (split P15-P16)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speed", type=float, default=1.0, metavar="X", help="replay speed (default 1 = real time)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="stop after S seconds (default: at the end of the session, or Ctrl-C)",
    )
    parser.add_argument(
        "--no-dashboard",
        action="store_true",
        help="print one log line per TR instead of the terminal dashboard",
    )
    parser.add_argument(
        "--session-file",
        metavar="PATH",
        help="replay this recording instead of the shipped session (XDF, ICBHI folder, ...)",
    )
    parser.add_argument("--mqtt", metavar="URL", help="publish to this broker instead")
    parser.add_argument(
        "--model", metavar="PATH", help="checkpoint or keras-v1:PATH (default: the shipped one)"
    )
    parser.add_argument("--log", metavar="FILE", help="append a JSONL audit log of predictions")
    parser.add_argument(
        "--web-port", type=int, metavar="P", help="port of the live web pages (default 8080)"
    )
    parser.add_argument("--no-web", action="store_true", help="do not start the live web pages")
    parser.add_argument(
        "--scanner",
        action="store_true",
        help="the whole chain from image files: a simulated scanner writes the session's volumes"
        " into an export folder, the scanner bridge turns them into the fMRI and Motion streams"
        " (docs/scanner.md), the session's physiology is replayed beside them",
    )
    parser.add_argument(
        "--scanner-format",
        default="dicom",
        choices=("dicom", "dicom-slices", "dicom-enhanced", "nifti", "nifti-gz"),
        help="with --scanner: what the simulated scanner writes (default: Siemens-style mosaic"
        " DICOM, one file per volume)",
    )


def replay_data_dir() -> Path:
    """``replay_data/`` of a source checkout (next to the package folder)."""
    return Path(__file__).resolve().parents[2] / "replay_data"


def demo_sessions(session_file: str | None = None) -> tuple[list[Any], str]:
    """The sessions to replay and a sentence saying where they came from."""
    from emorecog_stream.cli import UsageError

    if session_file:
        from emorecog_stream.recordings import load_sessions

        try:
            return list(load_sessions(session_file)), f"replaying {session_file}"
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot replay {session_file}: {exc}") from None
    folder = replay_data_dir()
    files = sorted(folder.glob("*.xdf*")) if folder.is_dir() else []
    if files:
        from emorecog_stream.recordings import load_sessions

        try:
            sessions = list(load_sessions(files[0]))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the shipped session {files[0]}: {exc}") from None
        return sessions[:1], f"replaying the shipped synthetic session {files[0].name}"
    from emorecog_stream.recordings.synth import SynthConfig, generate_session

    session = generate_session(DEFAULT_PARTICIPANT, SynthConfig())
    return [session], (
        f"replay_data/ not found: replaying synthetic participant {session.participant}"
        f" generated in memory (seed {SynthConfig().seed})"
    )


def demo_config(args: argparse.Namespace, tag: str) -> Any:
    """The engine config for the demo's replayed streams (tagged names: no clash with a lab)."""
    from emorecog_stream.adapters.lsl_info import stream_identity
    from emorecog_stream.config import apply_overrides, load_config
    from emorecog_stream.core.streams import Role

    overrides: dict[str, Any] = {
        "session.id": "demo",
        "mqtt.url": args.mqtt,
        "model.path": args.model,
        "output.log": args.log,
        "output.dashboard": False if args.no_dashboard else None,
        "session.duration": args.duration,
        "web.enabled": not getattr(args, "no_web", False),
        "web.port": getattr(args, "web_port", None),
    }
    for role in Role:  # every role, markers and motion included: never a lab's streams
        name, type_, source_id = stream_identity(role, tag)
        overrides[f"streams.{role.value}.name"] = name
        overrides[f"streams.{role.value}.type"] = type_
        overrides[f"streams.{role.value}.source_id"] = source_id
    return apply_overrides(load_config(None), overrides)


def main(args: argparse.Namespace) -> int:
    import asyncio

    from emorecog_stream.adapters.lsl_log import quiet_liblsl
    from emorecog_stream.cli import UsageError
    from emorecog_stream.config import ConfigError
    from emorecog_stream.engine.runner import RunError, RunHooks, run_engine

    if not args.speed > 0:
        raise UsageError(f"--speed must be > 0, got {args.speed}")
    quiet_liblsl()  # before the first LSL call: liblsl's INFO lines would cover the dashboard
    sessions, origin = demo_sessions(args.session_file)
    tag = uuid.uuid4().hex[:8]
    try:
        config = demo_config(args, tag)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    print(origin)
    try:
        if getattr(args, "scanner", False):
            asyncio.run(
                _demo_scanner(
                    config, sessions[0], args.speed, tag, args.scanner_format, run_engine, RunHooks
                )
            )
        else:
            asyncio.run(_demo(config, sessions, args.speed, tag, run_engine, RunHooks))
    except RunError as exc:
        raise UsageError(str(exc)) from None
    return 0


async def _demo(
    config: Any, sessions: list[Any], speed: float, tag: str, run_engine: Any, hooks_cls: Any
) -> None:
    import asyncio

    from emorecog_stream.adapters.replay import Replayer, ReplayError
    from emorecog_stream.cli import UsageError
    from emorecog_stream.core.streams import Role

    try:
        replayer = Replayer(sessions, speed=speed, tag=tag)
    except ReplayError as exc:
        raise UsageError(str(exc)) from None
    replayer.open()  # outlets visible before the engine resolves them
    loop = asyncio.get_running_loop()
    from emorecog_stream.commands.web import EngineWeb

    web = EngineWeb(config, lambda line: print(line, flush=True))
    on_broker = web.on_broker if config.web.enabled else None

    def on_engine(engine: Any) -> None:
        def finished() -> None:
            # start once the engine's inlets are connected, so no sample is missed
            replayer.wait_for_consumers([Role.FMRI, Role.PPG, Role.RESP], timeout=5.0)
            replayer.start(delay=0.2)
            replayer.join()
            # let the last volumes pass their deadline, then stop
            grace = (config.aligner.deadline + 0.5) / speed
            loop.call_soon_threadsafe(loop.call_later, grace, engine.stop)

        loop.run_in_executor(None, finished)

    try:
        await run_engine(
            config, time_scale=speed, hooks=hooks_cls(on_engine=on_engine, on_broker=on_broker)
        )
    finally:
        await asyncio.to_thread(replayer.stop)
        await web.close()


async def _demo_scanner(
    config: Any,
    session: Any,
    speed: float,
    tag: str,
    fmt: str,
    run_engine: Any,
    hooks_cls: Any,
) -> None:
    """``demo --scanner``: scanner-sim -> export folder -> bridge -> engine, physiology beside."""
    import asyncio

    from emorecog_stream.cli import UsageError
    from emorecog_stream.commands.web import EngineWeb
    from emorecog_stream.scanner.bridge import BridgeError
    from emorecog_stream.scanner.rehearsal import ScannerRehearsal

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        rehearsal = ScannerRehearsal(session, tag=tag, speed=speed, fmt=fmt, say=say)
    except BridgeError as exc:
        raise UsageError(str(exc)) from None
    loop = asyncio.get_running_loop()
    web = EngineWeb(config, say)
    on_broker = web.on_broker if config.web.enabled else None

    def on_engine(engine: Any) -> None:
        def scan() -> None:
            rehearsal.start_acquisition()
            rehearsal.join()
            grace = (config.aligner.deadline + 2.0) / speed  # the last file, then its deadline
            loop.call_soon_threadsafe(loop.call_later, grace, engine.stop)

        loop.run_in_executor(None, scan)

    try:
        await rehearsal.start_bridge()
        await run_engine(
            config, time_scale=speed, hooks=hooks_cls(on_engine=on_engine, on_broker=on_broker)
        )
    finally:
        await rehearsal.aclose()
        await web.close()
