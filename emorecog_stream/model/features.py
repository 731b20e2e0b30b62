"""Causal per-session baselines: what the network sees instead of raw ROI values and raw rates.

Why. Raw fMRI ROI values carry a baseline per region and per participant (scanner units around
some arbitrary level) that dwarfs the few-percent changes an emotion evokes, and raw heart and
respiration rates differ between people by more than emotions move them. The seed normalised each
ROI over the 25 volumes of a trial (min-max), which needs the whole trial: not causal. Here every
ROI and each rate is compared with its own *running mean over the session so far*:

    a_n = max(1 / (n + 1), 1 / window)     # n = values seen before this one
    e   = x - m                           # deviation from the mean before this value
    m  <- m + a_n * e                     # a cumulative mean first, then an exponential one
    d   = e - a_n * e                     # = x - m after the update (0 for the first value)

``d`` is what the network gets (then z-scored with training-set statistics stored in the
checkpoint). The first values of a session compare with a short history, so early predictions
are less sure; after about ``window`` volumes the baseline is an exponential average with that
time constant, which follows slow scanner drift. A missing rate (NaN) leaves its mean unchanged
and gives ``d = NaN`` (the network replaces it with a learned value and a 0 flag). A non-finite
ROI value counts as "no change" (``e = 0``).

The baselines are kept in float64: the same float64 operations run in the one-volume steppers
and over a whole sequence, so the two agree to the last bit on these features, and a long session
does not accumulate float32 rounding in its running means (training rounds ``d`` to float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BaselineConfig:
    """Time constants of the running baselines, in volumes (at TR 1 s: seconds)."""

    roi_window: float = 60.0
    rate_window: float = 60.0

    def __post_init__(self) -> None:
        for name in ("roi_window", "rate_window"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(
                    f"BaselineConfig.{name}: expected >= 1 volume, got {getattr(self, name)}"
                )


def alpha(n: int | float, window: float) -> float:
    """Weight of the ``n``-th value (0-based) in the running mean."""
    return max(1.0 / (n + 1.0), 1.0 / window)


def roi_deviation_sequence(
    roi: np.ndarray, window: float, dtype: type[np.floating] = np.float64
) -> np.ndarray:
    """``d`` for every volume of one recording (T, R) -> (T, R), from a fresh baseline."""
    roi = np.asarray(roi, dtype=np.float32)
    return roi_deviation_batch(roi[None], window, dtype)[0]


def roi_deviation_batch(
    roi: np.ndarray, window: float, dtype: type[np.floating] = np.float64
) -> np.ndarray:
    """``d`` for B recordings of equal length at once, (B, T, R) -> (B, T, R).

    The ROI values are taken as float32 (as the model receives them); the baseline and ``d`` are
    computed in float64 (the steppers' arithmetic) and returned as ``dtype``.
    """
    roi = np.asarray(roi, dtype=np.float32)
    b, t_len, r = roi.shape
    mean = np.zeros((b, r), np.float64)
    e = np.empty((b, r), np.float64)
    ae = np.empty((b, r), np.float64)
    out = np.empty(roi.shape, dtype)
    for t in range(t_len):
        np.subtract(roi[:, t], mean, out=e)
        if not math.isfinite(float(np.add.reduce(e, axis=None))):
            e[~np.isfinite(e)] = 0.0
        np.multiply(e, alpha(t, window), out=ae)
        mean += ae
        np.subtract(e, ae, out=out[:, t])
    return out


def rate_deviation_sequence(values: np.ndarray, window: float) -> np.ndarray:
    """``d`` for one rate over a recording (T,) -> (T,) float64; NaN where the rate is missing."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    tracker = RateBaseline(window)
    for t, v in enumerate(values.tolist()):
        out[t] = tracker.update(v)
    return out


class RateBaseline:
    """Running mean of one rate for one session (plain floats: it runs once per volume)."""

    __slots__ = ("count", "mean", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.mean = 0.0
        self.count = 0

    def reset(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        """Deviation of ``value`` from the running mean (NaN for a missing value)."""
        if not math.isfinite(value):
            return math.nan
        a = max(1.0 / (self.count + 1.0), 1.0 / self.window)
        e = value - self.mean
        ae = a * e
        self.mean = self.mean + ae
        self.count += 1
        return e - ae


def rate_deviation_batch(
    values: np.ndarray, mean: np.ndarray, count: np.ndarray, window: float
) -> np.ndarray:
    """One volume for B sessions: updates ``mean``/``count`` (B,) in place, returns ``d`` (B,).

    The same float64 operations as :class:`RateBaseline`, element by element.
    """
    values = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(values)
    a = np.maximum(1.0 / (count + 1.0), 1.0 / window)
    e = np.where(valid, values, mean) - mean
    ae = a * e
    new_mean = mean + ae
    mean[valid] = new_mean[valid]
    count[valid] += 1
    return np.where(valid, e - ae, np.nan)
