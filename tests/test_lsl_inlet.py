"""Async LSL inlets against real outlets on loopback (unique names per test)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pylsl
import pytest

from emorecog_stream.adapters.lsl_inlet import (
    AmbiguousStreamError,
    AsyncInlet,
    Chunk,
    InletGroup,
    InletSpec,
    StreamEvent,
    StreamMismatchError,
    StreamNotFoundError,
    StreamState,
    default_processing_flags,
    pick_stream,
    resolve_one,
)
from emorecog_stream.core.streams import Role

pytestmark = pytest.mark.timeout(60)


async def collect(inlet: AsyncInlet | InletGroup, n_samples: int, timeout: float = 5.0) -> list:
    """Chunks (and events) until ``n_samples`` samples have arrived."""
    items: list = []
    got = 0

    async def run() -> None:
        nonlocal got
        async for item in inlet:
            items.append(item)
            if isinstance(item, Chunk):
                got += len(item)
                if got >= n_samples:
                    return

    await asyncio.wait_for(run(), timeout)
    return items


def chunks_of(items: list, role: Role | None = None) -> list[Chunk]:
    return [i for i in items if isinstance(i, Chunk) and (role is None or i.role is role)]


def events_of(items: list) -> list[StreamEvent]:
    return [i for i in items if isinstance(i, StreamEvent)]


def push_regular(outlet: pylsl.StreamOutlet, t0: float, start: int, n: int, rate: float) -> list:
    ts = (t0 + (start + np.arange(n)) / rate).tolist()
    outlet.push_chunk(np.arange(start, start + n, dtype=np.float32)[:, None], ts)
    return ts


@pytest.mark.parametrize("selector", ["name", "source_id", "type", "name+type+source_id"])
async def test_resolves_by_each_selector(selector, lsl_tag, outlet_factory):
    outlet = outlet_factory(f"PPG-{lsl_tag}", type=f"PPGtype-{lsl_tag}", source_id=f"sid-{lsl_tag}")
    fields = {
        "name": {"name": f"PPG-{lsl_tag}"},
        "source_id": {"source_id": f"sid-{lsl_tag}"},
        "type": {"type": f"PPGtype-{lsl_tag}"},
        "name+type+source_id": {
            "name": f"PPG-{lsl_tag}",
            "type": f"PPGtype-{lsl_tag}",
            "source_id": f"sid-{lsl_tag}",
        },
    }[selector]
    async with AsyncInlet(InletSpec(Role.PPG, channels=1, rate=400, **fields)) as inlet:
        meta = await inlet.open(5.0)
        assert (meta.name, meta.source_id, meta.channel_count) == (
            f"PPG-{lsl_tag}",
            f"sid-{lsl_tag}",
            1,
        )
        assert inlet.state is StreamState.CONNECTED
        sent = push_regular(outlet, pylsl.local_clock(), 0, 8, 400.0)
        items = await collect(inlet, 8)
    data = np.concatenate([c.data for c in chunks_of(items)])
    assert data[:, 0].tolist() == list(range(8))
    assert len(sent) == 8


async def test_not_found_lists_visible_streams(lsl_tag, outlet_factory):
    outlet_factory(f"Other-{lsl_tag}", type="Respiration", channels=1, srate=50)
    spec = InletSpec(Role.PPG, name=f"Missing-{lsl_tag}", type="PPG")
    inlet = AsyncInlet(spec)
    with pytest.raises(StreamNotFoundError) as err:
        await inlet.open(0.6)
    text = str(err.value)
    assert f"Missing-{lsl_tag}" in text  # what was asked for
    assert "visible LSL streams" in text
    assert f"name='Other-{lsl_tag}' type='Respiration' source_id='Other-{lsl_tag}'" in text
    assert "channels=1" in text and "rate=50 Hz" in text and "host=" in text
    assert inlet.state is StreamState.CLOSED


async def test_wrong_channel_count_names_both(lsl_tag, outlet_factory):
    outlet_factory(f"PPG-{lsl_tag}", channels=3)
    with pytest.raises(StreamMismatchError, match="expected 1 channel, found 3"):
        await AsyncInlet(InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", channels=1)).open(5.0)


async def test_wrong_fmri_channel_count(lsl_tag, outlet_factory):
    outlet_factory(f"fMRI-{lsl_tag}", type="fMRI", channels=200, srate=1.0)
    spec = InletSpec.for_role(Role.FMRI, name=f"fMRI-{lsl_tag}", source_id="")
    with pytest.raises(StreamMismatchError, match="expected 246 channels, found 200"):
        await AsyncInlet(spec).open(5.0)


async def test_wrong_rate_names_both(lsl_tag, outlet_factory):
    outlet_factory(f"PPG-{lsl_tag}", srate=250.0)
    spec = InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", rate=500.0, rate_tolerance=0.05)
    with pytest.raises(StreamMismatchError) as err:
        await AsyncInlet(spec).open(5.0)
    assert "expected a nominal rate of 500 Hz" in str(err.value)
    assert "found 250 Hz" in str(err.value)


async def test_rate_within_tolerance_is_accepted(lsl_tag, outlet_factory):
    outlet_factory(f"PPG-{lsl_tag}", srate=398.0)
    spec = InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", rate=400.0, rate_tolerance=0.01)
    async with AsyncInlet(spec) as inlet:
        meta = await inlet.open(5.0)
    assert meta.nominal_srate == 398.0


async def test_markers_must_be_strings(lsl_tag, outlet_factory):
    outlet_factory(f"Mk-{lsl_tag}", type="Markers", srate=0.0)
    with pytest.raises(StreamMismatchError, match="expected string channels for markers"):
        await AsyncInlet(InletSpec(Role.MARKERS, name=f"Mk-{lsl_tag}")).open(5.0)


def test_spec_needs_a_selector_and_sane_rate():
    with pytest.raises(ValueError, match="at least one of name, type or source_id"):
        InletSpec(Role.PPG)
    with pytest.raises(ValueError, match="rate_tolerance"):
        InletSpec(Role.PPG, name="x", rate_tolerance=1.5)


def test_processing_flags_per_role():
    for role in Role:
        flags = default_processing_flags(role)
        assert flags & pylsl.proc_clocksync and flags & pylsl.proc_monotonize
        assert flags & pylsl.proc_threadsafe
        assert bool(flags & pylsl.proc_dejitter) == (role in (Role.PPG, Role.RESP))


async def test_timestamps_preserved_and_clock_corrected(lsl_tag, outlet_factory):
    """Explicit, irregular timestamps arrive as sent (raw) / plus the clock offset (corrected)."""
    outlet = outlet_factory(f"Rates-{lsl_tag}", type="PhysioRates", channels=2, srate=0.0)
    corrected = InletSpec(Role.RATES, name=f"Rates-{lsl_tag}", channels=2, rate=0)
    raw = InletSpec(Role.RATES, name=f"Rates-{lsl_tag}", channels=2, processing_flags=0)
    async with AsyncInlet(corrected) as a, AsyncInlet(raw) as b:
        await asyncio.gather(a.open(5.0), b.open(5.0))
        now = pylsl.local_clock()
        sent = now - np.array([3.0, 2.5, 2.4, 1.0, 0.123456789])
        values = np.array([[60, 15], [61, 15.5], [62, 16], [63, 16.5], [64, 17]], np.float32)
        outlet.push_chunk(values, sent.tolist())
        got_a, got_b = await asyncio.gather(collect(a, 5), collect(b, 5))
        offset = a.status().clock_offset
    ts_a = np.concatenate([c.timestamps for c in chunks_of(got_a)])
    ts_b = np.concatenate([c.timestamps for c in chunks_of(got_b)])
    np.testing.assert_array_equal(ts_b, sent)  # without post-processing: bit-exact
    assert offset is not None and abs(offset) < 1e-3  # same machine: tiny but measured
    np.testing.assert_allclose(ts_a - sent, offset, atol=2e-4)  # clocksync applied
    data = np.concatenate([c.data for c in chunks_of(got_a)])
    np.testing.assert_array_equal(data, values.astype(np.float64))
    assert all(c.receipt_time >= c.timestamps[-1] for c in chunks_of(got_a))


async def test_nan_samples_arrive_as_nan(lsl_tag, outlet_factory):
    outlet = outlet_factory(f"fMRI-{lsl_tag}", type="fMRI", channels=246, srate=1.0)
    spec = InletSpec.for_role(Role.FMRI, name=f"fMRI-{lsl_tag}", source_id="")
    async with AsyncInlet(spec) as inlet:
        await inlet.open(5.0)
        volume = np.arange(246, dtype=np.float32)
        volume[[3, 100]] = np.nan
        volume[7] = np.inf
        outlet.push_sample(volume.tolist(), pylsl.local_clock())
        items = await collect(inlet, 1)
    (chunk,) = chunks_of(items)
    assert chunk.data.shape == (1, 246) and chunk.data.dtype == np.float64
    assert np.isnan(chunk.data[0, [3, 100]]).all() and np.isinf(chunk.data[0, 7])
    assert np.isfinite(chunk.data).sum() == 243


async def test_markers_arrive_as_strings(lsl_tag, outlet_factory):
    outlet = outlet_factory(f"Mk-{lsl_tag}", type="Markers", srate=0.0, fmt=pylsl.cf_string)
    async with AsyncInlet(InletSpec(Role.MARKERS, name=f"Mk-{lsl_tag}")) as inlet:
        await inlet.open(5.0)
        texts = ['{"event":"trial_start","trial":0}', "plain ünïcode marker"]
        for text in texts:
            outlet.push_sample([text], pylsl.local_clock())
        items = await collect(inlet, 2)
    assert [t for c in chunks_of(items) for t in c.data] == texts


async def test_status_reports_rate_samples_lag(lsl_tag, outlet_factory):
    outlet = outlet_factory(f"PPG-{lsl_tag}", srate=500.0)
    async with AsyncInlet(InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", rate=500)) as inlet:
        await inlet.open(5.0)
        t0 = pylsl.local_clock() - 1.0
        for k in range(10):  # 1 s of data in 50-sample chunks, stamped in the past
            push_regular(outlet, t0, 50 * k, 50, 500.0)
        await collect(inlet, 500)
        status = inlet.status()
    assert status.state is StreamState.CONNECTED
    assert status.samples == 500 and status.chunks >= 1
    assert status.measured_srate == pytest.approx(500.0, rel=0.01)
    assert status.last_timestamp == pytest.approx(t0 + 499 / 500, abs=1e-3)
    assert status.lag is not None and status.lag > 0
    assert status.nominal_srate == 500.0 and status.name == f"PPG-{lsl_tag}"


async def test_event_loop_is_not_blocked_while_resolving(lsl_tag):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    with pytest.raises(StreamNotFoundError):
        await AsyncInlet(InletSpec(Role.PPG, name=f"none-{lsl_tag}")).open(1.0)
    task.cancel()
    assert ticks >= 10  # the loop kept running during a >= 1 s resolve


async def test_stall_lost_and_recovery_with_same_source_id(lsl_tag):
    """The outlet disappears (stalled, then lost) and a new one with the same source_id
    comes back: the inlet reconnects by itself and data flows again."""
    name, sid = f"PPG-{lsl_tag}", f"sid-{lsl_tag}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "PPG", 1, 100.0, pylsl.cf_float32, sid))
    spec = InletSpec(Role.PPG, name=name, rate=100, stall_timeout=0.3, lost_after=0.4)
    async with AsyncInlet(spec) as inlet:
        await inlet.open(5.0)
        t0 = pylsl.local_clock()
        push_regular(outlet, t0, 0, 10, 100.0)
        items = await collect(inlet, 10)
        del outlet  # the sender goes away
        items += await wait_state(inlet, StreamState.LOST, 8.0)
        new = pylsl.StreamOutlet(pylsl.StreamInfo(name, "PPG", 1, 100.0, pylsl.cf_float32, sid))
        assert new.wait_for_consumers(10.0)  # liblsl's recovery found it by source_id
        t1 = pylsl.local_clock()
        push_regular(new, t1, 0, 10, 100.0)
        items += await collect(inlet, 10)
        status = inlet.status()
    states = [e.state for e in events_of(items)]
    # (lost -> stalled happens when the new outlet is visible before its first sample)
    assert states[:3] == [StreamState.CONNECTED, StreamState.STALLED, StreamState.LOST]
    assert states[-1] is StreamState.CONNECTED
    assert status.stalls == 1 and status.recoveries == 1
    after = np.concatenate([c.timestamps for c in chunks_of(items)[-1:]])
    assert after[-1] == pytest.approx(t1 + 9 / 100, abs=1e-3)  # fresh, correct timestamps


async def wait_state(inlet: AsyncInlet, state: StreamState, timeout: float) -> list:
    items: list = []

    async def run() -> None:
        async for item in inlet:
            items.append(item)
            if isinstance(item, StreamEvent) and item.state is state:
                return

    await asyncio.wait_for(run(), timeout)
    return items


async def test_pause_does_not_bend_dejittered_timestamps(lsl_tag, outlet_factory):
    """liblsl's dejitter counts samples; after a pause in a live outlet the reader restarts it,
    so post-pause timestamps stay right (without the restart they come out ~1 s early)."""
    outlet = outlet_factory(f"PPG-{lsl_tag}", srate=400.0)
    spec = InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", stall_timeout=10.0)
    assert spec.flags & pylsl.proc_dejitter
    async with AsyncInlet(spec) as inlet:
        await inlet.open(5.0)
        t0 = pylsl.local_clock()
        sent: list[float] = []
        for k in range(10):
            sent += push_regular(outlet, t0, 8 * k, 8, 400.0)
            await asyncio.sleep(0.02)
        items = await collect(inlet, 80)
        await asyncio.sleep(1.0)  # a pause: no samples for 1 s of data time
        t1 = t0 + 1.2
        for k in range(10):
            sent += push_regular(outlet, t1, 8 * k, 8, 400.0)
            await asyncio.sleep(0.02)
        items += await collect(inlet, 80)
    got = np.concatenate([c.timestamps for c in chunks_of(items)])
    np.testing.assert_allclose(got, np.array(sent), atol=2e-3)


async def test_background_start_waits_for_stream(lsl_tag):
    name = f"PPG-{lsl_tag}"
    inlet = AsyncInlet(InletSpec(Role.PPG, name=name))
    inlet.start()
    await asyncio.sleep(0.3)
    assert inlet.state is StreamState.CONNECTING
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "PPG", 1, 100.0, pylsl.cf_float32, name))
    assert await asyncio.to_thread(outlet.wait_for_consumers, 10.0)
    await asyncio.sleep(0.2)  # open_stream completes after the consumer registers
    push_regular(outlet, pylsl.local_clock(), 0, 5, 100.0)
    items = await collect(inlet, 5, timeout=10.0)
    await inlet.close()
    assert events_of(items)[0].state is StreamState.CONNECTED
    assert sum(len(c) for c in chunks_of(items)) == 5


async def test_group_merges_roles_and_fails_cleanly(lsl_tag, outlet_factory):
    ppg = outlet_factory(f"PPG-{lsl_tag}", srate=100.0)
    resp = outlet_factory(f"Resp-{lsl_tag}", type="Respiration", srate=25.0)
    specs = [
        InletSpec(Role.PPG, name=f"PPG-{lsl_tag}"),
        InletSpec(Role.RESP, name=f"Resp-{lsl_tag}"),
    ]
    async with InletGroup(specs) as group:
        meta = await group.open(5.0)
        assert set(meta) == {Role.PPG, Role.RESP}
        t = pylsl.local_clock()
        push_regular(ppg, t, 0, 4, 100.0)
        push_regular(resp, t, 0, 2, 25.0)
        items = await collect(group, 6)
        assert {c.role for c in chunks_of(items)} == {Role.PPG, Role.RESP}
        assert set(group.statuses()) == {Role.PPG, Role.RESP}
    before = {t.name for t in threading.enumerate()}
    missing = [*specs, InletSpec(Role.FMRI, name=f"fMRI-missing-{lsl_tag}", channels=246)]
    with pytest.raises(StreamNotFoundError, match="no fmri stream"):
        await InletGroup(missing).open(0.6)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("lsl-inlet") for name in leftover)


async def test_close_joins_reader_thread(lsl_tag, outlet_factory):
    outlet_factory(f"PPG-{lsl_tag}")
    inlet = AsyncInlet(InletSpec(Role.PPG, name=f"PPG-{lsl_tag}"))
    await inlet.open(5.0)
    thread = inlet._thread
    assert thread is not None and thread.is_alive()
    await inlet.close()
    assert not thread.is_alive()
    assert inlet.state is StreamState.CLOSED
    assert [i async for i in inlet][-1].state is StreamState.CLOSED  # iteration ends


async def test_group_optional_role_connects_later(lsl_tag, outlet_factory):
    """Optional roles (physiology) do not hold up open(); they connect when they appear."""
    outlet_factory(f"fMRI-{lsl_tag}", type="fMRI", channels=246, srate=1.0)
    specs = [
        InletSpec(Role.FMRI, name=f"fMRI-{lsl_tag}", channels=246),
        InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", channels=1),
    ]
    async with InletGroup(specs, optional=[Role.PPG]) as group:
        meta = await group.open(5.0)
        assert set(meta) == {Role.FMRI}
        assert group.statuses()[Role.PPG].state is StreamState.CONNECTING
        ppg = outlet_factory(f"PPG-{lsl_tag}", srate=100.0)
        assert await asyncio.to_thread(ppg.wait_for_consumers, 10.0)
        await asyncio.sleep(0.2)
        push_regular(ppg, pylsl.local_clock(), 0, 3, 100.0)
        items = await collect(group, 3, timeout=10.0)
    assert [(e.role, e.state) for e in events_of(items)][-1] == (Role.PPG, StreamState.CONNECTED)
    assert group.inlets[Role.PPG].metadata is not None


def test_two_matching_streams_are_ambiguous(lsl_tag, outlet_factory):
    outlet_factory(f"PPG-{lsl_tag}", source_id=f"a-{lsl_tag}")
    outlet_factory(f"PPG-{lsl_tag}", source_id=f"b-{lsl_tag}")
    spec = InletSpec(Role.PPG, name=f"PPG-{lsl_tag}")
    infos = pylsl.resolve_bypred(spec.predicate, 2, 10.0)
    assert len(infos) == 2
    with pytest.raises(AmbiguousStreamError) as err:
        pick_stream(spec, infos)
    assert f"source_id='a-{lsl_tag}'" in str(err.value)
    assert f"source_id='b-{lsl_tag}'" in str(err.value)
    assert "set name or source_id" in str(err.value)
    # one selector more makes it unique
    info = resolve_one(InletSpec(Role.PPG, name=f"PPG-{lsl_tag}", source_id=f"b-{lsl_tag}"), 5.0)
    assert info.source_id() == f"b-{lsl_tag}"


def test_paced_reader_hurries_only_until_the_waiting_volume_is_covered():
    """The hub's paced physiology: with a volume waiting (``urgent`` set, ``needed()`` its
    timestamp) the reader goes straight back to pulling until it has delivered a sample at or
    after that timestamp; then it clears ``urgent`` itself and lets samples gather for up to
    ``pace`` s - however far behind the event loop may be."""
    urgent = threading.Event()
    needed = [100.0]
    inlet = AsyncInlet(
        InletSpec.for_role(Role.PPG, "pace"), pace=0.3, urgent=urgent, needed=lambda: needed[0]
    )
    urgent.set()
    t0 = time.monotonic()
    inlet._gather(99.9)  # the volume at 100.0 is not covered yet: no waiting
    assert urgent.is_set() and time.monotonic() - t0 < 0.1
    t0 = time.monotonic()
    inlet._gather(100.0)  # covered: stop hurrying, gather for the pace
    assert not urgent.is_set() and time.monotonic() - t0 >= 0.25
    # a new volume wakes a gathering reader at once
    waker = threading.Timer(0.05, lambda: (needed.__setitem__(0, 101.0), urgent.set()))
    t0 = time.monotonic()
    waker.start()
    inlet._gather(100.5)
    waker.join()
    assert urgent.is_set() and time.monotonic() - t0 < 0.25
