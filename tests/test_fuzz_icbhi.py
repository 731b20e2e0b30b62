"""Fuzzed ICBHI files (per-trial ``.mat`` v5 and v7.3, official ``.npz``): only IcbhiError, no
hang, no allocation from a size field (see tests/fuzzing.py for the bar and the worker)."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.recordings.icbhi import IcbhiError, read_mat_folder, read_participant_dir
from tests.fuzz_seeds import _mat_v73, mat_seeds, npz_seeds
from tests.fuzzing import FUZZ_FIXTURES, Blob, Worker, failures_of, mutants, report

FUZZ = settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def mat_worker():
    with Worker("icbhi_mat") as w:
        yield w


@pytest.fixture(scope="module")
def npz_worker(mat_worker):
    """The .mat worker serves the .npz target too (same imports)."""
    return mat_worker


# ------------------------------------------------------------------------- structured inputs

DTYPES = ["<f8", "<f4", "<i8", "<i2", "|u1", "|b1", "<c16", "<U3", "|S2", "|O", "<M8[s]", "|V4"]


def _array(draw, shape) -> np.ndarray:
    dtype = draw(st.sampled_from(["f8", "f4", "i4", "u1", "c16", "U2"]))
    n = int(np.prod(shape))
    return np.arange(n).reshape(shape).astype(dtype)


@st.composite
def mat_values(draw):
    kind = draw(st.sampled_from(["array", "array", "text", "struct", "cell", "empty"]))
    if kind == "array":
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 25, 246]), max_size=3)))
        return _array(draw, shape)
    if kind == "text":
        return draw(st.text(max_size=8))
    if kind == "struct":
        return {"a": draw(st.floats()), "b": np.ones(draw(st.integers(0, 3)))}
    if kind == "cell":
        return np.array([1.0, "x", np.ones(2)], dtype=object)
    return np.zeros((0, 0))


@st.composite
def mat_files(draw) -> bytes:
    keys = draw(st.lists(st.sampled_from(["mri_d", "pnr_rate", "lab_d", "other"]), unique=True))
    values = {k: draw(mat_values()) for k in keys}
    if draw(st.booleans()):
        numeric = {
            k: v
            for k, v in values.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "fiu" and v.size
        }
        return Blob(_mat_v73(numeric or {"other": np.ones(2)}))
    raw = io.BytesIO()
    import scipy.io

    scipy.io.savemat(raw, values, do_compression=draw(st.booleans()))
    return Blob(raw.getvalue())


@FUZZ
@given(values=st.dictionaries(st.sampled_from(["mri_d", "x", "y"]), mat_values(), max_size=3))
def test_the_element_size_check_accepts_what_scipy_writes(values) -> None:
    import scipy.io

    from emorecog_stream.recordings.icbhi import _mat5_element_sizes

    for compress in (False, True):
        raw = io.BytesIO()
        scipy.io.savemat(raw, values, do_compression=compress)
        assert _mat5_element_sizes(raw.getvalue()) is None


@FUZZ
@given(data=mat_files())
def test_generated_mat_files(mat_worker, data: bytes) -> None:
    found = failures_of(mat_worker, [data])
    assert not found, report(found)


@st.composite
def npz_files(draw) -> bytes:
    """An npz whose ``data.npy`` header says any shape and dtype, followed by any bytes."""
    shape = tuple(
        draw(st.lists(st.one_of(st.integers(0, 300), st.sampled_from([2**31, 2**40])), max_size=3))
    )
    descr = draw(st.sampled_from(DTYPES))
    header = {"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape}
    text = repr(header).encode("latin1")
    text += b" " * ((64 - (len(text) + 11) % 64) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    npy += draw(st.one_of(st.binary(max_size=256), st.just(b"\0" * 4 * 3 * 246 * 5)))
    raw = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(raw, "w", method) as archive:
        archive.writestr(draw(st.sampled_from(["data.npy", "data.npy", "other.npy"])), npy)
    return Blob(raw.getvalue())


@FUZZ
@given(data=npz_files())
def test_generated_npz_files(npz_worker, data: bytes) -> None:
    found = failures_of(npz_worker, [data], "icbhi_npz")
    assert not found, report(found)


# ------------------------------------------------------------------------- mutated real files


def test_mutated_mat_files(mat_worker) -> None:
    seeds = [data for _, data in mat_seeds()]
    assert [mat_worker.run(s).status for s in seeds] == ["ok"] * 3
    found = failures_of(mat_worker, mutants(seeds, 150, seed=2024))
    assert not found, report(found)


def test_mutated_npz_files(npz_worker) -> None:
    seeds = [data for _, data in npz_seeds()]
    found = failures_of(npz_worker, mutants(seeds, 50, seed=2024), "icbhi_npz")
    assert not found, report(found)


# ------------------------------------------------------------------------- what fuzzing found


@pytest.mark.parametrize(
    ("fixture", "was", "match"),
    [
        ("mat_v4_huge_name_length.mat", "MemoryError", "not a readable MATLAB file"),
        ("mat_v73_truncated.mat", "OSError", r"not a readable MATLAB v7\.3 \(HDF5\) file"),
        ("mat_v73_bad_object_header.mat", "KeyError", "no key 'mri_d'"),
        ("mat_v73_bad_link.mat", "RuntimeError", "no key 'mri_d'"),
        ("mat_v73_bad_float_type.mat", "ValueError", r"v7\.3 \(HDF5\) file: ValueError"),
        ("mat_v73_offset_overflow.mat", "OverflowError", r"v7\.3 \(HDF5\) file: OverflowError"),
        # found by atheris: scipy allocated the byte count of an element tag (9,896 in 589 bytes)
        ("mat_v5_huge_element.mat", "MemoryError", r"byte 128 declares 9896 bytes, but only 453"),
    ],
)
def test_broken_mat_files_found_by_fuzzing(tmp_path, mat_worker, fixture, was, match) -> None:
    folder = tmp_path / "mat"
    folder.mkdir()
    shutil.copy(FUZZ_FIXTURES / fixture, folder / "P10_1.mat")
    with pytest.raises(IcbhiError, match=match) as info:  # was: a raw `was`
        read_mat_folder(folder)
    assert str(folder / "P10_1.mat") in str(info.value)
    assert not mat_worker.run((FUZZ_FIXTURES / fixture).read_bytes()).failed


def test_an_npy_header_claiming_a_terabyte_allocates_nothing(tmp_path, npz_worker) -> None:
    # was: numpy allocating the declared shape before reading the member (MemoryError)
    data = (FUZZ_FIXTURES / "npz_huge_shape.npz").read_bytes()
    folder = tmp_path / "P01"
    folder.mkdir()
    (folder / "fMRI_data.npz").write_bytes(data)
    with pytest.raises(IcbhiError, match=r"fMRI_data\.npz: 'data' declares shape \(1099511627776,"):
        read_participant_dir(folder)
    assert not npz_worker.run(data, "icbhi_npz").failed
