"""Replay of sessions as LSL outlets, received by the real async inlets on loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pylsl
import pytest

from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.adapters.lsl_inlet import (
    Chunk,
    InletGroup,
    InletSpec,
    StreamEvent,
    StreamState,
)
from emorecog_stream.adapters.replay import Replayer, ReplayError
from emorecog_stream.core.streams import N_ROIS, Role
from emorecog_stream.recordings.session import SignalStream
from tests.plugins.lsl import make_session

pytestmark = pytest.mark.timeout(60)

ALL = (Role.FMRI, Role.PPG, Role.RESP, Role.MARKERS)


async def replay_and_collect(
    replayer: Replayer,
    specs: list[InletSpec],
    timeout: float = 20.0,
    complete: tuple[Role, ...] | None = None,
) -> tuple[dict[Role, list[Chunk]], list[StreamEvent]]:
    """Open inlets, play the whole replay, and gather every chunk until all has arrived."""
    chunks: dict[Role, list[Chunk]] = {s.role: [] for s in specs}
    events: list[StreamEvent] = []
    replayer.open()
    group = InletGroup(specs)
    await group.open(5.0)
    replayer.start(delay=0.3)

    async def reader() -> None:
        async for item in group:
            if isinstance(item, Chunk):
                chunks[item.role].append(item)
            else:
                events.append(item)

    task = asyncio.create_task(reader())
    try:
        assert await asyncio.wait_for(asyncio.to_thread(replayer.join, timeout), timeout + 1)
        expected = replayer.progress().pushed
        wanted = complete if complete is not None else tuple(chunks)
        for _ in range(100):  # the last pushes may still be in flight
            if all(group.statuses()[r].samples >= n for r, n in expected.items() if r in wanted):
                break
            await asyncio.sleep(0.05)
    finally:
        await group.close()
        await task
        replayer.stop()
    assert replayer.error is None
    return chunks, events


def joined(chunks: list[Chunk]) -> tuple[np.ndarray, np.ndarray | list[str]]:
    ts = np.concatenate([c.timestamps for c in chunks])
    if chunks and isinstance(chunks[0].data, list):
        return ts, [t for c in chunks for t in c.data]
    return ts, np.concatenate([c.data for c in chunks])


async def test_outlets_carry_live_names_and_metadata(lsl_tag):
    session = make_session(n_volumes=4)
    with Replayer(session, speed=2.0, tag=lsl_tag) as replayer:
        replayer.open()
        async with InletGroup([InletSpec.for_role(r, lsl_tag) for r in ALL]) as group:
            meta = await group.open(5.0)
    for role in ALL:
        name, type_, source_id = stream_identity(role, lsl_tag)
        assert (meta[role].name, meta[role].type, meta[role].source_id) == (name, type_, source_id)
        assert meta[role].participant == "P15"
        assert meta[role].tr == pytest.approx(0.5)  # TR scaled by the speed like the rates
    fmri, ppg, resp = meta[Role.FMRI], meta[Role.PPG], meta[Role.RESP]
    assert fmri.channel_count == N_ROIS and fmri.channel_format == "float32"
    assert fmri.channel_labels[:2] == ("BN001", "BN002") and fmri.channel_labels[-1] == "BN246"
    assert set(fmri.channel_types) == {"ROI"} and fmri.atlas == "Brainnetome246"
    assert fmri.nominal_srate == pytest.approx(2.0)  # 1/TR x speed
    assert (ppg.channel_labels, ppg.units, ppg.nominal_srate) == (("pleth",), ("V",), 800.0)
    assert (resp.channel_labels, resp.nominal_srate) == (("resp",), 100.0)
    assert meta[Role.MARKERS].channel_format == "string" and meta[Role.MARKERS].nominal_srate == 0


async def test_speed_20_keeps_relative_timing_values_and_markers(lsl_tag):
    session = make_session(n_volumes=10)  # 10 s of data -> 0.5 s of replay
    replayer = Replayer(session, speed=20.0, tag=lsl_tag)
    chunks, _ = await replay_and_collect(replayer, [InletSpec.for_role(r, lsl_tag) for r in ALL])
    originals = {Role.FMRI: session.fmri, Role.PPG: session.ppg, Role.RESP: session.resp}
    for role, stream in originals.items():
        assert isinstance(stream, SignalStream)
        ts, data = joined(chunks[role])
        assert len(ts) == len(stream), role
        expected = np.array([replayer.timestamp_of(t) for t in stream.timestamps])
        np.testing.assert_allclose(ts, expected, atol=1e-3)  # (t - t0) / speed after the start
        np.testing.assert_allclose(data, stream.data.astype(np.float32), rtol=0, atol=0)
        late = np.array([c.receipt_time - c.timestamps[-1] for c in chunks[role]])
        assert late.min() > -1e-3  # never pushed before its timestamp
        assert np.median(late) < 0.1  # and pushed about when due (generous: shared CPU)
    assert np.mean([len(c) for c in chunks[Role.PPG]]) > 5  # high-rate streams go in chunks
    ts, texts = joined(chunks[Role.MARKERS])
    assert texts == [m.text for m in session.markers]
    np.testing.assert_allclose(
        ts, [replayer.timestamp_of(m.timestamp) for m in session.markers], atol=1e-3
    )
    assert replayer.timestamp_of(session.fmri.timestamps[1]) - replayer.timestamp_of(
        session.fmri.timestamps[0]
    ) == pytest.approx(1.0 / 20)


async def test_loop_and_back_to_back_sessions_continue_timestamps(lsl_tag):
    a = make_session(n_volumes=3, ppg_rate=None, resp_rate=None, markers=False, t0=100.0)
    b = make_session(n_volumes=2, ppg_rate=None, resp_rate=None, markers=False, t0=9000.0)
    b.participant = "P16"
    replayer = Replayer([a, b], speed=20.0, loop=True, tag=lsl_tag)
    replayer.open()
    async with InletGroup([InletSpec.for_role(Role.FMRI, lsl_tag)]) as group:
        meta = await group.open(5.0)
        replayer.start(delay=0.2)
        got: list[Chunk] = []
        async for item in group:
            if isinstance(item, Chunk):
                got.append(item)
                if sum(len(c) for c in got) >= 12:
                    break
    replayer.stop()
    assert meta[Role.FMRI].participant == "P15,P16"
    ts, data = joined(got)
    np.testing.assert_allclose(np.diff(ts[:12]), 1.0 / 20, atol=1e-6)  # one TR apart, always
    first = data[:, 0].tolist()[:12]
    assert first == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 0, 1]  # a, b, a, b, ... again
    assert replayer.progress().loop_index >= 2


@pytest.mark.slow
async def test_drop_stream_vanishes_and_returns(lsl_tag):
    """PPG disappears mid-replay and comes back with the same source_id: the inlet goes
    stalled -> lost -> connected, and post-gap samples carry their original timing."""
    session = make_session(n_volumes=25, resp_rate=None, markers=False)
    replayer = Replayer(session, speed=5.0, tag=lsl_tag)  # 5 s: 3 s left after the return
    specs = [
        InletSpec.for_role(Role.FMRI, lsl_tag),
        InletSpec.for_role(Role.PPG, lsl_tag, stall_timeout=0.3, lost_after=0.3),
    ]

    async def dropper() -> None:
        while replayer.start_time is None or pylsl.local_clock() < replayer.start_time + 0.8:
            await asyncio.sleep(0.02)
        replayer.drop_stream(Role.PPG, 1.2)

    task = asyncio.create_task(dropper())
    chunks, events = await replay_and_collect(replayer, specs, complete=(Role.FMRI,))
    await task
    ppg_states = [e.state for e in events if e.role is Role.PPG]
    assert ppg_states[:4] == [
        StreamState.CONNECTED,
        StreamState.STALLED,
        StreamState.LOST,
        StreamState.CONNECTED,
    ] or ppg_states[:5] == [
        StreamState.CONNECTED,
        StreamState.STALLED,
        StreamState.LOST,
        StreamState.STALLED,  # visible again a moment before its first sample
        StreamState.CONNECTED,
    ]
    assert replayer.start_time is not None
    end = replayer.start_time + replayer.duration
    assert not any(
        e.role is Role.FMRI and e.state is StreamState.STALLED and e.time < end for e in events
    )
    progress = replayer.progress()
    assert progress.dropped[Role.PPG] > 0
    ts, data = joined(chunks[Role.PPG])
    assert len(ts) + progress.dropped[Role.PPG] <= len(session.ppg)  # type: ignore[arg-type]
    gap = np.diff(ts).max()
    assert 1.0 < gap < 3.0
    assert session.ppg is not None
    # every received sample sits at its original (scaled) time, with its original value
    original_ts = np.array([replayer.timestamp_of(t) for t in session.ppg.timestamps])
    index = np.round((ts - original_ts[0]) * 400.0 * 5.0).astype(int)
    np.testing.assert_allclose(ts, original_ts[index], atol=1e-3)
    np.testing.assert_array_equal(data[:, 0], session.ppg.data[index, 0].astype(np.float32))
    assert len(chunks[Role.FMRI]) == len(session.fmri)


def test_bad_sessions_and_arguments_are_clear_errors():
    a = make_session(n_volumes=2)
    b = make_session(n_volumes=2, ppg_rate=100.0)
    with pytest.raises(ReplayError, match=r"ppg: expected a nominal rate of 400 Hz .* found 100"):
        Replayer([a, b])
    with pytest.raises(ReplayError, match="speed must be > 0"):
        Replayer(a, speed=0)
    with pytest.raises(ReplayError, match="no sessions"):
        Replayer([])
    with pytest.raises(KeyError, match="no rates stream"):
        Replayer(a).drop_stream(Role.RATES, 1.0)


async def test_rates_stream_replays_with_live_labels(lsl_tag):
    """Sessions that carry one (heart rate, respiration rate) pair per TR, as the ICBHI .mat
    files do, replay as the irregular 2-channel PhysioRates stream."""
    session = make_session(n_volumes=4, ppg_rate=None, resp_rate=None, markers=False)
    rates = np.array([[70, 14], [71, 15], [72, 16], [73, 17]], dtype=np.float32)
    session.rates = SignalStream(
        Role.RATES, "pnr_rate", "PhysioRates", rates, session.fmri.timestamps, 0.0
    )
    replayer = Replayer(session, speed=20.0, tag=lsl_tag)
    specs = [InletSpec.for_role(Role.FMRI, lsl_tag), InletSpec.for_role(Role.RATES, lsl_tag)]
    replayer.open()
    async with InletGroup([specs[1]]) as group:
        meta = await group.open(5.0)
    assert meta[Role.RATES].channel_labels == ("heart_rate", "respiration_rate")
    assert meta[Role.RATES].units == ("bpm", "breaths/min")
    assert meta[Role.RATES].nominal_srate == 0
    chunks, _ = await replay_and_collect(replayer, specs)
    ts, data = joined(chunks[Role.RATES])
    np.testing.assert_array_equal(data, rates.astype(np.float64))
    np.testing.assert_allclose(ts, joined(chunks[Role.FMRI])[0], atol=1e-3)
