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
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RingBuffer"]

_F8 = np.dtype(np.float64)


class RingBuffer:
    """A bounded, time-sorted buffer of ``n_channels`` samples with timestamps."""

    def __init__(self, capacity: int, n_channels: int, dtype: np.dtype | type = np.float64) -> None:
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1 sample, got {capacity}")
        if int(n_channels) < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        self.capacity = int(capacity)
        self.n_channels = int(n_channels)
        self.dtype = np.dtype(dtype)
        self._data = np.empty((2 * self.capacity, self.n_channels), dtype=self.dtype)
        self._ts = np.empty(2 * self.capacity, dtype=np.float64)
        self._start = 0  # valid region is [_start, _end)
        self._end = 0
        self._read = 0  # first unconsumed row (>= _start)
        self._consumed_t = -math.inf  # timestamp of the last consumed sample
        self.appended = 0  # samples accepted
        self.overwritten = 0  # samples that fell off the old end
        self.overflow = 0  # ... of which had not been consumed yet
        self.dropped_late = 0  # out-of-order samples older than the consumed position
        self.dropped_bad_time = 0  # samples with a non-finite timestamp
        self.reordered = 0  # chunks that had to be sorted or merged

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return self._end - self._start

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use (0..1)."""
        return (self._end - self._start) / self.capacity

    @property
    def latest_timestamp(self) -> float | None:
        """Timestamp of the newest sample, or None when empty."""
        return float(self._ts[self._end - 1]) if self._end > self._start else None

    @property
    def oldest_timestamp(self) -> float | None:
        """Timestamp of the oldest held sample, or None when empty."""
        return float(self._ts[self._start]) if self._end > self._start else None

    @property
    def unconsumed(self) -> int:
        """Samples not yet handed out by :meth:`consume`."""
        return self._end - self._read

    @property
    def consumed_timestamp(self) -> float:
        """Timestamp of the last consumed sample (``-inf`` before any)."""
        return self._consumed_t

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
        n = ts.shape[0]
        if x.shape != (n, self.n_channels):
            raise ValueError(
                f"expected data (n, {self.n_channels}) and one timestamp per sample,"
                f" got data {x.shape} and timestamps {ts.shape}"
            )
        if n == 0:
            return 0
        start, end = self._start, self._end
        t0 = ts.item(0)
        # Fast path: finite, sorted, and newer than what we hold. A NaN/Inf inside the chunk
        # makes some difference NaN or negative, so the min() test catches it too.
        if (
            (end == start or t0 >= self._ts.item(end - 1))
            and t0 > self._consumed_t
            and math.isfinite(t0)
            and math.isfinite(ts.item(-1))
            and (n == 1 or (ts[1:] - ts[:-1]).min() >= 0.0)
        ):
            cap = self.capacity
            if end - start + n <= cap and end + n <= 2 * cap:  # no eviction, no compaction
                self._data[end : end + n] = x
                self._ts[end : end + n] = ts
                self._end = end + n
                self.appended += n
            else:
                self._write(x, ts)
            return n
        return self._append_slow(x, ts)

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

    def _append_slow(self, x: np.ndarray, ts: np.ndarray) -> int:
        good = np.isfinite(ts)
        if not good.all():
            self.dropped_bad_time += int(ts.shape[0] - np.count_nonzero(good))
            x, ts = x[good], ts[good]
        fresh = ts > self._consumed_t
        if not fresh.all():
            self.dropped_late += int(ts.shape[0] - np.count_nonzero(fresh))
            x, ts = x[fresh], ts[fresh]
        n = ts.shape[0]
        if n == 0:
            return 0
        if n > 1 and not bool((ts[1:] >= ts[:-1]).all()):
            order = np.argsort(ts, kind="stable")
            x, ts = x[order], ts[order]
            self.reordered += 1
        if self._end == self._start or ts[0] >= self._ts[self._end - 1]:
            self._write(x, ts)
            return n
        # Merge into the unconsumed tail: rows from the first held sample newer than ts[0].
        self.reordered += 1
        lo = max(self._read, self._start)
        cut = lo + int(np.searchsorted(self._ts[lo : self._end], ts[0], side="right"))
        tail_x = self._data[cut : self._end].copy()
        tail_t = self._ts[cut : self._end].copy()
        all_t = np.concatenate([tail_t, ts])
        all_x = np.concatenate([tail_x, x.astype(self.dtype, copy=False)])
        order = np.argsort(all_t, kind="stable")  # held samples first among equal times
        self._end = cut
        if self._read > cut:
            self._read = cut
        self._write(all_x[order], all_t[order])
        return n

    def _write(self, x: np.ndarray, ts: np.ndarray) -> None:
        n = ts.shape[0]
        cap = self.capacity
        if n > cap:
            skip = n - cap
            self._drop_front(self._end - self._start)  # everything held falls off
            self.overwritten += skip
            self.overflow += skip  # never seen by a consumer
            self.appended += skip
            self._consumed_t = max(self._consumed_t, float(ts[skip - 1]))
            x, ts, n = x[skip:], ts[skip:], cap
        held = self._end - self._start
        if held + n > cap:
            self._drop_front(held + n - cap)
        if self._end + n > 2 * cap:
            # compact: move the held rows to the front of the array
            held = self._end - self._start
            self._data[:held] = self._data[self._start : self._end]
            self._ts[:held] = self._ts[self._start : self._end]
            self._read -= self._start
            self._start, self._end = 0, held
        e = self._end
        self._data[e : e + n] = x
        self._ts[e : e + n] = ts
        self._end = e + n
        self.appended += n

    def _drop_front(self, k: int) -> None:
        if k <= 0:
            return
        new_start = self._start + k
        self.overwritten += k
        if self._read < new_start:
            self.overflow += new_start - self._read
            # unconsumed samples lost: consumers resume after them
            self._consumed_t = max(self._consumed_t, float(self._ts[new_start - 1]))
            self._read = new_start
        self._start = new_start

    # ---------------------------------------------------------------- reading
    def window(self, t_start: float, t_end: float) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the samples with ``t_start <= t <= t_end``: (data (m, ch), timestamps (m,))."""
        s, e = self._start, self._end
        ts = self._ts[s:e]
        i0 = s + int(np.searchsorted(ts, t_start, side="left"))
        i1 = s + int(np.searchsorted(ts, t_end, side="right"))
        return self._data[i0:i1].copy(), self._ts[i0:i1].copy()

    def latest(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the newest ``n`` samples (fewer when the buffer holds fewer)."""
        i0 = max(self._start, self._end - max(0, int(n)))
        return self._data[i0 : self._end].copy(), self._ts[i0 : self._end].copy()

    def value_at(self, t: float) -> tuple[np.ndarray, float] | None:
        """The sample at or just before ``t`` (a copy) with its timestamp; None if there is none."""
        s, e = self._start, self._end
        i = s + int(np.searchsorted(self._ts[s:e], t, side="right")) - 1
        if i < s:
            return None
        return self._data[i].copy(), float(self._ts[i])

    def consume(self, t_end: float) -> tuple[np.ndarray, np.ndarray]:
        """Hand out the unconsumed samples with ``t <= t_end`` once, in order.

        The returned arrays are views, valid until the next :meth:`append`.
        """
        r, e = self._read, self._end
        if r == e or self._ts[r] > t_end:
            return self._data[r:r], self._ts[r:r]
        if self._ts[e - 1] <= t_end:
            i = e
        else:
            i = r + int(np.searchsorted(self._ts[r:e], t_end, side="right"))
        self._read = i
        self._consumed_t = float(self._ts[i - 1])
        return self._data[r:i], self._ts[r:i]

    def clear(self) -> None:
        """Forget all samples (counters are kept)."""
        self._start = self._end = self._read = 0
        self._consumed_t = -math.inf
