"""Aligner: one step per volume, live equals offline whatever the chunking, robust to bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emorecog_stream.core.aligner import Aligner, AlignerConfig, align_session, session_config
from emorecog_stream.core.messages import AlignedStep
from emorecog_stream.core.streams import N_ROIS, Role
from emorecog_stream.recordings.session import Session, SignalStream

PPG_FS = 64.0
RESP_FS = 16.0
TR = 1.0


def _make_session(
    n_volumes: int = 40,
    *,
    rates: bool = True,
    seed: int = 0,
) -> Session:
    """A small recording with the troubles the aligner must survive: NaN ROI values and a
    NaN volume, NaN PPG samples, a PPG gap, respiration that starts late and ends early."""
    rng = np.random.default_rng(seed)
    vol_t = 0.3 + TR * np.arange(n_volumes)
    rois = rng.normal(100, 5, (n_volumes, N_ROIS)).astype(np.float32)
    rois[7, :5] = np.nan
    rois[9, 3] = np.inf
    rois[12] = np.nan
    end = vol_t[-1] + 0.5
    ppg_t = np.arange(-16.0, end, 1 / PPG_FS)
    hr = 72 + 8 * np.sin(2 * np.pi * ppg_t / 30)
    ppg = np.sin(2 * np.pi * np.cumsum(hr / 60) / PPG_FS) ** 5 + 0.05 * rng.standard_normal(
        ppg_t.size
    )
    ppg[np.searchsorted(ppg_t, 5.0) : np.searchsorted(ppg_t, 5.1)] = np.nan
    keep = (ppg_t < 20.0) | (ppg_t > 20.8)  # a 0.8 s gap
    ppg_t, ppg = ppg_t[keep], ppg[keep]
    resp_t = np.arange(-10.0, end - 4.0, 1 / RESP_FS)
    resp = np.sin(2 * np.pi * (14 / 60) * resp_t) + 0.05 * rng.standard_normal(resp_t.size)
    streams = {
        "ppg": SignalStream(Role.PPG, "ppg", "PPG", ppg, ppg_t, PPG_FS),
        "resp": SignalStream(Role.RESP, "resp", "Respiration", resp, resp_t, RESP_FS),
    }
    if rates:
        rate_t = np.arange(-3.5, end, 1.0)
        values = np.column_stack([np.full(rate_t.size, 71.0), np.full(rate_t.size, 13.0)])
        streams["rates"] = SignalStream(Role.RATES, "rates", "PhysioRates", values, rate_t, 0.0)
    fmri = SignalStream(Role.FMRI, "fmri", "fMRI", rois, vol_t, 1 / TR)
    return Session(participant="T01", tr=TR, fmri=fmri, **streams)


def _same(a: AlignedStep, b: AlignedStep) -> bool:
    def eq(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or x == y

    return (
        a.index == b.index
        and a.timestamp == b.timestamp
        and np.array_equal(a.roi, b.roi)
        and eq(a.heart_rate, b.heart_rate)
        and eq(a.respiration_rate, b.respiration_rate)
        and (a.roi_valid, a.heart_rate_valid, a.respiration_rate_valid)
        == (b.roi_valid, b.heart_rate_valid, b.respiration_rate_valid)
        and eq(a.heart_rate_quality, b.heart_rate_quality)
        and eq(a.respiration_rate_quality, b.respiration_rate_quality)
        and a.roi_nonfinite == b.roi_nonfinite
        and a.deadline_expired == b.deadline_expired
        and (a.heart_rate_source, a.respiration_rate_source)
        == (b.heart_rate_source, b.respiration_rate_source)
        and a.notes == b.notes
    )


SESSION = _make_session()
CONFIG = replace(session_config(SESSION), deadline_s=5.0)
OFFLINE = align_session(SESSION, CONFIG)


def _chunked_feed(
    session: Session, rng: np.random.Generator, max_chunk_s: float, jitter_s: float
) -> list[tuple[float, float, Role, np.ndarray, np.ndarray]]:
    """Chunks of every stream, each with an arrival time (last sample + jitter, never before
    the stream's previous chunk: LSL keeps a stream's order), interleaved by arrival (ties in
    random order)."""
    feed = []
    for stream in session.streams:
        n = len(stream)
        fs = stream.nominal_srate or 1.0
        hi = max(1, round(max_chunk_s * fs))
        i = 0
        arrival = -math.inf
        while i < n:
            j = min(n, i + int(rng.integers(1, hi + 1)))
            ts = stream.timestamps[i:j]
            arrival = max(arrival + 1e-9, float(ts[-1]) + float(rng.uniform(0.0, jitter_s)))
            feed.append((arrival, float(rng.random()), stream.role, stream.data[i:j], ts))
            i = j
    feed.sort(key=lambda c: (c[0], c[1]))
    return feed


def test_offline_alignment_has_one_step_per_volume_with_the_troubles_flagged() -> None:
    steps = OFFLINE
    assert [s.index for s in steps] == list(range(SESSION.n_volumes))
    assert [s.timestamp for s in steps] == SESSION.fmri.timestamps.tolist()
    for s in steps:
        assert s.roi.dtype == np.float32 and s.roi.shape == (N_ROIS,)
        assert np.isfinite(s.roi).all()  # never a NaN into the model
    assert steps[7].roi_nonfinite == 5 and steps[7].roi_valid
    np.testing.assert_array_equal(steps[7].roi[:5], steps[6].roi[:5])  # last finite value
    assert steps[9].roi_nonfinite == 1
    assert steps[12].roi_nonfinite == N_ROIS and not steps[12].roi_valid
    np.testing.assert_array_equal(steps[12].roi, steps[11].roi)
    assert any("non-finite ROI" in note for note in steps[12].notes)
    # heart rate from the PPG waveform, present throughout
    assert all(s.heart_rate_valid and s.heart_rate_source == "ppg" for s in steps)
    assert all(60 < s.heart_rate < 85 for s in steps)
    assert any("ppg: " in note and "non-finite" in note for s in steps for note in s.notes)
    # respiration: rates stream until the belt covers 80% of 30 s, then the waveform
    early, late = steps[0], steps[25]
    assert early.respiration_rate_source == "rates" and early.respiration_rate == 13.0
    assert late.respiration_rate_source == "resp"
    assert late.respiration_rate == pytest.approx(14.0, abs=0.7)
    # the belt stops 4 s before the end: those volumes wait for the deadline, then go out
    tail = [s for s in steps if s.timestamp > SESSION.resp.timestamps[-1]]
    assert tail and all(s.deadline_expired for s in tail)
    assert all("resp" in " ".join(s.notes) for s in tail)
    assert not any(s.deadline_expired for s in steps[: -len(tail)])


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    max_chunk_s=st.floats(0.05, 2.0),
    jitter_s=st.floats(0.0, 1.0),
)
def test_live_steps_equal_offline_whatever_the_chunking_interleaving_and_jitter(
    seed: int, max_chunk_s: float, jitter_s: float
) -> None:
    rng = np.random.default_rng(seed)
    aligner = Aligner(CONFIG)
    live: list[AlignedStep] = []
    for arrival, _, role, data, ts in _chunked_feed(SESSION, rng, max_chunk_s, jitter_s):
        aligner.push(role, data, ts)
        live.extend(aligner.poll(arrival))
        deadline = aligner.next_deadline()
        assert deadline is None or deadline > arrival or aligner.pending == 0
    live.extend(aligner.flush())
    assert len(live) == len(OFFLINE)
    for a, b in zip(live, OFFLINE, strict=True):
        assert _same(a, b), (a, b)


def _feed_all(aligner: Aligner, session: Session, until: float) -> None:
    for stream in session.streams:
        keep = stream.timestamps <= until
        aligner.push(stream.role, stream.data[keep], stream.timestamps[keep])


def test_a_step_waits_for_physiology_then_goes_out_on_the_deadline() -> None:
    cfg = AlignerConfig(ppg_srate=PPG_FS, resp_srate=RESP_FS, deadline_s=2.0)
    aligner = Aligner(cfg)
    session = _make_session(rates=False)
    vol = session.fmri
    aligner.push(Role.FMRI, vol.data[20:22], vol.timestamps[20:22])
    t20 = float(vol.timestamps[20])
    assert aligner.poll(t20) == []  # no physiology yet
    assert aligner.next_deadline() == pytest.approx(t20 + 2.0)
    assert aligner.poll(t20 + 1.0) == []
    # respiration arrives past the volume, PPG stops short of it
    r = session.resp.timestamps <= t20 + 0.5
    aligner.push(Role.RESP, session.resp.data[r], session.resp.timestamps[r])
    p = session.ppg.timestamps <= t20 - 0.5
    aligner.push(Role.PPG, session.ppg.data[p], session.ppg.timestamps[p])
    assert aligner.poll(t20 + 1.9) == []
    (step,) = aligner.poll(t20 + 2.0)
    assert step.timestamp == t20 and step.deadline_expired
    assert "deadline passed waiting for ppg" in step.notes
    assert step.heart_rate_valid  # 0.5 s short of a 15 s window: still covered
    assert aligner.next_deadline() == pytest.approx(float(vol.timestamps[21]) + 2.0)
    stats = aligner.stats()
    assert stats.steps == 1 and stats.steps_on_deadline == 1 and stats.pending == 1
    # the late PPG now arrives: newer than what the step consumed, so it is kept for the next
    late = (session.ppg.timestamps > t20 - 0.5) & (session.ppg.timestamps <= t20 + 1.5)
    aligner.push(Role.PPG, session.ppg.data[late], session.ppg.timestamps[late])
    assert aligner.stats().streams["ppg"].dropped_late == 0
    # ... but a sample from before what was consumed can no longer be used: dropped, counted
    aligner.push(Role.PPG, np.array([0.0]), np.array([t20 - 1.0]))
    assert aligner.stats().streams["ppg"].dropped_late == 1
    aligner.push(Role.RESP, session.resp.data[~r][:30], session.resp.timestamps[~r][:30])
    (step21,) = aligner.poll(t20 + 1.5)
    assert not step21.deadline_expired and step21.heart_rate_valid and step21.index == 1


def test_vanishing_ppg_is_flagged_missing_and_recovers() -> None:
    cfg = AlignerConfig(ppg_srate=PPG_FS, resp_srate=RESP_FS, expected=(Role.RESP,))
    session = _make_session(n_volumes=60, rates=False)
    ppg = session.ppg
    cut = (ppg.timestamps < 10.0) | (ppg.timestamps > 30.0)  # 20 s without PPG
    session.ppg = SignalStream(Role.PPG, "ppg", "PPG", ppg.data[cut], ppg.timestamps[cut], PPG_FS)
    steps = align_session(session, cfg)
    valid = {round(s.timestamp): s.heart_rate_valid for s in steps}
    assert valid[8] and not valid[25] and valid[59]
    missing = next(s for s in steps if round(s.timestamp) == 25)
    assert math.isnan(missing.heart_rate) and missing.heart_rate_source == ""
    assert any("heart_rate" in note for note in missing.notes)
    assert Aligner(cfg).stats().streams.keys() == {"resp"}


def test_out_of_order_volumes_and_chunks() -> None:
    cfg = AlignerConfig(ppg_srate=PPG_FS, resp_srate=RESP_FS)
    session = _make_session(rates=False)
    vol = session.fmri
    aligner = Aligner(cfg)
    # volumes 3..5 arrive before 0..2; all before the physiology: emitted in time order
    aligner.push(Role.FMRI, vol.data[3:6], vol.timestamps[3:6])
    aligner.push(Role.FMRI, vol.data[0:3], vol.timestamps[0:3])
    # physiology chunks out of order but before any step consumed them: merged
    for stream in (session.ppg, session.resp):
        mid = np.searchsorted(stream.timestamps, 3.0)
        end = np.searchsorted(stream.timestamps, 10.0)
        aligner.push(stream.role, stream.data[mid:end], stream.timestamps[mid:end])
        aligner.push(stream.role, stream.data[:mid], stream.timestamps[:mid])
    steps = aligner.poll(0.0)
    assert [s.timestamp for s in steps] == vol.timestamps[:6].tolist()
    reference = align_session(session, cfg)[:6]
    assert all(_same(a, b) for a, b in zip(steps, reference, strict=True))
    # a volume older than what was emitted is dropped and counted
    aligner.push(Role.FMRI, vol.data[1:2], vol.timestamps[1:2])
    aligner.push(Role.FMRI, vol.data[6:7], np.array([np.nan]))
    assert aligner.pending == 0 and aligner.stats().volumes_dropped == 2


def test_non_monotonic_timestamps_inside_chunks_do_not_break_anything() -> None:
    cfg = AlignerConfig(ppg_srate=PPG_FS, resp_srate=RESP_FS)
    session = _make_session(rates=False)
    aligner = Aligner(cfg)
    rng = np.random.default_rng(3)
    for stream in session.streams:
        ts = stream.timestamps.copy()
        swap = rng.choice(ts.size - 1, size=ts.size // 20, replace=False)
        ts[swap], ts[swap + 1] = ts[swap + 1], ts[swap].copy()  # local disorder
        ts[rng.choice(ts.size, 3, replace=False)] = np.nan
        for i in range(0, ts.size, 50):
            aligner.push(stream.role, stream.data[i : i + 50], ts[i : i + 50])
    steps = aligner.flush()
    assert len(steps) == session.n_volumes - 3  # three volumes had a NaN timestamp
    assert [s.timestamp for s in steps] == sorted(s.timestamp for s in steps)
    assert all(np.isfinite(s.roi).all() for s in steps)
    stats = aligner.stats()
    assert stats.volumes_dropped == 3
    assert stats.streams["ppg"].dropped_late >= 3
    assert sum(s.heart_rate_valid for s in steps) > 0.8 * len(steps)


def test_rates_only_session_uses_the_value_at_or_before_each_volume() -> None:
    session = _make_session(rates=True)
    session.ppg = None
    session.resp = None
    rates = session.rates
    rates.data[:, 0] = 60 + np.arange(len(rates))  # heart rate changes every second
    steps = align_session(session)
    for s in steps:
        i = int(np.searchsorted(rates.timestamps, s.timestamp, side="right")) - 1
        assert s.heart_rate == rates.data[i, 0] and s.heart_rate_source == "rates"
        assert s.respiration_rate == 13.0 and s.heart_rate_quality == 1.0
    assert not any(s.deadline_expired for s in steps)


def test_stale_or_non_finite_rates_are_missing() -> None:
    cfg = AlignerConfig(expected=(Role.RATES,), rates_max_age_s=5.0)
    aligner = Aligner(cfg)
    aligner.push(Role.RATES, np.array([[70.0, np.nan]]), np.array([0.0]))
    aligner.push(Role.FMRI, np.ones((2, N_ROIS)), np.array([1.0, 9.0]))
    aligner.push(Role.RATES, np.array([[71.0, 12.0]]), np.array([10.0]))
    first, second = aligner.poll(0.0)
    assert first.heart_rate == 70.0 and not first.respiration_rate_valid
    assert not second.heart_rate_valid and any("old" in n for n in second.notes)


def test_bad_input_raises_clear_errors() -> None:
    aligner = Aligner(AlignerConfig(ppg_srate=100.0, resp_srate=25.0))
    with pytest.raises(ValueError, match=r"fmri: expected volumes of shape \(n, 246\)"):
        aligner.push(Role.FMRI, np.zeros((2, 245)), np.zeros(2))
    with pytest.raises(ValueError, match="one timestamp per volume"):
        aligner.push(Role.FMRI, np.zeros((2, N_ROIS)), np.zeros(3))
    with pytest.raises(ValueError, match=r"ppg: expected data \(n, 1\)"):
        aligner.push(Role.PPG, np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(ValueError, match=r"rates: expected data \(n, 2\)"):
        aligner.push("rates", np.zeros((5, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="markers"):
        aligner.push(Role.MARKERS, np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(ValueError, match="'eeg' is not a valid Role"):
        aligner.push("eeg", np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(ValueError, match="ppg is expected but ppg_srate is not set"):
        AlignerConfig()
    with pytest.raises(ValueError, match="deadline_s"):
        AlignerConfig(ppg_srate=1.0, resp_srate=1.0, deadline_s=-1)
    with pytest.raises(ValueError, match="expected: roles"):
        AlignerConfig(expected=(Role.FMRI,))
    with pytest.raises(ValueError, match="resp_srate is not set"):
        Aligner(AlignerConfig(expected=())).push(Role.RESP, np.zeros(3), np.arange(3.0))
    aligner.push(Role.FMRI, np.zeros((1, N_ROIS)), np.array([1.0]))
    with pytest.raises(ValueError, match="now must be a time"):
        aligner.poll(math.nan)


def test_pending_volumes_are_bounded() -> None:
    cfg = AlignerConfig(ppg_srate=100.0, resp_srate=25.0, max_pending=4)
    aligner = Aligner(cfg)
    aligner.push(Role.FMRI, np.zeros((10, N_ROIS)), np.arange(10.0))
    forced = aligner.poll(-1.0)
    assert len(forced) == 6 and all(s.deadline_expired for s in forced)
    assert aligner.pending == 4


def test_corpus_session_aligns_with_rates_close_to_the_generator_truth() -> None:
    synth = pytest.importorskip("emorecog_stream.recordings.synth")
    session = synth.generate_session(3, synth.SynthConfig(n_participants=3, n_trials=3))
    truth = session.metadata["truth"]
    steps = align_session(session)
    assert len(steps) == session.n_volumes
    late = [s for s in steps if s.timestamp >= 30.0]
    assert all(s.heart_rate_valid and s.respiration_rate_valid for s in late)
    hr_err = [abs(s.heart_rate - truth.heart_rate_between(s.timestamp - 15, s.timestamp))
              for s in late]  # fmt: skip
    rr_err = [abs(s.respiration_rate - truth.respiration_rate_between(s.timestamp - 30,
                                                                       s.timestamp))
              for s in late]  # fmt: skip
    assert np.mean(np.asarray(hr_err) <= 2.0) >= 0.95
    assert np.mean(np.asarray(rr_err) <= 1.0) >= 0.95


def test_expected_streams_and_sampling_rates_can_be_set_while_running() -> None:
    aligner = Aligner(AlignerConfig(expected=()))
    assert aligner.expected == ()
    with pytest.raises(ValueError, match="ppg_srate is not set"):
        aligner.set_expected([Role.PPG])
    aligner.set_srate(Role.PPG, 100.0)
    aligner.set_expected([Role.PPG])
    assert aligner.expected == (Role.PPG,) and aligner.config.ppg_srate == 100.0
    with pytest.raises(ValueError, match="already in use"):
        aligner.set_srate(Role.PPG, 200.0)
    with pytest.raises(ValueError, match="sampling rate"):
        aligner.set_srate(Role.RATES, 1.0)
    aligner.push(Role.FMRI, np.ones((1, N_ROIS)), np.array([5.0]))
    assert aligner.poll(5.5) == []  # waits for PPG
    aligner.set_expected([])
    (step,) = aligner.poll(5.5)  # a stalled stream is no longer waited for
    assert not step.deadline_expired and not step.heart_rate_valid


def test_physiology_without_volumes_is_processed_before_it_would_be_overwritten() -> None:
    cfg = AlignerConfig(ppg_srate=50.0, resp_srate=10.0, buffer_s=10.0)
    aligner = Aligner(cfg)
    t = np.arange(0, 60, 1 / 50.0)
    ppg = np.sin(2 * np.pi * 1.1 * t)
    for i in range(0, t.size, 25):  # a minute of PPG, no fMRI
        aligner.push(Role.PPG, ppg[i : i + 25], t[i : i + 25])
    stats = aligner.stats().streams["ppg"]
    assert stats.overflow == 0 and stats.samples == t.size
    aligner.push(Role.FMRI, np.ones((1, N_ROIS)), np.array([59.9]))
    (step,) = aligner.flush()
    assert step.heart_rate == pytest.approx(66.0, abs=0.5)
    # rates are consumed as they are used, so an unused backlog is not reported as overflow
    rates = Aligner(AlignerConfig(expected=(Role.RATES,)))
    for k in range(5000):
        rates.push(Role.RATES, np.array([[70.0, 14.0]]), np.array([float(k)]))
        rates.push(Role.FMRI, np.ones((1, N_ROIS)), np.array([k - 0.5]))
        assert len(rates.poll(float(k))) == 1
    assert rates.stats().streams["rates"].overflow == 0
