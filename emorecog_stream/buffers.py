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

Deferred checks (why: the aligner pushes many small chunks per fMRI volume, and one numpy call
costs about a microsecond, more than copying 25 samples). An append whose first and last
timestamps are finite, in order and not older than the newest held sample is copied in at once;
the check that the timestamps *inside* it are sorted and finite, and the dropping of consumed
samples beyond the capacity, wait until the buffer is next read (any query, :meth:`consume`, a
counter, or an append that needs the careful path). That check covers all chunks appended since
in one vectorised comparison. If it fails, the chunks since the last check are taken out again
and re-appended one by one through the careful path, so the contents and counters are exactly
what appending them one by one with the full checks gives. The array is never enlarged: the fast
path is only taken while the chunk fits before the end of the array and the drop it defers
touches only consumed samples. As reads may finish this deferred work, a buffer is for one
thread.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["RingBuffer"]

_F8 = np.dtype(np.float64)
_SUB = np.subtract
_MIN = np.minimum.reduce  # the ufunc's reduce directly: less call overhead than ndarray.min


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
        self._steps = np.empty(2 * self.capacity, dtype=np.float64)  # the order check's scratch
        self._start = 0  # valid region is [_start, _end) (may exceed capacity until settled)
        self._end = 0
        self._read = 0  # first unconsumed row (>= _start)
        self._consumed_t = -math.inf  # timestamp of the last consumed sample
        self._newest = -math.inf  # timestamp of row _end - 1 (-inf when empty)
        self._check_from = -1  # first row not yet checked for order (-1: all checked)
        self._chunk_starts: list[int] = []  # starts of the unchecked chunks, for a repair
        self._dirty = False  # an order check or a drop beyond the capacity is pending
        self._appended = 0
        self._overwritten = 0
        self._overflow = 0
        self._dropped_late = 0
        self._dropped_bad_time = 0
        self._reordered = 0

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        if self._dirty:
            self._settle()
        return self._end - self._start

    @property
    def appended(self) -> int:
        """Samples accepted."""
        if self._dirty:
            self._settle()
        return self._appended

    @property
    def overwritten(self) -> int:
        """Samples that fell off the old end."""
        if self._dirty:
            self._settle()
        return self._overwritten

    @property
    def overflow(self) -> int:
        """Samples that fell off the old end before :meth:`consume` handed them out."""
        if self._dirty:
            self._settle()
        return self._overflow

    @property
    def dropped_late(self) -> int:
        """Out-of-order samples at or before the consumed position (dropped)."""
        if self._dirty:
            self._settle()
        return self._dropped_late

    @property
    def dropped_bad_time(self) -> int:
        """Samples with a non-finite timestamp (dropped)."""
        if self._dirty:
            self._settle()
        return self._dropped_bad_time

    @property
    def reordered(self) -> int:
        """Chunks that had to be sorted or merged."""
        if self._dirty:
            self._settle()
        return self._reordered

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use (0..1)."""
        if self._dirty:
            self._settle()
        return (self._end - self._start) / self.capacity

    @property
    def latest_timestamp(self) -> float | None:
        """Timestamp of the newest sample, or None when empty."""
        if self._dirty:
            self._settle()
        return float(self._ts[self._end - 1]) if self._end > self._start else None

    @property
    def oldest_timestamp(self) -> float | None:
        """Timestamp of the oldest held sample, or None when empty."""
        if self._dirty:
            self._settle()
        return float(self._ts[self._start]) if self._end > self._start else None

    @property
    def unconsumed(self) -> int:
        """Samples not yet handed out by :meth:`consume`."""
        if self._dirty:
            self._settle()
        return self._end - self._read

    @property
    def consumed_timestamp(self) -> float:
        """Timestamp of the last consumed sample (``-inf`` before any)."""
        if self._dirty:
            self._settle()
        return self._consumed_t

    # ---------------------------------------------------------------- writing
    def append(self, data: np.ndarray, timestamps: np.ndarray) -> int:
        """Add a chunk: ``data`` (n, n_channels) or (n,) for one channel, ``timestamps`` (n,).

        Returns how many samples were accepted (see the module docstring for the policy). For a
        chunk that takes the fast path this is ``n`` at once; should the deferred check find
        samples to drop, the counters say so.
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
        t0 = ts.item(0)
        t1 = ts.item(-1)
        end = self._end
        cap = self.capacity
        # Fast path: ends finite and in order, not older than what we hold; the drop it defers
        # (beyond the capacity) touches consumed rows only; no compaction needed. (t0 > -inf
        # and t1 < inf with t0 <= t1 make both finite; a NaN fails every comparison.)
        if (
            t0 >= self._newest
            and t0 > self._consumed_t
            and t0 <= t1 < math.inf
            and end + n <= 2 * cap
            and end + n - cap <= self._read
        ):
            self._data[end : end + n] = x
            self._ts[end : end + n] = ts
            self._end = end + n
            self._newest = t1
            self._appended += n
            if n > 2 or self._check_from >= 0:  # one or two samples: checked by the above
                if self._check_from < 0:
                    self._check_from = end
                self._chunk_starts.append(end)
            self._dirty = True
            return n
        if self._dirty:
            self._settle()
        return self._append_checked(x, ts)

    def _append_checked(self, x: np.ndarray, ts: np.ndarray) -> int:
        """Append with every check done now (nothing pending)."""
        n = ts.shape[0]
        start, end = self._start, self._end
        t0 = ts.item(0)
        # Finite, sorted, and newer than what we hold? A NaN/Inf inside the chunk makes some
        # difference NaN or negative, so the min() test catches it too.
        if (
            (end == start or t0 >= self._ts.item(end - 1))
            and t0 > self._consumed_t
            and math.isfinite(t0)
            and math.isfinite(ts.item(-1))
            and (n == 1 or (ts[1:] - ts[:-1]).min() >= 0.0)
        ):
            self._write(x, ts)
            return n
        return self._append_slow(x, ts)

    def _settle(self) -> None:
        """Do the deferred work: check the order of the chunks appended on the fast path
        (repairing if one was not in order), then drop rows beyond the capacity."""
        self._dirty = False
        c = self._check_from
        if c >= 0:
            e = self._end
            lo = c if c > self._start else c + 1  # steps from the row before, if held
            ts = self._ts
            # in order and finite: no step negative or NaN (NaN propagates through the min)
            if e <= lo or _MIN(_SUB(ts[lo:e], ts[lo - 1 : e - 1], out=self._steps[lo:e])) >= 0.0:
                self._check_from = -1
                self._chunk_starts.clear()
            else:
                self._repair()
        over = self._end - self._start - self.capacity
        if over > 0:
            self._drop_front(over)

    def _repair(self) -> None:
        """A fast-path chunk was not sorted or finite inside: take the unchecked chunks out and
        append them again, one by one, with every check (the state before them is unchanged,
        so the result is what checking each at its append would have given)."""
        c, e = self._check_from, self._end
        bounds = [*self._chunk_starts, e]
        xs = self._data[c:e].copy()
        tss = self._ts[c:e].copy()
        self._check_from = -1
        self._chunk_starts = []
        self._appended -= e - c
        self._end = c
        self._newest = float(self._ts[c - 1]) if c > self._start else -math.inf
        # (rows beyond the capacity are dropped by the first re-append: the deferred drop
        # touched consumed rows only, so when it happens changes nothing else)
        for a, b in itertools.pairwise(bounds):
            self._append_checked(xs[a - c : b - c], tss[a - c : b - c])

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
            self._dropped_bad_time += int(ts.shape[0] - np.count_nonzero(good))
            x, ts = x[good], ts[good]
        fresh = ts > self._consumed_t
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
        if self._end == self._start or ts[0] >= self._ts[self._end - 1]:
            self._write(x, ts)
            return n
        # Merge into the unconsumed tail: rows from the first held sample newer than ts[0].
        self._reordered += 1
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
            self._overwritten += skip
            self._overflow += skip  # never seen by a consumer
            self._appended += skip
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
        self._newest = float(ts[-1])
        self._appended += n

    def _drop_front(self, k: int) -> None:
        if k <= 0:
            return
        new_start = self._start + k
        self._overwritten += k
        if self._read < new_start:
            self._overflow += new_start - self._read
            # unconsumed samples lost: consumers resume after them
            self._consumed_t = max(self._consumed_t, float(self._ts[new_start - 1]))
            self._read = new_start
        self._start = new_start

    # ---------------------------------------------------------------- reading
    def window(self, t_start: float, t_end: float) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the samples with ``t_start <= t <= t_end``: (data (m, ch), timestamps (m,))."""
        if self._dirty:
            self._settle()
        s, e = self._start, self._end
        ts = self._ts[s:e]
        i0 = s + int(ts.searchsorted(t_start, side="left"))
        i1 = s + int(ts.searchsorted(t_end, side="right"))
        return self._data[i0:i1].copy(), self._ts[i0:i1].copy()

    def latest(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the newest ``n`` samples (fewer when the buffer holds fewer)."""
        if self._dirty:
            self._settle()
        i0 = max(self._start, self._end - max(0, int(n)))
        return self._data[i0 : self._end].copy(), self._ts[i0 : self._end].copy()

    def value_at(self, t: float) -> tuple[np.ndarray, float] | None:
        """The sample at or just before ``t`` (a copy) with its timestamp; None if there is none."""
        if self._dirty:
            self._settle()
        s, e = self._start, self._end
        i = s + int(self._ts[s:e].searchsorted(t, side="right")) - 1
        if i < s:
            return None
        return self._data[i].copy(), float(self._ts[i])

    def consume(self, t_end: float) -> tuple[np.ndarray, np.ndarray]:
        """Hand out the unconsumed samples with ``t <= t_end`` once, in order.

        The returned arrays are views, valid until the next :meth:`append`.
        """
        if self._dirty:
            self._settle()
        r, e = self._read, self._end
        if r == e or self._ts[r] > t_end:
            return self._data[r:r], self._ts[r:r]
        if self._ts[e - 1] <= t_end:
            i = e
        else:
            i = r + int(self._ts[r:e].searchsorted(t_end, side="right"))
        self._read = i
        self._consumed_t = float(self._ts[i - 1])
        return self._data[r:i], self._ts[r:i]

    def clear(self) -> None:
        """Forget all samples (counters are kept)."""
        if self._dirty:
            self._settle()
        self._start = self._end = self._read = 0
        self._consumed_t = -math.inf
        self._newest = -math.inf
