"""XDF reading (real example files, role mapping, broken files) and our writer (round trip)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import pyxdf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.core.streams import N_ROIS, RATES_CHANNELS, Role, roi_labels
from emorecog_stream.recordings.session import Marker, Session, SignalStream, make_marker
from emorecog_stream.recordings.synth import SynthConfig, generate_session
from emorecog_stream.recordings.xdf import (
    Selector,
    XdfError,
    parse_role_specs,
    read_xdf_session,
    read_xdf_streams,
    write_xdf,
    xdf_bytes,
)

FIXTURES = Path(__file__).parent / "fixtures" / "xdf"
MINIMAL = FIXTURES / "minimal.xdf"
CLOCK_RESETS = FIXTURES / "clock_resets.xdf"
EMPTY = FIXTURES / "empty_streams.xdf"


@pytest.fixture(scope="module")
def small_session() -> Session:
    return generate_session(1, SynthConfig(n_participants=1, n_trials=3, rest_s=4.0))


# --------------------------------------------------------------------------- selectors


def test_role_specs_from_mapping_and_cli_strings():
    a = parse_role_specs({"ppg": "name=EEG", Role.RESP: "type=Belt,channel=2"})
    b = parse_role_specs(["ppg=name=EEG", "resp=type=Belt,channel=2"])
    assert a == b
    assert a[Role.PPG] == Selector(name="EEG")
    assert a[Role.RESP] == Selector(type="Belt", channel="2")
    assert parse_role_specs(["markers=none"])[Role.MARKERS].disabled
    assert str(a[Role.RESP]) == "type=Belt,channel=2"
    assert parse_role_specs(None) == {}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (["heart=type=PPG"], "unknown stream role 'heart'"),
        (["ppg"], "expected role=selector"),
        (["ppg=EEG"], "key=value"),
        (["ppg=colour=red"], "key=value"),
        (["ppg=channel=0"], "give type=, name= or source_id="),
    ],
)
def test_bad_role_specs_say_what_is_expected(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_role_specs(spec)


# --------------------------------------------------------------------------- real files


def test_minimal_eeg_as_ppg_and_string_markers():
    rec = read_xdf_streams(
        MINIMAL, {"ppg": "name=SendDataC", "markers": "type=StringMarker"}, required=["ppg"]
    )
    ppg = rec.signals[Role.PPG]
    assert ppg.name == "SendDataC" and ppg.type == "EEG"
    assert ppg.data.shape == (9, 3)
    assert ppg.nominal_srate == 10.0
    assert np.all(np.diff(ppg.timestamps) > 0)
    raw, _ = pyxdf.load_xdf(str(MINIMAL), dejitter_timestamps=False)
    eeg = next(s for s in raw if s["info"]["name"] == ["SendDataC"])
    np.testing.assert_array_equal(ppg.data, eeg["time_series"].astype(float))
    np.testing.assert_array_equal(ppg.timestamps, eeg["time_stamps"])
    assert [m.text for m in rec.markers[1:3]] == ["Hello", "World"]
    assert len(rec.markers) == 9


def test_channel_selector_cuts_one_channel():
    rec = read_xdf_streams(MINIMAL, ["ppg=name=SendDataC,channel=1"])
    assert rec.signals[Role.PPG].data.shape == (9, 1)
    with pytest.raises(XdfError, match=r"channel '7'.*3 channels"):
        read_xdf_streams(MINIMAL, ["ppg=name=SendDataC,channel=7"])


def test_clock_resets_are_handled():
    rec = read_xdf_streams(CLOCK_RESETS, ["ppg=name=BioSemi,channel=0"], required=["ppg"])
    ppg = rec.signals[Role.PPG]
    steps = np.diff(ppg.timestamps)
    # monotonic after pyxdf's clock-reset handling; raw timestamps go backwards
    assert np.all(steps > 0)
    assert 0.009 < np.median(steps) < 0.012  # 100 Hz
    raw, _ = pyxdf.load_xdf(str(CLOCK_RESETS), handle_clock_resets=False, dejitter_timestamps=False)
    raw_eeg = next(s for s in raw if s["info"]["name"] == ["BioSemi"])
    assert np.any(np.diff(raw_eeg["time_stamps"]) < 0)
    # the Markers-typed stream is found by the default type
    assert rec.mapping[Role.MARKERS].name == "MyMarkerStream"
    assert len(rec.markers) == 175


def test_empty_streams_are_ok():
    rec = read_xdf_streams(
        EMPTY,
        {
            "ppg": "name=Empty data stream: test stream 0 counter",
            "resp": "name=Data stream: test stream 0 counter",
            "markers": "name=Empty marker stream: test stream 0 counter",
        },
    )
    assert len(rec.signals[Role.PPG]) == 0
    assert rec.signals[Role.PPG].data.shape == (0, 1)
    assert len(rec.signals[Role.RESP]) == 10
    assert rec.markers == []


def test_missing_role_lists_every_stream_found():
    with pytest.raises(XdfError) as info:
        read_xdf_session(EMPTY)
    text = str(info.value)
    assert "empty_streams.xdf" in text and "no stream for fmri" in text
    for name in ("Empty data stream", "Data stream", "ctrl", "Empty marker stream"):
        assert name in text
    assert "samples=0" in text and "samples=10" in text and "rate=irregular" in text


def test_selector_that_matches_nothing_or_several():
    with pytest.raises(XdfError, match=r"no stream matches the ppg selector 'name=Nope'"):
        read_xdf_streams(MINIMAL, ["ppg=name=Nope"])
    with pytest.raises(XdfError, match=r"3 streams match"):
        read_xdf_streams(EMPTY, ["ppg=type=data"])


def test_session_needs_246_channel_fmri():
    with pytest.raises(XdfError, match=r"3 channels; expected 246"):
        read_xdf_session(MINIMAL, ["fmri=name=SendDataC"])


def test_truncated_file_names_file_and_problem(tmp_path):
    data = MINIMAL.read_bytes()
    cut = tmp_path / "cut.xdf"
    cut.write_bytes(data[:1500])
    with pytest.raises(XdfError, match=r"cut\.xdf: truncated XDF: chunk #\d+"):
        read_xdf_streams(cut)
    # non-strict keeps what pyxdf recovers
    rec = read_xdf_streams(cut, ["ppg=name=SendDataC"], strict=False)
    assert len(rec.signals[Role.PPG]) > 0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not an XDF file"),
        (b"PK\x03\x04 not xdf", "not an XDF file"),
        (b"XDF:\x03\x00\x00", "length field of 3 bytes"),
        (b"XDF:\x01\x05\x09\x00abc", "has tag 9"),
    ],
)
def test_broken_files(tmp_path, content, match):
    path = tmp_path / "broken.xdf"
    path.write_bytes(content)
    with pytest.raises(XdfError, match=match) as info:
        read_xdf_streams(path)
    assert "broken.xdf" in str(info.value)


def test_corrupt_xml_is_reported(tmp_path):
    data = bytearray(MINIMAL.read_bytes())
    data[300:320] = b"\xff" * 20
    path = tmp_path / "garbled.xdf"
    path.write_bytes(bytes(data))
    with pytest.raises(XdfError, match=r"garbled\.xdf: cannot parse XDF: ParseError"):
        read_xdf_streams(path)


def test_missing_file(tmp_path):
    with pytest.raises(XdfError, match="no such XDF file"):
        read_xdf_streams(tmp_path / "nope.xdf")


# --------------------------------------------------------------------------- writer


def _assert_same(a: Session, b: Session) -> None:
    assert a.participant == b.participant and a.tr == b.tr and a.atlas == b.atlas
    assert len(a.streams) == len(b.streams)
    for x, y in zip(a.streams, b.streams, strict=True):
        assert (x.role, x.name, x.type, x.source_id) == (y.role, y.name, y.type, y.source_id)
        assert x.nominal_srate == y.nominal_srate
        assert x.channel_labels == y.channel_labels and x.units == y.units
        assert y.data.dtype == np.float32
        np.testing.assert_array_equal(x.data, y.data)
        np.testing.assert_array_equal(x.timestamps, y.timestamps)
    assert a.markers == b.markers
    assert a.trials() == b.trials()


def test_pyxdf_round_trip_is_exact(tmp_path, small_session):
    path = write_xdf(small_session, tmp_path / "s.xdf")
    # straight pyxdf, no help from our reader
    streams, header = pyxdf.load_xdf(str(path), dejitter_timestamps=False)
    assert header["info"]["version"] == ["1.0"]
    by_type = {s["info"]["type"][0]: s for s in streams}
    assert set(by_type) == {"fMRI", "PPG", "Respiration", "Markers"}
    fmri = by_type["fMRI"]
    assert fmri["time_series"].dtype == np.float32
    np.testing.assert_array_equal(fmri["time_series"], small_session.fmri.data)
    np.testing.assert_array_equal(fmri["time_stamps"], small_session.fmri.timestamps)
    np.testing.assert_array_equal(by_type["PPG"]["time_series"], small_session.ppg.data)
    np.testing.assert_array_equal(by_type["PPG"]["time_stamps"], small_session.ppg.timestamps)
    info = fmri["info"]
    assert info["channel_count"] == [str(N_ROIS)]
    assert float(info["nominal_srate"][0]) == 1.0
    assert info["source_id"] == [small_session.fmri.source_id]
    channels = info["desc"][0]["channels"][0]["channel"]
    assert [c["label"][0] for c in channels] == roi_labels()
    assert channels[0]["unit"] == ["a.u."]
    session_desc = info["desc"][0]["session"][0]
    assert session_desc["participant"] == ["P01"] and session_desc["tr"] == ["1.0"]
    assert session_desc["atlas"] == ["Brainnetome246"]
    markers = by_type["Markers"]
    assert markers["info"]["channel_format"] == ["string"]
    assert [s[0] for s in markers["time_series"]] == [m.text for m in small_session.markers]
    assert fmri["footer"]["info"]["sample_count"] == [str(small_session.n_volumes)]
    # and our reader restores the whole session
    back = read_xdf_session(path)
    _assert_same(small_session, back)
    assert back.metadata["seed"] == small_session.metadata["seed"]
    assert back.metadata["synth_config"] == small_session.metadata["synth_config"]


def test_xdfz_round_trip_and_determinism(tmp_path, small_session):
    a = write_xdf(small_session, tmp_path / "a.xdfz")
    b = write_xdf(small_session, tmp_path / "b.xdfz")
    assert a.read_bytes() == b.read_bytes()  # no timestamp in the gzip header
    assert gzip.decompress(a.read_bytes()) == xdf_bytes(small_session)
    _assert_same(small_session, read_xdf_session(a))


def test_dejitter_option_changes_little(tmp_path, small_session):
    path = write_xdf(small_session, tmp_path / "s.xdf")
    back = read_xdf_session(path, dejitter=True)
    np.testing.assert_allclose(back.ppg.timestamps, small_session.ppg.timestamps, atol=1e-6)


def test_rates_stream_and_custom_names_round_trip(tmp_path):
    t = np.arange(5) * 2.0
    session = Session(
        participant="lab-7",
        tr=2.0,
        fmri=SignalStream(Role.FMRI, "Scanner", "fMRI", np.ones((5, N_ROIS)), t + 100.0, 0.5),
        rates=SignalStream(
            Role.RATES, "Rates", "PhysioRates", np.array([[60.0, 12.0]] * 5), t + 100.0, 0.0
        ),
        markers=[Marker(100.0, make_marker("trial_start", 0, None, None)), Marker(101.0, "go")],
        metadata={"site": "B"},
    )
    back = read_xdf_session(write_xdf(session, tmp_path / "lab.xdf"))
    assert back.participant == "lab-7" and back.tr == 2.0
    assert back.rates is not None and back.rates.channel_labels == list(RATES_CHANNELS)
    np.testing.assert_array_equal(back.rates.data, session.rates.data)
    assert back.fmri.name == "Scanner" and back.fmri.timestamps[0] == 100.0
    assert back.markers == session.markers
    assert back.metadata["site"] == "B"
    assert back.trials() == []  # a start without end is not a trial


def test_tr_falls_back_to_nominal_rate_and_override(tmp_path, small_session):
    path = write_xdf(small_session, tmp_path / "s.xdf")
    assert read_xdf_session(path, tr=2.5).tr == 2.5
    # a copy under another name keeps the participant from desc, not the file name
    other = tmp_path / "renamed.xdf"
    shutil.copy(path, other)
    assert read_xdf_session(other).participant == "P01"
    assert read_xdf_session(other, participant="X").participant == "X"


def test_write_rejects_other_suffix(tmp_path, small_session):
    with pytest.raises(ValueError, match=r"expected a \.xdf or \.xdfz path"):
        write_xdf(small_session, tmp_path / "s.h5")


def test_one_stream_can_feed_two_roles_by_channel():
    rec = read_xdf_streams(
        MINIMAL, ["ppg=name=SendDataC,channel=0", "resp=name=SendDataC,channel=2"]
    )
    both = read_xdf_streams(MINIMAL, ["ppg=name=SendDataC"]).signals[Role.PPG].data
    np.testing.assert_array_equal(rec.signals[Role.PPG].data[:, 0], both[:, 0])
    np.testing.assert_array_equal(rec.signals[Role.RESP].data[:, 0], both[:, 2])


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_vol=st.integers(1, 4),
    n_ppg=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    participant=_TEXT,
    ppg_name=_TEXT,
    texts=st.lists(st.text(max_size=40), max_size=6),
    start=st.floats(-1e6, 1e6, allow_nan=False),
)
def test_round_trip_property(tmp_path, n_vol, n_ppg, seed, participant, ppg_name, texts, start):
    """Any values (NaN and inf included), names with XML specials, any marker text."""
    rng = np.random.default_rng(seed)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40], dtype=np.float32)
    fmri = rng.normal(size=(n_vol, N_ROIS)).astype(np.float32)
    fmri.ravel()[rng.integers(0, fmri.size, 6)] = special
    ppg = rng.normal(size=(n_ppg, 1)).astype(np.float32)
    session = Session(
        participant=participant,
        tr=0.8,
        fmri=SignalStream(
            Role.FMRI, "f<&>", "fMRI", fmri, start + np.arange(n_vol) * 0.8, 1.25, roi_labels()
        ),
        ppg=SignalStream(
            Role.PPG, ppg_name, "PPG", ppg, start + np.sort(rng.uniform(0, 5, n_ppg)), 0.0
        ),
        markers=[Marker(start + i * 0.5, t) for i, t in enumerate(texts)],
    )
    back = read_xdf_session(write_xdf(session, tmp_path / "p.xdf"))
    assert back.participant == participant and back.ppg.name == ppg_name
    np.testing.assert_array_equal(back.fmri.data.view(np.uint32), fmri.view(np.uint32))
    np.testing.assert_array_equal(back.fmri.timestamps, session.fmri.timestamps)
    np.testing.assert_array_equal(back.ppg.data, ppg)
    np.testing.assert_array_equal(back.ppg.timestamps, session.ppg.timestamps)
    assert back.markers == session.markers


def test_writer_rejects_text_xml_cannot_hold(tmp_path, small_session):
    bad = Session(
        participant="P\x01",
        tr=1.0,
        fmri=small_session.fmri,
    )
    with pytest.raises(ValueError, match=r"participant.*control character"):
        write_xdf(bad, tmp_path / "bad.xdf")
