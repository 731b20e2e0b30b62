"""Names, types and shapes that every part of the engine agrees on.

LSL has no standard stream type for fMRI ROI volumes, so we choose ``fMRI``; ``PPG``,
``Respiration`` and ``Markers`` follow common use. Replay outlets and live inlets both read
these defaults (overridable in the config), which is why a replay is indistinguishable from a
live session.
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


DEFAULT_LSL_TYPE: dict[Role, str] = {
    Role.FMRI: "fMRI",
    Role.PPG: "PPG",
    Role.RESP: "Respiration",
    Role.RATES: "PhysioRates",
    Role.MARKERS: "Markers",
}

DEFAULT_LSL_NAME: dict[Role, str] = {
    Role.FMRI: "EmoRecog-fMRI",
    Role.PPG: "EmoRecog-PPG",
    Role.RESP: "EmoRecog-Resp",
    Role.RATES: "EmoRecog-Rates",
    Role.MARKERS: "EmoRecog-Markers",
}

RATES_CHANNELS: tuple[str, str] = ("heart_rate", "respiration_rate")
RATES_UNITS: tuple[str, str] = ("bpm", "breaths/min")


def roi_labels(n: int = N_ROIS) -> list[str]:
    """Channel labels of the fMRI stream: ``BN001`` .. ``BN246`` in Brainnetome order."""
    return [f"BN{i:03d}" for i in range(1, n + 1)]
