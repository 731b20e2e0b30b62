"""Payload and topic contract: what subscribers rely on, checked against the shipped schemas."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from emorecog_stream.sinks.payload import (
    SCHEMA_VERSION,
    PayloadError,
    Topics,
    encode,
    load_schema,
    physio_payload,
    prediction_payload,
    status_payload,
    validate_session_id,
    validate_topic_prefix,
)
from tests.plugins.mqtt_broker import sample_prediction


def validator(kind: str) -> jsonschema.protocols.Validator:
    schema = load_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_prediction_payload_has_every_field_and_validates() -> None:
    p = sample_prediction("lab-1", 12)
    payload = prediction_payload(p)
    validator("prediction").validate(json.loads(encode(payload)))
    assert payload["schema_version"] == SCHEMA_VERSION
    assert payload["session"] == "lab-1"
    assert payload["sequence"] == 12 and payload["tr_index"] == 12
    assert payload["volume_timestamp"] == p.volume_timestamp
    assert list(payload["probabilities"]) == ["negative", "neutral", "positive"]
    assert tuple(payload["probabilities"].values()) == pytest.approx(p.probabilities)
    assert payload["category"] == p.category
    assert payload["intensity"] == p.intensity and payload["level"] == p.level
    assert payload["heart_rate"] == p.heart_rate and payload["heart_rate_valid"] is True
    assert payload["respiration_rate"] is None and payload["respiration_rate_valid"] is False
    assert payload["model_id"] == "test-model" and payload["latency_ms"] == 1.5
    assert payload["flags"] == ["respiration_rate_missing"]


def test_missing_rates_become_null_not_nan() -> None:
    p = sample_prediction("s", 0, heart_rate=math.nan, heart_rate_valid=False)
    payload = prediction_payload(p)
    assert payload["heart_rate"] is None and payload["heart_rate_valid"] is False
    text = encode(payload).decode()
    assert "NaN" not in text
    validator("prediction").validate(json.loads(text))


def test_rate_flagged_valid_but_none_is_reported_invalid() -> None:
    payload = prediction_payload(sample_prediction("s", 0, heart_rate=None, heart_rate_valid=True))
    assert payload["heart_rate"] is None and payload["heart_rate_valid"] is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"probabilities": (0.5, math.nan, 0.5)}, "finite"),
        ({"probabilities": (0.5, 0.5)}, "3 values"),
        ({"probabilities": (0.7, 0.7, 0.1)}, "sum to 1"),
        ({"probabilities": (1.2, -0.2, 0.0)}, r"\[0, 1\]"),
        ({"category": "happy"}, "category must be one of"),
        ({"intensity": math.inf}, "intensity must be finite"),
        ({"latency_ms": math.nan}, "latency_ms must be finite"),
        ({"tr_index": -1}, "tr_index must be >= 0"),
        ({"level": 7}, "level must be in -4..4"),
        ({"heart_rate": math.nan, "heart_rate_valid": True}, "flagged valid"),
    ],
)
def test_bad_predictions_are_refused_with_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        prediction_payload(sample_prediction("s", 3, **overrides))


def test_physio_payload_validates_and_carries_qualities() -> None:
    p = sample_prediction("s", 4)
    payload = physio_payload(p, heart_rate_quality=0.9)
    validator("physio").validate(json.loads(encode(payload)))
    assert payload["sequence"] == 4 and payload["heart_rate"] == p.heart_rate
    assert payload["heart_rate_quality"] == 0.9 and "respiration_rate_quality" not in payload
    with pytest.raises(PayloadError, match="heart_rate_quality must lie in"):
        physio_payload(p, heart_rate_quality=1.5)


def test_status_payload_validates_and_rejects_unknown_states() -> None:
    payload = status_payload("s", "degraded", "PPG stream lost", details={"missing": ["ppg"]})
    validator("status").validate(json.loads(encode(payload)))
    assert payload["state"] == "degraded" and payload["details"] == {"missing": ["ppg"]}
    with pytest.raises(PayloadError, match="state must be one of"):
        status_payload("s", "sleeping")
    with pytest.raises(PayloadError, match="JSON-serialisable"):
        status_payload("s", "online", details={"x": object()})


def test_schema_rejects_a_broken_payload() -> None:
    payload = prediction_payload(sample_prediction("s", 1))
    v = validator("prediction")
    for key, value in [("category", "happy"), ("sequence", -3), ("heart_rate", "72")]:
        bad = dict(payload, **{key: value})
        assert not v.is_valid(bad), key
    missing = {k: v for k, v in payload.items() if k != "volume_timestamp"}
    assert not v.is_valid(missing)


def test_topics_per_session_and_prefix() -> None:
    t = Topics.for_session("run-07")
    assert (t.prediction, t.status, t.physio) == (
        "emorecog/run-07/prediction",
        "emorecog/run-07/status",
        "emorecog/run-07/physio",
    )
    assert Topics.for_session("a", "lab/3T").status == "lab/3T/a/status"


@pytest.mark.parametrize(
    ("session", "message"),
    [
        ("", "must not be empty"),
        ("a+b", r"'\+'"),
        ("#", "'#'"),
        ("a/b", "without '/'"),
        ("x" * 129, "at most 128"),
        ("bad\x00id", "control"),
        ("new\nline", "control"),
        (42, "must be a string"),
    ],
)
def test_session_id_injection_is_rejected(session: object, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        validate_session_id(session)
    if isinstance(session, str):
        with pytest.raises(PayloadError):
            prediction_payload(sample_prediction(session, 0))


def test_ordinary_session_ids_pass() -> None:
    for ok in ("P01-run1", "sub_01.ses-2", "Zürich 3T", "a" * 128):
        assert validate_session_id(ok) == ok


@pytest.mark.parametrize("prefix", ["", "/emorecog", "emorecog/", "a//b", "a/+", "#", "$SYS"])
def test_bad_topic_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(PayloadError):
        validate_topic_prefix(prefix)


def test_load_schema_kinds() -> None:
    assert load_schema("status")["title"].endswith("status")
    with pytest.raises(ValueError, match="prediction, physio, status or marker"):
        load_schema("nope")


def test_framewise_displacement_travels_in_prediction_and_physio() -> None:
    params = (0.1, -0.2, 0.3, 0.001, -0.002, 0.003)
    p = sample_prediction("s", 5, framewise_displacement=0.62, motion_params=params)
    pred = prediction_payload(p)
    physio = physio_payload(p)
    validator("prediction").validate(json.loads(encode(pred)))
    validator("physio").validate(json.loads(encode(physio)))
    assert pred["framewise_displacement"] == 0.62 and physio["framewise_displacement"] == 0.62
    assert physio["motion"] == {
        "trans_x": 0.1,
        "trans_y": -0.2,
        "trans_z": 0.3,
        "rot_x": 0.001,
        "rot_y": -0.002,
        "rot_z": 0.003,
    }
    assert "motion" not in pred  # the six parameters ride on the physio topic only


def test_without_motion_the_displacement_is_null_and_valid() -> None:
    p = sample_prediction("s", 6)
    pred, physio = prediction_payload(p), physio_payload(p)
    assert pred["framewise_displacement"] is None
    assert physio["framewise_displacement"] is None and physio["motion"] is None
    validator("prediction").validate(json.loads(encode(pred)))
    validator("physio").validate(json.loads(encode(physio)))
    # payloads of engines from before the Motion stream (no such keys) stay valid v1 payloads
    old = {k: v for k, v in pred.items() if k != "framewise_displacement"}
    assert validator("prediction").is_valid(old)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"framewise_displacement": math.nan}, "framewise_displacement must be finite"),
        ({"framewise_displacement": -0.1}, "framewise_displacement must be >= 0"),
        ({"motion_params": (0.0, 0.0, 0.0)}, "motion parameters must be 6 values"),
        ({"motion_params": (0.0, 0.0, math.inf, 0.0, 0.0, 0.0)}, "trans_z must be finite"),
    ],
)
def test_bad_motion_is_refused_with_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        physio_payload(sample_prediction("s", 3, **overrides))


def test_schemas_reject_a_negative_displacement_and_partial_motion() -> None:
    p = sample_prediction("s", 7, framewise_displacement=0.2, motion_params=(0.0,) * 6)
    pred, physio = prediction_payload(p), physio_payload(p)
    assert not validator("prediction").is_valid(dict(pred, framewise_displacement=-1.0))
    assert not validator("physio").is_valid(dict(physio, framewise_displacement="0.2"))
    partial = dict(physio, motion={"trans_x": 0.0})
    assert not validator("physio").is_valid(partial)
