"""ICBHI challenge readers: per-trial .mat folders (v5 and v7.3/HDF5) and the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from emorecog_stream.core.streams import N_ROIS, RATES_CHANNELS, Role
from emorecog_stream.recordings.icbhi import (
    IcbhiError,
    participant_dirs,
    read_mat_folder,
    read_official,
    read_participant_dir,
)

RNG = np.random.default_rng(0)


def _write_mat_trials(folder: Path, participant: int, n: int, t: int = 25, start: int = 0):
    labels = []
    for trial in range(start, start + n):
        mri = RNG.normal(size=(N_ROIS, t))
        lab = [[(trial % 3) - 1, (trial % 9) - 4]]
        scipy.io.savemat(
            folder / f"P{participant:02d}_{trial}.mat",
            {"mri_d": mri, "pnr_rate": [[60.0 + trial, 12.0 + trial / 10]], "lab_d": lab},
        )
        labels.append((mri, lab[0]))
    return labels


def test_mat_folder_one_session_per_participant_in_trial_order(tmp_path):
    p3 = _write_mat_trials(tmp_path, 3, 4)
    _write_mat_trials(tmp_path, 10, 2)
    (tmp_path / "notes.txt").write_text("ignored")
    sessions = read_mat_folder(tmp_path, tr=2.0)
    assert [s.participant for s in sessions] == ["P03", "P10"]
    s = sessions[0]
    assert s.tr == 2.0 and s.fmri.data.shape == (4 * 25, N_ROIS)
    assert s.fmri.data.dtype == np.float32
    np.testing.assert_allclose(s.fmri.data[:25], p3[0][0].T.astype(np.float32))
    np.testing.assert_allclose(s.fmri.data[75:], p3[3][0].T.astype(np.float32))
    np.testing.assert_allclose(np.diff(s.fmri.timestamps), 2.0)
    trials = s.trials()
    assert [(t.index, t.category, t.intensity) for t in trials] == [
        (i, (i % 3) - 1, (i % 9) - 4) for i in range(4)
    ]
    assert trials[1].onset == 50.0 and trials[1].offset == 100.0
    assert s.rates is not None and s.rates.channel_labels == list(RATES_CHANNELS)
    assert s.rates.role is Role.RATES and s.rates.data.shape == (100, 2)
    np.testing.assert_allclose(s.rates.data[30], [61.0, 12.1], rtol=1e-6)
    assert s.ppg is None and s.resp is None


def test_mat_trial_sorting_is_numeric_and_rest_gap(tmp_path):
    _write_mat_trials(tmp_path, 1, 3, start=8)  # trials 8, 9, 10 ("10" sorts before "8" as text)
    s = read_mat_folder(tmp_path, rest_s=5.0)[0]
    assert [t.index for t in s.trials()] == [8, 9, 10]
    assert [t.onset for t in s.trials()] == [0.0, 30.0, 60.0]


def test_mat_v73_hdf5(tmp_path):
    mri = RNG.normal(size=(N_ROIS, 25))
    path = tmp_path / "P02_0.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        # MATLAB v7.3 writes column-major: h5py sees the transpose
        f["mri_d"] = mri.T
        f["pnr_rate"] = np.array([[70.0], [15.0]])
        f["lab_d"] = np.array([[1.0], [3.0]])
    s = read_mat_folder(tmp_path)[0]
    np.testing.assert_allclose(s.fmri.data, mri.T.astype(np.float32))
    assert s.trials()[0].category == 1 and s.trials()[0].intensity == 3
    np.testing.assert_allclose(s.rates.data[0], [70.0, 15.0])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"pnr_rate": [1, 2]}, r"no key 'mri_d'.*keys found: \['pnr_rate'\]"),
        ({"mri_d": np.zeros((200, 25)), "pnr_rate": [1, 2]}, r"'mri_d'.*found shape \(200, 25\)"),
        ({"mri_d": np.zeros((N_ROIS, 25))}, "no key 'pnr_rate'"),
        ({"mri_d": np.zeros((N_ROIS, 25)), "pnr_rate": [1, 2, 3]}, r"2 values.*\(1, 3\)"),
        (
            {"mri_d": np.zeros((N_ROIS, 25)), "pnr_rate": [1, 2], "lab_d": [2, 7]},
            r"'lab_d' should be \[category -1/0/1, level -4\.\.4\], found \[2, 7\]",
        ),
    ],
)
def test_bad_mat_files_name_file_key_expected_and_found(tmp_path, content, match):
    scipy.io.savemat(tmp_path / "P01_0.mat", content)
    with pytest.raises(IcbhiError, match=match) as info:
        read_mat_folder(tmp_path)
    assert "P01_0.mat" in str(info.value)


def test_not_a_mat_file(tmp_path):
    (tmp_path / "P01_0.mat").write_bytes(b"hello")
    with pytest.raises(IcbhiError, match=r"P01_0\.mat: not a readable MATLAB file"):
        read_mat_folder(tmp_path)


def _official_participant(
    folder: Path, n: int = 4, t: int = 25, layout: str = "rois", labels: bool = True, fs=400
):
    folder.mkdir(parents=True)
    fmri = RNG.normal(size=(n, N_ROIS, t)) if layout == "rois" else RNG.normal(size=(n, t, N_ROIS))
    ppg = RNG.normal(size=(n, int(fs * t)))
    resp = RNG.normal(size=(n, int(50 * t)))
    np.savez(folder / "fMRI_data.npz", data=fmri)
    np.savez(folder / "PPG_data.npz", data=ppg)
    np.savez(folder / "resp_data.npz", data=resp)
    if labels:
        np.savez(
            folder / "labels.npz", data=np.array([[(i % 3) - 1, (i % 9) - 4] for i in range(n)])
        )
    return fmri, ppg, resp


@pytest.mark.parametrize("layout", ["rois", "time"])
def test_official_participant_both_fmri_layouts(tmp_path, layout):
    fmri, ppg, _ = _official_participant(tmp_path / "Train" / "P01", layout=layout)
    s = read_participant_dir(tmp_path / "Train" / "P01")
    assert s.participant == "P01"
    expected = np.transpose(fmri, (0, 2, 1)) if layout == "rois" else fmri
    np.testing.assert_allclose(s.fmri.data, expected.reshape(-1, N_ROIS).astype(np.float32))
    assert s.metadata["fmri_layout"] == (
        "trials x rois x time" if layout == "rois" else "trials x time x rois"
    )
    assert s.ppg.nominal_srate == 400.0 and s.resp.nominal_srate == 50.0
    assert s.metadata["ppg_rate"] == 400.0 and s.metadata["split"] == "Train"
    np.testing.assert_allclose(s.ppg.data[:, 0], ppg.ravel().astype(np.float32))
    # trial 2's PPG starts at its onset (50 s) and steps 1/400 s
    i = 2 * 10000
    assert s.ppg.timestamps[i] == 50.0 and s.ppg.timestamps[i + 1] == pytest.approx(50.0025)
    assert [t.category for t in s.trials()] == [-1, 0, 1, -1]
    assert s.rates is None


def test_official_tree_train_and_unlabelled_test(tmp_path):
    _official_participant(tmp_path / "Train" / "P01")
    _official_participant(tmp_path / "Train" / "P02")
    _official_participant(tmp_path / "Test" / "P17", labels=False)
    dirs = participant_dirs(tmp_path)
    assert [d.name for d in dirs] == ["P01", "P02", "P17"]
    sessions = read_official(tmp_path)
    test = sessions[-1]
    assert test.metadata["labelled"] is False
    starts = [json.loads(m.text) for m in test.markers if "trial_start" in m.text]
    assert all(m["category"] is None and m["intensity"] is None for m in starts)
    assert [t.category for t in test.trials()] == [None] * 4
    assert len(read_official(tmp_path / "Train")) == 2


@pytest.mark.parametrize(
    ("file", "array", "match"),
    [
        ("fMRI_data.npz", np.zeros((4, 200, 25)), r"should be \(trials, 246, T\).*\(4, 200, 25\)"),
        ("PPG_data.npz", np.zeros((3, 10000)), r"PPG_data\.npz: key 'data' should be \(4 trials"),
        ("labels.npz", np.zeros((4, 3)), r"labels\.npz: key 'data' should be \(4, 2\)"),
    ],
)
def test_official_wrong_shapes(tmp_path, file, array, match):
    folder = tmp_path / "P05"
    _official_participant(folder)
    np.savez(folder / file, data=array)
    with pytest.raises(IcbhiError, match=match):
        read_participant_dir(folder)


def test_official_wrong_key_and_missing_file(tmp_path):
    folder = tmp_path / "P05"
    _official_participant(folder)
    np.savez(folder / "resp_data.npz", values=np.zeros((4, 10)))
    with pytest.raises(
        IcbhiError, match=r"resp_data\.npz: no key 'data'; keys found: \['values'\]"
    ):
        read_participant_dir(folder)
    (folder / "resp_data.npz").unlink()
    with pytest.raises(IcbhiError, match=r"resp_data\.npz: file missing"):
        read_participant_dir(folder)
