"""Fixed-capacity, numpy-backed sample buffers with time-window queries.

Layout: one array of ``2 * capacity`` rows. Samples are appended at the end of the valid region;
when the end of the array is reached, the newest ``capacity`` rows move to the front (one
``memmove`` per ``capacity`` appended samples), so appends are amortised O(1) per sample, the
valid region is always one contiguous, time-sorted slice (window queries are two binary
searches and a slice), and memory never grows.

Ordering policy (why: window queries and the streaming rate estimators need time order):

- Timestamps in the buffer are always non-decreasing.
- A chunk whose timestamps are not sorted is sorted (stably) first; ``reordered`` counts it.
- A chunk that starts before the newest held sample (an out-of-order chunk) is merged into the
  *unconsumed* part of the buffer in time order. Samples at or before the last consumed
  timestamp cannot be merged (a consumer has already moved past that time): they are dropped
  and counted in ``dropped_late``.
- Samples with a non-finite timestamp are dropped and counted in ``dropped_bad_time``. Non-finite
  *values* are kept (the consumer decides; the rate estimators treat them as breaks).

Consumption: :meth:`consume` hands out the samples up to a time once, in order, and advances a
read position; ``overflow`` counts samples that fell off the old end before they were consumed
(a consumer too slow for the capacity), ``overwritten`` all samples that fell off.

Two paths, one result. The aligner appends dozens of small chunks per fMRI volume, and a numpy
call costs about a microsecond, more than copying 25 samples. So a float chunk that arrives in
order (the usual case) takes one compiled call, :func:`_append_in_order`, which checks every
timestamp (finite, sorted, not older than the held samples, newer than the consumed position)
and writes it; any other chunk (unsorted, NaN times, older than held samples, another dtype)
takes the careful path in Python, which drops, sorts and merges, then writes through the same
compiled :func:`_write`. A test checks that a buffer with the compiled path switched off gives
the same contents and counters. Position and counters live in one float64 array shared with the
compiled code (exact to 2**53 samples). A buffer is for one thread, as the engine uses it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import from_dtype, njit, types

__all__ = ["RingBuffer"]

_F8 = np.dtype(np.float64)
_F4 = np.dtype(np.float32)

# Slots of the state array.
_START = 0  # valid rows are [start, end)
_END = 1
_READ = 2  # first unconsumed row (>= start)
_CONSUMED_T = 3  # timestamp of the last consumed sample (-inf before any)
_NEWEST = 4  # timestamp of row end - 1 (-inf when empty)
_APPENDED = 5  # samples accepted
_OVERWRITTEN = 6  # samples that fell off the old end
_OVERFLOW = 7  # ... before they were consumed
_N_STATE = 8


@njit(cache=True, nogil=True)
def _drop_front(tsb: np.ndarray, st: np.ndarray, k: int) -> None:
    """Let the ``k`` oldest rows fall off; unconsumed ones count as overflow."""
    if k <= 0:
        return
    new_start = int(st[_START]) + k
    st[_OVERWRITTEN] += k
    read = int(st[_READ])
    if read < new_start:
        st[_OVERFLOW] += new_start - read
        # unconsumed samples lost: consumers resume after them
        st[_CONSUMED_T] = max(st[_CONSUMED_T], tsb[new_start - 1])
        st[_READ] = new_start
    st[_START] = new_start


@njit(cache=True, nogil=True)
def _write(
    x: np.ndarray, ts: np.ndarray, data: np.ndarray, tsb: np.ndarray, st: np.ndarray
) -> None:
    """Append rows known to be finite, sorted, newer than the consumed position and not older
    than the newest held row; applies the capacity (the oldest rows fall off)."""
    n = ts.shape[0]
    cap = tsb.shape[0] // 2
    first = 0
    if n > cap:
        # everything held falls off, and the chunk's oldest rows are never seen by a consumer
        skip = n - cap
        _drop_front(tsb, st, int(st[_END] - st[_START]))
        st[_OVERWRITTEN] += skip
        st[_OVERFLOW] += skip
        st[_APPENDED] += skip
        st[_CONSUMED_T] = max(st[_CONSUMED_T], ts[skip - 1])
        first = skip
        n = cap
    held = int(st[_END] - st[_START])
    if held + n > cap:
        _drop_front(tsb, st, held + n - cap)
    start, end = int(st[_START]), int(st[_END])
    if end + n > 2 * cap:
        # compact: move the held rows to the front of the array
        held = end - start
        for r in range(held):
            tsb[r] = tsb[start + r]
            for c in range(data.shape[1]):
                data[r, c] = data[start + r, c]
        st[_READ] -= start
        st[_START] = 0
        end = held
    for i in range(n):
        tsb[end + i] = ts[first + i]
        for c in range(data.shape[1]):
            data[end + i, c] = x[first + i, c]
    st[_END] = end + n
    st[_NEWEST] = ts[first + n - 1]
    st[_APPENDED] += n


@njit(cache=True, nogil=True)
def _append_in_order(
    x: np.ndarray, ts: np.ndarray, data: np.ndarray, tsb: np.ndarray, st: np.ndarray
) -> int:
    """Write a chunk whose timestamps are finite, sorted, not older than the newest held
    sample and newer than the consumed position; -1 (nothing written) for any other chunk."""
    n = ts.shape[0]
    prev = st[_NEWEST]
    if not ts[0] > st[_CONSUMED_T]:
        return -1
    for i in range(n):
        t = ts[i]
        if not (t >= prev and t < math.inf):  # (NaN fails both; -inf fails the first)
            return -1
        prev = t
    _write(x, ts, data, tsb, st)
    return n


# Compile now (or load from numba's on-disk cache) what a session will call, so no compile
# happens mid-session: the in-order path for float64 and float32 chunks (contiguous, or rows of
# a wider array; the engine passes contiguous float64), and _write as the careful path calls
# it. Other array types (read-only chunks, say) are compiled at their first append, about half
# a second once per machine (numba caches them on disk), and work the same.
_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))
_F8_ROWS = types.float64[:, ::1]
for _chunk in (_F8_ROWS, types.float64[:, :], types.float32[:, ::1], types.float32[:, :]):
    _append_in_order.compile((_chunk, types.float64[::1], _F8_ROWS, *(types.float64[::1],) * 2))
for _dtype in _DTYPES:
    _rows = types.Array(from_dtype(_dtype), 2, "C")
    _write.compile((_rows, types.float64[::1], _rows, types.float64[::1], types.float64[::1]))


class RingBuffer:
    """A bounded, time-sorted buffer of ``n_channels`` samples with timestamps."""

    _in_order = staticmethod(_append_in_order)  # the compiled path (a test switches it off)

    def __init__(self, capacity: int, n_channels: int, dtype: np.dtype | type = np.float64) -> None:
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1 sample, got {capacity}")
        if int(n_channels) < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        self.capacity = int(capacity)
        self.n_channels = int(n_channels)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be float64 or float32, got {self.dtype}")
        self._data = np.empty((2 * self.capacity, self.n_channels), dtype=self.dtype)
        self._ts = np.empty(2 * self.capacity, dtype=np.float64)
        self._st = np.zeros(_N_STATE, dtype=np.float64)
        self._st[_CONSUMED_T] = -math.inf
        self._st[_NEWEST] = -math.inf
        self._fast = self.dtype == _F8  # float chunks into float64 storage: compiled path
        self._dropped_late = 0
        self._dropped_bad_time = 0
        self._reordered = 0

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return int(self._st[_END] - self._st[_START])

    @property
    def appended(self) -> int:
        """Samples accepted."""
        return int(self._st[_APPENDED])

    @property
    def overwritten(self) -> int:
        """Samples that fell off the old end."""
        return int(self._st[_OVERWRITTEN])

    @property
    def overflow(self) -> int:
        """Samples that fell off the old end before :meth:`consume` handed them out."""
        return int(self._st[_OVERFLOW])

    @property
    def dropped_late(self) -> int:
        """Out-of-order samples at or before the consumed position (dropped)."""
        return self._dropped_late

    @property
    def dropped_bad_time(self) -> int:
        """Samples with a non-finite timestamp (dropped)."""
        return self._dropped_bad_time

    @property
    def reordered(self) -> int:
        """Chunks that had to be sorted or merged."""
        return self._reordered

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use (0..1)."""
        return len(self) / self.capacity

    @property
    def newest(self) -> float:
        """Timestamp of the newest sample, ``-inf`` when empty (cheap: for hot paths)."""
        return self._st.item(_NEWEST)

    @property
    def latest_timestamp(self) -> float | None:
        """Timestamp of the newest sample, or None when empty."""
        return self._st.item(_NEWEST) if len(self) else None

    @property
    def oldest_timestamp(self) -> float | None:
        """Timestamp of the oldest held sample, or None when empty."""
        return self._ts.item(int(self._st[_START])) if len(self) else None

    @property
    def unconsumed(self) -> int:
        """Samples not yet handed out by :meth:`consume`."""
        return int(self._st[_END] - self._st[_READ])

    @property
    def consumed_timestamp(self) -> float:
        """Timestamp of the last consumed sample (``-inf`` before any)."""
        return self._st.item(_CONSUMED_T)

    # ---------------------------------------------------------------- writing
    def append(self, data: np.ndarray, timestamps: np.ndarray) -> int:
        """Add a chunk: ``data`` (n, n_channels) or (n,) for one channel, ``timestamps`` (n,).

        Returns how many samples were accepted (see the module docstring for the policy).
        """
        ts = timestamps
        x = data
        if not (
            type(ts) is np.ndarray
            and type(x) is np.ndarray
            and ts.dtype == _F8
            and ts.ndim == 1
            and x.ndim == 2
        ):
            ts, x = self._normalise(x, ts)
        shape = x.shape
        n = ts.shape[0]
        if shape[0] != n or shape[1] != self.n_channels:
            raise ValueError(
                f"expected data (n, {self.n_channels}) and one timestamp per sample,"
                f" got data {shape} and timestamps {ts.shape}"
            )
        if n == 0:
            return 0
        dtype = x.dtype
        if self._fast and (dtype is _F8 or dtype is _F4):
            got = self._in_order(x, ts, self._data, self._ts, self._st)
            if got >= 0:
                return got
        return self._append_careful(x, ts)

    def _normalise(self, x: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ts = np.asarray(ts, dtype=np.float64)
        if ts.ndim == 0:
            ts = ts.reshape(1)
        x = np.asarray(x)
        if x.ndim == 1 and self.n_channels == 1:
            x = x.reshape(-1, 1)
        elif x.ndim == 1 and ts.shape[0] == 1 and x.shape[0] == self.n_channels:
            x = x.reshape(1, -1)
        if x.ndim != 2 or ts.ndim != 1:
            raise ValueError(
                f"expected data (n, {self.n_channels}) and timestamps (n,),"
                f" got data {x.shape} and timestamps {ts.shape}"
            )
        return ts, x

    def _append_careful(self, x: np.ndarray, ts: np.ndarray) -> int:
        """Any chunk: drop bad and stale timestamps, sort, merge, then write."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        ts = np.ascontiguousarray(ts, dtype=np.float64)
        good = np.isfinite(ts)
        if not good.all():
            self._dropped_bad_time += int(ts.shape[0] - np.count_nonzero(good))
            x, ts = x[good], ts[good]
        fresh = ts > self.consumed_timestamp
        if not fresh.all():
            self._dropped_late += int(ts.shape[0] - np.count_nonzero(fresh))
            x, ts = x[fresh], ts[fresh]
        n = ts.shape[0]
        if n == 0:
            return 0
        if n > 1 and not bool((ts[1:] >= ts[:-1]).all()):
            order = np.argsort(ts, kind="stable")
            x, ts = x[order], ts[order]
            self._reordered += 1
        st = self._st
        if len(self) == 0 or ts[0] >= self.newest:
            _write(x, ts, self._data, self._ts, st)
            return n
        # Merge into the unconsumed tail: rows from the first held sample newer than ts[0].
        self._reordered += 1
        start, end, read = int(st[_START]), int(st[_END]), int(st[_READ])
        lo = max(read, start)
        cut = lo + int(np.searchsorted(self._ts[lo:end], ts[0], side="right"))
        all_t = np.concatenate([self._ts[cut:end], ts])
        all_x = np.concatenate([self._data[cut:end], x])
        order = np.argsort(all_t, kind="stable")  # held samples first among equal times
        st[_END] = cut
        st[_NEWEST] = self._ts[cut - 1] if cut > start else -math.inf
        st[_READ] = min(read, cut)
        st[_APPENDED] -= end - cut  # the held rows taken out are written again
        _write(all_x[order], all_t[order], self._data, self._ts, st)
        return n

    # ---------------------------------------------------------------- reading
    def window(self, t_start: float, t_end: float) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the samples with ``t_start <= t <= t_end``: (data (m, ch), timestamps (m,))."""
        s, e = int(self._st[_START]), int(self._st[_END])
        ts = self._ts[s:e]
        i0 = s + int(ts.searchsorted(t_start, side="left"))
        i1 = s + int(ts.searchsorted(t_end, side="right"))
        return self._data[i0:i1].copy(), self._ts[i0:i1].copy()

    def latest(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the newest ``n`` samples (fewer when the buffer holds fewer)."""
        s, e = int(self._st[_START]), int(self._st[_END])
        i0 = max(s, e - max(0, int(n)))
        return self._data[i0:e].copy(), self._ts[i0:e].copy()

    def value_at(self, t: float) -> tuple[np.ndarray, float] | None:
        """The sample at or just before ``t`` (a copy) with its timestamp; None if there is none."""
        s, e = int(self._st[_START]), int(self._st[_END])
        i = s + int(self._ts[s:e].searchsorted(t, side="right")) - 1
        if i < s:
            return None
        return self._data[i].copy(), float(self._ts[i])

    def consume(self, t_end: float) -> tuple[np.ndarray, np.ndarray]:
        """Hand out the unconsumed samples with ``t <= t_end`` once, in order.

        The returned arrays are views, valid until the next :meth:`append`.
        """
        st = self._st
        r, e = int(st.item(_READ)), int(st.item(_END))
        ts = self._ts
        if r == e or ts.item(r) > t_end:
            return self._data[r:r], ts[r:r]
        i = e if ts.item(e - 1) <= t_end else r + int(ts[r:e].searchsorted(t_end, side="right"))
        st[_READ] = i
        st[_CONSUMED_T] = ts.item(i - 1)
        return self._data[r:i], ts[r:i]

    def clear(self) -> None:
        """Forget all samples (counters are kept)."""
        st = self._st
        st[_START] = st[_END] = st[_READ] = 0
        st[_CONSUMED_T] = -math.inf
        st[_NEWEST] = -math.inf
