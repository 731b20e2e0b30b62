"""Fuzzed LSL stream metadata: the XML a sender announces, parsed by liblsl into a StreamInfo
and read by the engine (parse_metadata, describe_info, check_info for every role), and marker
strings that are not UTF-8 through a real outlet and inlet on loopback.

Bar (tests/fuzzing.py): only StreamMismatchError from check_info, nothing from the rest, no
hang or crash in liblsl; an accepted stream has a finite nominal rate >= 0 and a positive stall
timeout, and a TR read from ``desc/tr`` is None or a finite number > 0.
"""

from __future__ import annotations

import asyncio
from xml.sax.saxutils import escape

import pylsl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.adapters.lsl_info import parse_metadata
from emorecog_stream.adapters.lsl_inlet import (
    AsyncInlet,
    Chunk,
    InletSpec,
    StreamEvent,
    StreamState,
)
from emorecog_stream.core.streams import Role
from tests.fuzz_seeds import lsl_xml_seeds
from tests.fuzzing import Blob, Worker, failures_of, mutants, report, stream_info_from_xml

FUZZ = settings(
    max_examples=80,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NUMBER_TEXT = st.one_of(
    st.floats().map(repr),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-1", "1e400", "", " 5 ", "0x10", "1,5", "٣"]),
)
TEXT = st.text(max_size=16).map(lambda t: escape(t.encode("utf-8", "replace").decode()))


@pytest.fixture(scope="module")
def worker():
    with Worker("lsl_xml") as w:
        yield w


@st.composite
def stream_xml(draw) -> Blob:
    fields = {
        "name": draw(TEXT),
        "type": draw(st.one_of(st.sampled_from(["fMRI", "PPG", "Markers", "Respiration"]), TEXT)),
        "channel_count": draw(NUMBER_TEXT),
        "nominal_srate": draw(NUMBER_TEXT),
        "channel_format": draw(
            st.one_of(st.sampled_from(["float32", "string", "int64", "undefined"]), TEXT)
        ),
        "source_id": draw(TEXT),
        "uid": draw(TEXT),
        "hostname": draw(TEXT),
    }
    keep = [k for k in fields if k == "name" or draw(st.booleans())]
    body = "".join(f"<{k}>{fields[k]}</{k}>" for k in keep)
    channels = "".join(
        "<channel>"
        + "".join(f"<{k}>{draw(TEXT)}</{k}>" for k in ("label", "unit", "type"))
        + "</channel>"
        for _ in range(draw(st.integers(0, 4)))
    )
    desc = f"<desc><channels>{channels}</channels><tr>{draw(NUMBER_TEXT)}</tr>"
    desc += f"<participant>{draw(TEXT)}</participant><atlas>{draw(TEXT)}</atlas></desc>"
    xml = f'<?xml version="1.0"?><info>{body}{desc}</info>'
    cut = draw(st.one_of(st.none(), st.integers(0, len(xml))))
    return Blob((xml if cut is None else xml[:cut]).encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=stream_xml())
def test_generated_stream_descriptions(worker, data: bytes) -> None:
    found = failures_of(worker, [data])
    assert not found, report(found)


def test_mutated_stream_descriptions(worker) -> None:
    seeds = [data for _, data in lsl_xml_seeds()]
    assert [worker.run(s).status for s in seeds] == ["ok"] * 3
    found = failures_of(worker, mutants(seeds, 300, seed=2024))
    assert not found, report(found)


# ------------------------------------------------------------------------- what fuzzing found


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "1e400"])
def test_a_tr_that_is_no_duration_reads_as_none(text) -> None:
    info = stream_info_from_xml(
        f'<?xml version="1.0"?><info><name>f</name><type>fMRI</type><channel_count>246'
        f"</channel_count><nominal_srate>1</nominal_srate><channel_format>float32"
        f"</channel_format><desc><tr>{text}</tr></desc></info>".encode()
    )
    assert parse_metadata(info).tr is None


@pytest.mark.timeout(60)
async def test_markers_that_are_not_utf8_arrive_with_the_others(lsl_tag, outlet_factory) -> None:
    # was: pylsl's strict decoding raised inside pull_chunk; the chunk's other markers were lost
    # and the inlet was torn down and resolved again
    outlet = outlet_factory(f"Mk-{lsl_tag}", type="Markers", srate=0.0, fmt=pylsl.cf_string)
    sent = [b'{"event":"trial_start","trial":1}', b"caf\xe9 \xff\xfe", b"ok", b"\xc3"]
    async with AsyncInlet(InletSpec(Role.MARKERS, name=f"Mk-{lsl_tag}")) as inlet:
        await inlet.open(5.0)
        await asyncio.sleep(0.5)
        t0 = pylsl.local_clock()
        for i, raw in enumerate(sent):
            outlet.push_sample([raw], t0 + i)
        texts: list[str] = []
        events: list[StreamEvent] = []

        async def read() -> None:
            async for item in inlet:
                if isinstance(item, Chunk):
                    texts.extend(item.data)
                elif isinstance(item, StreamEvent):
                    events.append(item)
                if len(texts) >= len(sent):
                    return

        await asyncio.wait_for(read(), 10)
    assert texts == [raw.decode("utf-8", errors="replace") for raw in sent]
    assert not [e for e in events if e.state is StreamState.LOST]
