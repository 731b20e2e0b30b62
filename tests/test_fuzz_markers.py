"""Fuzzed marker strings: what any LSL sender or XDF file may put on the marker stream.

Bar: ``parse_marker`` returns a dict or None and ``Session.trials`` builds trials or skips the
marker, never an exception; through the engine, every marker reaches the JSONL audit log (as
text, with its parsed form where it has one), nothing is lost and no prediction is affected.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.config import apply_overrides, load_config
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.outputs import MarkerLog
from emorecog_stream.engine.session import Engine
from emorecog_stream.model import load_model
from emorecog_stream.recordings.session import Marker, parse_marker
from emorecog_stream.sinks.jsonl import JsonlLog, read_log
from tests.fuzz_seeds import marker_seeds
from tests.fuzzing import (
    FUZZ_FIXTURES,
    Blob,
    Worker,
    _marker_session,
    failures_of,
    mutants,
    report,
)

FUZZ = settings(
    max_examples=80,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=5,
)


@st.composite
def marker_texts(draw) -> str:
    kind = draw(st.sampled_from(["ours", "ours", "json", "text", "deep", "digits"]))
    if kind == "ours":
        fields = {
            "event": draw(st.sampled_from(["trial_start", "trial_end", "other", ""])),
            "trial": draw(st.one_of(st.integers(-3, 3), JSON)),
            "category": draw(st.one_of(st.integers(-2, 2), JSON)),
            "intensity": draw(st.one_of(st.integers(-5, 5), JSON)),
        }
        fields = {k: v for k, v in fields.items() if k == "event" or draw(st.booleans())}
        return json.dumps(fields)  # NaN and Infinity included, as Python writes them
    if kind == "json":
        return json.dumps(draw(JSON))
    if kind == "deep":
        depth = draw(st.sampled_from([20, 500, 5000, 100_000]))
        return '{"event":"x","v":' + "[" * depth + "]" * depth + "}"
    if kind == "digits":
        return '{"event":"trial_start","trial":' + "9" * draw(st.integers(4000, 6000)) + "}"
    return draw(st.text(max_size=40))


@pytest.fixture(scope="module")
def worker():
    with Worker("markers") as w:
        yield w


@FUZZ
@given(texts=st.lists(marker_texts(), min_size=1, max_size=6))
def test_generated_markers_parse_and_build_trials(worker, texts: list[str]) -> None:
    found = failures_of(worker, [Blob("\x1e".join(texts).encode("utf-8", "surrogatepass"))])
    assert not found, report(found)


def test_mutated_marker_streams(worker) -> None:
    seeds = [data for _, data in marker_seeds()]
    found = failures_of(worker, mutants(seeds, 400, seed=2024))
    assert not found, report(found)


@pytest.fixture(scope="module")
def model():
    return load_model()


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(texts=st.lists(marker_texts(), min_size=1, max_size=5))
def test_every_marker_reaches_the_audit_log(model, tmp_path_factory, texts: list[str]) -> None:
    path = tmp_path_factory.mktemp("markers") / "session.jsonl"
    log = JsonlLog(path, session="fuzz", model_id=model.model_id)
    engine = Engine(
        apply_overrides(load_config(None), {"session.id": "fuzz"}), model, [log, MarkerLog(log)]
    )
    stamps = [100.0 + i for i in range(len(texts))]
    engine.process_chunk(Role.MARKERS, [[t] for t in texts], stamps, 200.0)
    log.close()
    logged = read_log(path, kind="marker")
    assert [m["text"] for m in logged] == texts
    assert [m["timestamp"] for m in logged] == stamps
    assert engine.counters.markers == len(texts) and engine.counters.steps == 0
    for entry, text in zip(logged, texts, strict=True):
        assert ("marker" in entry) == (parse_marker(text) is not None)


# ------------------------------------------------------------------------- what fuzzing found


@pytest.mark.parametrize(
    ("fixture", "was"),
    [
        ("marker_without_trial.txt", "KeyError: 'trial'"),
        ("marker_null_trial.txt", "TypeError from int(None)"),
        ("marker_deep.txt", "RecursionError in json.loads"),
        ("marker_5000_digits.txt", "ValueError: Exceeds the limit (4300 digits)"),
    ],
)
def test_markers_found_by_fuzzing(fixture, was) -> None:
    text = (FUZZ_FIXTURES / fixture).read_text()
    start = Marker(1.0, '{"event":"trial_start","trial":7,"category":1,"intensity":2}')
    end = Marker(9.0, '{"event":"trial_end","trial":7}')
    session = _marker_session([start, Marker(5.0, text), end])
    assert [(t.index, t.onset, t.offset) for t in session.trials()] == [(7, 1.0, 9.0)]


def test_a_category_or_level_out_of_range_reads_as_unknown() -> None:
    start = Marker(1.0, '{"event":"trial_start","trial":"3","category":"sad","intensity":9}')
    end = Marker(2.0, '{"event":"trial_end","trial":3.0}')
    (trial,) = _marker_session([start, end]).trials()
    assert (trial.index, trial.category, trial.intensity) == (3, None, None)
