"""The synthetic corpus: structure, labels, determinism, ground truth and learnability."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from scipy import signal as sps

from emorecog_stream.core.streams import DEFAULT_LSL_TYPE, N_ROIS, Role
from emorecog_stream.recordings.session import parse_marker
from emorecog_stream.recordings.synth import (
    BENCHMARK_LEVELS_BY_CATEGORY,
    SynthConfig,
    SynthTruth,
    canonical_hrf,
    corpus_labels,
    generate_corpus,
    generate_session,
)

BENCHMARK_LEVELS = {0: 124, -1: 29, -2: 40, -3: 37, -4: 65, 1: 46, 2: 63, 3: 30, 4: 46}


@pytest.fixture(scope="module")
def session():
    return generate_session(2)


def _stream_bytes(s) -> bytes:
    parts = []
    for stream in s.streams:
        parts += [stream.data.tobytes(), stream.timestamps.tobytes()]
    parts += [f"{m.timestamp!r}{m.text}".encode() for m in s.markers]
    return b"".join(parts)


def test_corpus_level_distribution_matches_the_benchmark():
    labels = corpus_labels(SynthConfig())
    assert labels.shape == (16, 30, 2)
    assert dict(Counter(labels[:, :, 1].ravel().tolist())) == BENCHMARK_LEVELS
    # 10 videos per category per participant
    for p in range(16):
        assert Counter(labels[p, :, 0].tolist()) == {-1: 10, 0: 10, 1: 10}
    # per-category pools are the documented cross-tabulation
    for category, counts in BENCHMARK_LEVELS_BY_CATEGORY.items():
        got = Counter(labels[:, :, 1][labels[:, :, 0] == category].tolist())
        assert dict(got) == counts


def test_labels_scale_to_other_corpus_sizes():
    labels = corpus_labels(SynthConfig(n_participants=3, n_trials=7))
    assert labels.shape == (3, 7, 2)
    assert set(labels[:, :, 0].ravel().tolist()) <= {-1, 0, 1}
    assert labels[:, :, 1].min() >= -4 and labels[:, :, 1].max() <= 4
    assert all(Counter(labels[p, :, 0].tolist())[-1] == 3 for p in range(3))


def test_session_structure(session):
    config = SynthConfig()
    assert session.participant == "P02"
    assert session.tr == 1.0
    n_vol = int(config.duration_s / config.tr)
    assert session.fmri.data.shape == (n_vol, N_ROIS)
    assert session.fmri.data.dtype == np.float32
    assert session.fmri.type == DEFAULT_LSL_TYPE[Role.FMRI]
    assert session.ppg.nominal_srate == 400.0 and session.resp.nominal_srate == 50.0
    assert session.ppg.data.shape == (int(config.duration_s * 400), 1)
    assert session.resp.data.shape == (int(config.duration_s * 50), 1)
    np.testing.assert_allclose(np.diff(session.fmri.timestamps), 1.0)
    np.testing.assert_allclose(np.diff(session.ppg.timestamps), 1 / 400)
    assert all(np.isfinite(s.data).all() for s in session.streams)
    trials = session.trials()
    assert len(trials) == 30
    assert [t.index for t in trials] == list(range(30))
    for t in trials:
        assert t.offset - t.onset == pytest.approx(25.0)
        # 25 volumes per video at TR 1 s
        inside = (session.fmri.timestamps >= t.onset) & (session.fmri.timestamps < t.offset)
        assert inside.sum() == 25
    gaps = [b.onset - a.offset for a, b in itertools.pairwise(trials)]
    assert gaps == pytest.approx([10.0] * 29)
    labels = corpus_labels(config)[1]
    assert [t.category for t in trials] == labels[:, 0].tolist()
    assert [t.intensity for t in trials] == labels[:, 1].tolist()
    assert all(parse_marker(m.text) is not None for m in session.markers)


def test_configurable_timing():
    config = SynthConfig(
        n_participants=2, n_trials=3, tr=2.0, ppg_rate=100.0, resp_rate=25.0, rest_s=4.0
    )
    s = generate_session(1, config)
    assert s.tr == 2.0 and s.fmri.nominal_srate == 0.5
    assert len(s.fmri) == round(config.duration_s / 2.0)
    assert s.ppg.nominal_srate == 100.0 and s.resp.nominal_srate == 25.0
    assert [t.onset for t in s.trials()] == [10.0, 39.0, 68.0]


def test_bit_identical_for_same_seed_and_different_otherwise():
    config = SynthConfig(n_participants=2, n_trials=6, seed=5)
    a = _stream_bytes(generate_session(2, config))
    b = _stream_bytes(generate_session(2, config))
    c = _stream_bytes(generate_session(2, SynthConfig(n_participants=2, n_trials=6, seed=6)))
    assert a == b
    assert a != c
    # a participant does not depend on which others are generated
    corpus = generate_corpus(config)
    assert _stream_bytes(corpus[1]) == a


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tr=0"):
        SynthConfig(tr=0)
    with pytest.raises(ValueError, match=r"1\.\.16.*got 17"):
        generate_session(17)


def test_hrf_is_canonical():
    h = canonical_hrf(0.1)
    assert h.max() == pytest.approx(1.0)
    assert 4.0 <= np.argmax(h) * 0.1 <= 6.0  # peak 4-6 s
    assert h.min() < 0 and 10.0 <= np.argmin(h) * 0.1 <= 18.0  # undershoot


def _peak_rate(x: np.ndarray, fs: float, band: tuple[float, float], min_gap_s: float) -> float:
    """A plain peak counter, independent of the generator, to check its ground truth."""
    sos = sps.butter(2, band, btype="bandpass", fs=fs, output="sos")
    y = sps.sosfiltfilt(sos, x)
    peaks, _ = sps.find_peaks(y, distance=int(min_gap_s * fs), prominence=0.5 * np.std(y))
    return 60.0 * (peaks.size - 1) / ((peaks[-1] - peaks[0]) / fs)


def test_truth_matches_the_waveforms(session):
    truth = session.metadata["truth"]
    assert isinstance(truth, SynthTruth)
    ibi = np.diff(truth.beat_times)
    assert ibi.min() > 0.3 and ibi.max() < 1.6 and np.std(ibi) > 0.01  # variability
    hr_err, rr_err = [], []
    for t0 in np.arange(20.0, 1000.0, 60.0):
        t1 = t0 + 30.0
        m = (session.ppg.timestamps >= t0) & (session.ppg.timestamps < t1)
        hr = _peak_rate(session.ppg.data[m, 0].astype(float), 400.0, (0.5, 4.0), 0.33)
        hr_err.append(abs(hr - truth.heart_rate_between(t0, t1)))
        m = (session.resp.timestamps >= t0) & (session.resp.timestamps < t1)
        rr = _peak_rate(session.resp.data[m, 0].astype(float), 50.0, (0.08, 0.7), 2.0)
        rr_err.append(abs(rr - truth.respiration_rate_between(t0, t1)))
    assert np.median(hr_err) < 1.5
    assert np.median(rr_err) < 1.5
    # the smooth driving rate agrees with the beat count over a window
    sel = (truth.time >= 100) & (truth.time < 160)
    assert truth.heart_rate_between(100, 160) == pytest.approx(
        truth.heart_rate[sel].mean(), abs=2.5
    )
    assert truth.heart_rate_between(5.0, 5.1) is None


def _trial_features(s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fMRI: per-ROI mean response (HRF-shifted window minus pre-trial rest), z-scored series.
    Physiology: heart and respiration rate from peak counting, centred per participant."""
    x = s.fmri.data.astype(float)
    x = (x - x.mean(0)) / x.std(0)
    t = s.fmri.timestamps
    fmri, physio, y = [], [], []
    for trial in s.trials():
        win = (t >= trial.onset + 5) & (t < trial.offset + 5)
        pre = (t >= trial.onset - 5) & (t < trial.onset)
        fmri.append(x[win].mean(0) - x[pre].mean(0))
        mp = (s.ppg.timestamps >= trial.onset) & (s.ppg.timestamps < trial.offset)
        mr = (s.resp.timestamps >= trial.onset) & (s.resp.timestamps < trial.offset)
        physio.append(
            [
                _peak_rate(s.ppg.data[mp, 0].astype(float), s.ppg.nominal_srate, (0.5, 4.0), 0.33),
                _peak_rate(
                    s.resp.data[mr, 0].astype(float), s.resp.nominal_srate, (0.08, 0.7), 2.0
                ),
            ]
        )
        y.append(trial.category)
    p = np.asarray(physio)
    return np.asarray(fmri), (p - p.mean(0)) / p.std(0), np.asarray(y)


def _shrunk_lda_accuracy(xtr, ytr, xte, yte) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    centroids = np.array([xtr[ytr == c].mean(0) for c in (-1, 0, 1)])
    resid = xtr - centroids[ytr + 1]
    cov = resid.T @ resid / len(resid)
    cov = 0.5 * cov + 0.5 * np.diag(np.diag(cov)) + 1e-3 * np.eye(len(cov))
    prec = np.linalg.inv(cov)
    score = xte @ prec @ centroids.T - 0.5 * np.einsum("ij,jk,ik->i", centroids, prec, centroids)
    return float(np.mean(score.argmax(1) - 1 == yte))


@pytest.mark.slow
def test_learnable_but_not_trivial():
    """Participant-wise split as the model's: train P01-P12, test P13-P16 (120 trials)."""
    corpus = generate_corpus(SynthConfig())
    feats = [_trial_features(s) for s in corpus]

    def stack(parts, k):
        return np.concatenate([f[k] for f in parts])

    ytr, yte = stack(feats[:12], 2), stack(feats[12:], 2)
    f_tr, f_te = stack(feats[:12], 0), stack(feats[12:], 0)
    p_tr, p_te = stack(feats[:12], 1), stack(feats[12:], 1)
    fmri_only = _shrunk_lda_accuracy(f_tr, ytr, f_te, yte)
    both = _shrunk_lda_accuracy(np.hstack([f_tr, p_tr]), ytr, np.hstack([f_te, p_te]), yte)
    assert 0.45 < fmri_only < 0.85, fmri_only
    assert both >= fmri_only + 0.03, (fmri_only, both)
    assert both < 0.95


def test_config_round_trips_through_metadata():
    config = SynthConfig(seed=9, tr=2.0, hr_shift_by_category=(1.0, 2.0, 3.0))
    assert SynthConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        SynthConfig.from_dict({"colour": 1})


def test_synth_command_writes_loadable_xdf(tmp_path, capsys):
    from emorecog_stream.cli import main
    from emorecog_stream.recordings import load_sessions

    args = ["synth", str(tmp_path), "--participants", "P02", "--n-participants", "2"]
    args += ["--trials", "3", "--rest", "2", "--tr", "2", "--ppg-rate", "100", "--seed", "3"]
    assert main(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["P02.xdf"]
    [s] = load_sessions(tmp_path)
    fresh = generate_session(
        2, SynthConfig(seed=3, n_participants=2, n_trials=3, rest_s=2.0, tr=2.0, ppg_rate=100.0)
    )
    assert s.tr == 2.0 and s.ppg.nominal_srate == 100.0
    np.testing.assert_array_equal(s.fmri.data, fresh.fmri.data)
    assert s.markers == fresh.markers
    # refuses to overwrite, and names bad participant lists
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force", "--compress"]) == 0
    assert (tmp_path / "P02.xdfz").is_file()
    assert main(["synth", str(tmp_path), "--participants", "x7"]) == 2
    assert "cannot read 'x7'" in capsys.readouterr().err


def test_synth_help(capsys):
    from emorecog_stream.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--participants", "--seed", "--tr", "--ppg-rate", "--resp-rate", "--compress"):
        assert flag in out
