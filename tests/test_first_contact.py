"""What a new user meets first: the seed's own split file, a wrong file given as a checkpoint, and
the demo's output in a pipe. Each through the real command where a user would use it."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emorecog_stream.cli import main as cli_main
from emorecog_stream.model.data import read_split_file

SEED_SPLIT = Path(__file__).parent / "fixtures" / "emorecog-net" / "levelsplit.csv"
KERAS_FIXTURES = Path(__file__).parent / "fixtures" / "keras_v1"
TR_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  TR +\d+ ", re.MULTILINE)


# --------------------------------------------------------------------------- the seed's split file


def test_the_seeds_wide_split_file_is_read_as_it_is() -> None:
    split = read_split_file(SEED_SPLIT)
    assert split.describe() == {"kind": "trials", "trials": {"train": 384, "val": 48, "test": 48}}
    # first data row: ./level/fmri_p1_data/N1\P10_29_N1.npz, ...P1\P15_1_P1.npz, ...P1\P03_24_P1.npz
    assert split.trials[("P10", 29)] == "train"
    assert split.trials[("P15", 1)] == "val"
    assert split.trials[("P03", 24)] == "test"
    assert split.trials[("P07", 28)] == "train"  # last row, after val and test ran out ("0")
    assert split.participants == {}  # the distribution columns add nothing
    participants = {p for p, _ in split.trials}
    assert participants == {f"P{i:02d}" for i in range(1, 17)}
    for p in participants:  # every participant's 30 trials, 0..29, each in one split
        assert sorted(t for q, t in split.trials if q == p) == list(range(30))


def test_wide_split_file_mistakes_name_the_line_and_column(tmp_path: Path) -> None:
    header = "train_list,val_list,test_list,train_distribution\n"
    junk = tmp_path / "junk.csv"
    junk.write_text(header + "./a/N1\\P01_0_N1.npz,notes.txt,0,0.25\n")
    with pytest.raises(ValueError, match=r"line 2, column 'val_list': expected a trial file") as e:
        read_split_file(junk)
    assert "found 'notes.txt'" in str(e.value)
    twice = tmp_path / "twice.csv"
    twice.write_text(header + "./a/N1\\P01_0_N1.npz,./b/P2/P01_0_P2.npz,0,0.1\n")
    with pytest.raises(ValueError, match="line 2: trial 0 of P01 is in both 'train' and 'val'"):
        read_split_file(twice)


def test_older_split_shapes_still_work(tmp_path: Path) -> None:
    long = tmp_path / "long.csv"
    long.write_text("path,split\n.\\level\\N1\\P02_3_N1.npz,test\nP04,train\n")
    split = read_split_file(long)
    assert split.trials == {("P02", 3): "test"} and split.participants == {"P04": "train"}
    short = tmp_path / "short.csv"
    short.write_text("train,validation,test\n/x/P01_3.npz,/x/P02_0.npz,/x/P03_4.npz\n")
    assert read_split_file(short).trials == {
        ("P01", 3): "train",
        ("P02", 0): "val",
        ("P03", 4): "test",
    }


@pytest.mark.slow
def test_evaluate_scores_exactly_the_split_files_trials(tmp_path: Path, capsys) -> None:
    """``evaluate --split-file levelsplit.csv``: P03's test trials in the seed's file are scored."""
    split = read_split_file(SEED_SPLIT)
    p03_test = sorted(t for (p, t), s in split.trials.items() if p == "P03" and s == "test")
    out = tmp_path / "figures.json"
    argv = ["evaluate", "default", "synth", "--participants", "P03", "--split-file",
            str(SEED_SPLIT), "--split", "test", "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0, capsys.readouterr().err
    figures = json.loads(out.read_text())
    assert figures["per_trial"]["n"] == len(p03_test) == 7
    assert figures["split"]["name"] == "test"
    assert figures["split"]["trials"] == {"train": 384, "val": 48, "test": 48}
    assert "no split name" not in capsys.readouterr().err


# --------------------------------------------------------------------------- not a checkpoint


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emorecog_stream", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_evaluate_on_a_file_that_is_not_a_checkpoint_says_what_it_found(tmp_path: Path) -> None:
    notes = tmp_path / "notes.pt"
    notes.write_text("subject P03 moved a lot in run 2\n")
    proc = _cli("evaluate", str(notes), "synth")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("emorecog-stream evaluate: error: model checkpoint")
    assert "expected a PyTorch checkpoint" in err
    assert "found a text file starting with 'subject P03 moved a lot in run 2'" in err
    assert "weights_only" not in err and "Traceback" not in err and "\n" not in err

    keras = KERAS_FIXTURES / "k2_full.h5"
    proc = _cli("evaluate", str(keras), "synth")
    assert proc.returncode == 2
    assert "found an HDF5 file (a Keras model? give it as keras-v1:PATH" in proc.stderr


# --------------------------------------------------------------------------- output in a pipe


@pytest.mark.slow
def test_demo_in_a_pipe_prints_a_line_per_tr() -> None:
    """``emorecog-stream demo | tee log``: stdout is a pipe, so no live dashboard."""
    proc = _cli("demo", "--duration", "8", "--speed", "4", "--no-web", timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "output is not a terminal: one line per TR instead of the dashboard" in out
    lines = TR_LINE.findall(out)
    assert len(lines) >= 10, out  # 8 s at 4x with TR 1 s: ~30 volumes, minus start-up
    trs = [int(m) for m in re.findall(r"  TR +(\d+) ", out)]
    assert trs == sorted(trs) and len(set(trs)) == len(trs)  # one line per TR, in order
    assert "Input streams" not in out  # no dashboard frame


@pytest.mark.slow
def test_demo_on_a_terminal_keeps_the_dashboard() -> None:
    """Control: on a (pseudo-)terminal the live dashboard is still what the user sees."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "demo", "--duration", "4", "--speed", "4",
         "--no-web"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "Input streams" in out
    assert "output is not a terminal" not in out
    assert not TR_LINE.findall(out)


def test_tr_line_pattern_matches_the_log_line_format() -> None:
    """The pattern the pipe test counts is the headless line's real format."""
    from emorecog_stream.core.messages import Prediction
    from emorecog_stream.sinks.dashboard import format_log_line

    p = Prediction(
        session="s", sequence=3, tr_index=3, volume_timestamp=1.0,
        utc="2026-01-01T10:00:00.000Z", probabilities=(0.2, 0.5, 0.3), category="neutral",
        intensity=0.0, heart_rate=None, heart_rate_valid=False, respiration_rate=None,
        respiration_rate_valid=False, model_id="m", latency_ms=1.0,
    )  # fmt: skip
    assert TR_LINE.match(format_log_line(p))
