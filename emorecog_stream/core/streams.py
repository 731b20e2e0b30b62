"""Names, types and shapes that every part of the engine agrees on.

LSL has no standard stream type for fMRI ROI volumes, so we choose ``fMRI``; ``PPG``,
``Respiration`` and ``Markers`` follow common use; ``Motion`` carries the scanner bridge's head
motion per volume (same timestamp as the volume's fMRI sample). Replay outlets and live inlets
both read these defaults (overridable in the config), which is why a replay is
indistinguishable from a live session.
"""

from __future__ import annotations

from enum import Enum

N_ROIS = 246
"""Brainnetome atlas regions per fMRI volume."""

ATLAS = "Brainnetome246"

CATEGORY_LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
"""Order of category probabilities everywhere (model output, MQTT payload)."""

INTENSITY_RANGE = (-4.0, 4.0)


class Role(str, Enum):
    """What a stream is for the engine, independent of what a recording calls it."""

    FMRI = "fmri"
    PPG = "ppg"
    RESP = "resp"
    RATES = "rates"
    MARKERS = "markers"
    MOTION = "motion"


DEFAULT_LSL_TYPE: dict[Role, str] = {
    Role.FMRI: "fMRI",
    Role.PPG: "PPG",
    Role.RESP: "Respiration",
    Role.RATES: "PhysioRates",
    Role.MARKERS: "Markers",
    Role.MOTION: "Motion",
}

DEFAULT_LSL_NAME: dict[Role, str] = {
    Role.FMRI: "EmoRecog-fMRI",
    Role.PPG: "EmoRecog-PPG",
    Role.RESP: "EmoRecog-Resp",
    Role.RATES: "EmoRecog-Rates",
    Role.MARKERS: "EmoRecog-Markers",
    Role.MOTION: "EmoRecog-Motion",
}

RATES_CHANNELS: tuple[str, str] = ("heart_rate", "respiration_rate")
RATES_UNITS: tuple[str, str] = ("bpm", "breaths/min")

MOTION_CHANNELS: tuple[str, ...] = (
    "trans_x",
    "trans_y",
    "trans_z",
    "rot_x",
    "rot_y",
    "rot_z",
    "framewise_displacement",
)
"""Channels of the ``Motion`` stream, one sample per volume: rigid-body parameters as FSL
MCFLIRT reports them (translations in scanner axes, rotations about the field of view's
centre) and the volume's framewise displacement (Power et al. 2012, rotations on a 50 mm
sphere)."""
MOTION_UNITS: tuple[str, ...] = ("mm", "mm", "mm", "rad", "rad", "rad", "mm")


def roi_labels(n: int = N_ROIS) -> list[str]:
    """Channel labels of the fMRI stream: ``BN001`` .. ``BN246`` in Brainnetome order."""
    return [f"BN{i:03d}" for i in range(1, n + 1)]
