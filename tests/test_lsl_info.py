"""Stream descriptions shared by replay outlets and inlets; selectors as XPath predicates."""

from __future__ import annotations

import pylsl
import pytest

from emorecog_stream.adapters.lsl_info import (
    DEFAULT_SOURCE_ID,
    OutletDescription,
    build_predicate,
    describe_visible,
    parse_metadata,
    stream_identity,
    xpath_literal,
)
from emorecog_stream.adapters.lsl_inlet import AsyncInlet, InletSpec
from emorecog_stream.core.streams import Role


def test_identity_is_stable_and_tagged():
    assert stream_identity(Role.PPG) == ("EmoRecog-PPG", "PPG", "emorecog-stream-ppg")
    assert stream_identity(Role.FMRI, "lab2") == (
        "EmoRecog-fMRI-lab2",
        "fMRI",
        "emorecog-stream-fmri-lab2",
    )
    assert len(set(DEFAULT_SOURCE_ID.values())) == len(Role)


def test_xpath_quoting_and_predicates():
    assert xpath_literal("abc") == "'abc'"
    assert xpath_literal("Bob's") == '"Bob\'s"'
    assert xpath_literal("""a'b"c""") == """concat('a', "'", 'b"c')"""
    assert build_predicate(name="X", source_id="S") == "name='X' and source_id='S'"
    with pytest.raises(ValueError, match="at least one of name, type or source_id"):
        build_predicate()


def test_description_round_trip_through_stream_info():
    desc = OutletDescription(
        role=Role.RATES,
        name="R",
        type="PhysioRates",
        source_id="sid",
        channel_count=2,
        nominal_srate=0.0,
        channel_labels=("heart_rate", "respiration_rate"),
        units=("bpm", "breaths/min"),
        participant="P01",
        tr=2.0,
        extra={"replay_speed": "1.0"},
    )
    meta = parse_metadata(desc.stream_info())
    assert (meta.name, meta.type, meta.source_id, meta.channel_count) == (
        "R",
        "PhysioRates",
        "sid",
        2,
    )
    assert meta.channel_labels == ("heart_rate", "respiration_rate")
    assert meta.units == ("bpm", "breaths/min")
    assert meta.channel_types == ("RATE", "RATE")
    assert (meta.participant, meta.tr, meta.atlas, meta.channel_format) == (
        "P01",
        2.0,
        "",
        "float32",
    )


def test_describe_visible_without_streams():
    assert "no LSL streams are visible" in describe_visible([])


async def test_name_with_quotes_resolves(lsl_tag):
    name = f'Bob\'s "PPG" {lsl_tag}'
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "PPG", 1, 100.0, pylsl.cf_float32, lsl_tag))
    async with AsyncInlet(InletSpec(Role.PPG, name=name)) as inlet:
        meta = await inlet.open(5.0)
    assert meta.name == name
    del outlet
