"""`run` and `demo` on the command line: user mistakes are clear errors before anything starts."""

from __future__ import annotations

import uuid
from pathlib import Path

import pylsl
import pytest

from emorecog_stream.cli import main


def test_help_lists_every_flag(capsys) -> None:
    for command, flags in {
        "run": [
            "--mqtt",
            "--session",
            "--model",
            "--log",
            "--duration",
            "--no-dashboard",
            "--config",
        ],
        "demo": ["--speed", "--duration", "--no-dashboard"],
    }.items():
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, (command, flag)


def test_wrong_config_key_is_an_error_before_anything_starts(tmp_path: Path, capsys) -> None:
    config = tmp_path / "lab.toml"
    config.write_text('[mqtt]\nurl = "mqtt://127.0.0.1:1"\ntopic_prefx = "x"\n')
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'topic_prefx' in [mqtt]" in err and "topic_prefix" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--session", "a/b"], "[session] id"),
        (["run", "--mqtt", "http://x"], "expected mqtt://host[:port]"),
        (["run", "--duration", "-1"], "duration: expected a number >= 0, found -1"),
        (["demo", "--speed", "0"], "--speed must be > 0"),
    ],
)
def test_bad_flags(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _config(tmp_path: Path, name: str, **extra: str) -> Path:
    lines = [
        "[engine]\nresolve_timeout = 1.0\n",
        f'[streams.fmri]\nname = "{name}"\nsource_id = ""\n',
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n',
        "[output]\ndashboard = false\n",
    ]
    lines += [f"{k} = {v}\n" for k, v in extra.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.slow
def test_fmri_stream_with_wrong_channel_count(tmp_path: Path, capsys) -> None:
    name = f"wrong-{uuid.uuid4().hex[:8]}"
    info = pylsl.StreamInfo(name, "fMRI", 100, 1.0, pylsl.cf_float32, name)
    outlet = pylsl.StreamOutlet(info)
    model = tmp_path / "model.pt"
    _save_untrained(model)
    rc = main(["run", "--config", str(_config(tmp_path, name)), "--model", str(model)])
    del outlet
    err = capsys.readouterr().err
    assert rc == 2
    assert f"fmri stream '{name}'" in err and "expected 246 channels, found 100" in err


@pytest.mark.slow
def test_missing_fmri_stream_lists_what_is_visible(tmp_path: Path, capsys) -> None:
    visible = f"other-{uuid.uuid4().hex[:8]}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(visible, "EEG", 2, 100.0))
    model = tmp_path / "model.pt"
    _save_untrained(model)
    missing = f"absent-{uuid.uuid4().hex[:8]}"
    rc = main(["run", "--config", str(_config(tmp_path, missing)), "--model", str(model)])
    del outlet
    err = capsys.readouterr().err
    assert rc == 2
    assert missing in err and visible in err  # the error lists the streams that are there


def test_missing_model_and_unwritable_log(tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, "nothing")
    assert main(["run", "--config", str(config), "--model", str(tmp_path / "no.pt")]) == 2
    assert "no.pt" in capsys.readouterr().err
    model = tmp_path / "model.pt"
    _save_untrained(model)
    rc = main(["run", "--config", str(config), "--model", str(model), "--log", str(tmp_path)])
    assert rc == 2
    assert "is a directory" in capsys.readouterr().err


def test_demo_with_a_broken_session_file(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.xdf"
    broken.write_bytes(b"XDF:\x01\x02 not really")
    assert main(["demo", "--session-file", str(broken), "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert "cannot replay" in err and "broken.xdf" in err
    assert "Traceback" not in err


def _save_untrained(path: Path) -> None:
    import torch

    from emorecog_stream.model.checkpoint import save_checkpoint
    from emorecog_stream.model.net import EmoRecogNet, NetConfig

    torch.manual_seed(0)
    save_checkpoint(EmoRecogNet(NetConfig()), path)


@pytest.mark.slow
def test_demo_publishes_what_listen_prints() -> None:
    """The README's main job: `demo` on a fresh setup, `listen` in another process."""
    import subprocess
    import sys

    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emorecog_stream",
            "demo",
            "--no-dashboard",
            "--speed",
            "20",
            "--duration",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        url = None
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if "embedded MQTT broker listening on " in line:
                url = line.rsplit(" ", 1)[-1].strip()
            if "mosquitto_sub" in line:
                break
        assert url is not None and url.startswith("mqtt://127.0.0.1:"), "".join(seen)
        listen = subprocess.run(
            [
                sys.executable,
                "-m",
                "emorecog_stream",
                "listen",
                "--mqtt",
                url,
                "--session",
                "demo",
                "--count",
                "5",
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if listen.returncode != 0:
            demo.kill()
            said = "".join(seen) + demo.stdout.read()
            pytest.fail(f"{listen.stdout}{listen.stderr}\ndemo said:\n{said}")
        assert listen.stdout.count("TR") >= 5
        rest = demo.stdout.read()
        assert demo.wait(timeout=60) == 0, rest
        assert "TR    0" in "".join(seen) + rest
        assert "unsent 0" in rest  # the queue was flushed before the broker went down
    finally:
        if demo.poll() is None:
            demo.kill()


def test_demo_without_replay_data_generates_the_same_participant(tmp_path, monkeypatch) -> None:
    """From an installed wheel (no replay_data/ folder) the demo still has its session."""
    from emorecog_stream.commands import demo

    sessions, origin = demo.demo_sessions()
    assert sessions[0].participant == "P15" and "P15.xdf" in origin
    monkeypatch.setattr(demo, "replay_data_dir", lambda: tmp_path / "absent")
    generated, origin = demo.demo_sessions()
    assert "generated in memory" in origin
    assert generated[0].participant == "P15"
    assert generated[0].n_volumes == sessions[0].n_volumes
    import numpy as np

    np.testing.assert_array_equal(generated[0].fmri.data, sessions[0].fmri.data)


def test_user_lsl_config_is_found_where_liblsl_looks(tmp_path: Path) -> None:
    from emorecog_stream.adapters.lsl_log import user_lsl_config

    if Path("/etc/lsl_api/lsl_api.cfg").is_file():
        pytest.skip("this machine has a system-wide liblsl config")
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    (home / "lsl_api").mkdir(parents=True)
    assert user_lsl_config({}, cwd, home) is None
    assert user_lsl_config({"LSLAPICFG": "/x.cfg"}, cwd, home) == "LSLAPICFG=/x.cfg"
    (home / "lsl_api" / "lsl_api.cfg").write_text("[log]\nlevel = 0\n")
    assert user_lsl_config({}, cwd, home) == str(home / "lsl_api" / "lsl_api.cfg")
    (cwd / "lsl_api.cfg").write_text("[log]\nlevel = 0\n")
    assert user_lsl_config({}, cwd, home) == str(cwd / "lsl_api.cfg")


@pytest.mark.parametrize("user_config", [False, True])
def test_liblsl_info_lines_are_quieted_unless_the_user_has_a_config(
    tmp_path: Path, user_config: bool
) -> None:
    """In a fresh process with no liblsl config anywhere, liblsl prints INFO lines to stderr
    on its first call (what scribbled over the dashboard); after ``quiet_liblsl`` it prints
    none. With the user's own config, that config (here: log level INFO) is what applies."""
    import os
    import subprocess
    import sys

    if Path("/etc/lsl_api/lsl_api.cfg").is_file():
        pytest.skip("this machine has a system-wide liblsl config")
    env = {k: v for k, v in os.environ.items() if k != "LSLAPICFG"}
    env["HOME"] = str(tmp_path)
    if user_config:
        cfg = tmp_path / "mine.cfg"
        cfg.write_text("[log]\nlevel = 0\n")
        env["LSLAPICFG"] = str(cfg)
    first_call = "pylsl.StreamInfo('q', 'q', 1, 1.0, 'float32', 'q')"  # loads liblsl's config
    results = {}
    for quiet in (False, True):
        code = "import pylsl\n"
        if quiet:
            code += (
                "from emorecog_stream.adapters.lsl_log import quiet_liblsl\n"
                "print(quiet_liblsl())\n"
            )
        code += first_call + "\n"
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        results[quiet] = done
    assert "INFO|" in results[False].stderr  # the check can fail: liblsl does log by default
    if user_config:
        assert results[True].stdout.strip() == "False"
        assert "Configuration loaded from" in results[True].stderr
    else:
        assert results[True].stdout.strip() == "True"
        assert results[True].stderr == ""
