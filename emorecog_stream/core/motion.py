"""Head motion per fMRI volume, matched to its volume by timestamp (pure, no I/O).

The scanner bridge publishes one sample of the ``Motion`` stream per volume (``trans_x,
trans_y, trans_z`` mm, ``rot_x, rot_y, rot_z`` rad, ``framewise_displacement`` mm; see
:data:`~emorecog_stream.core.streams.MOTION_CHANNELS`) with exactly the LSL timestamp of that
volume's fMRI sample, pushed just before it. The engine keeps the recent motion samples here
and looks up each volume's one when the volume's step is ready.

Why by timestamp and not by order: the two streams reach the engine through two inlets with
their own reader threads, so their relative arrival order is not guaranteed, and either stream
can lose a sample (an outlet restart) without the other. The timestamp is the one thing both
samples share. Each inlet applies its own clock-correction estimate, so on the receiving side
the two stamps can differ by that estimate's jitter (microseconds on one machine, well under a
millisecond on a lab network): they match when they are within :data:`MATCH_TOLERANCE_S`,
which is also far below any TR, so a neighbouring volume's sample can never match.

A volume whose motion sample has not arrived when its step is ready gets no framewise
displacement (``None``): predictions are never held back for it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from emorecog_stream.core.streams import MOTION_CHANNELS

__all__ = ["MATCH_TOLERANCE_S", "MotionSample", "MotionTrack"]

MATCH_TOLERANCE_S = 0.01
"""A motion sample belongs to a volume when their LSL timestamps differ by at most this (s)."""

_N_CHANNELS = len(MOTION_CHANNELS)


@dataclass(frozen=True)
class MotionSample:
    """One volume's head motion as the bridge reported it.

    ``params`` are the six rigid-body parameters in :data:`MOTION_CHANNELS` order (mm, rad);
    ``framewise_displacement`` is None when the bridge sent a non-finite or negative value
    (FD is a sum of absolute values, so a negative one is not an FD).
    """

    timestamp: float  # LSL clock, as received (clock-corrected)
    params: tuple[float, float, float, float, float, float]
    framewise_displacement: float | None

    @classmethod
    def from_row(cls, timestamp: float, row: np.ndarray) -> MotionSample:
        values = [float(v) for v in np.asarray(row, dtype=np.float64).reshape(-1)]
        if len(values) != _N_CHANNELS:
            raise ValueError(
                f"motion sample: expected {_N_CHANNELS} values {MOTION_CHANNELS},"
                f" found {len(values)}"
            )
        fd = values[6]
        return cls(
            timestamp=float(timestamp),
            params=tuple(values[:6]),  # type: ignore[arg-type]
            framewise_displacement=fd if math.isfinite(fd) and fd >= 0 else None,
        )

    @property
    def params_finite(self) -> bool:
        return all(math.isfinite(v) for v in self.params)


class MotionTrack:
    """The last ``capacity`` motion samples, looked up by volume timestamp.

    ``capacity`` only needs to cover the volumes between a motion sample's arrival and its
    volume's step (a few, since steps wait at most for the aligner's deadline); 256 volumes
    is minutes of margin for a few kilobytes.
    """

    def __init__(self, capacity: int = 256, tolerance: float = MATCH_TOLERANCE_S) -> None:
        if capacity < 1:
            raise ValueError(f"motion track capacity must be >= 1, got {capacity}")
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"motion match tolerance must be >= 0 s, got {tolerance}")
        self.tolerance = float(tolerance)
        self._samples: deque[MotionSample] = deque(maxlen=capacity)
        self.received = 0

    def push(self, values: np.ndarray, timestamps: np.ndarray) -> None:
        """Keep samples ``values`` (n, 7) stamped ``timestamps`` (n,) (checked by the caller)."""
        rows = np.asarray(values, dtype=np.float64).reshape(-1, _N_CHANNELS)
        stamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if rows.shape[0] != stamps.shape[0]:
            raise ValueError(
                f"motion chunk: {rows.shape[0]} samples but {stamps.shape[0]} timestamps"
            )
        for t, row in zip(stamps.tolist(), rows, strict=True):
            self._samples.append(MotionSample.from_row(t, row))
        self.received += int(stamps.shape[0])

    def match(self, timestamp: float) -> MotionSample | None:
        """The sample stamped within the tolerance of ``timestamp`` (the closest), or None.

        Searched from the newest and stopped at the first older sample: the inlet delivers
        timestamps in order (``monotonize``), and the volume being stepped is nearly always
        among the last samples that arrived.
        """
        best: MotionSample | None = None
        best_gap = math.inf
        for sample in reversed(self._samples):
            if sample.timestamp < timestamp - self.tolerance:
                break  # older samples only get further away
            gap = abs(sample.timestamp - timestamp)
            if gap <= self.tolerance and gap < best_gap:
                best, best_gap = sample, gap
        return best

    def __len__(self) -> int:
        return len(self._samples)
