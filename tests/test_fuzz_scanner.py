"""Fuzzed scanner exports: the bridge's NIfTI and DICOM readers (scanner/files.py) on mutants
of nibabel's functional.nii (4-D, and a gzipped 3-D volume cut from it) and pydicom's
MR_small.dcm. Bar (tests/fuzzing.py): only VolumeReadError (IncompleteFile included), naming the
file; no hang; no allocation from a size field in the file."""

from __future__ import annotations

import shutil

import pytest

from emorecog_stream.scanner.files import IncompleteFile, VolumeReadError, read_dicom
from tests.fuzz_seeds import scanner_seeds
from tests.fuzzing import FUZZ_FIXTURES, Worker, failures_of, mutants, report


@pytest.fixture(scope="module")
def worker():
    with Worker("scanner") as w:
        yield w


def test_mutated_nifti_and_dicom_files(worker) -> None:
    seeds = [data for _, data in scanner_seeds()]
    assert [worker.run(s).status for s in seeds] == ["ok", "ok", "ok"]
    found = failures_of(worker, mutants(seeds, 300, seed=2024))
    assert not found, report(found)


@pytest.mark.parametrize(
    ("fixture", "was", "error"),
    [
        # pydicom's read(length) on a file allocated the 2 GiB one element declared
        ("dicom_huge_element_length.dcm", "MemoryError", IncompleteFile),
        # telling "still being written" from "broken" raised from inside the error path
        ("dicom_not_a_transfer_syntax.dcm", "ValueError: UID is not a transfer syntax", None),
        ("dicom_unknown_vr.dcm", "NotImplementedError: Unknown Value Representation", None),
    ],
)
def test_dicom_files_found_by_fuzzing(tmp_path, worker, fixture, was, error) -> None:
    path = tmp_path / "in.dcm"
    shutil.copy(FUZZ_FIXTURES / fixture, path)
    with pytest.raises(error or VolumeReadError, match=rf"{path}: DICOM not readable") as info:
        read_dicom(str(path))
    if error is None:
        assert type(info.value) is VolumeReadError  # broken, not a file still being written
    assert not worker.run(path.read_bytes()).failed


def test_a_nifti_time_unit_code_that_nifti_does_not_define_gives_no_tr(tmp_path, worker) -> None:
    # was: KeyError 128 from nibabel's get_xyzt_units (found with --layer both)
    from emorecog_stream.scanner.files import read_nifti

    path = tmp_path / "in.nii"
    shutil.copy(FUZZ_FIXTURES / "nifti_unknown_time_unit.nii", path)
    (volume,) = read_nifti(str(path))
    assert volume.tr is None and volume.data.shape == (2, 2, 2)
    assert not worker.run(path.read_bytes()).failed
