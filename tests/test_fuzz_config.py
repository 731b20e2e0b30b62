"""Fuzzed configuration text: TOML config files (ConfigError or RunError only), MQTT URLs
(MqttConfigError / RunError) and password files (MqttConfigError); no hang, no allocation from
the input. See tests/fuzzing.py for the bar and the worker that enforces it."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.sinks.mqtt import MqttConfigError, MqttSettings
from tests.fuzz_seeds import config_seeds, url_seeds
from tests.fuzzing import FUZZ_FIXTURES, Worker, failures_of, mutants, report

FUZZ = settings(
    max_examples=80,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def config_worker():
    """One worker for the config, URL and password targets (they share their imports)."""
    with Worker("config") as w:
        yield w




# ------------------------------------------------------------------------- TOML documents

KNOWN = {
    "session": ["id", "duration"],
    "aligner": ["hr_window", "rr_window", "deadline"],
    "engine": ["reset_gap_trs", "tr", "stall_timeout", "fmri_stall_trs", "resolve_timeout",
               "model_thread"],
    "mqtt": ["url", "username", "password_env", "password_file", "tls_ca", "tls_cert", "tls_key",
             "tls_insecure", "client_id", "topic_prefix", "queue_size", "message_expiry"],
    "model": ["path"],
    "output": ["log", "dashboard"],
    "streams.fmri": ["enabled", "name", "type", "source_id", "channels", "rate", "rate_tolerance"],
    "streams.ppg": ["enabled", "name", "type", "source_id", "channels", "rate", "rate_tolerance"],
    "streams.markers": ["enabled", "name", "channels"],
}  # fmt: skip


def _key(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else json.dumps(text)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["mqtt://127.0.0.1:1883", "mqtts://[::1]", "keras-v1:x.h5", "auto", "x" * 70]),
    st.datetimes(),
)
VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=2),
    max_leaves=4,
)


@st.composite
def toml_documents(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.one_of(st.sampled_from(sorted(KNOWN)), st.text(min_size=1, max_size=8)))
        lines.append(f"[{'.'.join(_key(p) for p in section.split('.'))}]")
        keys = KNOWN.get(section, [])
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=8)) if keys
                       else st.text(min_size=1, max_size=8))
            lines.append(f"{_key(key)} = {_toml(draw(VALUES))}")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=30)))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(data=toml_documents())
def test_generated_toml_configs(config_worker, data: bytes) -> None:
    found = failures_of(config_worker, [data])
    assert not found, report(found)


def test_mutated_config_files(config_worker) -> None:
    seeds = [data for _, data in config_seeds()]
    assert [config_worker.run(s).status for s in seeds] == ["ok", "ok", "ok"]
    found = failures_of(config_worker, mutants(seeds, 300, seed=2024))
    assert not found, report(found)


# ------------------------------------------------------------------------- MQTT URLs, passwords


@st.composite
def urls(draw) -> bytes:
    scheme = draw(st.sampled_from(["mqtt", "mqtts", "MQTT", "http", "", "mqtt+ws"]))
    user = draw(st.sampled_from(["", "lab@", "a:b@", "%40@", "@", "u@@"]))
    host = draw(
        st.one_of(
            st.sampled_from(["127.0.0.1", "[::1]", "[", "]", "[::1", "host name", "", "h%00"]),
            st.text(max_size=12),
        )
    )
    port = draw(
        st.one_of(
            st.just(""),
            st.integers(-5, 2**70).map(lambda p: f":{p}"),
            st.sampled_from([":", ":x", ": 1", ":٣"]),
        )
    )
    rest = draw(st.sampled_from(["", "/", "/t", "?q", "#f", "\n"]))
    return f"{scheme}://{user}{host}{port}{rest}".encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.one_of(urls(), st.binary(max_size=40)))
def test_generated_mqtt_urls(config_worker, data: bytes) -> None:
    found = failures_of(config_worker, [data], "mqtt_url")
    assert not found, report(found)


def test_mutated_mqtt_urls(config_worker) -> None:
    seeds = [data for _, data in url_seeds()]
    found = failures_of(config_worker, mutants(seeds, 300, seed=2024), "mqtt_url")
    assert not found, report(found)


@FUZZ
@given(data=st.one_of(st.binary(max_size=64), st.text(max_size=20).map(str.encode)))
def test_generated_password_files(config_worker, data: bytes) -> None:
    found = failures_of(config_worker, [data], "mqtt_password_file")
    assert not found, report(found)


# ------------------------------------------------------------------------- what fuzzing found


def test_an_unclosed_ipv6_bracket_is_an_mqtt_config_error() -> None:
    # was: ValueError "Invalid IPv6 URL" from urllib
    url = (FUZZ_FIXTURES / "url_unclosed_ipv6.txt").read_text()
    with pytest.raises(MqttConfigError, match=r"MQTT URL cannot be parsed \(Invalid IPv6 URL\)"):
        MqttSettings.from_url(url)
    with pytest.raises(MqttConfigError, match=r"'mqtt://\.\.\.@\[::1'") as info:
        MqttSettings.from_url("mqtt://lab:hunter2@[::1")
    assert "hunter2" not in str(info.value)


def test_a_password_file_that_is_not_utf8_is_an_mqtt_config_error(tmp_path) -> None:
    # was: UnicodeDecodeError (whose message quotes the byte)
    path = tmp_path / "password"
    path.write_bytes((FUZZ_FIXTURES / "password_not_utf8.bin").read_bytes())
    with pytest.raises(MqttConfigError, match=rf"{path} is not UTF-8 text \(byte 0 is not\)"):
        MqttSettings.from_url("mqtt://lab@127.0.0.1", password_file=str(path))


def test_a_bad_port_in_the_config_is_a_config_error_naming_the_file(tmp_path) -> None:
    # found by atheris: the [mqtt] url check let "mqtt://lab@127.0.0.1:188~4" through, and the
    # error came later from the MQTT settings without the file's name
    from emorecog_stream.config import ConfigError, load_config

    path = tmp_path / "lab.toml"
    path.write_bytes((FUZZ_FIXTURES / "config_bad_port.toml").read_bytes())
    with pytest.raises(ConfigError, match=r"lab\.toml: \[mqtt\] url: expected mqtt://host\[:port\]"):
        load_config(path)
