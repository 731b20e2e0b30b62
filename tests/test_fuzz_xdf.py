"""Fuzzed XDF files: only XdfError/RecordingError, no hang, no allocation from a size field.

Two layers (see tests/fuzzing.py for the bar and the worker that enforces it): XDF files built
by hypothesis from chunks with random tags, length fields, stream headers and sample counts, and
byte-level mutants of real files (a cut of the shipped replay data, the XDF example recordings,
gzip). Then the inputs the fuzzer found, kept as fixtures.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.recordings import load_sessions
from emorecog_stream.recordings.xdf import XdfError, read_xdf_session, read_xdf_streams
from tests.fuzz_seeds import xdf_seeds
from tests.fuzzing import FUZZ_FIXTURES, Blob, Worker, failures_of, mutants, pack_chunk, report

CI_MUTANTS = 120


@pytest.fixture(scope="module")
def worker():
    with Worker("xdf") as w:
        yield w


# ------------------------------------------------------------------------- structured inputs

FORMATS = ["float32", "double64", "int8", "int16", "int32", "int64", "string", "", "float99"]
RATE_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "abc", "-1", "1e400", "0"]),
)
COUNT_TEXT = st.one_of(
    st.integers(-3, 300).map(str), st.sampled_from(["", "x", "1e3", "99999999999"])
)


@st.composite
def stream_header(draw, stream_id: int) -> bytes:
    parts = {
        "name": draw(st.text(max_size=12)),
        "type": draw(st.sampled_from(["fMRI", "PPG", "Markers", "EEG", ""])),
        "channel_count": draw(COUNT_TEXT),
        "nominal_srate": draw(RATE_TEXT),
        "channel_format": draw(st.sampled_from(FORMATS)),
    }
    body = "".join(
        f"<{k}>{v.replace('&', '&amp;').replace('<', '&lt;')}</{k}>" for k, v in parts.items()
    )
    xml = f'<?xml version="1.0"?><info>{body}</info>'.encode("utf-8", "surrogatepass")
    return struct.pack("<I", stream_id) + xml


@st.composite
def samples(draw, stream_id: int) -> bytes:
    count = draw(st.one_of(st.integers(0, 6), st.sampled_from([2**31, 2**40, 2**63])))
    width = 8 if count >= 256 else draw(st.sampled_from([1, 4, 8]))
    code = {1: "<B", 4: "<I", 8: "<Q"}[width]
    payload = draw(st.binary(max_size=200))
    if draw(st.booleans()) and count < 7:  # well-formed float32 samples of 1..3 channels
        channels = draw(st.integers(1, 3))
        payload = b"".join(
            b"\x08" + struct.pack("<d", draw(st.floats(width=64))) + b"\0" * 4 * channels
            for _ in range(count)
        )
    head = struct.pack("<I", stream_id) + struct.pack("<B", width) + struct.pack(code, count)
    return head + payload


@st.composite
def xdf_files(draw) -> bytes:
    chunks = [pack_chunk(1, b'<?xml version="1.0"?><info><version>1.0</version></info>')]
    ids = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    for stream_id in ids:
        chunks.append(pack_chunk(2, draw(stream_header(stream_id))))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["samples", "samples", "clock", "boundary", "footer", "raw"]))
        sid = draw(st.sampled_from([*ids, 7]))
        if kind == "samples":
            content, tag = draw(samples(sid)), 3
        elif kind == "clock":
            content, tag = struct.pack("<Idd", sid, draw(st.floats()), draw(st.floats())), 4
        elif kind == "boundary":
            content, tag = bytes.fromhex("43a546dccbf5410fb30ed5467383cbe4"), 5
        elif kind == "footer":
            footer = b"<info><sample_count>9</sample_count></info>"
            content, tag = struct.pack("<I", sid) + footer, 6
        else:
            content, tag = draw(st.binary(max_size=64)), draw(st.integers(0, 9))
        lie = draw(st.sampled_from([None, None, None, 0, 1, 2**32 - 1, 2**40, 2**64 - 1]))
        width = 8 if lie is not None and lie >= 2**32 else None
        chunks.append(pack_chunk(tag, content, width=width, length=lie))
    data = b"XDF:" + b"".join(chunks)
    cut = draw(st.one_of(st.none(), st.integers(4, max(4, len(data)))))
    return Blob(data if cut is None else data[:cut])


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=xdf_files())
def test_generated_xdf_files(worker, data: bytes) -> None:
    found = failures_of(worker, [data])
    assert not found, report(found)


# ------------------------------------------------------------------------- mutated real files


def test_mutated_real_xdf_files(worker) -> None:
    seeds = [data for _, data in xdf_seeds()]
    assert [worker.run(s).status for s in seeds] == ["ok", "rejected", "rejected", "ok"]
    found = failures_of(worker, mutants(seeds, CI_MUTANTS, seed=2024))
    assert not found, report(found)


# ------------------------------------------------------------------------- what fuzzing found


def test_a_chunk_length_past_any_offset_is_reported_as_truncation() -> None:
    # was: ValueError "cannot fit 'int' into an offset-sized integer" from seek()
    path = FUZZ_FIXTURES / "xdf_huge_chunk_length.xdf"
    with pytest.raises(XdfError, match=r"xdf_huge_chunk_length\.xdf: truncated XDF: chunk #0"):
        read_xdf_streams(path)
    assert read_xdf_streams(path, strict=False).found == []  # nothing intact before it


def test_a_corrupt_gzip_stream_is_an_xdf_error() -> None:
    # was: zlib.error from the framing walk
    path = FUZZ_FIXTURES / "xdf_corrupt_deflate.xdfz"
    with pytest.raises(XdfError, match=r"xdf_corrupt_deflate\.xdfz: cannot read XDF file"):
        load_sessions(path)


def test_a_sample_count_larger_than_the_chunk_allocates_nothing(worker) -> None:
    # was: pyxdf allocating 2**48 samples (MemoryError, wrapped) from a 77 kB file
    path = FUZZ_FIXTURES / "xdf_huge_sample_count.xdf"
    with pytest.raises(XdfError, match=r"declares 281474976710656 samples of at least 985 bytes"):
        read_xdf_streams(path)
    # lenient: the intact chunks before it are read, the corrupt one is left out
    recording = read_xdf_streams(path, strict=False)
    assert recording.found and all(info.n_samples == 0 for info in recording.found[:1])
    assert not worker.run(path.read_bytes()).failed


def test_a_file_without_a_file_header() -> None:
    # was: AttributeError ('NoneType' object has no attribute 'get')
    path = FUZZ_FIXTURES / "xdf_magic_only.xdf"
    assert read_xdf_streams(path, strict=False).found == []
    with pytest.raises(XdfError, match=r"xdf_magic_only\.xdf: no stream for fmri"):
        load_sessions(path)


def test_a_tr_of_infinity_in_the_header_is_no_tr() -> None:
    # was: a session with TR = inf
    session = read_xdf_session(FUZZ_FIXTURES / "xdf_tr_inf.xdf")
    assert math.isfinite(session.tr) and session.tr == pytest.approx(1.0)
