"""Training augmentation in the seed's spirit (noise, time warp, drift) plus physiology dropout.

The seed applied tsaug's AddNoise (scale 0.05), TimeWarp (5 speed changes, max ratio 5) and
Drift (max 0.4, 3 points), each with probability 0.5, to min-max normalised 25-volume trials.
Here the same three act on a whole session's raw ROI series (before the causal baseline, as a
live scanner's data would arrive), in units of each ROI's own temporal spread; the time warp is
milder (speed ratio up to 1.5), because per-volume labels must stay near their volumes. Physiology
dropout blanks heart and/or respiration rate for the whole session or for stretches of it, so the
model learns to answer without them (the engine sees exactly that when a sensor drops out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emorecog_stream.model.data import SessionData


@dataclass(frozen=True)
class AugmentConfig:
    probability: float = 0.5  # of each of noise, drift, time warp
    noise_scale: float = 0.2  # x each ROI's temporal standard deviation
    drift_max: float = 0.4  # x each ROI's temporal standard deviation
    drift_points: int = 3
    warp_changes: int = 5
    warp_max_ratio: float = 1.5
    drop_whole: float = 0.15  # probability of losing a rate for the whole session (each rate)
    drop_gaps: float = 0.3  # probability of gaps in a rate (each rate)
    gap_volumes: tuple[int, int] = (10, 60)


def _time_warp(n: int, rng: np.random.Generator, changes: int, max_ratio: float) -> np.ndarray:
    """Source positions (n,) of a smooth monotone warp of [0, n-1] onto itself."""
    knots = np.linspace(0, n - 1, changes + 2)
    speed = np.exp(rng.uniform(-np.log(max_ratio) / 2, np.log(max_ratio) / 2, changes + 1))
    pos = np.arange(n, dtype=np.float64)
    seg = np.clip(np.searchsorted(knots, pos, side="right") - 1, 0, changes)
    rate = speed[seg]
    src = np.concatenate([[0.0], np.cumsum(rate[:-1])])
    return src * (n - 1) / max(src[-1], 1e-9)


def augment(data: SessionData, rng: np.random.Generator, config: AugmentConfig) -> SessionData:
    """A randomly augmented copy of ``data`` (labels follow the time warp)."""
    roi = data.roi.astype(np.float64)
    hr = data.heart_rate.copy()
    rr = data.respiration_rate.copy()
    category, intensity, trial = data.category, data.intensity, data.trial
    n, r = roi.shape
    spread = roi.std(axis=0) + 1e-6
    if n > 3 and rng.random() < config.probability:
        src = _time_warp(n, rng, config.warp_changes, config.warp_max_ratio)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = (src - lo)[:, None]
        roi = roi[lo] * (1 - frac) + roi[hi] * frac
        nearest = np.rint(src).astype(np.int64)
        hr, rr = hr[nearest], rr[nearest]
        category, intensity, trial = category[nearest], intensity[nearest], trial[nearest]
    if rng.random() < config.probability:
        roi = roi + rng.normal(0.0, 1.0, size=roi.shape) * (config.noise_scale * spread)
    if n > 1 and rng.random() < config.probability:
        knots = np.linspace(0, n - 1, config.drift_points + 1)
        values = rng.uniform(-1, 1, size=(config.drift_points + 1, r)) * config.drift_max * spread
        seg = np.minimum((np.arange(n) / (knots[1] - knots[0])).astype(np.int64), len(knots) - 2)
        frac = ((np.arange(n) - knots[seg]) / (knots[1] - knots[0]))[:, None]
        roi = roi + values[seg] * (1 - frac) + values[seg + 1] * frac
    for rate in (hr, rr):
        if rng.random() < config.drop_whole:
            rate[:] = np.nan
        elif rng.random() < config.drop_gaps:
            for _ in range(int(rng.integers(1, 4))):
                length = int(rng.integers(config.gap_volumes[0], config.gap_volumes[1] + 1))
                start = int(rng.integers(0, max(1, n - length)))
                rate[start : start + length] = np.nan
    return SessionData(
        participant=data.participant,
        roi=roi.astype(np.float32),
        heart_rate=hr,
        respiration_rate=rr,
        category=category,
        intensity=intensity,
        trial=trial,
        label_delay=data.label_delay,
        source=data.source,
    )
