"""The engine's configuration: a TOML file, validated in full before anything starts.

Everything a ``run``/``demo`` flag can set has a key here, so a lab can keep one file per
scanner setup and override a value or two on the command line (flags win over the file).
Validation is strict because a typo in a stream name or a deadline would otherwise only show up
as a silent engine that never predicts: an unknown key is an error naming the key, its section
and the valid keys; a value of the wrong type or range is an error naming the key, what was
expected and what was found.

Layout (see ``examples/config.toml`` for a documented example)::

    [session]   id, duration
    [streams.fmri] / [streams.ppg] / [streams.resp] / [streams.rates] / [streams.markers]
    / [streams.motion]
                enabled, name, type, source_id, channels, rate, rate_tolerance
    [aligner]   hr_window, rr_window, deadline
    [engine]    reset_gap_trs, tr, stall_timeout, fmri_stall_trs, resolve_timeout,
                model_thread, fd_threshold
    [mqtt]      url, username, password_env, password_file, tls_ca, tls_cert, tls_key,
                tls_insecure, allow_insecure, client_id, topic_prefix, queue_size, message_expiry
    [model]     path
    [output]    log, dashboard
    [web]       enabled, host, port, session, history, target, smooth, shape, color,
                background, track

Relative paths in a file (model, log, password and TLS files) are taken relative to the
file's own folder, so a config and its files can move together; paths given as flags are
relative to the current directory as usual.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from emorecog_stream.core.streams import (
    DEFAULT_LSL_NAME,
    DEFAULT_LSL_TYPE,
    MOTION_CHANNELS,
    N_ROIS,
    Role,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration mistake; the message says where, what was expected and what was found."""


MODEL_THREAD_CHOICES = ("auto", "always", "never")

_SESSION_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MQTT_URL = re.compile(
    r"^mqtts?://(?:[^@/\s]+@)?(?:\[[^\]/\s]+\]|[^:/\s@\[\]]+)(?::\d{1,5})?/?$", re.IGNORECASE
)
"""mqtt[s]://[user@]host[:port], host a name, an IPv4 address or an [IPv6] address; the port
digits only (``sinks.mqtt`` checks its range), so a typo is reported here with the file's name."""


@dataclass
class SessionConfig:
    """Session id (used in MQTT topics) and how long to run (0 = until Ctrl-C)."""

    id: str = "live"
    duration: float = 0.0

    def check(self, section: str) -> None:
        if not _SESSION_ID.match(self.id):
            raise ConfigError(
                f"[{section}] id: expected 1-64 characters of letters, digits, '_', '-' or '.'"
                f" (it becomes an MQTT topic level), found {self.id!r}"
            )
        _non_negative(section, "duration", self.duration)


@dataclass
class StreamConfig:
    """How to find one LSL stream and what it must look like.

    Every non-empty selector (``name``, ``type``, ``source_id``) must match; ``channels`` is the
    required channel count; ``rate`` the expected nominal rate in Hz (absent = accept any, which
    is the default for physiology since scanners log at 50-1000 Hz), checked within
    ``rate_tolerance`` (a fraction).
    """

    enabled: bool = True
    name: str = ""
    type: str = ""
    source_id: str = ""
    channels: int = 1
    rate: float | None = None
    rate_tolerance: float = 0.05

    def check(self, section: str) -> None:
        if self.enabled and not (self.name or self.type or self.source_id):
            raise ConfigError(
                f"[{section}]: an enabled stream needs at least one of name, type or source_id"
            )
        if self.channels < 1:
            raise ConfigError(
                f"[{section}] channels: expected an integer >= 1, found {self.channels}"
            )
        if self.rate is not None:
            _non_negative(section, "rate", self.rate)
        if not 0 <= self.rate_tolerance < 1:
            raise ConfigError(
                f"[{section}] rate_tolerance: expected a fraction in [0, 1),"
                f" found {self.rate_tolerance}"
            )


def _default_stream(role: Role, enabled: bool, channels: int) -> StreamConfig:
    return StreamConfig(
        enabled=enabled,
        name=DEFAULT_LSL_NAME[role],
        type=DEFAULT_LSL_TYPE[role],
        channels=channels,
    )


@dataclass
class StreamsConfig:
    """One entry per role. The rates stream is off by default (waveforms are the usual input).

    Markers and motion are on by default and optional: the engine records trial markers in the
    log and flags head motion whenever such a stream exists, and runs as before without them.
    """

    fmri: StreamConfig = field(default_factory=lambda: _default_stream(Role.FMRI, True, N_ROIS))
    ppg: StreamConfig = field(default_factory=lambda: _default_stream(Role.PPG, True, 1))
    resp: StreamConfig = field(default_factory=lambda: _default_stream(Role.RESP, True, 1))
    rates: StreamConfig = field(default_factory=lambda: _default_stream(Role.RATES, False, 2))
    markers: StreamConfig = field(default_factory=lambda: _default_stream(Role.MARKERS, True, 1))
    motion: StreamConfig = field(
        default_factory=lambda: _default_stream(Role.MOTION, True, len(MOTION_CHANNELS))
    )

    def check(self, section: str) -> None:
        for role in Role:
            getattr(self, role.value).check(f"{section}.{role.value}")
        if not self.fmri.enabled:
            raise ConfigError(f"[{section}.fmri] enabled: the fMRI stream cannot be disabled")
        if self.fmri.channels != N_ROIS:
            raise ConfigError(
                f"[{section}.fmri] channels: expected {N_ROIS} (Brainnetome ROIs),"
                f" found {self.fmri.channels}"
            )
        for role, n in (
            (Role.PPG, 1),
            (Role.RESP, 1),
            (Role.RATES, 2),
            (Role.MARKERS, 1),
            (Role.MOTION, len(MOTION_CHANNELS)),
        ):
            stream = getattr(self, role.value)
            if stream.channels != n:
                raise ConfigError(
                    f"[{section}.{role.value}] channels: expected {n}, found {stream.channels}"
                )

    def enabled_roles(self) -> list[Role]:
        return [role for role in Role if getattr(self, role.value).enabled]


@dataclass
class AlignerSettings:
    """Physiology windows and the deadline after a volume's timestamp (seconds).

    A step is emitted as soon as every expected physiology stream has caught up with the
    volume, or at ``volume time + deadline`` with the late modality flagged. The defaults are
    the aligner's own (``aligner.AlignerConfig``), so live steps equal ``align_session``'s.
    A stream the engine has found stalled is not waited for at all.
    """

    hr_window: float = 15.0
    rr_window: float = 30.0
    deadline: float = 2.0

    def check(self, section: str) -> None:
        for key in ("hr_window", "rr_window", "deadline"):
            _positive(section, key, getattr(self, key))


@dataclass
class EngineSettings:
    """Session segmentation and stall detection.

    ``reset_gap_trs``: a gap between volumes longer than this many TRs resets the model state
    (the first prediction after carries the flag ``state_reset``). ``tr``: the TR in seconds;
    absent = from the fMRI stream's nominal rate, else measured from the first volumes.
    ``stall_timeout``: seconds without physiology samples before the stream is called stalled
    (predictions go on, status degraded). ``fmri_stall_trs``: TRs without a volume before the
    status says predictions are paused. ``resolve_timeout``: seconds to wait for each stream at
    start before giving up (fMRI) or running without it (physiology). ``model_thread``: where
    model steps run: ``auto`` (the light NumPy stepper inline on the event loop, any other
    model, or one whose steps take over 2 ms, in one worker thread so a slow step does not hold
    up arriving chunks), ``always`` or ``never``. ``fd_threshold``: framewise displacement
    (mm) above which a prediction carries the ``motion`` flag (needs a ``Motion`` stream; 0.5 mm
    is the usual censoring threshold, Power et al. 2012).
    """

    reset_gap_trs: float = 3.0
    tr: float | None = None
    stall_timeout: float = 2.0
    fmri_stall_trs: float = 2.5
    resolve_timeout: float = 10.0
    model_thread: str = "auto"
    fd_threshold: float = 0.5

    def check(self, section: str) -> None:
        _positive(section, "reset_gap_trs", self.reset_gap_trs)
        if self.tr is not None:
            _positive(section, "tr", self.tr)
        _positive(section, "stall_timeout", self.stall_timeout)
        _positive(section, "fmri_stall_trs", self.fmri_stall_trs)
        _positive(section, "resolve_timeout", self.resolve_timeout)
        if self.model_thread not in MODEL_THREAD_CHOICES:
            choices = ", ".join(repr(c) for c in MODEL_THREAD_CHOICES)
            raise ConfigError(
                f"[{section}] model_thread: expected one of {choices}, found {self.model_thread!r}"
            )
        _positive(section, "fd_threshold", self.fd_threshold)


@dataclass
class MqttConfig:
    """Broker and publishing. ``url`` empty = start the embedded broker.

    The password itself is never in the file: ``password_env`` names an environment variable,
    ``password_file`` a file holding it. ``message_expiry`` is the MQTT 5 message expiry in
    seconds (0 = none); ``queue_size`` bounds the predictions kept while the broker is away.
    ``allow_insecure`` lets a password go in clear (``mqtt://``) to a broker that is not on this
    machine; without it that is an error before anything connects.
    """

    url: str = ""
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_insecure: bool = False
    allow_insecure: bool = False
    client_id: str = ""
    topic_prefix: str = "emorecog"
    queue_size: int = 10000
    message_expiry: int = 3600

    def check(self, section: str) -> None:
        if self.url and not _MQTT_URL.match(self.url):
            raise ConfigError(
                f"[{section}] url: expected mqtt://host[:port] or mqtts://host[:port],"
                f" found {self.url!r}"
            )
        if self.password_env and self.password_file:
            raise ConfigError(f"[{section}]: give either password_env or password_file, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ConfigError(f"[{section}]: a password needs a username")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"[{section}]: tls_cert and tls_key go together")
        if not self.topic_prefix or re.search(r"[+#\s]", self.topic_prefix):
            raise ConfigError(
                f"[{section}] topic_prefix: expected a non-empty topic without '+', '#' or"
                f" spaces, found {self.topic_prefix!r}"
            )
        if self.queue_size < 1:
            raise ConfigError(f"[{section}] queue_size: expected >= 1, found {self.queue_size}")
        if self.message_expiry < 0:
            raise ConfigError(
                f"[{section}] message_expiry: expected seconds >= 0, found {self.message_expiry}"
            )

    def __repr__(self) -> str:  # keep file paths but never anything secret
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"MqttConfig({fields})"


@dataclass
class ModelConfig:
    """``path`` empty = the shipped default checkpoint; ``keras-v1:PATH`` for the Keras port."""

    path: str = ""

    def check(self, section: str) -> None:
        pass


@dataclass
class OutputConfig:
    """``log``: JSONL audit log path (empty = none). ``dashboard``: rich dashboard or log lines."""

    log: str = ""
    dashboard: bool = True

    def check(self, section: str) -> None:
        pass


_WEB_TARGETS = ("negative", "neutral", "positive", "intensity")
_WEB_SHAPES = ("thermometer", "bar", "circle")


@dataclass
class WebConfig:
    """The live web pages (``emorecog-stream web``, ``run --web``, ``demo``; docs/web.md).

    ``enabled`` starts them with ``run``; ``host``/``port`` where they listen (any host but
    loopback needs the token printed at start); ``session`` only this session (empty: all);
    ``history`` predictions kept for a newly opened page. The rest are the feedback page's
    defaults, which its URL overrides: ``target`` (a category or ``intensity``), ``smooth``
    (mean over that many TRs), ``shape`` and the colours (CSS colours).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    session: str = ""
    history: int = 600
    target: str = "positive"
    smooth: int = 3
    shape: str = "thermometer"
    color: str = "#4fb3d9"
    background: str = "#000000"
    track: str = "#1c1c1c"

    def check(self, section: str) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"[{section}] port: expected 0..65535, found {self.port}")
        if not self.host:
            raise ConfigError(f"[{section}] host: expected an address, found an empty string")
        if self.history < 1:
            raise ConfigError(f"[{section}] history: expected >= 1, found {self.history}")
        if not 1 <= self.smooth <= 100:
            raise ConfigError(f"[{section}] smooth: expected 1..100 TRs, found {self.smooth}")
        if self.target not in _WEB_TARGETS:
            raise ConfigError(
                f"[{section}] target: expected one of {', '.join(_WEB_TARGETS)},"
                f" found {self.target!r}"
            )
        if self.shape not in _WEB_SHAPES:
            raise ConfigError(
                f"[{section}] shape: expected one of {', '.join(_WEB_SHAPES)},"
                f" found {self.shape!r}"
            )


@dataclass
class Config:
    session: SessionConfig = field(default_factory=SessionConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    aligner: AlignerSettings = field(default_factory=AlignerSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    web: WebConfig = field(default_factory=WebConfig)

    def check(self) -> None:
        """Validate every section (also run after flags are applied)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f.name)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a TOML config; ``None`` gives the defaults."""
    if path is None:
        config = Config()
        config.check()
        return config
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    try:
        config = config_from_dict(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Build a validated :class:`Config` from parsed TOML (a nested mapping)."""
    config = _build(Config, data, section="")
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    config.check()
    return config


def apply_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Return a copy of ``config`` with dotted keys (``"mqtt.url"``) replaced; ``None`` = keep.

    Used by the commands to let flags win over the file; the result is validated again.
    """
    new = dataclasses.replace(config)
    for f in dataclasses.fields(new):  # deep enough copy: sections are flat dataclasses
        setattr(new, f.name, _deep_copy(getattr(config, f.name)))
    for dotted, value in overrides.items():
        if value is None:
            continue
        *sections, key = dotted.split(".")
        target: Any = new
        for name in sections:
            if not hasattr(target, name):
                raise ConfigError(f"unknown config section {name!r} in override {dotted!r}")
            target = getattr(target, name)
        if not dataclasses.is_dataclass(target) or key not in {
            f.name for f in dataclasses.fields(target)
        }:
            raise ConfigError(f"unknown config key {dotted!r}")
        hint = get_type_hints(type(target))[key]
        setattr(target, key, _convert(hint, value, ".".join(sections), key))
    new.check()
    return new


def _deep_copy(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _deep_copy(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        )
    return obj


def _build(cls: type, data: Mapping[str, Any], section: str) -> Any:
    where = f"[{section}]" if section else "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, found {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        kind = "section" if not section else "key"
        raise ConfigError(
            f"unknown {kind} {unknown[0]!r} in {where}; valid: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    default = cls()
    for name, value in data.items():
        hint = hints[name]
        sub = f"{section}.{name}" if section else name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{sub}]: expected a table, found {_describe(value)}")
            kwargs[name] = _merge(hint, getattr(default, name), value, sub)
        else:
            kwargs[name] = _convert(hint, value, section, name)
    return dataclasses.replace(default, **kwargs)


def _merge(cls: type, default: Any, data: Mapping[str, Any], section: str) -> Any:
    """Like ``_build`` but starting from ``default`` (stream tables keep their role defaults)."""
    built = _build(cls, data, section)
    overrides = {name: getattr(built, name) for name in data}
    return dataclasses.replace(default, **overrides)


def _convert(hint: Any, value: Any, section: str, key: str) -> Any:
    where = f"[{section}] {key}" if section else key
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, section, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, found {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, found {_describe(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, found {value}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, found {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, found {_describe(value)}")
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}.get(
        type(value), "table" if isinstance(value, Mapping) else type(value).__name__
    )
    return f"{kind} {value!r}"


def _positive(section: str, key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"[{section}] {key}: expected a number > 0, found {value}")


def _non_negative(section: str, key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"[{section}] {key}: expected a number >= 0, found {value}")


def _resolve_paths(config: Config, base: Path) -> None:
    def rel(p: str) -> str:
        return str(base / p) if p and not Path(p).is_absolute() else p

    for key in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        setattr(config.mqtt, key, rel(getattr(config.mqtt, key)))
    config.output.log = rel(config.output.log)
    model = config.model.path
    if model.startswith("keras-v1:"):
        config.model.path = "keras-v1:" + rel(model[len("keras-v1:") :])
    else:
        config.model.path = rel(model)


def to_toml(config: Config) -> str:
    """The config as TOML text (what ``load_config`` reads back to an equal config)."""
    lines: list[str] = []

    def emit(section: str, obj: Any) -> None:
        simple = [
            f for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(getattr(obj, f.name))
        ]
        if simple:
            lines.append(f"[{section}]")
            for f in simple:
                value = getattr(obj, f.name)
                if value is None:
                    continue
                lines.append(f"{f.name} = {_toml_value(value)}")
            lines.append("")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                emit(f"{section}.{f.name}" if section else f.name, value)

    emit("", config)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
