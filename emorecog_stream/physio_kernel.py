"""The per-sample loop of the streaming rate trackers, compiled with numba.

Why compiled: the aligner feeds each physiology stream once per fMRI volume, and the work per
feed (a band-pass over a few hundred samples, then a lobe scan) is small; written with numpy
and scipy it is a dozen library calls whose fixed cost (argument checks, temporaries) is most
of the ~60 us a step used to take. One compiled call does the same work per sample in ~3 us.

:func:`track` is the whole per-sample rule of :class:`emorecog_stream.physio.PeakRateTracker`:
breaks (non-finite samples, timestamp gaps, filter overflow), the band-pass (direct form II
transposed, each stage computed exactly as ``scipy.signal.lfilter`` computes it, so the output
is bit-identical to ``lfilter``), and the lobe detector with its height gate and refractory
period. It keeps its state in small arrays owned by the tracker and reports what the tracker
must record (accepted peaks, data spans). Everything happens per sample, so the same samples in
any chunking give bit-identical results. ``track.py_func`` is the same function interpreted
(the tests compare the two).

Compiled once at import for one signature (loaded from numba's on-disk cache after the first
time), so the first fMRI volume of a session pays no compile time.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["N_STATE", "band_pass", "track"]

# Slots of the tracker's float64 state array.
LAST_T = 0  # timestamp of the last processed sample (-inf before any)
ARMED = 1  # 1: the filtered signal has been <= 0 since the (re)start, so a lobe may begin
IN_LOBE = 2  # 1: inside a positive lobe
LOBE_MAX = 3  # height of the lobe in progress
LOBE_T = 4  # time of that height
REF_HEIGHT = 5  # running mean height of accepted peaks (NaN before any)
RUNNING = 6  # 1: the filter state is valid; 0: it restarts at the next good sample
PEAK_T = 7  # the last accepted peak: time, height, segment (-1: none yet)
PEAK_H = 8
PEAK_SEG = 9
SEGMENT = 10  # increments at every break of a running filter
SAMPLES = 11  # counters: good samples processed, non-finite samples, gaps
NONFINITE = 12
GAPS = 13
N_STATE = 14

# Slots of the parameter array.
P_GAP = 0  # a step between timestamps above this is a gap
P_GATE = 1  # a lobe must reach this fraction of the running mean height
P_REFRACTORY = 2  # two peaks closer than this (s) are one
P_EMA = 3  # weight of an accepted height in the running mean
P_EMA_REJECTED = 4  # ... and of a rejected one
N_PARAMS = 5


@njit(cache=True, nogil=True)
def _filter_sample(b: np.ndarray, a: np.ndarray, z: np.ndarray, v: float) -> float:
    """One sample through the stages ``(b[s], a[s])`` in cascade, updating the state ``z``
    (stages x order) in place: per stage, ``lfilter``'s direct form II transposed recurrence
    (with ``a[s, 0] == 1``), in its order of operations."""
    n_stages, m = b.shape
    for s in range(n_stages):
        out = z[s, 0] + b[s, 0] * v
        for k in range(m - 2):
            z[s, k] = z[s, k + 1] + v * b[s, k + 1] - out * a[s, k + 1]
        z[s, m - 2] = v * b[s, m - 1] - out * a[s, m - 1]
        v = out
    return v


@njit("void(f8[:, :], f8[:, :], f8[:, :], f8[:], f8[:])", cache=True, nogil=True)
def band_pass(b: np.ndarray, a: np.ndarray, z: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Filter ``x`` into ``y`` from state ``z`` (updated in place): the band-pass that
    :func:`track` applies, on its own (the tests compare it with ``scipy.signal.sosfilt``)."""
    for i in range(x.shape[0]):
        y[i] = _filter_sample(b, a, z, x[i])


_SIGNATURE_TRACK = (
    "UniTuple(i8, 3)(f8[:], f8[:], f8[:, :], f8[:, :], f8[:, :], f8[:, :], f8[:], f8[:],"
    " f8[:, :], f8[:, :])"
)


@njit(_SIGNATURE_TRACK, cache=True, nogil=True)
def track(
    ts: np.ndarray,
    x: np.ndarray,
    b: np.ndarray,
    a: np.ndarray,
    z_unit: np.ndarray,
    z: np.ndarray,
    state: np.ndarray,
    params: np.ndarray,
    peaks: np.ndarray,
    spans: np.ndarray,
) -> tuple[int, int, int]:
    """Process samples ``(ts, x)`` (finite, non-decreasing timestamps, none older than
    ``state[LAST_T]``; values may be non-finite).

    ``peaks`` and ``spans`` are scratch rows (at least ``len(x) + 1`` each) filled with what
    the tracker must record: accepted peaks as ``(time, height, segment, replaces_last)``, and
    the data spans ``(start, end)`` of the runs processed. Returns ``(number of peaks, number of
    spans, 1 if the first span continues the tracker's last one else 0)``.
    """
    gap = params[P_GAP]
    gate = params[P_GATE]
    refractory = params[P_REFRACTORY]
    ema = params[P_EMA]
    ema_rejected = params[P_EMA_REJECTED]
    last_t = state[LAST_T]
    armed = state[ARMED] != 0.0
    in_lobe = state[IN_LOBE] != 0.0
    lobe_max = state[LOBE_MAX]
    lobe_t = state[LOBE_T]
    ref = state[REF_HEIGHT]
    running = state[RUNNING] != 0.0
    peak_t = state[PEAK_T]
    peak_h = state[PEAK_H]
    peak_seg = state[PEAK_SEG]
    segment = state[SEGMENT]
    samples = state[SAMPLES]
    nonfinite = state[NONFINITE]
    gaps = state[GAPS]
    n_stages, m = b.shape
    n_peaks = 0
    n_spans = 0
    continues = 0
    n = x.shape[0]
    for i in range(n + 1):
        # A run of filtered samples ends at a break or at the end of the call: finite samples
        # so large that the filter state overflowed end the segment too.
        end_of_run = i == n
        t = 0.0
        v = 0.0
        bad = False
        is_gap = False
        if not end_of_run:
            t = ts[i]
            v = x[i]
            bad = not math.isfinite(v)
            # a gap just before a bad sample is not counted (the bad sample breaks anyway)
            is_gap = (not bad) and last_t != -math.inf and t - last_t > gap
            end_of_run = bad or is_gap
        if end_of_run and running:
            total = 0.0
            for s in range(n_stages):
                for k in range(m - 1):
                    total += z[s, k]
            if not math.isfinite(total):
                segment += 1.0
                running = False
                armed = False
                in_lobe = False
                lobe_max = -math.inf
        if i == n:
            break
        if bad or is_gap:
            if is_gap:
                gaps += 1.0
            else:
                nonfinite += 1.0
            if running:
                segment += 1.0
            running = False
            armed = False
            in_lobe = False
            lobe_max = -math.inf
            if bad:
                if t > last_t:
                    last_t = t
                continue
        if not running:
            for s in range(n_stages):
                for k in range(m - 1):
                    z[s, k] = z_unit[s, k] * v
            running = True
            spans[n_spans, 0] = t
            n_spans += 1
        elif n_spans == 0:
            continues = 1
            spans[0, 0] = math.nan
            n_spans = 1
        spans[n_spans - 1, 1] = t
        v = _filter_sample(b, a, z, v)
        samples += 1.0
        last_t = t
        # lobes: a peak is the maximum of a positive lobe, counted once the lobe is complete
        if v > 0.0:
            if in_lobe:
                if v > lobe_max:
                    lobe_max = v
                    lobe_t = t
            elif armed:  # (not armed: the lobe the (re)start fell into, its start unseen)
                in_lobe = True
                lobe_max = v
                lobe_t = t
            continue
        armed = True
        if not in_lobe:
            continue
        in_lobe = False
        height = lobe_max
        if ref == ref and height < gate * ref:  # ref == ref: not NaN
            # rejected, but the reference sinks slowly towards it, so a lasting drop in
            # amplitude (sensor moved, gain changed) is followed after a few beats
            ref = ref + ema_rejected * (height - ref)
            continue
        ref = height if ref != ref else ref + ema * (height - ref)
        replaces = 0.0
        if peak_seg == segment and lobe_t - peak_t < refractory:
            if height <= peak_h:
                continue
            replaces = 1.0  # within the refractory period: the higher peak is kept
        peaks[n_peaks, 0] = lobe_t
        peaks[n_peaks, 1] = height
        peaks[n_peaks, 2] = segment
        peaks[n_peaks, 3] = replaces
        n_peaks += 1
        peak_t = lobe_t
        peak_h = height
        peak_seg = segment
    state[LAST_T] = last_t
    state[ARMED] = 1.0 if armed else 0.0
    state[IN_LOBE] = 1.0 if in_lobe else 0.0
    state[LOBE_MAX] = lobe_max
    state[LOBE_T] = lobe_t
    state[REF_HEIGHT] = ref
    state[RUNNING] = 1.0 if running else 0.0
    state[PEAK_T] = peak_t
    state[PEAK_H] = peak_h
    state[PEAK_SEG] = peak_seg
    state[SEGMENT] = segment
    state[SAMPLES] = samples
    state[NONFINITE] = nonfinite
    state[GAPS] = gaps
    return n_peaks, n_spans, continues


def new_state() -> np.ndarray:
    """The state of a tracker that has seen nothing."""
    state = np.zeros(N_STATE, dtype=np.float64)
    state[LAST_T] = -math.inf
    state[LOBE_MAX] = -math.inf
    state[LOBE_T] = math.nan
    state[REF_HEIGHT] = math.nan
    state[PEAK_T] = math.nan
    state[PEAK_H] = math.nan
    state[PEAK_SEG] = -1.0
    return state
