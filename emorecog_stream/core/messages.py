"""Messages that travel between the stages of the engine (all I/O free, all dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RateEstimate:
    """A heart or respiration rate over a window; ``value`` is None when the window is unusable."""

    value: float | None
    quality: float  # 0..1, how much to trust it (peak regularity / spectral concentration)
    reason: str = ""  # why it is missing or poor, for the status topic and the dashboard

    @property
    def valid(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class AlignedStep:
    """One fMRI volume with the physiology around its timestamp: the model's input for one TR.

    ``roi`` is always finite (non-finite values are replaced and counted in ``roi_nonfinite``);
    a rate that is not valid is NaN here and must be treated as missing by the model.
    """

    index: int  # volume index since the session (or the aligner) started
    timestamp: float  # the volume's timestamp (LSL clock)
    roi: np.ndarray  # (246,) float32, finite
    heart_rate: float  # bpm, NaN when missing
    respiration_rate: float  # breaths/min, NaN when missing
    roi_valid: bool = True
    heart_rate_valid: bool = False
    respiration_rate_valid: bool = False
    heart_rate_quality: float = 0.0
    respiration_rate_quality: float = 0.0
    roi_nonfinite: int = 0  # ROI values that were NaN/Inf in the received volume
    deadline_expired: bool = False  # emitted on the deadline, before all physiology had arrived
    heart_rate_source: str = ""  # "ppg" (from the waveform), "rates" (rate stream) or ""
    respiration_rate_source: str = ""  # "resp" (from the waveform), "rates" or ""
    notes: tuple[str, ...] = field(default_factory=tuple)  # human-readable reasons for flags


@dataclass(frozen=True)
class Prediction:
    """One published prediction (one per fMRI volume). Serialised by ``sinks.payload``."""

    session: str
    sequence: int  # strictly increasing per engine run: subscribers de-duplicate on it
    tr_index: int  # volume index within the session (resets when a new session starts)
    volume_timestamp: float  # the volume's LSL timestamp, to line up with stimuli
    utc: str  # ISO 8601 UTC time the prediction was made
    probabilities: tuple[float, float, float]  # negative, neutral, positive
    category: str  # arg-max of probabilities
    intensity: float  # -4..+4
    heart_rate: float | None
    heart_rate_valid: bool
    respiration_rate: float | None
    respiration_rate_valid: bool
    model_id: str
    latency_ms: float  # from the step becoming ready (last needed sample) to publish hand-off
    level: int | None = None  # arg-max level (-4..4) for models with a 9-way level head
    flags: tuple[str, ...] = ()  # e.g. "heart_rate_missing", "deadline_expired", "state_reset"
    # head motion of the volume (the Motion stream); None when there is none or it was late
    framewise_displacement: float | None = None  # mm (Power et al. 2012)
    motion_params: tuple[float, float, float, float, float, float] | None = None  # mm x3, rad x3
