"""MQTT topics and JSON payloads: ``Prediction`` -> prediction / physio payloads, and status.

Why a separate, I/O-free module: the payload is a contract with every subscriber (dashboards,
stimulus software, loggers). Keeping it pure lets the JSON Schema files beside this module
(``prediction.schema.json``, ``physio.schema.json``, ``status.schema.json``) be tested against
exactly what the publisher sends, and lets ``listen`` and tests parse the same format.

Topics are ``<prefix>/<session>/prediction``, ``/status`` and ``/physio`` (prefix
``emorecog`` by default). A session id becomes one topic level, so it must not smuggle MQTT
wildcards or extra levels into the topic: :func:`validate_session_id` rejects ``+``, ``#``,
``/``, control characters, empty ids and ids longer than :data:`MAX_SESSION_ID_LENGTH`.

JSON has no NaN: a missing heart or respiration rate is ``null`` with its ``*_valid`` flag
false; an unknown framewise displacement (no ``Motion`` stream, or its sample was late) is
``null``. Non-finite probabilities, intensity or latency are a bug upstream and raise
:class:`PayloadError` rather than publishing a silently wrong value.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from emorecog_stream.core.messages import Prediction
from emorecog_stream.core.streams import CATEGORY_LABELS, MOTION_CHANNELS

SCHEMA_VERSION = 1
"""Bumped when a payload field changes meaning or disappears (adding a field does not bump it)."""

DEFAULT_TOPIC_PREFIX = "emorecog"
MAX_SESSION_ID_LENGTH = 128

STATUS_STATES: tuple[str, ...] = ("starting", "online", "degraded", "paused", "offline")
"""``degraded``: predictions go on with something missing (e.g. PPG); ``paused``: no
predictions (e.g. the fMRI stream is gone); ``offline``: the engine stopped or died (Last Will)."""

_PROBABILITY_SUM_TOLERANCE = 1e-3
_FORBIDDEN_IN_LEVEL = {"+": "'+' (MQTT single-level wildcard)", "#": "'#' (MQTT wildcard)"}


class PayloadError(ValueError):
    """A prediction or topic part that cannot be published as it is (named field, value)."""


def validate_session_id(session: object) -> str:
    """Return ``session`` if it is safe as one MQTT topic level, else raise :class:`PayloadError`.

    The error names what was expected and what came (with control characters escaped).
    """
    if not isinstance(session, str):
        raise PayloadError(f"session id must be a string, got {type(session).__name__}")
    if session == "":
        raise PayloadError("session id must not be empty")
    if len(session) > MAX_SESSION_ID_LENGTH:
        raise PayloadError(
            f"session id must be at most {MAX_SESSION_ID_LENGTH} characters, got {len(session)}"
        )
    _check_level(session, what="session id")
    if "/" in session:
        raise PayloadError(f"session id must be one topic level without '/', got {session!r}")
    return session


def validate_topic_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a wildcard-free topic (``/`` between non-empty levels allowed)."""
    if not isinstance(prefix, str):
        raise PayloadError(f"topic prefix must be a string, got {type(prefix).__name__}")
    if prefix == "":
        raise PayloadError("topic prefix must not be empty")
    if prefix.startswith("$"):
        raise PayloadError(
            f"topic prefix must not start with '$' (broker-reserved), got {prefix!r}"
        )
    for level in prefix.split("/"):
        if level == "":
            raise PayloadError(
                f"topic prefix must not have empty levels (leading, trailing or double '/'),"
                f" got {prefix!r}"
            )
        _check_level(level, what="topic prefix")
    return prefix


def _check_level(text: str, *, what: str) -> None:
    for ch in text:
        if ch in _FORBIDDEN_IN_LEVEL:
            raise PayloadError(f"{what} must not contain {_FORBIDDEN_IN_LEVEL[ch]}, got {text!r}")
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or ch == "\x00":
            raise PayloadError(
                f"{what} must not contain control or unassigned characters"
                f" (found {ch!r}), got {text!r}"
            )


@dataclass(frozen=True)
class Topics:
    """The topics of one session."""

    prediction: str
    status: str
    physio: str
    marker: str

    @classmethod
    def for_session(cls, session: str, prefix: str = DEFAULT_TOPIC_PREFIX) -> Topics:
        base = f"{validate_topic_prefix(prefix)}/{validate_session_id(session)}"
        return cls(
            prediction=f"{base}/prediction",
            status=f"{base}/status",
            physio=f"{base}/physio",
            marker=f"{base}/marker",
        )


def utc_now() -> str:
    """ISO 8601 UTC time with milliseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise PayloadError(f"{name} must be finite, got {out!r}")
    return out


def _rate(name: str, value: float | None, valid: bool) -> float | None:
    """A rate for JSON: ``None`` when not valid or not finite (JSON has no NaN)."""
    if not valid or value is None:
        return None
    out = float(value)
    if not math.isfinite(out):
        raise PayloadError(f"{name} is flagged valid but is {out!r}")
    return out


def _displacement(value: float | None) -> float | None:
    """Framewise displacement (mm) for JSON: ``None`` stays null; otherwise finite and >= 0."""
    if value is None:
        return None
    out = _finite("framewise_displacement", value)
    if out < 0:
        raise PayloadError(f"framewise_displacement must be >= 0 mm, got {out}")
    return out


def _motion(params: tuple[float, ...] | None) -> dict[str, float] | None:
    """The six rigid-body parameters by name (``trans_x`` ... ``rot_z``), or None."""
    if params is None:
        return None
    names = MOTION_CHANNELS[:6]
    if len(params) != len(names):
        raise PayloadError(f"motion parameters must be {len(names)} values {names}, got {params}")
    return {n: _finite(n, v) for n, v in zip(names, params, strict=True)}


def _int(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise PayloadError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def prediction_payload(prediction: Prediction) -> dict[str, Any]:
    """The JSON object published on ``<prefix>/<session>/prediction`` (see the schema file)."""
    p = prediction
    validate_session_id(p.session)
    if len(p.probabilities) != len(CATEGORY_LABELS):
        raise PayloadError(
            f"probabilities must have {len(CATEGORY_LABELS)} values {CATEGORY_LABELS},"
            f" got {len(p.probabilities)}"
        )
    probs = [
        _finite(f"probability of {lab}", v)
        for lab, v in zip(CATEGORY_LABELS, p.probabilities, strict=True)
    ]
    if any(v < 0.0 or v > 1.0 for v in probs):
        raise PayloadError(f"probabilities must lie in [0, 1], got {probs}")
    if abs(sum(probs) - 1.0) > _PROBABILITY_SUM_TOLERANCE:
        raise PayloadError(
            f"probabilities must sum to 1 (±{_PROBABILITY_SUM_TOLERANCE}), got {probs}"
        )
    if p.category not in CATEGORY_LABELS:
        raise PayloadError(f"category must be one of {CATEGORY_LABELS}, got {p.category!r}")
    level = None if p.level is None else _int("level", p.level)
    if level is not None and not -4 <= level <= 4:
        raise PayloadError(f"level must be in -4..4, got {level}")
    return {
        "schema_version": SCHEMA_VERSION,
        "session": p.session,
        "sequence": _int("sequence", p.sequence, minimum=0),
        "tr_index": _int("tr_index", p.tr_index, minimum=0),
        "volume_timestamp": _finite("volume_timestamp", p.volume_timestamp),
        "utc": str(p.utc),
        "category": p.category,
        "probabilities": dict(zip(CATEGORY_LABELS, probs, strict=True)),
        "intensity": _finite("intensity", p.intensity),
        "level": level,
        "heart_rate": _rate("heart_rate", p.heart_rate, p.heart_rate_valid),
        "heart_rate_valid": bool(p.heart_rate_valid and p.heart_rate is not None),
        "respiration_rate": _rate("respiration_rate", p.respiration_rate, p.respiration_rate_valid),
        "respiration_rate_valid": bool(p.respiration_rate_valid and p.respiration_rate is not None),
        "model_id": str(p.model_id),
        "latency_ms": _finite("latency_ms", p.latency_ms),
        "flags": [str(f) for f in p.flags],
        "framewise_displacement": _displacement(p.framewise_displacement),
    }


def physio_payload(
    prediction: Prediction,
    *,
    heart_rate_quality: float | None = None,
    respiration_rate_quality: float | None = None,
) -> dict[str, Any]:
    """The per-TR physiology published on ``<prefix>/<session>/physio``.

    Qualities (0..1) are optional because a ``Prediction`` does not carry them; the engine
    passes them from its ``AlignedStep`` when it has one. The volume's head motion (framewise
    displacement and the six rigid-body parameters) is null without a ``Motion`` stream.
    """
    p = prediction
    validate_session_id(p.session)
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "session": p.session,
        "sequence": _int("sequence", p.sequence, minimum=0),
        "tr_index": _int("tr_index", p.tr_index, minimum=0),
        "volume_timestamp": _finite("volume_timestamp", p.volume_timestamp),
        "utc": str(p.utc),
        "heart_rate": _rate("heart_rate", p.heart_rate, p.heart_rate_valid),
        "heart_rate_valid": bool(p.heart_rate_valid and p.heart_rate is not None),
        "respiration_rate": _rate("respiration_rate", p.respiration_rate, p.respiration_rate_valid),
        "respiration_rate_valid": bool(p.respiration_rate_valid and p.respiration_rate is not None),
        "framewise_displacement": _displacement(p.framewise_displacement),
        "motion": _motion(p.motion_params),
    }
    for name, q in (
        ("heart_rate_quality", heart_rate_quality),
        ("respiration_rate_quality", respiration_rate_quality),
    ):
        if q is not None:
            value = _finite(name, q)
            if not 0.0 <= value <= 1.0:
                raise PayloadError(f"{name} must lie in [0, 1], got {value}")
            out[name] = value
    return out


def status_payload(
    session: str,
    state: str,
    reason: str = "",
    *,
    utc: str | None = None,
    model_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The retained status published on ``<prefix>/<session>/status``.

    ``details`` holds JSON-serialisable extras (e.g. which stream is missing); it is checked
    here so a bad value fails at the caller, not inside the publisher task.
    """
    validate_session_id(session)
    if state not in STATUS_STATES:
        raise PayloadError(f"status state must be one of {STATUS_STATES}, got {state!r}")
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "session": session,
        "state": state,
        "reason": str(reason),
        "utc": utc if utc is not None else utc_now(),
    }
    if model_id is not None:
        out["model_id"] = str(model_id)
    if details:
        try:
            json.dumps(details, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"status details must be JSON-serialisable: {exc}") from exc
        out["details"] = dict(details)
    return out


def marker_payload(session: str, timestamp: float, text: str) -> dict[str, Any]:
    """A trial marker as received from the LSL marker stream, for ``<prefix>/<session>/marker``.

    ``timestamp`` is the marker's LSL time (the clock of ``volume_timestamp``), so a subscriber
    can lay trials over the predictions; ``text`` is kept verbatim (subscribers must treat it
    as untrusted text), and ``marker`` holds its JSON object when it is one of ours
    (``recordings.session.make_marker``).
    """
    from emorecog_stream.recordings.session import parse_marker

    validate_session_id(session)
    if not isinstance(text, str):
        raise PayloadError(f"marker text must be a string, got {type(text).__name__}")
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "session": session,
        "timestamp": _finite("marker timestamp", timestamp),
        "utc": utc_now(),
        "text": text,
    }
    parsed = parse_marker(text)
    if parsed is not None:
        try:
            json.dumps(parsed, allow_nan=False)
            out["marker"] = parsed
        except ValueError:
            pass  # a NaN inside: the verbatim text still says everything
    return out


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (``allow_nan=False``: a NaN would be invalid JSON for subscribers)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def load_schema(kind: str = "prediction") -> dict[str, Any]:
    """The shipped JSON Schema of ``prediction``, ``physio``, ``status`` or ``marker``."""
    if kind not in ("prediction", "physio", "status", "marker"):
        raise ValueError(
            f"schema kind must be prediction, physio, status or marker, got {kind!r}"
        )
    text = resources.files("emorecog_stream.sinks").joinpath(f"{kind}.schema.json").read_text()
    return json.loads(text)
