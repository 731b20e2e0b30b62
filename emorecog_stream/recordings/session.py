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

from emorecog_stream.streams import N_ROIS, Role


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


def parse_marker(text: str) -> dict[str, Any] | None:
    """The JSON object in a marker, or None for markers that are not ours (kept, not parsed)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) and "event" in value else None


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
        """Trials from ``trial_start``/``trial_end`` markers, in time order."""
        starts: dict[int, tuple[float, dict[str, Any]]] = {}
        trials: list[Trial] = []
        for marker in sorted(self.markers, key=lambda m: m.timestamp):
            info = parse_marker(marker.text)
            if info is None:
                continue
            if info["event"] == "trial_start":
                starts[int(info["trial"])] = (marker.timestamp, info)
            elif info["event"] == "trial_end" and int(info["trial"]) in starts:
                onset, start_info = starts.pop(int(info["trial"]))
                trials.append(
                    Trial(
                        index=int(info["trial"]),
                        onset=onset,
                        offset=marker.timestamp,
                        category=start_info.get("category"),
                        intensity=start_info.get("intensity"),
                    )
                )
        return trials
