"""``load_sessions``: one entry point that recognises every recording kind we read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from emorecog_stream.core.streams import N_ROIS
from emorecog_stream.recordings import RecordingError, XdfError, load_session, load_sessions
from emorecog_stream.recordings.synth import SynthConfig, generate_session
from emorecog_stream.recordings.xdf import write_xdf

MINIMAL = Path(__file__).parent / "fixtures" / "xdf" / "minimal.xdf"


@pytest.fixture(scope="module")
def tiny():
    return generate_session(1, SynthConfig(n_participants=2, n_trials=3, rest_s=2.0))


def test_xdf_file_and_folder(tmp_path, tiny):
    write_xdf(tiny, tmp_path / "b.xdf")
    write_xdf(tiny, tmp_path / "a.xdfz")
    (tmp_path / "readme.txt").write_text("not a recording")
    [one] = load_sessions(tmp_path / "b.xdf")
    assert one.participant == "P01" and one.n_volumes == tiny.n_volumes
    both = load_sessions(tmp_path)
    assert [s.metadata["source_file"] for s in both] == [
        str(tmp_path / "a.xdfz"),
        str(tmp_path / "b.xdf"),
    ]
    assert load_sessions(tmp_path / "b.xdf", tr=3.0)[0].tr == 3.0
    assert load_session(tmp_path / "b.xdf")[0].participant == "P01"


def test_roles_are_passed_to_the_xdf_reader(tmp_path):
    with pytest.raises(XdfError, match="3 channels; expected 246"):
        load_sessions(MINIMAL, ["fmri=name=SendDataC"])
    with pytest.raises(XdfError, match="no stream for fmri"):
        load_sessions(MINIMAL)


def test_mat_folder(tmp_path):
    for trial in range(2):
        scipy.io.savemat(
            tmp_path / f"P04_{trial}.mat",
            {"mri_d": np.zeros((N_ROIS, 25)), "pnr_rate": [70, 14], "lab_d": [0, 0]},
        )
    [s] = load_sessions(tmp_path, tr=2.0, rest_s=1.0)
    assert s.participant == "P04" and s.tr == 2.0
    assert [t.onset for t in s.trials()] == [0.0, 51.0]
    with pytest.raises(RecordingError, match="a single trial file; give the folder"):
        load_sessions(tmp_path / "P04_0.mat")


def test_official_layout(tmp_path):
    folder = tmp_path / "Train" / "P09"
    folder.mkdir(parents=True)
    np.savez(folder / "fMRI_data.npz", data=np.zeros((2, N_ROIS, 25)))
    np.savez(folder / "PPG_data.npz", data=np.zeros((2, 10000)))
    np.savez(folder / "resp_data.npz", data=np.zeros((2, 1250)))
    for path in (tmp_path, tmp_path / "Train", folder):
        [s] = load_sessions(path)
        assert s.participant == "P09" and s.ppg.nominal_srate == 400.0


def test_unknown_things_get_a_clear_error(tmp_path):
    with pytest.raises(RecordingError, match="no such file or folder"):
        load_sessions(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(RecordingError, match=r"x\.csv: unknown recording file \(expected \.xdf"):
        load_sessions(tmp_path / "x.csv")
    with pytest.raises(RecordingError, match="a folder without recordings"):
        load_sessions(tmp_path)


def test_copied_example_file_in_a_folder_is_read_as_xdf(tmp_path):
    shutil.copy(MINIMAL, tmp_path / "m.xdf")
    with pytest.raises(XdfError, match=r"m\.xdf: no stream for fmri"):
        load_sessions(tmp_path)
