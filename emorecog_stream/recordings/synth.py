"""Deterministic synthetic ICBHI-like sessions (no real ICBHI data may ship).

Why synthetic: the benchmark's data cannot be redistributed, yet the engine, the model and the
replay demo need sessions with the benchmark's structure and with signals that behave like the
real ones. This module builds them from a documented generative model:

* **Design** (per participant): a lead-in rest, then ``n_trials`` video trials of ``video_s``
  seconds separated by ``rest_s`` seconds of rest; 10 videos per category (negative, neutral,
  positive) in a seeded random order; self-reported levels drawn so that the corpus-wide level
  distribution equals the benchmark's (see :func:`corpus_labels`).
* **fMRI** (246 Brainnetome ROIs, one volume per TR): each trial's boxcar convolved with the
  canonical double-gamma HRF drives a spatial pattern = a video-evoked pattern shared by every
  trial + a category pattern over a subset of ROIs + a valence pattern scaled by the level, all
  scaled by intensity (|level|). Each participant has a gain and jittered patterns, each trial
  its own pattern noise. On top: AR(1) noise per ROI, a shared global fluctuation, slow cosine
  drift, and a per-ROI baseline. Values are in arbitrary scanner units around ~100.
* **PPG**: beats placed by integrating a heart-rate time course (participant baseline + smooth
  emotion-dependent shift per trial + Mayer waves + respiratory sinus arrhythmia) with
  beat-to-beat interval variability; each beat is a systolic peak, a dicrotic notch and a
  diastolic wave; respiration-coupled amplitude modulation, baseline wander and white noise.
* **Respiration**: breaths placed by integrating a respiration-rate time course (participant
  baseline + emotion-dependent shift) with breath-to-breath variability; asymmetric
  inhale/exhale shape, per-breath depth, slow drift and noise.

Every random draw comes from ``numpy.random.default_rng([seed, participant, component])``, so a
session is bit-identical for the same seed and configuration, and generating one participant
does not depend on which others are generated.

The generator's ground truth (true beat and breath times, the heart and respiration rates that
drove them) is in ``session.metadata["truth"]`` as a :class:`SynthTruth`, so physiology
estimators can be tested against it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import signal as sps
from scipy.stats import gamma

from emorecog_stream.core.streams import (
    ATLAS,
    DEFAULT_LSL_NAME,
    DEFAULT_LSL_TYPE,
    N_ROIS,
    Role,
    roi_labels,
)
from emorecog_stream.recordings.session import Marker, Session, SignalStream, make_marker

GENERATOR = "emorecog_stream.recordings.synth"
GENERATOR_VERSION = 1
"""Bumped whenever the generative model changes, so shipped files can say which one made them."""

# Benchmark level distribution over 480 trials (shared/domain.md, from levelsplit.csv), split by
# category under our assumption that a level's sign follows the video's category, the surplus of
# +/-1 and 0 ratings going to neutral videos. Each row sums to 160 = 16 participants x 10 videos.
BENCHMARK_LEVELS_BY_CATEGORY: dict[int, dict[int, int]] = {
    -1: {-4: 65, -3: 37, -2: 40, -1: 18},
    0: {-1: 11, 0: 124, 1: 25},
    1: {1: 21, 2: 63, 3: 30, 4: 46},
}

# Component ids for the random streams (never reuse one for another purpose).
(
    _RNG_DESIGN,
    _RNG_GROUP,
    _RNG_SUBJECT,
    _RNG_FMRI,
    _RNG_RESP,
    _RNG_HEART,
    _RNG_PPG,
    _RNG_PHYSIO_SUBJECT,
) = range(8)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that shapes the corpus. Defaults follow the ICBHI 2024 benchmark.

    Effect sizes are in the generator's units: fMRI percent signal change, heart rate bpm,
    respiration breaths/min. They were tuned so that labels are recoverable from fMRI above
    chance but far from perfectly, and physiology adds information (see tests/test_synth.py).
    """

    seed: int = 2024
    n_participants: int = 16
    n_trials: int = 30
    video_s: float = 25.0
    rest_s: float = 10.0
    lead_in_s: float = 10.0
    tr: float = 1.0
    ppg_rate: float = 400.0
    resp_rate: float = 50.0
    # fMRI
    n_category_rois: int = 40
    n_valence_rois: int = 24
    n_video_rois: int = 30
    video_amplitude: float = 1.2
    category_amplitude: float = 0.11
    valence_amplitude: float = 0.2
    intensity_gain: float = 0.5
    subject_pattern_jitter: float = 0.25
    trial_pattern_noise: float = 0.3
    noise_sd: float = 0.9
    ar_coef: float = 0.5
    global_sd: float = 0.4
    drift_sd: float = 1.0
    # physiology
    hr_baseline_range: tuple[float, float] = (60.0, 80.0)
    rr_baseline_range: tuple[float, float] = (12.0, 17.0)
    hr_shift_by_category: tuple[float, float, float] = (3.0, 0.0, 0.5)
    hr_shift_per_level: float = 0.25
    rr_shift_by_category: tuple[float, float, float] = (0.3, 0.0, 1.2)
    rr_shift_per_level: float = 0.1
    hr_trial_sd: float = 2.5
    rr_trial_sd: float = 0.8
    hrv_sd: float = 0.03
    breath_variability_sd: float = 0.08
    ppg_noise_sd: float = 0.03
    resp_noise_sd: float = 0.02

    def __post_init__(self) -> None:
        checks = {
            "seed": self.seed >= 0,
            "n_participants": self.n_participants >= 1,
            "n_trials": self.n_trials >= 3,
            "video_s": self.video_s > 0,
            "rest_s": self.rest_s >= 0,
            "lead_in_s": self.lead_in_s >= 0,
            "tr": self.tr > 0,
            "ppg_rate": self.ppg_rate >= 20,
            "resp_rate": self.resp_rate >= 5,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"SynthConfig: invalid {values} (need seed >= 0, n_participants >= 1,"
                " n_trials >= 3, video_s > 0, rest_s >= 0, lead_in_s >= 0, tr > 0,"
                " ppg_rate >= 20 Hz, resp_rate >= 5 Hz)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists), as stored in ``session.metadata``."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SynthConfig:
        """The config back from :meth:`to_dict` output (e.g. a shipped file's metadata)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"SynthConfig: unknown fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def trial_period_s(self) -> float:
        return self.video_s + self.rest_s

    @property
    def duration_s(self) -> float:
        """Lead-in, all trials with the rest after each (the last rest lets the HRF settle)."""
        return self.lead_in_s + self.n_trials * self.trial_period_s

    def onsets(self) -> np.ndarray:
        """Video onsets in seconds from the session start."""
        return self.lead_in_s + np.arange(self.n_trials) * self.trial_period_s


@dataclass
class SynthTruth:
    """What the generator used, to test estimators against.

    ``beat_times``/``breath_times``: every heartbeat (pulse onset) and breath (inhale onset) in
    session seconds. ``time``: a 10 Hz grid; ``heart_rate`` (bpm) and ``respiration_rate``
    (breaths/min) on it are the smooth rates that drove beat and breath placement (before the
    beat-to-beat variability). For a window, :meth:`heart_rate_between` and
    :meth:`respiration_rate_between` give the rate an ideal counter would measure.
    """

    beat_times: np.ndarray
    breath_times: np.ndarray
    time: np.ndarray
    heart_rate: np.ndarray
    respiration_rate: np.ndarray
    trial_heart_rate: np.ndarray  # per-trial target heart rate (bpm), shape (n_trials,)
    trial_respiration_rate: np.ndarray  # per-trial target respiration rate, shape (n_trials,)

    def heart_rate_between(self, t0: float, t1: float) -> float | None:
        """Mean heart rate (bpm) of the complete beat intervals inside [t0, t1]."""
        return _event_rate(self.beat_times, t0, t1)

    def respiration_rate_between(self, t0: float, t1: float) -> float | None:
        """Mean respiration rate (breaths/min) of the complete breaths inside [t0, t1]."""
        return _event_rate(self.breath_times, t0, t1)


def _event_rate(events: np.ndarray, t0: float, t1: float) -> float | None:
    inside = events[(events >= t0) & (events <= t1)]
    if inside.size < 2:
        return None
    return float(60.0 * (inside.size - 1) / (inside[-1] - inside[0]))


@dataclass
class _Design:
    categories: np.ndarray  # (n_trials,) -1/0/+1, in presentation order
    levels: np.ndarray  # (n_trials,) -4..4
    onsets: np.ndarray  # (n_trials,) seconds


@dataclass
class _GroupPatterns:
    video: np.ndarray  # (N_ROIS,)
    category: np.ndarray  # (3, N_ROIS), rows negative, neutral, positive
    valence: np.ndarray  # (N_ROIS,)
    category_mask: np.ndarray = field(repr=False)  # (3, N_ROIS) bool


def _rng(config: SynthConfig, participant: int, component: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, participant, component])


def participant_id(index: int) -> str:
    """``P01`` for 1: the benchmark's participant naming."""
    return f"P{index:02d}"


def _allocate(total: int, weights: dict[int, int]) -> dict[int, int]:
    """Split ``total`` over keys in proportion to ``weights`` (largest remainder, stable)."""
    wsum = sum(weights.values())
    exact = {k: total * w / wsum for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(counts.values())
    order = sorted(weights, key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:left]:
        counts[k] += 1
    return counts


def corpus_labels(config: SynthConfig) -> np.ndarray:
    """Labels of the whole corpus, shape (n_participants, n_trials, 2): [category, level].

    Rows are in presentation order. Each participant sees ``n_trials // 3`` videos per category
    (the remainder cycles negative, neutral, positive). Per category, the corpus-wide pool of
    levels follows :data:`BENCHMARK_LEVELS_BY_CATEGORY` (exactly, for 16 x 30) and is shuffled and
    dealt to participants, so single participants vary as real ones do.
    """
    rng = _rng(config, 0, _RNG_DESIGN)
    per_category = [config.n_trials // 3] * 3
    for i in range(config.n_trials - sum(per_category)):
        per_category[i] += 1
    pools: dict[int, list[int]] = {}
    for c_index, category in enumerate((-1, 0, 1)):
        counts = _allocate(
            per_category[c_index] * config.n_participants, BENCHMARK_LEVELS_BY_CATEGORY[category]
        )
        pool = np.repeat(np.array(sorted(counts)), [counts[k] for k in sorted(counts)])
        pools[category] = list(rng.permutation(pool))
    labels = np.zeros((config.n_participants, config.n_trials, 2), dtype=np.int64)
    for p in range(config.n_participants):
        cats = np.repeat(np.array([-1, 0, 1]), per_category)
        levels = np.empty(config.n_trials, dtype=np.int64)
        for c_index, category in enumerate((-1, 0, 1)):
            n = per_category[c_index]
            levels[cats == category] = pools[category][p * n : (p + 1) * n]
        order = _rng(config, p + 1, _RNG_DESIGN).permutation(config.n_trials)
        labels[p, :, 0] = cats[order]
        labels[p, :, 1] = levels[order]
    return labels


def canonical_hrf(dt: float, length_s: float = 32.0) -> np.ndarray:
    """Canonical double-gamma HRF (peak ~5 s, undershoot ~15 s, ratio 1/6), unit peak."""
    t = np.arange(0.0, length_s, dt)
    h = gamma.pdf(t, 6.0) - gamma.pdf(t, 16.0) / 6.0
    return h / h.max()


def _group_patterns(config: SynthConfig) -> _GroupPatterns:
    rng = _rng(config, 0, _RNG_GROUP)
    video = np.zeros(N_ROIS)
    video_rois = rng.choice(N_ROIS, size=config.n_video_rois, replace=False)
    video[video_rois] = config.video_amplitude * rng.uniform(0.5, 1.5, size=video_rois.size)
    category = np.zeros((3, N_ROIS))
    mask = np.zeros((3, N_ROIS), dtype=bool)
    for c in range(3):
        rois = rng.choice(N_ROIS, size=config.n_category_rois, replace=False)
        mask[c, rois] = True
        category[c, rois] = config.category_amplitude * rng.choice([-1.0, 1.0], size=rois.size)
        category[c, rois] *= rng.uniform(0.6, 1.4, size=rois.size)
    valence = np.zeros(N_ROIS)
    val_rois = rng.choice(N_ROIS, size=config.n_valence_rois, replace=False)
    valence[val_rois] = config.valence_amplitude * rng.normal(0.0, 1.0, size=val_rois.size)
    return _GroupPatterns(video=video, category=category, valence=valence, category_mask=mask)


def _smooth_steps(
    t: np.ndarray, onsets: np.ndarray, duration: float, values: np.ndarray, tau: float
) -> np.ndarray:
    """Sum of per-trial steps (value during the video) with exponential rise and decay ``tau``."""
    out = np.zeros_like(t)
    for onset, value in zip(onsets, values, strict=True):
        rise = np.clip(t - onset, 0.0, None)
        on = 1.0 - np.exp(-rise / tau)
        after = np.clip(t - (onset + duration), 0.0, None)
        end_level = 1.0 - math.exp(-duration / tau)
        off = np.where(t > onset + duration, end_level * np.exp(-after / tau), on)
        out += value * off
    return out


def _event_times(
    rate_fn_t: np.ndarray,
    rate_fn_v: np.ndarray,
    duration: float,
    variability: np.ndarray,
    start: float,
) -> np.ndarray:
    """Event times by stepping interval = 60 / rate(t) * (1 + variability[k])."""
    times = [start]
    k = 0
    t = start
    while t < duration:
        rate = float(np.interp(t, rate_fn_t, rate_fn_v))
        t = t + 60.0 / rate * (1.0 + variability[k % variability.size])
        times.append(t)
        k += 1
    return np.asarray(times)


def _phase(t: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the event interval holding each t, and the phase (0..1) within it."""
    idx = np.clip(np.searchsorted(events, t, side="right") - 1, 0, events.size - 2)
    phase = (t - events[idx]) / (events[idx + 1] - events[idx])
    return idx, np.clip(phase, 0.0, 1.0)


def _ppg_pulse(phase: np.ndarray) -> np.ndarray:
    """One pulse: systolic peak, dicrotic notch at ~0.4, diastolic wave; ~0 at both ends."""
    systolic = np.exp(-0.5 * ((phase - 0.22) / 0.075) ** 2)
    diastolic = 0.45 * np.exp(-0.5 * ((phase - 0.5) / 0.1) ** 2)
    return systolic + diastolic


def _breath_shape(phase: np.ndarray, inhale: float = 0.4) -> np.ndarray:
    """Chest expansion: half-cosine inhale then slower half-cosine exhale (0 at both ends)."""
    return np.where(
        phase < inhale,
        0.5 * (1.0 - np.cos(np.pi * phase / inhale)),
        0.5 * (1.0 + np.cos(np.pi * (phase - inhale) / (1.0 - inhale))),
    )


def _ar1(rng: np.random.Generator, n: int, m: int, phi: float, sd: float) -> np.ndarray:
    """AR(1) noise, stationary with marginal sd ``sd``, shape (n, m)."""
    innovations = rng.normal(0.0, sd * math.sqrt(1.0 - phi * phi), size=(n, m))
    innovations[0] = rng.normal(0.0, sd, size=m)
    return sps.lfilter([1.0], [1.0, -phi], innovations, axis=0)


def _fmri(
    config: SynthConfig, participant: int, design: _Design, group: _GroupPatterns
) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(config, participant, _RNG_FMRI)
    subj = _rng(config, participant, _RNG_SUBJECT)
    n_vol = round(config.duration_s / config.tr)
    t_vol = np.arange(n_vol) * config.tr
    gain = float(np.exp(subj.normal(0.0, 0.2)))
    cat_patterns = group.category + config.subject_pattern_jitter * config.category_amplitude * (
        subj.normal(size=group.category.shape) * group.category_mask
    )
    valence = group.valence * (1.0 + 0.3 * subj.normal(size=N_ROIS))

    dt = min(0.1, config.tr / 4.0)
    t_fine = np.arange(0.0, config.duration_s + 1.0, dt)
    hrf = canonical_hrf(dt)
    bold = np.zeros((n_vol, N_ROIS))
    for onset, category, level in zip(design.onsets, design.categories, design.levels, strict=True):
        boxcar = ((t_fine >= onset) & (t_fine < onset + config.video_s)).astype(float)
        # normalised so that a sustained stimulus plateaus at 1 (pattern units = % change)
        regressor = np.convolve(boxcar, hrf)[: t_fine.size] / hrf.sum()
        # sampled at mid-volume: a volume integrates signal over its TR
        sampled = np.interp(t_vol + config.tr / 2.0, t_fine, regressor)
        intensity = 1.0 + config.intensity_gain * abs(int(level)) / 4.0
        trial_noise = (
            config.trial_pattern_noise * config.category_amplitude * rng.normal(size=N_ROIS)
        )
        pattern = gain * (
            group.video
            + intensity * cat_patterns[int(category) + 1]
            + (int(level) / 4.0) * valence
            + trial_noise * group.category_mask[int(category) + 1]
        )
        bold += sampled[:, None] * pattern[None, :]
    noise = _ar1(rng, n_vol, N_ROIS, config.ar_coef, config.noise_sd)
    global_signal = _ar1(rng, n_vol, 1, 0.8, config.global_sd)
    global_loading = rng.uniform(0.5, 1.5, size=N_ROIS)
    # slow drift: three low-frequency cosines (periods >= ~2 x the session length / 3)
    k = np.arange(1, 4)
    basis = np.cos(np.pi * np.outer(t_vol / config.duration_s, k))
    drift = basis @ (rng.normal(0.0, config.drift_sd, size=(3, N_ROIS)) / k[:, None])
    baseline = rng.uniform(80.0, 120.0, size=N_ROIS)
    psc = bold + noise + global_signal * global_loading + drift
    data = baseline * (1.0 + psc / 100.0)
    return t_vol, data.astype(np.float32)


def _physiology_targets(
    config: SynthConfig, participant: int, design: _Design
) -> tuple[float, float, np.ndarray, np.ndarray]:
    subj = _rng(config, participant, _RNG_PHYSIO_SUBJECT)
    hr0 = float(subj.uniform(*config.hr_baseline_range))
    rr0 = float(subj.uniform(*config.rr_baseline_range))
    reactivity = float(np.exp(subj.normal(0.0, 0.25)))
    idx = design.categories + 1
    arousal = np.abs(design.levels) / 4.0
    hr_shift = np.asarray(config.hr_shift_by_category)[idx] + config.hr_shift_per_level * (
        arousal * 4.0
    )
    rr_shift = np.asarray(config.rr_shift_by_category)[idx] + config.rr_shift_per_level * (
        arousal * 4.0
    )
    hr_shift = reactivity * hr_shift + subj.normal(0.0, config.hr_trial_sd, size=idx.size)
    rr_shift = reactivity * rr_shift + subj.normal(0.0, config.rr_trial_sd, size=idx.size)
    return hr0, rr0, hr_shift, rr_shift


def _physiology(
    config: SynthConfig, participant: int, design: _Design
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], SynthTruth]:
    hr0, rr0, hr_shift, rr_shift = _physiology_targets(config, participant, design)
    duration = config.duration_s
    t_grid = np.arange(0.0, duration + 5.0, 0.1)

    # respiration first: its phase modulates heart rate (sinus arrhythmia) and PPG amplitude
    rng_r = _rng(config, participant, _RNG_RESP)
    rr = rr0 + _smooth_steps(t_grid, design.onsets, config.video_s, rr_shift, tau=4.0)
    rr += 0.6 * np.sin(2 * np.pi * t_grid / rng_r.uniform(60.0, 120.0) + rng_r.uniform(0, 6.3))
    rr = np.clip(rr, 4.0, 40.0)
    n_breaths = int(duration * 40.0 / 60.0) + 20
    breath_var = config.breath_variability_sd * rng_r.normal(size=n_breaths)
    breaths = _event_times(t_grid, rr, duration + 2.0, breath_var, start=-rng_r.uniform(0, 3))
    t_resp = np.arange(round(duration * config.resp_rate)) / config.resp_rate
    b_idx, b_phase = _phase(t_resp, breaths)
    depth = np.exp(rng_r.normal(0.0, 0.15, size=breaths.size))
    resp = depth[b_idx] * _breath_shape(b_phase)
    resp += 0.15 * np.sin(2 * np.pi * t_resp / rng_r.uniform(80.0, 200.0))
    resp += rng_r.normal(0.0, config.resp_noise_sd, size=t_resp.size)

    # heart: smooth rate + Mayer waves (~0.1 Hz) + sinus arrhythmia, beat-to-beat variability
    rng_h = _rng(config, participant, _RNG_HEART)
    hr = hr0 + _smooth_steps(t_grid, design.onsets, config.video_s, hr_shift, tau=3.0)
    hr += 1.5 * np.sin(2 * np.pi * 0.1 * t_grid + rng_h.uniform(0, 6.3))
    _g_idx, g_phase = _phase(t_grid, breaths)
    hr_driving = hr + 2.0 * np.sin(2 * np.pi * g_phase)
    hr_driving = np.clip(hr_driving, 35.0, 180.0)
    n_beats = int(duration * 200.0 / 60.0) + 20
    hrv = sps.lfilter([1.0], [1.0, -0.5], rng_h.normal(0.0, config.hrv_sd, size=n_beats))
    beats = _event_times(t_grid, hr_driving, duration + 2.0, hrv, start=-rng_h.uniform(0, 1))

    rng_p = _rng(config, participant, _RNG_PPG)
    t_ppg = np.arange(round(duration * config.ppg_rate)) / config.ppg_rate
    p_idx, p_phase = _phase(t_ppg, beats)
    amp = np.exp(rng_p.normal(0.0, 0.05, size=beats.size))
    resp_at_ppg = np.interp(t_ppg, t_resp, resp)
    ppg = amp[p_idx] * (1.0 + 0.1 * resp_at_ppg) * _ppg_pulse(p_phase)
    ppg += 0.1 * resp_at_ppg + 0.2 * np.sin(2 * np.pi * t_ppg / rng_p.uniform(20.0, 60.0))
    ppg += rng_p.normal(0.0, config.ppg_noise_sd, size=t_ppg.size)

    truth = SynthTruth(
        beat_times=beats[(beats >= 0) & (beats <= duration)],
        breath_times=breaths[(breaths >= 0) & (breaths <= duration)],
        time=t_grid[t_grid <= duration],
        heart_rate=hr[t_grid <= duration],
        respiration_rate=rr[t_grid <= duration],
        trial_heart_rate=hr0 + hr_shift,
        trial_respiration_rate=rr0 + rr_shift,
    )
    return (t_ppg, ppg.astype(np.float32)), (t_resp, resp.astype(np.float32)), truth


def _design(config: SynthConfig, participant: int) -> _Design:
    labels = corpus_labels(config)[participant - 1]
    return _Design(categories=labels[:, 0], levels=labels[:, 1], onsets=config.onsets())


def generate_session(participant_index: int, config: SynthConfig | None = None) -> Session:
    """Session of participant ``participant_index`` (1-based: 1 -> ``P01``) of the corpus.

    Timestamps are seconds from the session start (volume k at k * TR, waveform sample j at
    j / rate). Streams carry the default LSL names and types of :mod:`emorecog_stream.core.streams`.
    ``metadata`` holds ``generator``, ``generator_version``, ``seed``, ``synth_config`` (a dict)
    and ``truth`` (:class:`SynthTruth`, in memory only: XDF files do not carry it).
    """
    config = config or SynthConfig()
    if not 1 <= participant_index <= config.n_participants:
        raise ValueError(
            f"participant index must be 1..{config.n_participants} (P01..."
            f"{participant_id(config.n_participants)}), got {participant_index}"
        )
    pid = participant_id(participant_index)
    design = _design(config, participant_index)
    t_vol, volumes = _fmri(config, participant_index, design, _group_patterns(config))
    (t_ppg, ppg), (t_resp, resp), truth = _physiology(config, participant_index, design)
    source = f"emorecog-synth-{config.seed}-{pid}"
    fmri = SignalStream(
        role=Role.FMRI,
        name=DEFAULT_LSL_NAME[Role.FMRI],
        type=DEFAULT_LSL_TYPE[Role.FMRI],
        data=volumes,
        timestamps=t_vol,
        nominal_srate=1.0 / config.tr,
        channel_labels=roi_labels(),
        units=["a.u."] * N_ROIS,
        source_id=f"{source}-fmri",
    )
    ppg_stream = SignalStream(
        role=Role.PPG,
        name=DEFAULT_LSL_NAME[Role.PPG],
        type=DEFAULT_LSL_TYPE[Role.PPG],
        data=ppg,
        timestamps=t_ppg,
        nominal_srate=config.ppg_rate,
        channel_labels=["ppg"],
        units=["a.u."],
        source_id=f"{source}-ppg",
    )
    resp_stream = SignalStream(
        role=Role.RESP,
        name=DEFAULT_LSL_NAME[Role.RESP],
        type=DEFAULT_LSL_TYPE[Role.RESP],
        data=resp,
        timestamps=t_resp,
        nominal_srate=config.resp_rate,
        channel_labels=["respiration"],
        units=["a.u."],
        source_id=f"{source}-resp",
    )
    markers: list[Marker] = []
    for i, (onset, category, level) in enumerate(
        zip(design.onsets, design.categories, design.levels, strict=True)
    ):
        markers.append(
            Marker(float(onset), make_marker("trial_start", i, int(category), int(level)))
        )
        markers.append(
            Marker(
                float(onset + config.video_s),
                make_marker("trial_end", i, int(category), int(level)),
            )
        )
    return Session(
        participant=pid,
        tr=config.tr,
        fmri=fmri,
        ppg=ppg_stream,
        resp=resp_stream,
        markers=markers,
        atlas=ATLAS,
        metadata={
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": config.seed,
            "synth_config": config.to_dict(),
            "truth": truth,
        },
    )


def generate_corpus(
    config: SynthConfig | None = None, participants: list[int] | None = None
) -> list[Session]:
    """Sessions of ``participants`` (1-based indices; default all ``n_participants``)."""
    config = config or SynthConfig()
    indices = participants if participants is not None else range(1, config.n_participants + 1)
    return [generate_session(i, config) for i in indices]
