"""XDF files: read any recording with role mapping (via pyxdf), write our sessions as XDF.

Why XDF: LabRecorder writes every LSL stream it records to XDF, so one format serves a lab's own
recording of a live session and the project's shipped replay data alike.

Reading. ``pyxdf.load_xdf`` parses the file and applies clock offsets and clock-reset handling.
Its jitter removal is off by default here (timestamps stay as recorded, so our own files round-trip
exactly); pass ``dejitter=True`` to turn it on. Before parsing, the chunk framing is walked so a
truncated file is reported as such instead of being silently cut short.

Role mapping. Each role (:class:`~emorecog_stream.core.streams.Role`) is matched to at most one
stream:

* Default: the stream whose LSL type is ``streams.DEFAULT_LSL_TYPE[role]`` (``fMRI``, ``PPG``,
  ``Respiration``, ``PhysioRates``, ``Markers``; case-insensitive); if several have that type, the
  one named ``streams.DEFAULT_LSL_NAME[role]``; if none has the type, a stream with that name.
* Override with a *selector* per role: comma-separated ``key=value`` terms that must all hold,
  keys ``type``, ``name``, ``source_id`` (exact, case-sensitive) and ``channel`` (pick one channel
  by 0-based index or label, for a multi-channel stream used as PPG or respiration). The selector
  ``none`` leaves the role unmapped. Examples: ``{"ppg": "name=SendDataC,channel=0"}``,
  ``{Role.RESP: "type=Resp"}``. From the command line or a TOML file use ``role=selector`` strings,
  e.g. ``--role ppg=type=EEG``; :func:`parse_role_specs` turns either form into a dict.

Writing. :func:`write_xdf` writes the XDF 1.0 chunk format (magic ``XDF:``; FileHeader,
StreamHeader, Samples, ClockOffset, Boundary and StreamFooter chunks; XML headers with channel
labels, units and types under ``desc/channels/channel``). Every sample carries its timestamp, so
data (float32) and timestamps (float64) read back bit-exactly. A ``.xdfz`` suffix gzips the file
(pyxdf reads it); the gzip header carries no time, so the same session gives the same bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.etree import ElementTree as ET

import numpy as np

from emorecog_stream.core.streams import (
    ATLAS,
    DEFAULT_LSL_NAME,
    DEFAULT_LSL_TYPE,
    N_ROIS,
    RATES_CHANNELS,
    RATES_UNITS,
    Role,
)
from emorecog_stream.recordings.session import Marker, Session, SignalStream

XDF_SUFFIXES = (".xdf", ".xdfz")
_MAGIC = b"XDF:"
_TAG_FILE_HEADER, _TAG_STREAM_HEADER, _TAG_SAMPLES, _TAG_CLOCK_OFFSET = 1, 2, 3, 4
_TAG_BOUNDARY, _TAG_STREAM_FOOTER = 5, 6
_TAG_NAMES = {
    1: "FileHeader",
    2: "StreamHeader",
    3: "Samples",
    4: "ClockOffset",
    5: "Boundary",
    6: "StreamFooter",
}
_BOUNDARY_UUID = bytes.fromhex("43a546dccbf5410fb30ed5467383cbe4")
_SELECTOR_KEYS = ("type", "name", "source_id", "channel")
_SAMPLES_PER_CHUNK = 4096
_BOUNDARY_EVERY_BYTES = 10 * 2**20

log = logging.getLogger(__name__)


class XdfError(ValueError):
    """A file that cannot be read as asked: names the file and what was wrong."""


# --------------------------------------------------------------------------- role selectors


@dataclass(frozen=True)
class Selector:
    """Which stream a role maps to: every given field must match (``None`` = any)."""

    type: str | None = None
    name: str | None = None
    source_id: str | None = None
    channel: str | None = None  # index or label; only used to cut one channel out
    disabled: bool = False

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``"type=EEG,name=X,channel=0"`` or ``"none"``."""
        text = text.strip()
        if text.lower() == "none":
            return cls(disabled=True)
        terms: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in _SELECTOR_KEYS or not value.strip():
                raise ValueError(
                    f"bad stream selector {text!r}: expected comma-separated key=value terms"
                    f" with keys {', '.join(_SELECTOR_KEYS)} (e.g. 'type=EEG' or"
                    f" 'name=SendDataC,channel=0'), or 'none'"
                )
            terms[key] = value.strip()
        if set(terms) <= {"channel"}:
            raise ValueError(f"bad stream selector {text!r}: give type=, name= or source_id=")
        return cls(**terms)

    def matches(self, info: XdfStreamInfo) -> bool:
        return (
            (self.type is None or info.type == self.type)
            and (self.name is None or info.name == self.name)
            and (self.source_id is None or info.source_id == self.source_id)
        )

    def __str__(self) -> str:
        if self.disabled:
            return "none"
        terms = [f"{k}={getattr(self, k)}" for k in _SELECTOR_KEYS if getattr(self, k) is not None]
        return ",".join(terms)


RoleSpecs = Mapping[Role | str, "str | Selector"] | Iterable[str] | None


def _role(key: Role | str) -> Role:
    if isinstance(key, Role):
        return key
    try:
        return Role(str(key).strip().lower())
    except ValueError:
        raise ValueError(
            f"unknown stream role {key!r}: expected one of {', '.join(r.value for r in Role)}"
        ) from None


def parse_role_specs(specs: RoleSpecs) -> dict[Role, Selector]:
    """Role overrides from a mapping (TOML ``[roles]`` table, Python dict) or from
    ``"role=selector"`` strings (repeated CLI flag), e.g. ``["ppg=type=EEG", "resp=none"]``."""
    if specs is None:
        return {}
    items: list[tuple[Role | str, str | Selector]]
    if isinstance(specs, Mapping):
        items = list(specs.items())
    elif isinstance(specs, str):
        raise ValueError(
            f"role overrides: expected a list of 'role=selector' strings, got {specs!r}"
        )
    else:
        items = []
        for spec in specs:
            role, sep, selector = str(spec).partition("=")
            if not sep:
                raise ValueError(
                    f"bad role override {spec!r}: expected role=selector, e.g. 'ppg=type=EEG'"
                )
            items.append((role, selector))
    out: dict[Role, Selector] = {}
    for key, value in items:
        out[_role(key)] = value if isinstance(value, Selector) else Selector.parse(str(value))
    return out


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class XdfStreamInfo:
    """What a file says about one of its streams (used for matching and for error messages)."""

    stream_id: int
    name: str
    type: str
    channel_count: int
    nominal_srate: float
    channel_format: str
    source_id: str
    n_samples: int

    def describe(self) -> str:
        rate = f"{self.nominal_srate:g} Hz" if self.nominal_srate > 0 else "irregular"
        return (
            f"name={self.name!r} type={self.type!r} channels={self.channel_count}"
            f" ({self.channel_format}) rate={rate} samples={self.n_samples}"
            + (f" source_id={self.source_id!r}" if self.source_id else "")
        )


@dataclass
class XdfRecording:
    """The role-mapped streams of one XDF file.

    ``signals`` holds the numeric roles (fMRI, PPG, respiration, rates) that were found;
    ``markers`` the marker stream's samples as text; ``found`` every stream in the file;
    ``session_info`` what our writer (or a replay outlet) put under ``desc/session``.
    """

    path: Path
    signals: dict[Role, SignalStream]
    markers: list[Marker]
    found: list[XdfStreamInfo]
    mapping: dict[Role, XdfStreamInfo]
    session_info: dict[str, Any] = field(default_factory=dict)

    def listing(self) -> str:
        return _listing(self.found)


def _listing(found: list[XdfStreamInfo]) -> str:
    if not found:
        return "  (the file holds no streams)"
    return "\n".join(f"  - {info.describe()}" for info in found)


def _text(info: dict[str, Any], key: str, default: str = "") -> str:
    value = info.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None or isinstance(value, dict) else str(value)


def _first(node: Any) -> Any:
    return node[0] if isinstance(node, list) and node else node


def _desc_channels(info: dict[str, Any]) -> list[dict[str, str]]:
    desc = _first(info.get("desc"))
    if not isinstance(desc, dict):
        return []
    channels = _first(desc.get("channels"))
    if not isinstance(channels, dict):
        return []
    out = []
    for ch in channels.get("channel", []) or []:
        if isinstance(ch, dict):
            out.append({k: _text(ch, k) for k in ("label", "unit", "type")})
    return out


def _desc_session(info: dict[str, Any]) -> dict[str, Any]:
    desc = _first(info.get("desc"))
    if not isinstance(desc, dict):
        return {}
    sess = _first(desc.get("session"))
    if not isinstance(sess, dict):
        return {}
    out: dict[str, Any] = {k: _text(sess, k) for k in sess if k != "metadata_json"}
    raw = _text(sess, "metadata_json")
    if raw:
        try:
            out["metadata"] = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("ignoring unreadable desc/session/metadata_json")
    return out


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".xdfz" or path.suffixes[-2:] == [".xdf", ".gz"]:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


_ITEM_BYTES = {"float32": 4, "double64": 8, "int8": 1, "int16": 2, "int32": 4, "int64": 8}
"""Bytes per value of each XDF channel format; a string value takes at least 2 (its length)."""
_MAX_CHUNK = 2**62  # beyond any real file; keeps seek() offsets in range


@dataclass
class _Framing:
    """What walking the chunks found: where the last intact chunk ends and, if the file is not
    intact, what is wrong (``problem``) and where (the offset of the first bad chunk)."""

    good_end: int = 4
    chunks: int = 0
    problem: str | None = None


def _stream_shape(body: bytes) -> tuple[int, int | None] | None:
    """(stream id, minimum bytes per sample) from a StreamHeader chunk body; the size is None
    when the XML is unreadable (pyxdf then stops at this header with its own parse error)."""
    if len(body) < 4:
        return None
    stream_id = int.from_bytes(body[:4], "little")
    try:
        root = ET.fromstring(body[4:].decode("utf-8", "replace"))  # as pyxdf decodes it
        channels = int((root.findtext("channel_count") or "").strip())
    except (ET.ParseError, ValueError):
        return stream_id, None
    fmt = (root.findtext("channel_format") or "").strip()
    per_value = _ITEM_BYTES.get(fmt, 2)
    return stream_id, 1 + max(channels, 0) * per_value  # 1: the timestamp flag byte


def _scan(path: Path, f: BinaryIO) -> _Framing:
    """Walk the chunk framing without reading sample data.

    Checks that every chunk's length field fits in what is left of the file, and that the
    sample count of every Samples chunk fits in the chunk's bytes given its stream's channel
    count and format. Both are size fields that pyxdf allocates from before reading, so a
    corrupt one would otherwise ask for gigabytes from a small file.
    """
    scan = _Framing()
    if f.read(4) != _MAGIC:
        scan.good_end = 0
        scan.problem = f"{path}: not an XDF file (it does not start with 'XDF:')"
        return scan
    size = None if isinstance(f, gzip.GzipFile) else os.fstat(f.fileno()).st_size
    sample_bytes: dict[int, int | None] = {}
    index = 0
    while True:
        offset = f.tell()
        scan.good_end, scan.chunks = offset, index
        head = f.read(1)
        if not head:
            return scan
        where = f"chunk #{index} at byte {offset}"
        nbytes = head[0]
        if nbytes not in (1, 4, 8):
            scan.problem = (
                f"{path}: corrupt XDF: {where} has a length field of {nbytes} bytes"
                " (expected 1, 4 or 8)"
            )
            return scan
        raw = f.read(nbytes)
        if len(raw) < nbytes:
            scan.problem = f"{path}: truncated XDF: the file ends inside chunk #{index}"
            return scan
        length = int.from_bytes(raw, "little")
        body = f.read(min(length, 2))
        tag = int.from_bytes(body, "little") if len(body) == 2 else -1
        if length < 2 or tag not in _TAG_NAMES:
            scan.problem = (
                f"{path}: corrupt XDF: {where} has tag {tag} and length {length}"
                " (expected tags 1-6)"
            )
            return scan
        start = f.tell()
        left = None if size is None else size - start
        if length > _MAX_CHUNK or (left is not None and length - 2 > left):
            scan.problem = (
                f"{path}: truncated XDF: {where} ({_TAG_NAMES[tag]}) declares {length} bytes"
                f" but the file ends before it does"
                + ("" if left is None else f" ({left} bytes left)")
            )
            return scan
        if tag == _TAG_STREAM_HEADER:
            shape = _stream_shape(f.read(length - 2))
            if shape is not None:
                sample_bytes[shape[0]] = shape[1]
        elif tag == _TAG_SAMPLES:
            problem = _check_samples(f, length - 2, sample_bytes)
            if problem:
                scan.problem = f"{path}: corrupt XDF: {where} (Samples) {problem}"
                return scan
        f.seek(start + length - 2)
        if f.tell() < start + length - 2 or _past_end(f):
            scan.problem = (
                f"{path}: truncated XDF: {where} ({_TAG_NAMES[tag]}) declares {length} bytes"
                " but the file ends before it does"
            )
            return scan
        index += 1


def _check_samples(
    f: BinaryIO, content: int, sample_bytes: dict[int, int | None]
) -> str | None:
    """Why a Samples chunk's sample count cannot be right, or None."""
    head = f.read(min(content, 13))
    if len(head) < 6:
        return f"is {content + 2} bytes long, too short for a stream id and a sample count"
    stream_id, width = int.from_bytes(head[:4], "little"), head[4]
    if width not in (1, 4, 8) or len(head) < 5 + width:
        return f"of stream {stream_id} has a sample count field of {width} bytes"
    count = int.from_bytes(head[5 : 5 + width], "little")
    if stream_id not in sample_bytes:
        return f"belongs to stream {stream_id}, which has no readable StreamHeader before it"
    room = content - 5 - width
    per_sample = sample_bytes[stream_id]
    if per_sample is not None and count * per_sample > room:
        return (
            f"of stream {stream_id} declares {count} samples of at least {per_sample} bytes"
            f" each, but holds {room} bytes"
        )
    return None


def check_framing(path: Path) -> None:
    """Walk the chunk framing; raise :class:`XdfError` if the file is not XDF, is truncated, or
    has a size field (chunk length, sample count) claiming more than the file holds.

    pyxdf recovers what it can from a cut-off file and only logs a warning; a user replaying a
    session must know it is incomplete, so we check first.
    """
    scan = _framing(path)
    if scan.problem:
        raise XdfError(scan.problem)


def _framing(path: Path) -> _Framing:
    try:
        with _open(path) as f:
            return _scan(path, f)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise XdfError(f"{path}: cannot read XDF file: {exc}") from exc


def _past_end(f: BinaryIO) -> bool:
    """True if a seek went beyond the end (plain files allow it; gzip stops at the end)."""
    pos = f.tell()
    if isinstance(f, gzip.GzipFile):
        return False
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return pos > end


def _intact_prefix(path: Path, end: int) -> io.BytesIO:
    """The file's first ``end`` bytes (decompressed for .xdfz), for pyxdf to parse."""
    try:
        with _open(path) as f:
            return io.BytesIO(f.read(end))
    except (OSError, EOFError, zlib.error) as exc:
        raise XdfError(f"{path}: cannot read XDF file: {exc}") from exc


def _load(path: Path, dejitter: bool, strict: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import pyxdf

    path = Path(path)
    if not path.is_file():
        raise XdfError(f"{path}: no such XDF file")
    scan = _framing(path)
    source: Any = str(path)
    if scan.problem:
        if strict:
            raise XdfError(scan.problem)
        # pyxdf would allocate from the corrupt size field: give it the intact chunks only
        log.warning("%s; reading the %d intact chunks before it", scan.problem, scan.chunks)
        if scan.good_end < 4:
            raise XdfError(scan.problem)
        source = _intact_prefix(path, scan.good_end)
    try:
        streams, header = pyxdf.load_xdf(
            source, dejitter_timestamps=dejitter, synchronize_clocks=True
        )
    except Exception as exc:  # pyxdf raises OSError, ParseError, EOFError, struct.error, ...
        raise XdfError(f"{path}: cannot parse XDF: {type(exc).__name__}: {exc}") from exc
    return streams, header or {}


def _info(stream: dict[str, Any]) -> XdfStreamInfo:
    info = stream["info"]
    try:
        rate = float(_text(info, "nominal_srate", "0") or 0)
    except ValueError:
        rate = 0.0
    try:
        channels = int(_text(info, "channel_count", "0") or 0)
    except ValueError:
        channels = 0
    return XdfStreamInfo(
        stream_id=int(info.get("stream_id", 0) or 0),
        name=_text(info, "name"),
        type=_text(info, "type"),
        channel_count=channels,
        nominal_srate=rate,
        channel_format=_text(info, "channel_format"),
        source_id=_text(info, "source_id"),
        n_samples=len(stream["time_stamps"]),
    )


def _match(
    path: Path, found: list[XdfStreamInfo], overrides: dict[Role, Selector]
) -> dict[Role, tuple[XdfStreamInfo, Selector | None]]:
    """Assign streams to roles: explicit selectors first, then the documented defaults."""
    mapping: dict[Role, tuple[XdfStreamInfo, Selector | None]] = {}
    taken: set[int] = set()
    for role, sel in overrides.items():
        if sel.disabled:
            continue
        hits = [info for info in found if sel.matches(info)]
        if not hits:
            raise XdfError(
                f"{path}: no stream matches the {role.value} selector '{sel}'. Streams found:\n"
                + _listing(found)
            )
        if len(hits) > 1:
            raise XdfError(
                f"{path}: {len(hits)} streams match the {role.value} selector '{sel}'; add name="
                " or source_id= to pick one. Matching streams:\n" + _listing(hits)
            )
        mapping[role] = (hits[0], sel)
        taken.add(hits[0].stream_id)
    for role in Role:
        if role in overrides:
            continue
        free = [info for info in found if info.stream_id not in taken]
        want_type, want_name = DEFAULT_LSL_TYPE[role].lower(), DEFAULT_LSL_NAME[role]
        hits = [info for info in free if info.type.lower() == want_type]
        if len(hits) > 1:
            hits = [info for info in hits if info.name == want_name] or hits
        if not hits:
            hits = [info for info in free if info.name == want_name]
        if len(hits) > 1:
            raise XdfError(
                f"{path}: {len(hits)} streams could be the {role.value} stream (type"
                f" {DEFAULT_LSL_TYPE[role]!r}); pick one with a role override such as"
                f" '{role.value}=name=...'. Candidates:\n" + _listing(hits)
            )
        if hits:
            mapping[role] = (hits[0], None)
            taken.add(hits[0].stream_id)
    return mapping


def _numeric(
    path: Path, role: Role, stream: dict[str, Any], info: XdfStreamInfo, sel: Selector | None
) -> SignalStream:
    series = stream["time_series"]
    if isinstance(series, list):
        raise XdfError(
            f"{path}: the {role.value} stream {info.name!r} holds strings"
            f" ({info.channel_format}); a numeric stream was expected"
        )
    data = np.asarray(series)
    if data.size == 0:
        data = np.zeros((0, info.channel_count))
    if data.dtype.kind in "iu":
        data = data.astype(np.float64)
    channels = _desc_channels(stream["info"])
    labels = [c["label"] for c in channels] if len(channels) == data.shape[1] else []
    units = [c["unit"] for c in channels] if len(channels) == data.shape[1] else []
    if sel is not None and sel.channel is not None:
        col = _channel_index(path, role, info, sel.channel, labels)
        data = data[:, col : col + 1]
        labels = labels[col : col + 1]
        units = units[col : col + 1]
    return SignalStream(
        role=role,
        name=info.name,
        type=info.type,
        data=data,
        timestamps=np.asarray(stream["time_stamps"], dtype=np.float64),
        nominal_srate=info.nominal_srate,
        channel_labels=labels,
        units=units,
        source_id=info.source_id,
    )


def _channel_index(
    path: Path, role: Role, info: XdfStreamInfo, channel: str, labels: list[str]
) -> int:
    if channel in labels:
        return labels.index(channel)
    try:
        index = int(channel)
    except ValueError:
        index = -1
    if not 0 <= index < info.channel_count:
        raise XdfError(
            f"{path}: the {role.value} selector asks for channel {channel!r} of stream"
            f" {info.name!r}, which has {info.channel_count} channels"
            + (f" labelled {labels}" if labels else "")
            + f" (use an index 0..{info.channel_count - 1} or a label)"
        )
    return index


def read_xdf_streams(
    path: str | Path,
    roles: RoleSpecs = None,
    *,
    required: Iterable[Role | str] = (),
    dejitter: bool = False,
    strict: bool = True,
) -> XdfRecording:
    """Read any XDF file and return its role-mapped streams (fMRI not needed).

    ``roles``: overrides (see the module docstring). ``required``: roles that must be present;
    if one is missing the error lists every stream found. ``strict=False`` accepts a truncated
    file and keeps what pyxdf recovers.
    """
    path = Path(path)
    overrides = parse_role_specs(roles)
    streams, header = _load(path, dejitter, strict)
    found = [_info(s) for s in streams]
    mapping = _match(path, found, overrides)
    missing = [r for r in (_role(r) for r in required) if r not in mapping]
    if missing:
        names = ", ".join(f"{r.value} (type {DEFAULT_LSL_TYPE[r]!r})" for r in missing)
        raise XdfError(
            f"{path}: no stream for {names}. Map one with a role override such as"
            f" '{missing[0].value}=name=...'. Streams found:\n" + _listing(found)
        )
    by_id = {int(s["info"]["stream_id"]): s for s in streams}
    signals: dict[Role, SignalStream] = {}
    markers: list[Marker] = []
    for role, (info, sel) in mapping.items():
        stream = by_id[info.stream_id]
        if role is Role.MARKERS:
            markers = _markers(stream)
        else:
            signals[role] = _numeric(path, role, stream, info, sel)
    session_info: dict[str, Any] = {}
    file_session = _desc_session({"desc": [header.get("info", {})]})
    session_info.update(file_session)
    if Role.FMRI in mapping:
        session_info.update(_desc_session(by_id[mapping[Role.FMRI][0].stream_id]["info"]))
    return XdfRecording(
        path=path,
        signals=signals,
        markers=markers,
        found=found,
        mapping={role: info for role, (info, _) in mapping.items()},
        session_info=session_info,
    )


def _markers(stream: dict[str, Any]) -> list[Marker]:
    series = stream["time_series"]
    stamps = np.asarray(stream["time_stamps"], dtype=np.float64)
    out = []
    for t, sample in zip(stamps, series, strict=True):
        value = sample[0] if len(sample) else ""
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        out.append(Marker(float(t), str(value)))
    return out


def read_xdf_session(
    path: str | Path,
    roles: RoleSpecs = None,
    *,
    participant: str | None = None,
    tr: float | None = None,
    dejitter: bool = False,
    strict: bool = True,
) -> Session:
    """Read a full :class:`Session` (an fMRI stream of 246 channels is required).

    TR: ``tr`` if given, else ``desc/session/tr`` of the fMRI stream or file header, else
    1 / the fMRI stream's nominal rate, else the median volume interval. Participant: the
    argument, else ``desc/session/participant``, else the file name's stem.
    """
    rec = read_xdf_streams(path, roles, required=[Role.FMRI], dejitter=dejitter, strict=strict)
    fmri = rec.signals[Role.FMRI]
    if fmri.n_channels != N_ROIS:
        raise XdfError(
            f"{rec.path}: the fMRI stream {fmri.name!r} has {fmri.n_channels} channels; expected"
            f" {N_ROIS} (one per Brainnetome ROI)"
        )
    if len(fmri) == 0:
        raise XdfError(f"{rec.path}: the fMRI stream {fmri.name!r} holds no volumes")
    fmri.data = fmri.data.astype(np.float32, copy=False)
    for role in (Role.PPG, Role.RESP):
        stream = rec.signals.get(role)
        if stream is not None and stream.n_channels != 1:
            raise XdfError(
                f"{rec.path}: the {role.value} stream {stream.name!r} has {stream.n_channels}"
                f" channels; expected 1 (pick one with a selector such as"
                f" '{role.value}=name={stream.name},channel=0')"
            )
    rates = rec.signals.get(Role.RATES)
    if rates is not None and rates.n_channels != len(RATES_CHANNELS):
        raise XdfError(
            f"{rec.path}: the rates stream {rates.name!r} has {rates.n_channels} channels;"
            f" expected {len(RATES_CHANNELS)} ({', '.join(RATES_CHANNELS)})"
        )
    info = rec.session_info
    session_tr = tr if tr is not None else _float(info.get("tr"))
    if session_tr is None and fmri.nominal_srate > 0:
        session_tr = 1.0 / fmri.nominal_srate
    if session_tr is None and len(fmri) > 1:
        session_tr = float(np.median(np.diff(fmri.timestamps)))
    if session_tr is None or not session_tr > 0:
        raise XdfError(
            f"{rec.path}: cannot tell the TR (no desc/session/tr, no nominal rate, one volume);"
            " pass tr="
        )
    metadata = dict(info.get("metadata") or {})
    metadata["source_file"] = str(rec.path)
    metadata["stream_mapping"] = {r.value: i.describe() for r, i in rec.mapping.items()}
    return Session(
        participant=participant or info.get("participant") or rec.path.stem,
        tr=float(session_tr),
        fmri=fmri,
        ppg=rec.signals.get(Role.PPG),
        resp=rec.signals.get(Role.RESP),
        rates=rates,
        markers=rec.markers,
        atlas=info.get("atlas") or ATLAS,
        metadata=metadata,
    )


def _float(value: Any) -> float | None:
    """A finite number from header text, else None (a TR of 'inf' or 'nan' is no TR)."""
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


# --------------------------------------------------------------------------- writing


def _chunk(tag: int, content: bytes) -> bytes:
    length = len(content) + 2
    if length < 256:
        head = struct.pack("<BB", 1, length)
    elif length < 2**32:
        head = struct.pack("<BI", 4, length)
    else:
        head = struct.pack("<BQ", 8, length)
    return head + struct.pack("<H", tag) + content


def _varlen(n: int) -> bytes:
    if n < 256:
        return struct.pack("<BB", 1, n)
    if n < 2**32:
        return struct.pack("<BI", 4, n)
    return struct.pack("<BQ", 8, n)


def _xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0"?>' + ET.tostring(root, encoding="utf-8")


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _sub(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
        bad = _XML_INVALID.search(el.text)
        if bad:
            raise ValueError(
                f"write_xdf: {tag} {el.text!r} holds control character {bad.group()!r},"
                " which an XML header cannot carry"
            )
    return el


def _session_desc(parent: ET.Element, session: Session) -> None:
    sess = _sub(parent, "session")
    _sub(sess, "participant", session.participant)
    _sub(sess, "tr", repr(float(session.tr)))
    _sub(sess, "atlas", session.atlas)
    meta = _json_safe(session.metadata)
    if meta:
        _sub(sess, "metadata_json", json.dumps(meta, sort_keys=True, separators=(",", ":")))


def _json_safe(metadata: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of the metadata (e.g. the synth truth object stays out)."""
    out = {}
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


@dataclass
class _OutStream:
    stream_id: int
    name: str
    type: str
    fmt: str
    srate: float
    source_id: str
    labels: list[str]
    units: list[str]
    ch_types: list[str]
    timestamps: np.ndarray
    data: np.ndarray | None  # numeric (n, ch)
    texts: list[str] | None = None  # string stream (one channel)
    session: Session | None = None  # put desc/session here

    @property
    def n_channels(self) -> int:
        return 1 if self.data is None else int(self.data.shape[1])

    def header(self) -> bytes:
        info = ET.Element("info")
        _sub(info, "name", self.name)
        _sub(info, "type", self.type)
        _sub(info, "channel_count", self.n_channels)
        _sub(info, "nominal_srate", repr(float(self.srate)))
        _sub(info, "channel_format", self.fmt)
        _sub(info, "source_id", self.source_id)
        _sub(info, "version", "1.1")
        _sub(info, "created_at", repr(float(self.timestamps[0]) if len(self.timestamps) else 0.0))
        _sub(info, "uid", f"{self.source_id}-{self.stream_id}")
        _sub(info, "session_id", "default")
        _sub(info, "hostname", "emorecog-stream")
        desc = _sub(info, "desc")
        if self.labels:
            channels = _sub(desc, "channels")
            for i, label in enumerate(self.labels):
                ch = _sub(channels, "channel")
                _sub(ch, "label", label)
                _sub(ch, "unit", self.units[i] if i < len(self.units) else "")
                _sub(ch, "type", self.ch_types[i] if i < len(self.ch_types) else "")
        if self.session is not None:
            _session_desc(desc, self.session)
        _sub(desc, "writer", "emorecog-stream")
        return struct.pack("<I", self.stream_id) + _xml(info)

    def sample_chunks(self) -> Iterator[bytes]:
        n = len(self.timestamps)
        for start in range(0, n, _SAMPLES_PER_CHUNK):
            stop = min(n, start + _SAMPLES_PER_CHUNK)
            body = struct.pack("<I", self.stream_id) + _varlen(stop - start)
            if self.data is not None:
                rec = np.zeros(
                    stop - start,
                    dtype=[("flag", "u1"), ("t", "<f8"), ("v", "<f4", (self.n_channels,))],
                )
                rec["flag"] = 8
                rec["t"] = self.timestamps[start:stop]
                rec["v"] = self.data[start:stop]
                body += rec.tobytes()
            else:
                assert self.texts is not None
                parts = []
                for t, text in zip(
                    self.timestamps[start:stop], self.texts[start:stop], strict=True
                ):
                    raw = text.encode("utf-8")
                    parts.append(b"\x08" + struct.pack("<d", t) + _varlen(len(raw)) + raw)
                body += b"".join(parts)
            yield _chunk(_TAG_SAMPLES, body)

    def clock_offsets(self) -> list[tuple[float, float]]:
        """Offsets (collection time, value): zero, as the data are on one clock already."""
        if not len(self.timestamps):
            return []
        return [(float(self.timestamps[0]), 0.0), (float(self.timestamps[-1]), 0.0)]

    def footer(self) -> bytes:
        info = ET.Element("info")
        n = len(self.timestamps)
        _sub(info, "first_timestamp", repr(float(self.timestamps[0])) if n else "0")
        _sub(info, "last_timestamp", repr(float(self.timestamps[-1])) if n else "0")
        _sub(info, "sample_count", n)
        offsets = _sub(info, "clock_offsets")
        for t, v in self.clock_offsets():
            off = _sub(offsets, "offset")
            _sub(off, "time", repr(t))
            _sub(off, "value", repr(v))
        return struct.pack("<I", self.stream_id) + _xml(info)


def _out_streams(session: Session) -> list[_OutStream]:
    out: list[_OutStream] = []
    for stream in session.streams:
        data = np.asarray(stream.data, dtype=np.float32)
        if stream.data.dtype != np.float32 and not np.array_equal(
            data.astype(stream.data.dtype), stream.data, equal_nan=True
        ):
            log.info("%s: data converted to float32 for XDF", stream.name)
        labels = list(stream.channel_labels)
        if stream.role is Role.RATES and not labels:
            labels = list(RATES_CHANNELS)
        units = list(stream.units) or (list(RATES_UNITS) if stream.role is Role.RATES else [])
        if labels and len(labels) != stream.n_channels:
            labels = []
        out.append(
            _OutStream(
                stream_id=len(out) + 1,
                name=stream.name or DEFAULT_LSL_NAME[stream.role],
                type=stream.type or DEFAULT_LSL_TYPE[stream.role],
                fmt="float32",
                srate=stream.nominal_srate,
                source_id=stream.source_id or f"{session.participant}-{stream.role.value}",
                labels=labels,
                units=units,
                ch_types=[stream.type or DEFAULT_LSL_TYPE[stream.role]] * len(labels),
                timestamps=stream.timestamps,
                data=data,
                session=session if stream.role is Role.FMRI else None,
            )
        )
    markers = sorted(session.markers, key=lambda m: m.timestamp)
    out.append(
        _OutStream(
            stream_id=len(out) + 1,
            name=DEFAULT_LSL_NAME[Role.MARKERS],
            type=DEFAULT_LSL_TYPE[Role.MARKERS],
            fmt="string",
            srate=0.0,
            source_id=f"{session.fmri.source_id or session.participant}-markers",
            labels=["marker"],
            units=[""],
            ch_types=["Markers"],
            timestamps=np.array([m.timestamp for m in markers], dtype=np.float64),
            data=None,
            texts=[m.text for m in markers],
        )
    )
    return out


def xdf_bytes(session: Session) -> bytes:
    """The session as XDF (uncompressed). Streams are written one after another, each in
    chunks of up to 4096 samples, with boundary chunks every ~10 MB so a reader can resync."""
    parts: list[bytes] = [_MAGIC]
    header = ET.Element("info")
    _sub(header, "version", "1.0")
    _session_desc(header, session)
    parts.append(_chunk(_TAG_FILE_HEADER, _xml(header)))
    streams = _out_streams(session)
    for s in streams:
        parts.append(_chunk(_TAG_STREAM_HEADER, s.header()))
    since_boundary = 0
    for s in streams:
        for chunk in s.sample_chunks():
            parts.append(chunk)
            since_boundary += len(chunk)
            if since_boundary >= _BOUNDARY_EVERY_BYTES:
                parts.append(_chunk(_TAG_BOUNDARY, _BOUNDARY_UUID))
                since_boundary = 0
    for s in streams:
        for t, v in s.clock_offsets():
            parts.append(_chunk(_TAG_CLOCK_OFFSET, struct.pack("<Idd", s.stream_id, t, v)))
    for s in streams:
        parts.append(_chunk(_TAG_STREAM_FOOTER, s.footer()))
    return b"".join(parts)


def write_xdf(session: Session, path: str | Path) -> Path:
    """Write ``session`` to ``path`` (``.xdf``, or gzipped ``.xdfz``); returns the path.

    Streams keep their names, types, source ids and nominal rates; the fMRI stream's desc and
    the file header carry ``session/participant``, ``tr``, ``atlas`` and the JSON-serialisable
    metadata (``metadata_json``), so :func:`read_xdf_session` restores them.
    """
    path = Path(path)
    if path.suffix not in XDF_SUFFIXES:
        raise ValueError(f"write_xdf: expected a .xdf or .xdfz path, got {path}")
    raw = xdf_bytes(session)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        if path.suffix == ".xdfz":
            with (
                open(tmp, "wb") as f,
                gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz,
            ):
                gz.write(raw)
        else:
            tmp.write_bytes(raw)
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
