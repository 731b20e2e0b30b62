"""The TOML config: defaults, every error names key/section/expected/found, flags override."""

from __future__ import annotations

from pathlib import Path

import pytest

from emorecog_stream.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    to_toml,
)
from emorecog_stream.core.streams import N_ROIS, Role

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "config.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "engine.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_valid_and_match_the_stream_conventions() -> None:
    config = load_config(None)
    assert config.streams.fmri.channels == N_ROIS
    assert config.streams.fmri.type == "fMRI"
    assert config.streams.ppg.type == "PPG"
    # markers and motion are on by default, resolved as optional streams by the runner
    assert config.streams.enabled_roles() == [
        Role.FMRI,
        Role.PPG,
        Role.RESP,
        Role.MARKERS,
        Role.MOTION,
    ]
    assert config.streams.motion.type == "Motion" and config.streams.motion.channels == 7
    assert config.engine.fd_threshold == 0.5
    assert config.mqtt.url == ""  # embedded broker
    assert config.output.dashboard is True


def test_example_config_loads_and_documents_every_key() -> None:
    config = load_config(EXAMPLE)
    assert isinstance(config, Config)
    text = EXAMPLE.read_text(encoding="utf-8")
    for section, keys in {
        "session": ["id", "duration"],
        "aligner": ["hr_window", "rr_window", "deadline"],
        "engine": [
            "reset_gap_trs",
            "stall_timeout",
            "fmri_stall_trs",
            "resolve_timeout",
            "model_thread",
            "fd_threshold",
        ],
        "mqtt": ["url", "username", "password_env", "password_file", "tls_ca", "queue_size"],
        "model": ["path"],
        "output": ["log", "dashboard"],
    }.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text, key
    for role in Role:
        assert f"[streams.{role.value}]" in text, role


def test_motion_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"\[engine\] fd_threshold: expected a number > 0"):
        config_from_dict({"engine": {"fd_threshold": 0}})
    with pytest.raises(ConfigError, match=r"\[streams.motion\] channels: expected 7, found 6"):
        config_from_dict({"streams": {"motion": {"channels": 6}}})
    config = config_from_dict(
        {"engine": {"fd_threshold": 0.3}, "streams": {"motion": {"enabled": False}}}
    )
    assert config.engine.fd_threshold == 0.3 and Role.MOTION not in config.streams.enabled_roles()


def test_values_from_file_and_stream_defaults_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[session]
id = "scan-07"
duration = 120

[streams.ppg]
name = "Scanner-Pulse"
rate = 500

[aligner]
deadline = 0.25

[mqtt]
url = "mqtt://broker.lab:1884"
username = "engine"
password_file = "secret.txt"

[model]
path = "keras-v1:weights/best.h5"

[output]
log = "logs/session.jsonl"
dashboard = false
""",
    )
    config = load_config(path)
    assert config.session.id == "scan-07"
    assert config.session.duration == 120.0 and isinstance(config.session.duration, float)
    assert config.streams.ppg.name == "Scanner-Pulse"
    assert config.streams.ppg.type == "PPG"  # role default kept
    assert config.streams.ppg.rate == 500.0
    assert config.streams.resp.name == "EmoRecog-Resp"
    assert config.aligner.deadline == 0.25
    # relative paths are relative to the config file's folder
    assert config.mqtt.password_file == str(tmp_path / "secret.txt")
    assert config.model.path == "keras-v1:" + str(tmp_path / "weights/best.h5")
    assert config.output.log == str(tmp_path / "logs/session.jsonl")
    assert config.output.dashboard is False


def test_unknown_key_names_key_section_and_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[aligner]\ndeadlin = 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'deadlin'" in message and "[aligner]" in message
    assert "deadline" in message and "hr_window" in message
    assert str(path) in message


def test_unknown_section_and_unknown_stream_role() -> None:
    with pytest.raises(ConfigError, match=r"unknown section 'mqt'.*valid: aligner, engine"):
        config_from_dict({"mqt": {"url": "mqtt://x:1"}})
    with pytest.raises(ConfigError, match=r"unknown key 'eeg' in \[streams\].*fmri"):
        config_from_dict({"streams": {"eeg": {"name": "x"}}})
    with pytest.raises(ConfigError, match=r"unknown key 'chanels' in \[streams.ppg\]"):
        config_from_dict({"streams": {"ppg": {"chanels": 1}}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            {"aligner": {"deadline": "fast"}},
            r"\[aligner\] deadline: expected a number, found string 'fast'",
        ),
        ({"aligner": {"deadline": -1}}, r"\[aligner\] deadline: expected a number > 0, found -1"),
        ({"output": {"dashboard": "yes"}}, r"dashboard: expected true or false, found string"),
        ({"mqtt": {"queue_size": 1.5}}, r"queue_size: expected an integer, found number 1.5"),
        ({"mqtt": {"queue_size": 0}}, r"queue_size: expected >= 1, found 0"),
        ({"mqtt": {"url": "http://x"}}, r"url: expected mqtt://host\[:port\].*'http://x'"),
        ({"session": {"id": "a/b"}}, r"\[session\] id: expected .*found 'a/b'"),
        ({"session": {"id": "#"}}, r"\[session\] id"),
        ({"streams": {"fmri": {"channels": 200}}}, r"channels: expected 246.*found 200"),
        ({"streams": {"ppg": {"channels": 2}}}, r"\[streams.ppg\] channels: expected 1, found 2"),
        ({"streams": {"fmri": {"enabled": False}}}, r"cannot be disabled"),
        ({"streams": {"ppg": {"name": "", "type": ""}}}, r"at least one of name, type"),
        ({"streams": "ppg"}, r"\[streams\]: expected a table, found string"),
        ({"mqtt": {"password_env": "PW"}}, r"a password needs a username"),
        ({"engine": {"reset_gap_trs": True}}, r"reset_gap_trs: expected a number, found boolean"),
        (
            {"engine": {"model_thread": "sometimes"}},
            r"\[engine\] model_thread: expected one of 'auto', 'always', 'never', found 'some",
        ),
    ],
)
def test_wrong_values_name_key_expected_and_found(data: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(data)


def test_broken_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[aligner\ndeadline = 1"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_flags_override_file_and_are_validated(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[session]\nid = "a"\n[mqtt]\nurl = "mqtt://h:1"\n'))
    new = apply_overrides(
        config,
        {"session.id": "b", "mqtt.url": None, "output.dashboard": False, "session.duration": 5},
    )
    assert new.session.id == "b"
    assert new.mqtt.url == "mqtt://h:1"  # None keeps the file's value
    assert new.output.dashboard is False
    assert new.session.duration == 5.0
    assert config.session.id == "a"  # the original is untouched
    with pytest.raises(ConfigError, match=r"\[session\] id"):
        apply_overrides(config, {"session.id": "bad/id"})
    with pytest.raises(ConfigError, match=r"unknown config key 'mqtt\.ur'"):
        apply_overrides(config, {"mqtt.ur": "x"})


def test_to_toml_round_trips(tmp_path: Path) -> None:
    config = config_from_dict(
        {"session": {"id": "x1"}, "streams": {"ppg": {"rate": 400}}, "engine": {"tr": 2}}
    )
    again = load_config(write(tmp_path, to_toml(config)))
    assert again == config
