"""RingBuffer: bounded, time-sorted, windows by time, overflow visible, ordering policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emorecog_stream.core.buffers import RingBuffer


def _ramp(t0: float, n: int, fs: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    ts = t0 + np.arange(n) / fs
    return np.column_stack([ts * 2, -ts]), ts


def test_append_and_window_by_time() -> None:
    buf = RingBuffer(100, 2)
    assert buf.latest_timestamp is None and len(buf) == 0 and buf.fill == 0.0
    data, ts = _ramp(0.0, 30)
    assert buf.append(data[:10], ts[:10]) == 10
    buf.append(data[10:], ts[10:])
    assert len(buf) == 30 and buf.fill == pytest.approx(0.3)
    assert buf.latest_timestamp == pytest.approx(2.9)
    assert buf.oldest_timestamp == 0.0
    got, got_t = buf.window(1.0, 1.5)
    np.testing.assert_allclose(got_t, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    np.testing.assert_allclose(got[:, 0], got_t * 2)
    got[:] = 0  # a copy: the buffer is untouched
    assert buf.window(1.0, 1.0)[0][0, 0] == pytest.approx(2.0)
    assert buf.window(5.0, 6.0)[0].shape == (0, 2)
    assert buf.latest(3)[1].tolist() == pytest.approx([2.7, 2.8, 2.9])
    value, when = buf.value_at(1.05)
    assert when == pytest.approx(1.0) and value[0] == pytest.approx(2.0)
    assert buf.value_at(-1.0) is None


def test_capacity_is_fixed_and_overflow_counts_unconsumed_losses() -> None:
    buf = RingBuffer(50, 2)
    arrays = (buf._data, buf._ts)
    data, ts = _ramp(0.0, 1000)
    for i in range(0, 1000, 7):
        buf.append(data[i : i + 7], ts[i : i + 7])
        assert len(buf) <= 50
    assert buf._data is arrays[0] and buf._ts is arrays[1]  # never reallocated
    assert len(buf) == 50 and buf.fill == 1.0
    assert buf.overwritten == 950 and buf.overflow == 950  # nothing was consumed
    np.testing.assert_allclose(buf.window(-1, 1e9)[1], ts[-50:])
    # a consumer that keeps up loses nothing
    buf2 = RingBuffer(50, 2)
    for i in range(0, 1000, 7):
        buf2.append(data[i : i + 7], ts[i : i + 7])
        got, _ = buf2.consume(np.inf)
        assert got.shape[0] == min(7, 1000 - i)
    assert buf2.overflow == 0 and buf2.overwritten == 950


def test_chunk_larger_than_capacity_keeps_the_newest() -> None:
    buf = RingBuffer(10, 1)
    buf.append(np.arange(25.0), np.arange(25.0))
    assert len(buf) == 10 and buf.overflow == 15
    np.testing.assert_array_equal(buf.window(0, 100)[1], np.arange(15.0, 25.0))
    # the lost samples are behind the consumer now: a late sample from then is dropped
    assert buf.append(np.array([1.0]), np.array([3.0])) == 0 and buf.dropped_late == 1


def test_consume_hands_out_each_sample_once_in_order() -> None:
    buf = RingBuffer(100, 1)
    buf.append(np.arange(10.0), np.arange(10.0))
    _, got_t = buf.consume(3.5)
    assert got_t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert buf.consumed_timestamp == 3.0 and buf.unconsumed == 6
    assert buf.consume(3.9)[1].shape == (0,)
    assert buf.consume(100.0)[1].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert buf.unconsumed == 0


def test_out_of_order_chunk_is_merged_into_the_unconsumed_part() -> None:
    buf = RingBuffer(100, 1)
    buf.append(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    buf.consume(1.0)
    buf.append(np.array([5.0, 6.0]), np.array([5.0, 6.0]))
    assert buf.append(np.array([3.0, 4.0]), np.array([3.0, 4.0])) == 2  # late but unconsumed
    assert buf.append(np.array([0.5, 2.0]), np.array([0.5, 2.0])) == 1  # 0.5 was consumed
    assert buf.dropped_late == 1 and buf.reordered == 2
    assert buf.appended == 7  # the held samples a merge writes again are not counted twice
    np.testing.assert_array_equal(buf.window(-1, 10)[1], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert buf.consume(10.0)[1].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_in_order_float64_chunks_take_the_compiled_path() -> None:
    class NoCarefulPath(RingBuffer):
        def _append_careful(self, x: np.ndarray, ts: np.ndarray) -> int:
            raise AssertionError("careful path taken")

    buf = NoCarefulPath(8, 2)
    wide = np.arange(60.0).reshape(10, 6)
    assert buf.append(wide[:4, ::3], np.arange(4.0)) == 4  # strided rows of a wider array
    assert buf.append(np.ones((7, 2)), np.arange(4.0, 11.0)) == 7  # wraps: 3 fall off
    assert buf.append(np.ones((1, 2)), np.array([10.0])) == 1  # a tie with the newest
    assert buf.window(-1, 99)[1].tolist() == [4.0, 5, 6, 7, 8, 9, 10, 10]
    assert (buf.appended, buf.overwritten, buf.overflow) == (12, 4, 4)
    with pytest.raises(AssertionError, match="careful"):
        buf.append(np.ones((2, 2)), np.array([12.0, 11.0]))  # unsorted: the careful path


def test_unsorted_chunk_and_bad_timestamps() -> None:
    buf = RingBuffer(100, 1)
    buf.append(np.array([2.0, 1.0, np.nan, 3.0]), np.array([2.0, 1.0, np.nan, 3.0]))
    assert buf.dropped_bad_time == 1 and buf.reordered == 1
    np.testing.assert_array_equal(buf.window(0, 10)[1], [1.0, 2.0, 3.0])
    buf.append(np.array([np.nan]), np.array([4.0]))  # NaN values are kept (consumer decides)
    assert len(buf) == 4 and np.isnan(buf.value_at(4.0)[0][0])
    buf.append(np.array([5.0]), np.array([np.inf]))
    assert buf.dropped_bad_time == 2


def test_equal_timestamps_keep_arrival_order() -> None:
    buf = RingBuffer(10, 1)
    buf.append(np.array([1.0, 2.0]), np.array([1.0, 1.0]))
    buf.append(np.array([3.0]), np.array([1.0]))
    assert buf.window(1.0, 1.0)[0][:, 0].tolist() == [1.0, 2.0, 3.0]


def test_bad_shapes_raise_clear_errors() -> None:
    buf = RingBuffer(10, 2)
    with pytest.raises(ValueError, match=r"expected data \(n, 2\)"):
        buf.append(np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="one timestamp per sample"):
        buf.append(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0, 1)
    with pytest.raises(ValueError, match="n_channels"):
        RingBuffer(5, 0)
    one = RingBuffer(10, 1)
    assert one.append(np.zeros(3), np.arange(3.0)) == 3  # (n,) accepted for one channel
    assert buf.append(np.zeros(2), 5.0) == 1  # one sample as (channels,) with a scalar time


def test_float32_storage_and_clear() -> None:
    buf = RingBuffer(10, 3, dtype=np.float32)
    buf.append(np.ones((4, 3)), np.arange(4.0))
    assert buf.window(0, 9)[0].dtype == np.float32
    buf.clear()
    assert len(buf) == 0 and buf.latest_timestamp is None and buf.appended == 4


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 40),
    sizes=st.lists(st.integers(0, 25), min_size=1, max_size=30),
    consume_every=st.integers(1, 5),
)
def test_matches_a_naive_model_under_random_chunking(
    capacity: int, sizes: list[int], consume_every: int
) -> None:
    """Contents, consumption and overflow equal a list-based model for in-order streams."""
    buf = RingBuffer(capacity, 1)
    held: list[float] = []
    consumed_upto = -np.inf
    lost_unconsumed = 0
    t = 0.0
    for k, size in enumerate(sizes):
        ts = t + np.arange(size, dtype=np.float64)
        t += size
        buf.append(ts.copy(), ts)
        held.extend(ts.tolist())
        while len(held) > capacity:
            if held[0] > consumed_upto:
                lost_unconsumed += 1
                consumed_upto = held[0]  # a consumer resumes after what it lost
            held.pop(0)
        assert buf.window(-np.inf, np.inf)[1].tolist() == held
        assert buf.overflow == lost_unconsumed
        if k % consume_every == 0 and held:
            cut = held[len(held) // 2]
            got = buf.consume(cut)[1].tolist()
            assert got == [x for x in held if consumed_upto < x <= cut]
            consumed_upto = max(consumed_upto, cut)


def _state(buf: RingBuffer) -> tuple:
    data, ts = buf.window(-np.inf, np.inf)
    return (
        data.tolist(),
        ts.tolist(),
        len(buf),
        buf.unconsumed,
        buf.consumed_timestamp,
        buf.latest_timestamp,
        buf.appended,
        buf.overwritten,
        buf.overflow,
        buf.dropped_late,
        buf.dropped_bad_time,
        buf.reordered,
    )


class _CarefulBuffer(RingBuffer):
    _in_order = staticmethod(lambda *args: -1)  # the compiled path declines every chunk


_chunk = st.tuples(
    st.integers(0, 12),  # size
    st.sampled_from(["sorted", "sorted", "sorted", "shuffled", "nan", "older", "ties"]),
    st.floats(-3.0, 3.0),  # start offset from the newest timestamp so far
)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 30),
    ops=st.lists(
        st.one_of(_chunk, st.just("check"), st.floats(-5.0, 40.0)),  # float: consume(t)
        min_size=1,
        max_size=40,
    ),
)
def test_the_compiled_path_gives_what_the_careful_path_gives(capacity: int, ops: list) -> None:
    """In-order float64 chunks take one compiled call; a buffer with that path switched off
    (every chunk through the careful Python path) must end up with the same contents and
    counters, whatever the chunk: unsorted, NaN times, older, ties."""
    lazy = RingBuffer(capacity, 1)
    eager = _CarefulBuffer(capacity, 1)
    rng = np.random.default_rng(len(ops) * 7919 + capacity)
    newest = 0.0
    for op in ops:
        if op == "check":
            assert _state(lazy) == _state(eager)
        elif isinstance(op, float):
            a = lazy.consume(op)
            b = eager.consume(op)
            assert a[1].tolist() == b[1].tolist() and a[0].tolist() == b[0].tolist()
        else:
            size, kind, offset = op
            ts = newest + max(offset, 0.0) + np.arange(size) * 0.5
            if kind == "shuffled":
                rng.shuffle(ts)
            elif kind == "nan" and size:
                ts[rng.integers(size)] = np.nan
            elif kind == "older":
                ts = ts + offset - 2.0
            elif kind == "ties":
                ts = np.full(size, newest + max(offset, 0.0))
            values = np.arange(size, dtype=np.float64) + 100 * len(ops)
            assert lazy.append(values, ts) == eager.append(values, ts)
            if size and np.isfinite(ts).any():
                newest = max(newest, float(np.nanmax(ts)))
    assert _state(lazy) == _state(eager)
