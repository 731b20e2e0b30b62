"""LSL stream descriptions shared by the replay outlets and the live inlets.

Both ends agree on one layout so that an inlet cannot tell a replay from a live setup:

- core fields: name and type from :mod:`emorecog_stream.core.streams`, a stable ``source_id`` per
  role (:data:`DEFAULT_SOURCE_ID`, so inlets recover when an outlet restarts), channel count,
  nominal rate (0 = irregular), float32 channels (string for markers);
- ``desc``: ``channels/channel/{label,unit,type}`` (the XDF convention), plus ``participant``,
  ``tr`` (seconds), ``atlas`` and ``source = "emorecog-stream replay"`` when a replay made it.

This module also formats what the resolver sees (:func:`describe_visible`), which is how a
"stream not found" error tells the user what *is* there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pylsl

from emorecog_stream.core.streams import (
    ATLAS,
    DEFAULT_LSL_NAME,
    DEFAULT_LSL_TYPE,
    MOTION_CHANNELS,
    MOTION_UNITS,
    RATES_CHANNELS,
    RATES_UNITS,
    Role,
    roi_labels,
)

DEFAULT_SOURCE_ID: dict[Role, str] = {role: f"emorecog-stream-{role.value}" for role in Role}
"""Stable source_id per role. Stable ids are what lets liblsl reconnect an inlet to a restarted
outlet (``recover=True``), so a replay or a live bridge should keep them across restarts."""

CHANNEL_TYPE: dict[Role, str] = {
    Role.FMRI: "ROI",
    Role.PPG: "PPG",
    Role.RESP: "RESP",
    Role.RATES: "RATE",
    Role.MARKERS: "Marker",
    Role.MOTION: "Motion",
}

DEFAULT_UNITS: dict[Role, str] = {
    Role.FMRI: "a.u.",
    Role.PPG: "a.u.",
    Role.RESP: "a.u.",
    Role.MARKERS: "",
}


def stream_identity(role: Role, tag: str = "") -> tuple[str, str, str]:
    """(name, type, source_id) of a role's stream; a non-empty ``tag`` is appended to the name
    and the source_id (``EmoRecog-PPG-<tag>``) so parallel runs and tests never see each other."""
    suffix = f"-{tag}" if tag else ""
    return (
        f"{DEFAULT_LSL_NAME[role]}{suffix}",
        DEFAULT_LSL_TYPE[role],
        f"{DEFAULT_SOURCE_ID[role]}{suffix}",
    )


@dataclass(frozen=True)
class OutletDescription:
    """Everything needed to create (and re-create, identically) one outlet."""

    role: Role
    name: str
    type: str
    source_id: str
    channel_count: int
    nominal_srate: float  # Hz; 0 = irregular
    channel_labels: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    participant: str = ""
    tr: float | None = None
    atlas: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_string(self) -> bool:
        return self.role is Role.MARKERS

    def stream_info(self) -> pylsl.StreamInfo:
        """A fresh ``pylsl.StreamInfo`` with the core fields and the desc metadata."""
        info = pylsl.StreamInfo(
            name=self.name,
            type=self.type,
            channel_count=self.channel_count,
            nominal_srate=self.nominal_srate,
            channel_format=pylsl.cf_string if self.is_string else pylsl.cf_float32,
            source_id=self.source_id,
        )
        desc = info.desc()
        channels = desc.append_child("channels")
        ch_type = CHANNEL_TYPE[self.role]
        for i in range(self.channel_count):
            channel = channels.append_child("channel")
            label = self.channel_labels[i] if i < len(self.channel_labels) else f"ch{i + 1}"
            unit = self.units[i] if i < len(self.units) else DEFAULT_UNITS.get(self.role, "")
            channel.append_child_value("label", label)
            channel.append_child_value("unit", unit)
            channel.append_child_value("type", ch_type)
        if self.participant:
            desc.append_child_value("participant", self.participant)
        if self.tr is not None:
            desc.append_child_value("tr", repr(float(self.tr)))
        if self.atlas:
            desc.append_child_value("atlas", self.atlas)
        for key, value in self.extra.items():
            desc.append_child_value(key, value)
        return info


def default_labels(role: Role, n_channels: int) -> tuple[str, ...]:
    """Channel labels a live setup uses for a role (ROIs: BN001..BN246)."""
    if role is Role.FMRI:
        return tuple(roi_labels(n_channels))
    if role is Role.RATES:
        return RATES_CHANNELS[:n_channels]
    if role is Role.MOTION:
        return MOTION_CHANNELS[:n_channels]
    if role is Role.MARKERS:
        return ("marker",)
    return (
        (role.value,)
        if n_channels == 1
        else tuple(f"{role.value}{i + 1}" for i in range(n_channels))
    )


def default_units(role: Role, n_channels: int) -> tuple[str, ...]:
    if role is Role.RATES:
        return RATES_UNITS[:n_channels]
    if role is Role.MOTION:
        return MOTION_UNITS[:n_channels]
    return (DEFAULT_UNITS.get(role, ""),) * n_channels


@dataclass(frozen=True)
class StreamMetadata:
    """What a full ``StreamInfo`` (from ``inlet.info()``) says, as plain Python values."""

    name: str
    type: str
    source_id: str
    channel_count: int
    nominal_srate: float
    channel_format: str
    hostname: str
    uid: str
    channel_labels: tuple[str, ...]
    units: tuple[str, ...]
    channel_types: tuple[str, ...]
    participant: str
    tr: float | None
    atlas: str


_FORMAT_NAMES = {
    pylsl.cf_float32: "float32",
    pylsl.cf_double64: "double64",
    pylsl.cf_string: "string",
    pylsl.cf_int32: "int32",
    pylsl.cf_int16: "int16",
    pylsl.cf_int8: "int8",
    pylsl.cf_int64: "int64",
}


def format_name(channel_format: int) -> str:
    return _FORMAT_NAMES.get(channel_format, f"format{channel_format}")


def _channel_field(info: pylsl.StreamInfo, name: str) -> tuple[str, ...]:
    values: list[str] = []
    channel = info.desc().child("channels").child("channel")
    while not channel.empty():
        values.append(channel.child_value(name))
        channel = channel.next_sibling("channel")
    return tuple(values)


def parse_metadata(info: pylsl.StreamInfo) -> StreamMetadata:
    """Read core fields and our desc layout from a full StreamInfo (missing entries -> empty)."""
    desc = info.desc()
    tr_text = desc.child_value("tr")
    try:
        tr: float | None = float(tr_text) if tr_text else None
    except ValueError:
        tr = None
    if tr is not None and not (math.isfinite(tr) and tr > 0):
        tr = None  # a sender's "nan", "inf" or "-1" is no TR
    return StreamMetadata(
        name=info.name(),
        type=info.type(),
        source_id=info.source_id(),
        channel_count=info.channel_count(),
        nominal_srate=info.nominal_srate(),
        channel_format=format_name(info.channel_format()),
        hostname=info.hostname(),
        uid=info.uid(),
        channel_labels=_channel_field(info, "label"),
        units=_channel_field(info, "unit"),
        channel_types=_channel_field(info, "type"),
        participant=desc.child_value("participant"),
        tr=tr,
        atlas=desc.child_value("atlas"),
    )


def describe_info(info: pylsl.StreamInfo) -> str:
    """One line per stream: ``name='X' type='Y' source_id='Z' channels=1 rate=400 Hz host=h``."""
    rate = info.nominal_srate()
    rate_text = "irregular" if rate == 0 else f"{rate:g} Hz"
    return (
        f"name={info.name()!r} type={info.type()!r} source_id={info.source_id()!r}"
        f" channels={info.channel_count()} format={format_name(info.channel_format())}"
        f" rate={rate_text} host={info.hostname()!r}"
    )


def describe_visible(infos: Sequence[pylsl.StreamInfo]) -> str:
    """A readable list of visible streams for error messages (or a note that there are none)."""
    if not infos:
        return "no LSL streams are visible (is the sender running, and on this network scope?)"
    lines = sorted(describe_info(i) for i in infos)
    return "visible LSL streams:\n  " + "\n  ".join(lines)


def xpath_literal(value: str) -> str:
    """Quote ``value`` for an XPath 1.0 predicate (which has no escape characters)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    parts = value.split("'")
    return "concat(" + ', "\'", '.join(f"'{p}'" for p in parts) + ")"


def build_predicate(name: str = "", type: str = "", source_id: str = "") -> str:
    """XPath predicate matching every non-empty selector (all must match)."""
    terms = [
        f"{key}={xpath_literal(value)}"
        for key, value in (("name", name), ("type", type), ("source_id", source_id))
        if value
    ]
    if not terms:
        raise ValueError("a stream selector needs at least one of name, type or source_id")
    return " and ".join(terms)


__all__ = [
    "ATLAS",
    "CHANNEL_TYPE",
    "DEFAULT_SOURCE_ID",
    "OutletDescription",
    "StreamMetadata",
    "build_predicate",
    "default_labels",
    "default_units",
    "describe_info",
    "describe_visible",
    "format_name",
    "parse_metadata",
    "stream_identity",
    "xpath_literal",
]
