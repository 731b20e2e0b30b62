"""Assembling a running engine from a :class:`~emorecog_stream.config.Config`.

``run`` and ``demo`` (and the end-to-end tests) share this: load the model, start the
embedded broker when no URL is configured, open the MQTT publisher, the JSONL log and the
dashboard (or the headless log line), resolve the LSL streams, and run the
:class:`~emorecog_stream.engine.session.Engine` until Ctrl-C, ``--duration`` or :meth:`Engine.stop`.
Every user mistake found on the way (bad model path, unwritable log, stream not found or of the
wrong shape, bad MQTT settings) becomes a :class:`RunError` with a message that says what was
expected and what was found, before anything starts publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from emorecog_stream.config import Config
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.gc_pause import freeze_long_lived
from emorecog_stream.engine.outputs import DashboardOutput, MarkerLog, MqttOutput, RunSummaryLog
from emorecog_stream.engine.session import Chunk as EngineChunk
from emorecog_stream.engine.session import Engine, EngineCounters, Output
from emorecog_stream.engine.state import ROLE_LABEL, ROLE_RATES


class RunError(Exception):
    """A problem the user can fix (printed without a traceback by the commands)."""


@dataclass
class RunHooks:
    """Optional callbacks for embedding the engine (the demo and the tests use them)."""

    on_engine: Callable[[Engine], None] | None = None  # the engine exists, streams resolved
    on_broker: Callable[[str], None] | None = None  # the broker URL in use


def load_model_for(config: Config) -> Any:
    """The model named in ``[model] path`` (empty: the shipped default)."""
    from emorecog_stream.model import load_model

    path = config.model.path or None
    try:
        return load_model(path)
    except FileNotFoundError as exc:
        raise RunError(f"model not found: {exc}") from None
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise RunError(f"cannot load model {path or '(default)'}: {exc}") from None


def mqtt_settings_for(config: Config, url: str) -> Any:
    """:class:`~emorecog_stream.sinks.mqtt.MqttSettings` from the ``[mqtt]`` section."""
    from emorecog_stream.sinks.mqtt import MqttConfigError, MqttSettings

    m = config.mqtt
    options: dict[str, Any] = {
        "topic_prefix": m.topic_prefix,
        "queue_capacity": m.queue_size,
        "message_expiry_s": m.message_expiry or None,
        "tls_insecure": m.tls_insecure,
        "allow_insecure": m.allow_insecure,
    }
    for key, value in (
        ("username", m.username),
        ("ca_file", m.tls_ca),
        ("cert_file", m.tls_cert),
        ("key_file", m.tls_key),
        ("client_id", m.client_id),
    ):
        if value:
            options[key] = value
    try:
        return MqttSettings.from_url(
            url,
            password_env=m.password_env or None,
            password_file=m.password_file or None,
            **options,
        )
    except MqttConfigError as exc:
        raise RunError(f"MQTT settings: {exc}") from None


def inlet_specs(config: Config) -> list[Any]:
    """One LSL inlet spec per enabled stream role."""
    from emorecog_stream.adapters.lsl_inlet import InletSpec

    specs = []
    for role in config.streams.enabled_roles():
        s = getattr(config.streams, role.value)
        try:
            specs.append(
                InletSpec(
                    role=role,
                    name=s.name,
                    type=s.type,
                    source_id=s.source_id,
                    channels=s.channels if role is not Role.MARKERS else None,
                    rate=s.rate,
                    rate_tolerance=s.rate_tolerance,
                )
            )
        except ValueError as exc:
            raise RunError(f"[streams.{role.value}]: {exc}") from None
    return specs


def listen_hints(url: str, session: str, prefix: str) -> list[str]:
    """How to watch the predictions (printed at start)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    tls = " --cafile CA.pem" if parts.scheme == "mqtts" else ""
    return [
        f"  emorecog-stream listen --mqtt {url} --session {session}",
        f"  mosquitto_sub -h {host} -p {port}{tls} -t '{prefix}/{session}/#' -v",
    ]


async def run_engine(
    config: Config,
    *,
    model: Any = None,
    time_scale: float = 1.0,
    hooks: RunHooks | None = None,
    out: TextIO | None = None,
    console: Any = None,
    install_signal_handlers: bool = True,
) -> EngineCounters:
    """Run the engine on live LSL streams as ``config`` says; return its counters.

    ``time_scale``: the replay speed of the input (1 for live streams).
    ``out``: where the start-up lines and (headless) log lines go (default stdout).
    """
    from emorecog_stream.adapters.lsl_inlet import InletGroup, LslAdapterError
    from emorecog_stream.sinks.broker import BrokerStartError, EmbeddedBroker
    from emorecog_stream.sinks.jsonl import JsonlLog, JsonlLogError
    from emorecog_stream.sinks.mqtt import MqttPublisher

    hooks = hooks or RunHooks()
    stream = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if model is None:
        model = load_model_for(config)
    session = config.session.id
    async with contextlib.AsyncExitStack() as stack:
        url = config.mqtt.url
        if not url:
            broker = EmbeddedBroker()
            try:
                url = await broker.start()
            except BrokerStartError as exc:
                raise RunError(str(exc)) from None
            stack.push_async_callback(broker.stop)
            say(f"embedded MQTT broker listening on {url}")
        settings = mqtt_settings_for(config, url)
        if hooks.on_broker is not None:
            hooks.on_broker(url)

        log = None
        resume = None
        if config.output.log:
            # a restart on the same session and log (after a crash) numbers on from the log
            resume = log_resume_point(config.output.log, session)
            meta: dict[str, Any] = {"broker": settings.url, "time_scale": time_scale}
            if resume is not None:
                meta["continues"] = {
                    "last_sequence": resume.last_sequence,
                    "previous_run": "clean stop" if resume.clean else "unclean stop",
                }
            try:
                log = JsonlLog(
                    config.output.log,
                    session=session,
                    model_id=str(model.model_id),
                    # time_scale: a replay's speed, so `report` can give session seconds
                    meta=meta,
                )
            except JsonlLogError as exc:
                raise RunError(str(exc)) from None
            stack.callback(log.close)  # no-op after the engine closed it

        physio = [r for r in config.streams.enabled_roles() if r in ROLE_RATES]
        # markers and motion are optional: recorded / used whenever they exist, and looked
        # for in the background (a bridge started after the engine is picked up then)
        optional = [*physio, Role.MARKERS, Role.MOTION]
        group = InletGroup(inlet_specs(config), optional=optional)
        say(f"looking for the fMRI stream ({_describe_stream(config, Role.FMRI)}) ...")
        try:
            # real seconds: finding a stream has nothing to do with the replay speed
            metas = await group.open(timeout=config.engine.resolve_timeout)
        except LslAdapterError as exc:
            raise RunError(str(exc)) from None
        except asyncio.TimeoutError:  # the resolver thread itself overran (a starved machine)
            raise RunError(
                f"no answer from the LSL resolver within {config.engine.resolve_timeout:g} s"
                f" (+5 s grace) while looking for the fMRI stream"
                f" ({_describe_stream(config, Role.FMRI)}); is the machine overloaded?"
            ) from None
        stack.push_async_callback(group.close)

        note = restart_note(resume)
        publisher = MqttPublisher(
            settings,
            session,
            model_id=str(model.model_id),
            initial_state="starting",
            initial_reason=f"{note}; waiting for the fMRI stream"
            if note
            else "waiting for the fMRI stream",
        )
        await publisher.start()
        outputs: list[Output] = [MqttOutput(publisher)]
        engine_box: list[Engine] = []
        if log is not None:
            # closed after MQTT flushed and before the log's session_end: final counters
            outputs.append(
                RunSummaryLog(log, lambda: publisher.stats, lambda: engine_box[0].counters)
            )
            outputs.append(log)
            if config.streams.markers.enabled:
                outputs.append(MarkerLog(log))

        def snapshot() -> Any:
            return engine_box[0].snapshot(mqtt=publisher.stats)

        dashboard_output: DashboardOutput | None = None
        # Piped (`demo | tee log`) or run as a service, a live view only prints its last frame
        # at exit: print a line per TR there instead (a console given by the caller is kept).
        interactive = console is not None or bool(getattr(stream, "isatty", lambda: False)())
        if config.output.dashboard and not interactive:
            say("output is not a terminal: one line per TR instead of the dashboard")
        if config.output.dashboard and interactive:
            from emorecog_stream.sinks.dashboard import Dashboard

            dashboard_output = DashboardOutput(Dashboard(console=console), snapshot)
            outputs.append(dashboard_output)
        else:
            from emorecog_stream.sinks.dashboard import LogLinePrinter

            outputs.append(LogLinePrinter(out, mqtt_state=lambda: _mqtt_state(publisher.stats)))

        engine = Engine(config, model, outputs, time_scale=time_scale, broker_url=settings.url)
        engine_box.append(engine)
        if resume is not None and resume.last_sequence is not None:
            engine.continue_from(resume.last_sequence + 1, note)
            say(f"{note}: predictions continue at sequence {resume.last_sequence + 1}")
        if log is not None:
            log.on_error = lambda text: engine.set_output_problem(
                "log", f"session log not written: {text}" if text else None
            )
        for role, meta in metas.items():
            engine.register_stream(role, meta.name, meta.nominal_srate)
        # physiology is optional: give it a moment to connect so the first steps wait for it
        for role, meta in (await _wait_optional(group, physio, 2.0)).items():
            engine.register_stream(role, meta.name, meta.nominal_srate)
        say(f"model {model.model_id}; session {session!r}; predictions on {settings.url}:")
        for line in listen_hints(settings.url, session, config.mqtt.topic_prefix):
            say(line)
        if hooks.on_engine is not None:
            hooks.on_engine(engine)
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, engine.stop)
                    installed.append(sig)
        if dashboard_output is not None:
            dashboard_output.start()
        freeze_long_lived()  # set up: no full garbage collection in the middle of a step
        try:
            counters = await engine.run(engine_chunks(group, engine))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await engine.aclose()
        say(("\n" if dashboard_output is not None else "") + run_summary(engine, publisher, log))
        return counters


async def _wait_optional(group: Any, roles: list[Role], timeout: float) -> dict[Role, Any]:
    """Metadata of the optional streams that connect within ``timeout`` s (start-up only)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    found: dict[Role, Any] = {}
    while True:
        for role in roles:
            inlet = group.inlets.get(role)
            if inlet is not None and inlet.metadata is not None:
                found[role] = inlet.metadata
        if len(found) == len(roles) or loop.time() >= end:
            return found
        await asyncio.sleep(0.05)


async def engine_chunks(group: Any, engine: Engine) -> Any:
    """Chunks for the engine; inlet state events become notes on the engine's status.
    ``group``: an :class:`~emorecog_stream.adapters.lsl_inlet.InletGroup`, or a hub's
    ``SessionInlets``."""
    from emorecog_stream.adapters.lsl_inlet import Chunk, StreamEvent

    registered: set[Role] = set()

    def register(role: Role) -> None:
        # streams resolved in the background: their declared rate is known now. On connecting,
        # not on the first chunk: a Motion stream's first sample may trail its volume's, and
        # the engine must know by then that it is to wait for it.
        if role in registered:
            return
        meta = group.inlets[role].metadata if role in group.inlets else None
        if meta is not None:
            registered.add(role)
            engine.register_stream(role, meta.name, meta.nominal_srate)

    async for item in group:
        if isinstance(item, Chunk):
            register(item.role)
            yield EngineChunk(item.role, item.data, item.timestamps, item.receipt_time)
        elif isinstance(item, StreamEvent) and item.state.value == "connected":
            register(item.role)
        elif isinstance(item, StreamEvent) and item.state.value == "error":
            engine.stream_absent(item.role, f"{ROLE_LABEL[item.role]} stream: {item.reason}")


def _describe_stream(config: Config, role: Role) -> str:
    s = getattr(config.streams, role.value)
    parts = [
        f"{k}={v!r}"
        for k, v in (("name", s.name), ("type", s.type), ("source_id", s.source_id))
        if v
    ]
    return " ".join(parts)


def log_resume_point(path: str, session: str) -> Any:
    """Where an earlier run of ``session`` in the JSONL log at ``path`` ended (None: no log,
    no earlier run, or unreadable). Shared with the hub, which opens one log per session."""
    from emorecog_stream.sinks.jsonl import resume_point

    try:
        return resume_point(path, session)
    except OSError:
        return None  # unreadable: opening it for appending will say why


def restart_note(resume: Any) -> str:
    """What the status says about an earlier run of this session in the same log."""
    if resume is None or resume.last_sequence is None:
        return ""
    how = "a clean stop" if resume.clean else "an unclean stop"
    return f"restarted after {how} (the log ended at sequence {resume.last_sequence})"


def _mqtt_state(stats: Any) -> str:
    """The broker connection for the headless line: the state, and the backlog when there is
    one (more than the in-flight window, or anything while not connected), with the dropped
    count, so an outage shows on every line while it lasts."""
    text = stats.state
    waiting = stats.queued - stats.inflight
    if stats.queued and (stats.state != "connected" or waiting > 0):
        text += f" (queued {stats.queued}"
        text += f", dropped {stats.dropped})" if stats.dropped else ")"
    return text


def run_summary(engine: Engine, publisher: Any, log: Any = None) -> str:
    """The line printed when a session stops (shared with the hub: one per session)."""
    c = engine.counters
    s = publisher.stats
    lat = engine.telemetry.latency.summary()
    p50 = f"{lat.p50_ms:.2f}" if lat.p50_ms is not None else "-"
    p99 = f"{lat.p99_ms:.2f}" if lat.p99_ms is not None else "-"
    return (
        f"stopped: {c.predictions} predictions from {c.steps} volumes"
        f" ({c.resets} state resets, {c.deadline_steps} on deadline,"
        f" {c.rejected_chunks} chunks rejected); latency p50 {p50} ms, p99 {p99} ms;"
        f" MQTT sent {s.sent}, unsent {s.unsent_at_close}, dropped {s.dropped}"
        + _log_problems(log)
    )


def _log_problems(log: Any) -> str:
    if log is None or not (log.write_errors or log.reopened):
        return ""
    parts = []
    if log.write_errors:
        parts.append(f"{log.write_errors} line(s) not written ({log.last_error})")
    if log.reopened:
        parts.append(f"file deleted and created again {log.reopened} time(s)")
    return "; session log: " + ", ".join(parts)
