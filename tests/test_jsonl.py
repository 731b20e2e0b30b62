"""The JSONL audit log: same record as MQTT, flushed line by line, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from emorecog_stream.core.messages import Prediction
from emorecog_stream.sinks.jsonl import JsonlLog, JsonlLogError, read_log
from emorecog_stream.sinks.payload import PayloadError, load_schema, prediction_payload


def _pred(i: int, **kw: object) -> Prediction:
    base: dict[str, object] = dict(
        session="S01",
        sequence=i,
        tr_index=i,
        volume_timestamp=1000.0 + i,
        utc=f"2026-11-25T10:00:{i % 60:02d}.000Z",
        probabilities=(0.25, 0.25, 0.5),
        category="positive",
        intensity=0.5 * (i % 9) - 2.0,
        heart_rate=70.0 + i,
        heart_rate_valid=True,
        respiration_rate=15.0,
        respiration_rate_valid=True,
        model_id="test-model",
        latency_ms=2.5,
        level=1,
    )
    base.update(kw)
    return Prediction(**base)  # type: ignore[arg-type]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prediction_lines_parse_back_equal_to_the_mqtt_payloads(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    preds = [
        _pred(0),
        _pred(1, heart_rate=math.nan, heart_rate_valid=False, flags=("heart_rate_missing",)),
        _pred(2, respiration_rate=None, respiration_rate_valid=False, level=None),
    ]
    with JsonlLog(path, session="S01", model_id="test-model", meta={"broker": "mqtt://x:1"}) as log:
        for p in preds:
            written = log.write_prediction(p)
            assert written == prediction_payload(p)
    lines = _lines(path)
    assert [ln["kind"] for ln in lines] == [
        "session_start",
        "prediction",
        "prediction",
        "prediction",
        "session_end",
    ]
    start = lines[0]
    assert start["session"] == "S01" and start["model_id"] == "test-model"
    assert start["meta"] == {"broker": "mqtt://x:1"} and start["log_format"] == 1
    schema = load_schema("prediction")
    for line, p in zip(lines[1:4], preds, strict=True):
        body = {k: v for k, v in line.items() if k != "kind"}
        assert body == prediction_payload(p)
        jsonschema.validate(body, schema)
    assert lines[2]["heart_rate"] is None and lines[2]["heart_rate_valid"] is False
    assert lines[-1]["predictions"] == 3 and lines[-1]["reason"] == ""
    assert read_log(path, "prediction") == lines[1:4]


def test_status_changes_are_logged_once_each(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    log = JsonlLog(path, session="S01")
    assert log.write_status("online") is True
    assert log.write_status("online") is False  # unchanged: skipped
    assert log.write_status("degraded", "PPG lost", details={"stream": "ppg"}) is True
    assert log.write_status("degraded", "PPG lost", force=True) is True
    log.close()
    status = read_log(path, "status")
    assert [(s["state"], s["reason"]) for s in status] == [
        ("online", ""),
        ("degraded", "PPG lost"),
        ("degraded", "PPG lost"),
    ]
    assert status[1]["details"] == {"stream": "ppg"}
    jsonschema.validate({k: v for k, v in status[1].items() if k != "kind"}, load_schema("status"))


def test_append_mode_keeps_earlier_runs(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with JsonlLog(path, session="A") as log:
        log.write_prediction(_pred(0, session="A"))
    with JsonlLog(path, session="B") as log:
        log.write_prediction(_pred(0, session="B"))
    kinds = [(r["kind"], r["session"]) for r in read_log(path)]
    assert kinds == [
        ("session_start", "A"),
        ("prediction", "A"),
        ("session_end", "A"),
        ("session_start", "B"),
        ("prediction", "B"),
        ("session_end", "B"),
    ]


def test_abrupt_stop_loses_nothing_already_written(tmp_path: Path) -> None:
    """A process killed with SIGKILL mid-run (no close, no flush) leaves every line it wrote."""
    path = tmp_path / "crash.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_jsonl import _pred
        from emorecog_stream.sinks.jsonl import JsonlLog
        log = JsonlLog({str(path)!r}, session="S01")
        for i in range(25):
            log.write_prediction(_pred(i))
        log.write_status("degraded", "about to die")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    records = read_log(path)
    assert [r["kind"] for r in records] == ["session_start"] + ["prediction"] * 25 + ["status"]
    assert [r["sequence"] for r in records[1:26]] == list(range(25))
    assert path.read_bytes().endswith(b"\n")  # no half line


def test_unwritable_paths_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JsonlLogError, match="is a directory; expected a file path"):
        JsonlLog(tmp_path, session="S01")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(JsonlLogError, match=r"cannot open session log .*not-a-dir/s\.jsonl"):
        JsonlLog(blocker / "s.jsonl", session="S01")


def test_bad_session_id_is_refused_before_the_file_is_touched(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with pytest.raises(PayloadError, match="must not contain '#'"):
        JsonlLog(path, session="lab/#")
    assert not path.exists()


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "2026" / "s.jsonl"
    JsonlLog(path, session="S01").close()
    assert [r["kind"] for r in read_log(path)] == ["session_start", "session_end"]


def test_closed_log_refuses_writes_and_close_is_idempotent(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "s.jsonl", session="S01")
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(JsonlLogError, match="is closed; cannot write 'prediction'"):
        log.write_prediction(_pred(0))


def test_invalid_prediction_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    log = JsonlLog(path, session="S01")
    with pytest.raises(PayloadError, match="intensity must be finite"):
        log.write_prediction(_pred(0, intensity=math.nan))
    assert log.predictions == 0 and log.lines == 1
    log.close()
    assert [r["kind"] for r in read_log(path)] == ["session_start", "session_end"]


def test_non_finite_metadata_becomes_null(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    JsonlLog(path, session="S01", meta={"tr": math.nan, "rates": (1.0, math.inf)}).close()
    assert read_log(path, "session_start")[0]["meta"] == {"tr": None, "rates": [1.0, None]}


def test_exit_by_exception_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with pytest.raises(KeyboardInterrupt), JsonlLog(path, session="S01"):
        raise KeyboardInterrupt
    assert read_log(path, "session_end")[0]["reason"] == "interrupted"


def test_read_log_skips_a_cut_off_last_line_but_not_a_broken_middle_one(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    log = JsonlLog(path, session="S01")
    log.write_prediction(_pred(0))
    log.close()
    good = path.read_bytes()
    path.write_bytes(good + b'{"kind": "predic')  # died mid-write
    assert len(read_log(path)) == 3
    path.write_bytes(b'{"kind": "session_start"}\nnot json\n' + good)
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_log(path)


async def test_engine_output_hooks(tmp_path: Path) -> None:
    """The log plugs into the engine as an Output: prediction, status object, aclose."""
    from emorecog_stream.engine.state import EngineStatus

    path = tmp_path / "s.jsonl"
    log = JsonlLog(path, session="S01")
    log.on_status(EngineStatus("online"))
    log.on_prediction(_pred(0), None)
    log.on_status(EngineStatus("degraded", "PPG stalled", ("heart_rate",)))
    log.on_status(EngineStatus("degraded", "PPG stalled", ("heart_rate",)))  # unchanged
    await log.aclose()
    assert log.closed
    recs = read_log(path)
    assert [r["kind"] for r in recs] == [
        "session_start",
        "status",
        "prediction",
        "status",
        "session_end",
    ]
    assert recs[3]["state"] == "degraded" and recs[3]["details"] == {"missing": ["heart_rate"]}
