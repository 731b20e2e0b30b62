"""Heart and respiration rate: accuracy against NeuroKit2 and the corpus generator, streaming
equals offline, and unusable windows give None with a reason."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.signal import lfilter, sosfilt, sosfilt_zi

from emorecog_stream.core import physio
from emorecog_stream.core.physio import (
    HEART,
    RESPIRATION,
    HeartRateTracker,
    PeakRateTracker,
    RespirationRateTracker,
    heart_rate,
    heart_rate_estimate,
    respiration_rate,
    respiration_rate_estimate,
)

nk = pytest.importorskip("neurokit2")


def _nk_heart_rate(signal: np.ndarray, fs: float) -> float:
    """NeuroKit2's rate over the window: its own cleaning and peak detector, mean interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peaks = nk.ppg_findpeaks(nk.ppg_clean(signal, sampling_rate=fs), sampling_rate=fs)
    p = np.asarray(peaks["PPG_Peaks"])
    return 60.0 * (len(p) - 1) / ((p[-1] - p[0]) / fs)


def _nk_resp_rate(signal: np.ndarray, fs: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = nk.rsp_clean(signal, sampling_rate=fs)
        peaks = nk.rsp_findpeaks(clean, sampling_rate=fs)
    p = np.asarray(peaks["RSP_Peaks"])
    return 60.0 * (len(p) - 1) / ((p[-1] - p[0]) / fs)


@pytest.mark.parametrize("fs", [50, 100, 400, 500])
def test_heart_rate_within_2_bpm_of_neurokit_on_95_percent_of_windows(fs: int) -> None:
    errors = []
    for i, hr in enumerate(np.linspace(55, 120, 12)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ppg = nk.ppg_simulate(
                duration=60,
                sampling_rate=fs,
                heart_rate=hr,
                frequency_modulation=0.1,
                ibi_randomness=0.1,
                drift=0.5,
                motion_amplitude=0.2,
                powerline_amplitude=0.05,
                burst_number=0,
                random_state=1000 + i,
            )
        for start in (0, 15, 30, 45):
            window = ppg[start * fs : (start + 15) * fs]
            ours = heart_rate(window, fs)
            ref = _nk_heart_rate(window, fs)
            errors.append(abs(ours - ref) if ours is not None else math.inf)
            assert abs(ref - hr) < 6  # the reference itself tracks the simulated rate
    errors = np.asarray(errors)
    assert np.mean(errors <= 2.0) >= 0.95, sorted(errors)[-5:]


@pytest.mark.parametrize("fs", [25, 50, 100])
def test_respiration_rate_within_1_per_minute_on_regular_breathing(fs: int) -> None:
    for i, rr in enumerate(np.linspace(8, 25, 8)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resp = nk.rsp_simulate(
                duration=60, sampling_rate=fs, respiratory_rate=rr, noise=0.05,
                method="sinusoidal", random_state=2000 + i,
            )  # fmt: skip
        for start in (0, 30):
            window = resp[start * fs : (start + 30) * fs]
            ours = respiration_rate(window, fs)
            assert ours is not None
            assert abs(ours - rr) <= 1.0, (rr, ours)
            assert abs(ours - _nk_resp_rate(window, fs)) <= 1.0


@pytest.mark.parametrize("fs", [50, 100])
def test_respiration_rate_within_1_per_minute_of_neurokit_on_irregular_breathing(fs: int) -> None:
    errors = []
    for i, rr in enumerate(np.linspace(8, 25, 16)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resp = nk.rsp_simulate(
                duration=120, sampling_rate=fs, respiratory_rate=rr, noise=0.05,
                method="breathmetrics", random_state=100 + i,
            )  # fmt: skip
        for start in (0, 30, 60):
            window = resp[start * fs : (start + 30) * fs]
            ours = respiration_rate(window, fs)
            ref = _nk_resp_rate(window, fs)
            errors.append(abs(ours - ref) if ours is not None else math.inf)
    errors = np.asarray(errors)
    assert np.mean(errors <= 1.0) >= 0.95, sorted(errors)[-5:]


def _chunks(n: int, rng: np.random.Generator, max_chunk: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < n:
        j = min(n, i + int(rng.integers(1, max_chunk + 1)))
        out.append((i, j))
        i = j
    return out


@pytest.mark.parametrize("seed", range(6))
def test_streaming_tracker_gives_identical_estimates_whatever_the_chunking(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fs = 100.0
    n = 90 * 100
    t = np.arange(n) / fs
    hr = 70 + 10 * np.sin(2 * np.pi * t / 60)
    x = np.sin(2 * np.pi * np.cumsum(hr / 60) / fs) ** 3 + 0.1 * rng.standard_normal(n)
    x[3000:3005] = np.nan  # a burst of bad samples
    t[6000:] += 2.0  # a 2 s gap
    whole = HeartRateTracker(fs)
    whole.update(t, x)
    chunked = HeartRateTracker(fs)
    for i, j in _chunks(n, rng, 400):
        chunked.update(t[i:j], x[i:j])
    assert whole.peak_times == chunked.peak_times
    for q in np.linspace(5, t[-1], 50):
        assert whole.estimate(q) == chunked.estimate(q)
    # asking along the way, after feeding up to each query time (as the aligner does), gives
    # the same answers whatever the chunking, and does not change the tracker's state
    answers = []
    for max_chunk in (37, 500):
        tracker, k, got = HeartRateTracker(fs), 0, []
        for q in range(1, 90):
            upto = int(np.searchsorted(t, float(q), side="right"))
            for i, j in _chunks(upto - k, rng, max_chunk):
                tracker.update(t[k + i : k + j], x[k + i : k + j])
            k = upto
            got.append(tracker.estimate(float(q)))
        tracker.update(t[k:], x[k:])
        assert tracker.peak_times == whole.peak_times
        answers.append(got)
    assert answers[0] == answers[1]
    assert sum(a.valid for a in answers[0]) > 60


def test_rate_follows_a_changing_heart_rate() -> None:
    fs = 200.0
    n = int(120 * fs)
    t = np.arange(n) / fs
    hr = np.where(t < 60, 60.0, 100.0)
    x = np.sin(2 * np.pi * np.cumsum(hr / 60) / fs)
    tracker = HeartRateTracker(fs)
    tracker.update(t[: int(55 * fs)], x[: int(55 * fs)])
    assert tracker.rate(55.0) == pytest.approx(60.0, abs=1.0)
    tracker.update(t[int(55 * fs) :], x[int(55 * fs) :])
    assert tracker.rate(118.0) == pytest.approx(100.0, abs=1.0)
    assert tracker.estimate(118.0).quality > 0.9


def test_unusable_windows_give_none_with_a_reason() -> None:
    fs = 100.0
    assert heart_rate(np.zeros(1500), fs) is None
    est = heart_rate_estimate(np.zeros(1500), fs)
    assert est.value is None and est.quality == 0.0 and "peaks" in est.reason
    assert heart_rate(np.ones(1), fs) is None
    assert respiration_rate(np.zeros(3000), 50.0) is None
    all_nan = heart_rate_estimate(np.full(1500, np.nan), fs)
    assert all_nan.value is None and "no data" in all_nan.reason
    t = np.arange(1500) / fs
    mostly_nan = np.sin(2 * np.pi * 1.2 * t)
    mostly_nan[:800] = np.nan
    est = heart_rate_estimate(mostly_nan, fs)
    assert est.value is None and "covers" in est.reason


def test_nan_samples_do_not_poison_the_filter() -> None:
    fs = 100.0
    t = np.arange(3000) / fs
    x = np.sin(2 * np.pi * 1.25 * t)
    x[1000] = np.nan
    x[1500] = np.inf
    tracker = HeartRateTracker(fs)
    tracker.update(t, x)
    assert tracker.nonfinite == 2
    assert tracker.rate(29.9) == pytest.approx(75.0, abs=0.5)


def test_no_interval_spans_a_gap() -> None:
    fs = 100.0
    t = np.arange(3000) / fs
    t[1500:] += 7.3  # a gap that is not a multiple of the beat period
    x = np.sin(2 * np.pi * 1.0 * np.arange(3000) / fs)
    tracker = HeartRateTracker(fs)
    tracker.update(t, x)
    assert tracker.gaps == 1
    # the window [22, 37] straddles the gap: intervals on either side are 1 s
    est = tracker.estimate(37.0)
    assert est.value == pytest.approx(60.0, abs=0.5)


def test_old_and_non_finite_timestamps_are_dropped_and_counted() -> None:
    tracker = HeartRateTracker(100.0)
    tracker.update(np.array([0.0, 0.01, np.nan, 0.03]), np.zeros(4))
    tracker.update(np.array([0.02, 0.04]), np.zeros(2))
    assert tracker.dropped == 2
    assert tracker.last_timestamp == pytest.approx(0.04)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="sampling rate"):
        HeartRateTracker(0.0)
    with pytest.raises(ValueError, match="too low"):
        RespirationRateTracker(0.05)
    with pytest.raises(ValueError, match="one timestamp per sample"):
        HeartRateTracker(100.0).update(np.arange(3.0), np.zeros(4))
    with pytest.raises(ValueError, match="1-D signal"):
        heart_rate(np.zeros((10, 3)), 100.0)


def test_low_sampling_rate_moves_the_band_below_nyquist() -> None:
    # 5 Hz respiration: the upper band edge (0.8 Hz) is fine; 4 Hz PPG clips the 3.5 Hz edge
    fs = 4.0
    t = np.arange(int(30 * fs)) / fs
    assert heart_rate(np.sin(2 * np.pi * 1.0 * t), fs) == pytest.approx(60.0, abs=2.0)


@pytest.mark.parametrize(
    ("fs", "method", "stages"),
    [(500.0, HEART, 1), (50.0, HEART, 1), (50.0, RESPIRATION, 1), (400.0, RESPIRATION, 2)],
)
def test_band_pass_matches_the_sos_cascade_and_is_split_invariant(
    fs: float, method: physio.RateMethod, stages: int
) -> None:
    """The compiled band-pass runs as one transfer function where that is accurate, else section
    by section (respiration at 400 Hz); either way it matches the SOS cascade (``sosfilt``),
    is bit-identical to ``lfilter`` stage by stage, and gives bit-identical output and state
    however the input is split."""
    tracker = PeakRateTracker(fs, method)
    assert tracker._b.shape[0] == stages
    rng = np.random.default_rng(0)
    n = int(60 * fs)
    x = 500.0 + np.cumsum(rng.standard_normal(n)) * 0.1 + rng.standard_normal(n)
    zi = tracker._z_unit * x[0]
    want, _ = sosfilt(tracker._sos, x, zi=sosfilt_zi(tracker._sos) * x[0])
    got, got_zi = tracker._filter(x, zi)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.array_equal(zi, tracker._z_unit * x[0])  # the given state is not modified
    y, z_ends = x, []
    for b, a, z in zip(tracker._b, tracker._a, zi.reshape(stages, -1), strict=True):
        y, z_end = lfilter(b, a, y, zi=z)
        z_ends.append(z_end)
    assert np.array_equal(y, got) and np.array_equal(np.concatenate(z_ends), got_zi)
    pieces, state = [], zi
    cuts = np.sort(rng.choice(np.arange(1, x.size), size=40, replace=False))
    for part in np.split(x, cuts):
        y, state = tracker._filter(part, state)
        pieces.append(y)
    assert np.array_equal(np.concatenate(pieces), got) and np.array_equal(state, got_zi)


def test_read_only_input_is_accepted() -> None:
    t = np.arange(3000) / 100.0
    x = np.sin(2 * np.pi * 1.2 * t)
    x.setflags(write=False)  # e.g. a memory-mapped recording
    assert heart_rate(x, 100.0) == pytest.approx(72.0, abs=0.5)
    tracker = HeartRateTracker(100.0)
    t.setflags(write=False)
    tracker.update(t, x)
    assert tracker.rate(29.9) == pytest.approx(72.0, abs=0.5)


def test_offline_helpers_accept_column_vectors_and_report_quality() -> None:
    fs = 50.0
    t = np.arange(int(30 * fs)) / fs
    resp = np.sin(2 * np.pi * (15 / 60) * t)[:, None]
    est = respiration_rate_estimate(resp, fs)
    assert est.value == pytest.approx(15.0, abs=0.3)
    assert 0.9 <= est.quality <= 1.0 and est.valid
    assert RESPIRATION.window_s == 30.0 and HEART.window_s == 15.0


def test_heart_and_respiration_rate_on_the_synthetic_corpus_match_its_ground_truth() -> None:
    synth = pytest.importorskip("emorecog_stream.recordings.synth")
    cfg = synth.SynthConfig(n_participants=2, n_trials=4)
    hr_err, rr_err = [], []
    for index in (1, 2):
        session = synth.generate_session(index, cfg)
        truth = session.metadata["truth"]
        hr_t = HeartRateTracker(session.ppg.nominal_srate)
        rr_t = RespirationRateTracker(session.resp.nominal_srate)
        for t in session.fmri.timestamps:
            for tracker, stream in ((hr_t, session.ppg), (rr_t, session.resp)):
                i0 = np.searchsorted(stream.timestamps, tracker.last_timestamp, side="right")
                i1 = np.searchsorted(stream.timestamps, t, side="right")
                tracker.update(stream.timestamps[i0:i1], stream.data[i0:i1, 0])
            if t < 35.0:  # both windows full
                continue
            want_hr = truth.heart_rate_between(t - 15.0, t)
            want_rr = truth.respiration_rate_between(t - 30.0, t)
            got_hr, got_rr = hr_t.rate(t), rr_t.rate(t)
            hr_err.append(abs(got_hr - want_hr) if got_hr is not None else math.inf)
            rr_err.append(abs(got_rr - want_rr) if got_rr is not None else math.inf)
    hr_err, rr_err = np.asarray(hr_err), np.asarray(rr_err)
    assert np.mean(hr_err <= 2.0) >= 0.95, np.sort(hr_err)[-5:]
    assert np.mean(rr_err <= 1.0) >= 0.95, np.sort(rr_err)[-5:]


def test_a_lasting_drop_in_amplitude_is_followed() -> None:
    fs = 100.0
    t = np.arange(int(90 * fs)) / fs
    x = np.sin(2 * np.pi * 1.2 * t)
    x[t >= 30] *= 0.1  # the sensor slips: a tenth of the amplitude from 30 s on
    x[: int(0.5 * fs)] += np.linspace(0, 20, int(0.5 * fs))  # and a big artefact at the start
    tracker = HeartRateTracker(fs)
    rates = []
    for k in range(0, t.size, 100):
        tracker.update(t[k : k + 100], x[k : k + 100])
        rates.append((t[min(k + 99, t.size - 1)], tracker.rate(t[min(k + 99, t.size - 1)])))
    late = [r for when, r in rates if when > 55]
    assert all(r == pytest.approx(72.0, abs=0.5) for r in late)
    early = [r for when, r in rates if 20 < when < 30]
    assert all(r == pytest.approx(72.0, abs=0.5) for r in early)


def test_real_ppg_recordings_shipped_with_heartpy() -> None:
    """Real finger PPG (heartpy's example recordings, ~100 Hz): 15 s windows against NeuroKit2
    and heartpy. Skipped where heartpy is not installed (it is a test-time reference only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = pytest.importorskip("heartpy")
    import os

    folder = os.path.join(os.path.dirname(hp.__file__), "data")
    # data.csv: 100 Hz, ~25 s
    ppg = np.genfromtxt(os.path.join(folder, "data.csv"), delimiter=",")[:1500]
    ours = heart_rate(ppg, 100.0)
    assert ours == pytest.approx(_nk_heart_rate(ppg, 100.0), abs=2.0)
    # data3.csv: ~11 min with datetimes, ~100.4 Hz
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = np.asarray(hp.get_data(os.path.join(folder, "data3.csv"), column_name="hr"), float)
        stamps = hp.get_data(os.path.join(folder, "data3.csv"), column_name="datetime")
        fs = hp.get_samplerate_datetime(stamps, timeformat="%Y-%m-%d %H:%M:%S.%f")
        width = int(15 * fs)
        errors = []
        for start in range(0, x.size - width, width):
            window = x[start : start + width]
            got = heart_rate(window, fs)
            errors.append(abs(got - _nk_heart_rate(window, fs)) if got else math.inf)
    errors = np.asarray(errors)
    assert errors.size >= 40
    assert np.mean(errors <= 2.0) >= 0.9, np.sort(errors)[-6:]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_bad_last_sample_of_a_chunk_is_caught(bad: float) -> None:
    fs = 100.0
    t = np.arange(3000) / fs
    x = np.sin(2 * np.pi * 1.25 * t)
    x[999] = bad  # the last sample of the first chunk
    tracker = HeartRateTracker(fs)
    tracker.update(t[:1000], x[:1000])
    tracker.update(t[1000:], x[1000:])
    assert tracker.nonfinite == 1
    assert tracker.rate(29.9) == pytest.approx(75.0, abs=0.5)


@pytest.mark.parametrize(("fs", "method", "hz"), [(500.0, HEART, 1.1), (400.0, RESPIRATION, 0.3)])
def test_the_compiled_loop_equals_its_python_source(
    fs: float, method: physio.RateMethod, hz: float
) -> None:
    """``physio_kernel.track`` and ``estimate`` compiled by numba and run as plain Python
    (``py_func``) give bit-identical peaks, spans, filter state, counters and estimates, on a
    signal with gaps, NaN, Inf and values so large that the filter overflows."""
    from emorecog_stream.core import physio_kernel as kernel

    rng = np.random.default_rng(3)
    n = int(80 * fs)
    t = np.arange(n) / fs
    t[n // 4 :] += 2.0  # a gap
    x = 100.0 + np.sin(2 * np.pi * hz * t) + 0.2 * rng.standard_normal(n)
    x[[n // 8, n // 8 + 1, n // 2]] = [np.nan, np.inf, -np.inf]
    x[3 * n // 4] = 1e306  # finite, but the filter state overflows
    queries = np.linspace(t[0], t[-1], 97)
    runs = []
    compiled = (kernel.track, kernel.estimate)
    for track, estimate in (compiled, tuple(f.py_func for f in compiled)):
        tracker = PeakRateTracker(fs, method)
        tracker._grow(n)
        tables = (tracker._state, tracker._z, tracker._peaks, tracker._spans)
        state, z, peaks, spans = (v.copy() for v in tables)
        estimates = []
        for a, b in ((0, n // 3), (n // 3, n // 2 + 1), (n // 2 + 1, n)):
            track(t[a:b], x[a:b], tracker._coef, tracker._one_stage, tracker._z_unit, z,
                  state, tracker._params, peaks, spans)
            estimates += [estimate(q, state, tracker._params, peaks, spans) for q in queries]
        k, s_ = int(state[kernel.N_PEAKS]), int(state[kernel.N_SPANS])
        runs.append((state, z, peaks[:k], spans[:s_], estimates))
    (s1, z1, p1, sp1, e1), (s2, z2, p2, sp2, e2) = runs
    for got, want in ((s1, s2), (z1, z2), (p1, p2), (sp1, sp2), (np.array(e1), np.array(e2))):
        np.testing.assert_array_equal(got, want)
    assert p1.shape[0] > 10 and sum(e[0] == kernel.OK for e in e1) > 50
    assert s1[kernel.NONFINITE] == 3 and s1[kernel.GAPS] == 1
