"""The in-memory form of a recorded session: timestamped streams plus metadata.

Every reader (XDF, ICBHI ``.mat``/``.npz``, the synthetic corpus) returns a :class:`Session`;
the replay adapter and the offline aligner consume it. Timestamps are seconds on one clock
(LSL time for live recordings, seconds from the session start for generated ones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emorecog_stream.core.streams import N_ROIS, Role


@dataclass
class SignalStream:
    """One numeric stream: ``data`` is (n_samples, n_channels), ``timestamps`` (n_samples,)."""

    role: Role
    name: str
    type: str
    data: np.ndarray
    timestamps: np.ndarray
    nominal_srate: float
    channel_labels: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    source_id: str = ""

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data)
        if self.data.ndim == 1:
            self.data = self.data[:, None]
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
        if self.data.ndim != 2 or self.data.shape[0] != self.timestamps.shape[0]:
            raise ValueError(
                f"stream {self.name!r}: expected data (n, channels) with one timestamp per sample,"
                f" got data {self.data.shape} and timestamps {self.timestamps.shape}"
            )

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[1])

    def __len__(self) -> int:
        return int(self.data.shape[0])


@dataclass(frozen=True)
class Marker:
    """A trial event. ``text`` is what travels on LSL: a JSON object (see :func:`parse_marker`)."""

    timestamp: float
    text: str


@dataclass(frozen=True)
class Trial:
    """One video trial derived from a start/end marker pair."""

    index: int
    onset: float
    offset: float
    category: int | None  # -1 negative, 0 neutral, +1 positive; None when unknown (test data)
    intensity: int | None  # self-reported -4..+4; None when unknown


def make_marker(event: str, trial: int, category: int | None, intensity: int | None) -> str:
    """Marker text as written to LSL and XDF: ``{"event": "trial_start", "trial": 3, ...}``."""
    return json.dumps(
        {"event": event, "trial": trial, "category": category, "intensity": intensity},
        separators=(",", ":"),
    )


def _whole(value: Any, low: int | None, high: int | None) -> int | None:
    """``value`` as an int if it is a whole number (within ``low..high``), else None."""
    if isinstance(value, str):  # "3" was always read as 3
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():  # NaN and inf included
        return None
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        return None
    return number


MARKER_MAX_DEPTH = 16
"""Nesting a parsed marker may have; ours are flat. A deeper one is kept as text only, since
writing it back out (the audit log) would hit Python's recursion limit and lose it."""


def parse_marker(text: str) -> dict[str, Any] | None:
    """The JSON object in a marker, or None for markers that are not ours (kept, not parsed).

    Markers come from any LSL sender or file: text that is not JSON, nests too deep for the
    parser, holds an integer of more than 4300 digits (Python's limit) or nests deeper than
    :data:`MARKER_MAX_DEPTH` is "not ours", never an exception.
    """
    try:
        value = json.loads(text)
    except (ValueError, TypeError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    if not isinstance(value, dict) or "event" not in value or _depth(value) > MARKER_MAX_DEPTH:
        return None
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level + 1)
            if deepest > MARKER_MAX_DEPTH:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest


@dataclass
class Session:
    """A recorded session. ``fmri`` is required; physiology comes as waveforms or as rates."""

    participant: str
    tr: float
    fmri: SignalStream
    ppg: SignalStream | None = None
    resp: SignalStream | None = None
    rates: SignalStream | None = None
    markers: list[Marker] = field(default_factory=list)
    atlas: str = "Brainnetome246"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fmri.n_channels != N_ROIS:
            raise ValueError(
                f"session {self.participant!r}: expected fMRI volumes of {N_ROIS} ROIs,"
                f" got {self.fmri.n_channels} channels"
            )
        if not self.tr > 0:
            raise ValueError(f"session {self.participant!r}: TR must be > 0 s, got {self.tr}")

    @property
    def streams(self) -> list[SignalStream]:
        return [s for s in (self.fmri, self.ppg, self.resp, self.rates) if s is not None]

    @property
    def n_volumes(self) -> int:
        return len(self.fmri)

    def trials(self) -> list[Trial]:
        """Trials from ``trial_start``/``trial_end`` markers, in time order.

        Markers come from outside (XDF files, LSL senders): one without a usable trial index is
        skipped like a marker that is not ours, and a category or intensity outside -1..+1 /
        -4..+4 reads as unknown (None), so a stray marker cannot stop a replay or a training.
        """
        starts: dict[int, tuple[float, dict[str, Any]]] = {}
        trials: list[Trial] = []
        for marker in sorted(self.markers, key=lambda m: m.timestamp):
            info = parse_marker(marker.text)
            index = _whole(info.get("trial"), None, None) if info is not None else None
            if info is None or index is None:
                continue
            if info["event"] == "trial_start":
                starts[index] = (marker.timestamp, info)
            elif info["event"] == "trial_end" and index in starts:
                onset, start_info = starts.pop(index)
                trials.append(
                    Trial(
                        index=index,
                        onset=onset,
                        offset=marker.timestamp,
                        category=_whole(start_info.get("category"), -1, 1),
                        intensity=_whole(start_info.get("intensity"), -4, 4),
                    )
                )
        return trials
