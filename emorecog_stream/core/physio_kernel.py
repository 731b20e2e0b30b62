"""The per-sample loop and the estimate of the streaming rate trackers, compiled with numba.

Why compiled: the aligner feeds each physiology stream once per fMRI volume and then asks for a
rate, and the work is small (a band-pass over a few hundred samples, a lobe scan, a mean over
the ~20 intervals in the window). Written with numpy, scipy and Python lists it was a dozen
library calls and list operations per stream, whose fixed cost (argument checks, temporaries,
scipy's wrappers) was most of the ~60 us a step took. Compiled, a second of PPG at 500 Hz is
fed in about 4 us and an estimate takes about 1.5 us, most of it the call itself.

:func:`track` is the whole per-sample rule of :class:`emorecog_stream.core.physio.PeakRateTracker`:
breaks (non-finite samples, timestamp gaps, filter overflow), the band-pass (direct form II
transposed, each stage computed exactly as ``scipy.signal.lfilter`` computes it, so the output
is bit-identical to ``lfilter``), the lobe detector with its height gate and refractory
period, and the tables it keeps: accepted peaks with prefix sums of their intervals, and the
spans of time that hold data. :func:`estimate` answers from those tables. State lives in small
arrays owned by the tracker. Everything happens per sample, so the same samples in any chunking
give bit-identical results. ``track.py_func`` and ``estimate.py_func`` are the same functions
interpreted (the tests compare them with the compiled ones).

The entry points are compiled for fixed signatures at import (loaded from numba's on-disk cache
after the first time), so the first fMRI volume of a session pays no compile time.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["band_pass", "coefficients", "coverage", "estimate", "new_state", "track"]

# Slots of the tracker's float64 state array.
LAST_T = 0  # timestamp of the last processed sample (-inf before any)
ARMED = 1  # 1: the filtered signal has been <= 0 since the (re)start, so a lobe may begin
IN_LOBE = 2  # 1: inside a positive lobe
LOBE_MAX = 3  # height of the lobe in progress
LOBE_T = 4  # time of that height
REF_HEIGHT = 5  # running mean height of accepted peaks (NaN before any)
RUNNING = 6  # 1: the filter state is valid; 0: it restarts at the next good sample
SEGMENT = 7  # increments at every break of a running filter
SAMPLES = 8  # counters: good samples processed, non-finite samples, gaps
NONFINITE = 9
GAPS = 10
N_PEAKS = 11  # rows in use of the peak table
N_SPANS = 12  # rows in use of the span table
N_STATE = 13

# Slots of the parameter array.
P_GAP = 0  # a step between timestamps above this is a gap
P_GATE = 1  # a lobe must reach this fraction of the running mean height
P_REFRACTORY = 2  # two peaks closer than this (s) are one
P_EMA = 3  # weight of an accepted height in the running mean
P_EMA_REJECTED = 4  # ... and of a rejected one
P_WINDOW = 5  # the estimate's window (s)
P_KEEP = 6  # peaks and spans older than this before the newest one are pruned (s)
P_MIN_INTERVALS = 7  # validity rules of an estimate (see RateMethod)
P_MIN_COVERAGE = 8
P_RATE_LO = 9
P_RATE_HI = 10
P_TRIM_LO = 11  # keep intervals within these x the median (NaN: no trimming)
P_TRIM_HI = 12
N_PARAMS = 13

# Columns of the peak table: one row per accepted peak, oldest first. CUM_* are prefix sums
# over the intervals ending at each peak (an interval is valid when both peaks lie in the same
# segment), so a window's mean interval is two subtractions.
PK_T = 0
PK_HEIGHT = 1
PK_SEGMENT = 2
PK_INTERVAL = 3  # from the previous peak (NaN: the first peak of its segment)
PK_CUM_N = 4
PK_CUM_S = 5
PK_CUM_S2 = 6
N_PEAK_COLUMNS = 7

_PRUNE_ABOVE = 64  # peaks held before pruning is considered
_PRUNE_PROBE = 32  # ... and pruning happens when this one is older than P_KEEP

# Outcomes of estimate (the tracker turns them into a reason).
OK = 0
NO_DATA = 1
LOW_COVERAGE = 2
FEW_PEAKS = 3
FEW_INTERVALS = 4
FEW_REGULAR = 5
IMPLAUSIBLE = 6


def coefficients(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The band-pass as the 10 numbers :func:`_filter` takes: ``b0..b4, a1..a4, 0`` for one
    order-4 stage, or ``b0 b1 b2 a1 a2`` of each of two order-2 stages (``a[s, 0] == 1``)."""
    if b.shape == (1, 5) and a[0, 0] == 1.0:
        return np.array([*b[0], *a[0, 1:], 0.0], dtype=np.float64)
    if b.shape == (2, 3) and a[0, 0] == 1.0 and a[1, 0] == 1.0:
        return np.array([*b[0], *a[0, 1:], *b[1], *a[1, 1:]], dtype=np.float64)
    raise ValueError(
        "the compiled band-pass takes one order-4 stage or two order-2 stages with a[0] == 1,"
        f" got b of shape {b.shape}"
    )


@njit(cache=True, nogil=True)
def _filter(
    c: np.ndarray, one_stage: bool, z0: float, z1: float, z2: float, z3: float, v: float
) -> tuple[float, float, float, float, float]:
    """One sample through the band-pass: ``(output, new state)``. Per stage, ``lfilter``'s
    direct form II transposed recurrence in its order of operations, so the output is
    bit-identical to ``lfilter``'s (the state is four scalars: kept in registers, this is
    twice as fast as a loop over a state array)."""
    if one_stage:
        out = z0 + c[0] * v
        z0 = z1 + v * c[1] - out * c[5]
        z1 = z2 + v * c[2] - out * c[6]
        z2 = z3 + v * c[3] - out * c[7]
        z3 = v * c[4] - out * c[8]
        return out, z0, z1, z2, z3
    out = z0 + c[0] * v
    z0 = z1 + v * c[1] - out * c[3]
    z1 = v * c[2] - out * c[4]
    v = out
    out = z2 + c[5] * v
    z2 = z3 + v * c[6] - out * c[8]
    z3 = v * c[7] - out * c[9]
    return out, z0, z1, z2, z3


@njit("void(f8[:], b1, f8[:], f8[:], f8[:])", cache=True, nogil=True)
def band_pass(c: np.ndarray, one_stage: bool, z: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Filter ``x`` into ``y`` from the four states ``z`` (updated in place): the band-pass
    that :func:`track` applies, on its own (the tests compare it with ``lfilter``)."""
    z0, z1, z2, z3 = z[0], z[1], z[2], z[3]
    for i in range(x.shape[0]):
        y[i], z0, z1, z2, z3 = _filter(c, one_stage, z0, z1, z2, z3, x[i])
    z[0], z[1], z[2], z[3] = z0, z1, z2, z3


@njit(cache=True, nogil=True)
def _push_peak(peaks: np.ndarray, n: int, t: float, height: float, segment: float) -> int:
    """Append a peak row (its interval and prefix sums); returns the new row count."""
    n0 = 0.0
    s0 = 0.0
    q0 = 0.0
    d = math.nan
    if n > 0:
        n0 = peaks[n - 1, PK_CUM_N]
        s0 = peaks[n - 1, PK_CUM_S]
        q0 = peaks[n - 1, PK_CUM_S2]
        if peaks[n - 1, PK_SEGMENT] == segment:
            d = t - peaks[n - 1, PK_T]
            n0 += 1.0
            s0 = s0 + d
            q0 = q0 + d * d
    peaks[n, PK_T] = t
    peaks[n, PK_HEIGHT] = height
    peaks[n, PK_SEGMENT] = segment
    peaks[n, PK_INTERVAL] = d
    peaks[n, PK_CUM_N] = n0
    peaks[n, PK_CUM_S] = s0
    peaks[n, PK_CUM_S2] = q0
    return n + 1


@njit(cache=True, nogil=True)
def _drop_front(table: np.ndarray, n: int, cut: int) -> int:
    """Remove the first ``cut`` of ``n`` rows; returns the new row count."""
    if cut > 0:
        for r in range(n - cut):  # forward: each source row is read before it is written
            for c in range(table.shape[1]):
                table[r, c] = table[r + cut, c]
    return n - cut


@njit(cache=True, nogil=True)
def _prune_spans(spans: np.ndarray, n: int, keep_from: float) -> int:
    """Drop the oldest data spans that end before ``keep_from`` (the newest is always kept)."""
    cut = 0
    while n - cut > 1 and spans[cut, 1] < keep_from:
        cut += 1
    return _drop_front(spans, n, cut)


_SIGNATURE_TRACK = "void(f8[:], f8[:], f8[:], b1, f8[:], f8[:], f8[:], f8[:], f8[:, :], f8[:, :])"


@njit(_SIGNATURE_TRACK, cache=True, nogil=True)
def track(
    ts: np.ndarray,
    x: np.ndarray,
    c: np.ndarray,
    one_stage: bool,
    z_unit: np.ndarray,
    z: np.ndarray,
    state: np.ndarray,
    params: np.ndarray,
    peaks: np.ndarray,
    spans: np.ndarray,
) -> None:
    """Process samples ``(ts, x)`` (finite, non-decreasing timestamps, none older than
    ``state[LAST_T]``; values may be non-finite), recording accepted peaks in ``peaks`` and
    the spans of time that hold data in ``spans``. The band-pass is ``(c, one_stage)`` (see
    :func:`coefficients`), its four states ``z`` and their steady state for an input of 1
    ``z_unit``.

    The caller guarantees room: ``len(x) // 2 + 2`` free peak rows (a lobe takes a positive
    and a non-positive sample) and ``len(x) + 1`` free span rows.
    """
    gap = params[P_GAP]
    gate = params[P_GATE]
    refractory = params[P_REFRACTORY]
    ema = params[P_EMA]
    ema_rejected = params[P_EMA_REJECTED]
    keep = params[P_KEEP]
    last_t = state[LAST_T]
    armed = state[ARMED] != 0.0
    in_lobe = state[IN_LOBE] != 0.0
    lobe_max = state[LOBE_MAX]
    lobe_t = state[LOBE_T]
    ref = state[REF_HEIGHT]
    running = state[RUNNING] != 0.0
    segment = state[SEGMENT]
    samples = state[SAMPLES]
    nonfinite = state[NONFINITE]
    gaps = state[GAPS]
    n_peaks = int(state[N_PEAKS])
    n_spans = int(state[N_SPANS])
    z0, z1, z2, z3 = z[0], z[1], z[2], z[3]
    n = x.shape[0]
    for i in range(n + 1):  # (one step past the end, for the overflow check)
        t = 0.0
        v = 0.0
        bad = False
        is_gap = False
        if i < n:
            t = ts[i]
            v = x[i]
            bad = not math.isfinite(v)
            # a gap just before a bad sample is not counted (the bad sample breaks anyway)
            is_gap = (not bad) and last_t != -math.inf and t - last_t > gap
        # a run of filtered samples ends at a break or at the end of the call; finite samples
        # so large that the filter state overflowed end the segment there too
        overflow = (i == n or bad or is_gap) and running and not math.isfinite(z0 + z1 + z2 + z3)
        if overflow or bad or is_gap:
            # a break: the segment ends, the lobe in progress is dropped, and the filter
            # restarts at the next good sample
            if running:
                segment += 1.0
            running = False
            armed = False
            in_lobe = False
            lobe_max = -math.inf
        if i == n:
            break
        if is_gap:
            gaps += 1.0
        elif bad:
            nonfinite += 1.0
            if t > last_t:
                last_t = t
            continue
        if not running:
            # a new segment: the filter starts in its steady state for this sample
            z0, z1, z2, z3 = z_unit[0] * v, z_unit[1] * v, z_unit[2] * v, z_unit[3] * v
            running = True
            n_spans = _prune_spans(spans, n_spans, t - keep)
            spans[n_spans, 0] = t
            n_spans += 1
        spans[n_spans - 1, 1] = t
        v, z0, z1, z2, z3 = _filter(c, one_stage, z0, z1, z2, z3, v)
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
        if (
            n_peaks > 0
            and peaks[n_peaks - 1, PK_SEGMENT] == segment
            and lobe_t - peaks[n_peaks - 1, PK_T] < refractory
        ):
            if height <= peaks[n_peaks - 1, PK_HEIGHT]:
                continue
            n_peaks -= 1  # within the refractory period: the higher peak is kept
        n_peaks = _push_peak(peaks, n_peaks, lobe_t, height, segment)
        if n_peaks > _PRUNE_ABOVE and lobe_t - peaks[_PRUNE_PROBE, PK_T] > keep:
            cut = np.searchsorted(peaks[:n_peaks, PK_T], lobe_t - keep)
            n_peaks = _drop_front(peaks, n_peaks, cut)
            n_spans = _prune_spans(spans, n_spans, lobe_t - keep)
    z[0], z[1], z[2], z[3] = z0, z1, z2, z3
    state[LAST_T] = last_t
    state[ARMED] = 1.0 if armed else 0.0
    state[IN_LOBE] = 1.0 if in_lobe else 0.0
    state[LOBE_MAX] = lobe_max
    state[LOBE_T] = lobe_t
    state[REF_HEIGHT] = ref
    state[RUNNING] = 1.0 if running else 0.0
    state[SEGMENT] = segment
    state[SAMPLES] = samples
    state[NONFINITE] = nonfinite
    state[GAPS] = gaps
    state[N_PEAKS] = n_peaks
    state[N_SPANS] = n_spans


@njit("f8(f8[:, :], i8, f8, f8)", cache=True, nogil=True)
def coverage(spans: np.ndarray, n_spans: int, t: float, window: float) -> float:
    """Seconds of data inside ``[t - window, t]``."""
    lo = t - window
    if n_spans > 0 and spans[n_spans - 1, 0] <= lo and spans[n_spans - 1, 1] >= t:
        return t - lo  # the usual case: one run covers the whole window
    total = 0.0
    for k in range(n_spans - 1, -1, -1):
        if spans[k, 1] < lo:
            break
        total += max(0.0, min(spans[k, 1], t) - max(spans[k, 0], lo))
    return total


_SIGNATURE_ESTIMATE = "Tuple((i8, f8, f8, f8, i8, f8))(f8, f8[:], f8[:], f8[:, :], f8[:, :])"


@njit(_SIGNATURE_ESTIMATE, cache=True, nogil=True)
def estimate(
    t: float, state: np.ndarray, params: np.ndarray, peaks: np.ndarray, spans: np.ndarray
) -> tuple[int, float, float, float, int, float]:
    """The rate per minute over ``[t - window, t]`` from the peaks recorded so far.

    Returns ``(outcome, rate, quality, coverage fraction, intervals, cv)``; ``outcome`` is
    :data:`OK` or says why there is no rate (the tracker words the reason).
    """
    window = params[P_WINDOW]
    cover = coverage(spans, int(state[N_SPANS]), t, window) / window
    if cover < params[P_MIN_COVERAGE]:
        return (NO_DATA if cover == 0 else LOW_COVERAGE), math.nan, 0.0, cover, 0, math.nan
    n_peaks = int(state[N_PEAKS])
    times = peaks[:n_peaks, PK_T]
    i0 = np.searchsorted(times, t - window, side="left")
    i1 = np.searchsorted(times, t, side="right") - 1
    if i1 <= i0:
        return FEW_PEAKS, math.nan, 0.0, cover, 0, math.nan
    count = int(peaks[i1, PK_CUM_N] - peaks[i0, PK_CUM_N])
    min_intervals = int(params[P_MIN_INTERVALS])
    if count < min_intervals:
        return FEW_INTERVALS, math.nan, 0.0, cover, count, math.nan
    kept = 1.0
    trim_lo = params[P_TRIM_LO]
    if trim_lo != trim_lo:  # no trimming
        total = peaks[i1, PK_CUM_S] - peaks[i0, PK_CUM_S]
        squares = peaks[i1, PK_CUM_S2] - peaks[i0, PK_CUM_S2]
    else:
        # robust: drop intervals far from the median (split or missed beats), O(k log k)
        valid = np.empty(count, dtype=np.float64)
        k = 0
        for j in range(i0 + 1, i1 + 1):
            d = peaks[j, PK_INTERVAL]
            if d == d:
                valid[k] = d
                k += 1
        srt = np.sort(valid)
        h = count // 2
        med = srt[h] if count % 2 else 0.5 * (srt[h - 1] + srt[h])
        lo = np.searchsorted(srt, med * trim_lo, side="left")
        hi = np.searchsorted(srt, med * params[P_TRIM_HI], side="right")
        kept = (hi - lo) / count
        count = hi - lo
        if count < min_intervals:
            return FEW_REGULAR, math.nan, 0.0, cover, count, math.nan
        total = 0.0
        squares = 0.0
        for j in range(lo, hi):  # in order, one at a time (as Python's sum of a list)
            total += srt[j]
        for j in range(lo, hi):
            squares += srt[j] * srt[j]
    mean = total / count
    rate = 60.0 / mean
    if not params[P_RATE_LO] <= rate <= params[P_RATE_HI]:
        return IMPLAUSIBLE, rate, 0.0, cover, count, math.nan
    var = max(0.0, squares / count - mean * mean)
    cv = math.sqrt(var) / mean
    quality = max(0.0, 1.0 - cv / 0.5) * min(1.0, cover) * kept
    return OK, rate, quality, cover, count, cv


def new_state() -> np.ndarray:
    """The state of a tracker that has seen nothing."""
    state = np.zeros(N_STATE, dtype=np.float64)
    state[LAST_T] = -math.inf
    state[LOBE_MAX] = -math.inf
    state[LOBE_T] = math.nan
    state[REF_HEIGHT] = math.nan
    return state
