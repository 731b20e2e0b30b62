"""`emorecog-stream report`: a real session log -> one self-contained, owner-only HTML file.

The main log comes from the real pipeline: a synthetic session with trial markers is replayed
as LSL outlets (10x), the engine resolves them with real inlets, publishes to the embedded
broker and writes its JSONL log with the markers; the report is made by the real command. Its
accuracy table is checked against ``evaluate``'s own function on the same session, and against
``evaluate``'s metric functions applied to the logged predictions. Hand-written logs (through
``JsonlLog``, the engine's own writer) cover escaping, gaps, FD and broken files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emorecog_stream import cli
from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.adapters.replay import Replayer
from emorecog_stream.commands.evaluate import evaluate_sessions
from emorecog_stream.config import apply_overrides, load_config
from emorecog_stream.core.messages import Prediction
from emorecog_stream.core.streams import CATEGORY_LABELS, Role
from emorecog_stream.engine.outputs import MarkerLog
from emorecog_stream.engine.runner import RunHooks, run_engine
from emorecog_stream.model import load_model
from emorecog_stream.model.data import DEFAULT_LABEL_DELAY_S, label_volumes, session_data
from emorecog_stream.model.metrics import evaluate_arrays
from emorecog_stream.recordings.session import Marker, make_marker
from emorecog_stream.recordings.synth import SynthConfig, generate_session
from emorecog_stream.report import read_session_log, session_view
from emorecog_stream.sinks.jsonl import JsonlLog, read_log

SPEED = 10.0
SESSION_ID = "report-test"
SHORT = SynthConfig(n_participants=1, n_trials=4, rest_s=5.0, lead_in_s=5.0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTION_HEADINGS = (
    "Session",
    "Timeline",
    "Heart rate, respiration",
    "Latency",
    "Status changes and gaps",
    "MQTT delivery and engine counters",
    "Accuracy against the trial labels",
    "Trial markers",
)


# -- the replayed session -----------------------------------------------------------------------


def _session():
    """The synthetic session, with physiology and markers off the volume grid.

    The generator puts PPG/respiration samples and trial markers exactly on volume times. LSL's
    clock correction moves timestamps by microseconds (x10 at 10x), enough to move a sample
    across a window edge or a volume across a label edge (onset + 5 s). Real recordings have no
    such coincidence; a fraction of a sample / TR of offset restores that.
    """
    session = generate_session(1, SHORT)
    session.ppg.timestamps = session.ppg.timestamps + 0.5 / SHORT.ppg_rate
    session.resp.timestamps = session.resp.timestamps + 0.5 / SHORT.resp_rate
    session.markers = [Marker(m.timestamp + 0.3, m.text) for m in session.markers]
    return session


def _replay_into_log(session, model, log_path: Path) -> str:
    """Replay ``session`` into ``run_engine`` (embedded broker, markers on, JSONL log)."""
    tag = "rep" + uuid.uuid4().hex[:8]
    overrides: dict[str, Any] = {
        "session.id": SESSION_ID,
        "output.dashboard": False,
        "output.log": str(log_path),
        "streams.markers.enabled": True,
    }
    roles = (Role.FMRI, Role.PPG, Role.RESP, Role.MARKERS)
    for role in roles:
        name, _type, source_id = stream_identity(role, tag)
        overrides[f"streams.{role.value}.name"] = name
        overrides[f"streams.{role.value}.source_id"] = source_id
    config = apply_overrides(load_config(None), overrides)
    replayer = Replayer(session, speed=SPEED, tag=tag)
    replayer.open()
    out = io.StringIO()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_engine(engine: Any) -> None:
            def watch() -> None:
                # every inlet, the markers' included, is connected before the first sample
                replayer.wait_for_consumers(list(roles), timeout=10.0)
                replayer.start(delay=0.2)
                replayer.join()
                time.sleep((config.aligner.deadline + 1.0) / SPEED)
                loop.call_soon_threadsafe(engine.stop)

            threading.Thread(target=watch, daemon=True).start()

        await run_engine(
            config,
            model=model,
            time_scale=SPEED,
            hooks=RunHooks(on_engine=on_engine),
            out=out,
            install_signal_handlers=False,
        )

    try:
        asyncio.run(main())
    finally:
        replayer.stop()
    return out.getvalue()


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def session():
    return _session()


@pytest.fixture(scope="module")
def replayed_log(tmp_path_factory, session, model) -> Path:
    path = tmp_path_factory.mktemp("report") / "session.jsonl"
    _replay_into_log(session, model, path)
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["report", *argv])
    return rc, out.getvalue(), err.getvalue()


def metric_cells(page: str) -> dict[str, dict[str, str]]:
    """``{view: {key: data-value}}`` from the report's accuracy table."""
    table = re.search(r'<table class="metrics" id="metrics">(.*?)</table>', page, re.S)
    assert table is not None, "no accuracy table"
    out: dict[str, dict[str, str]] = {}
    for view, row in re.findall(r'<tr data-view="([a-z_]+)">(.*?)</tr>', table.group(1), re.S):
        out[view] = dict(re.findall(r'data-key="([a-z_0-9]+)" data-value="([^"]*)"', row))
    return out


def confusion_cells(page: str, view: str) -> list[list[int]]:
    table = re.search(rf'<table class="confusion" data-view="{view}">(.*?)</table>', page, re.S)
    assert table is not None, f"no confusion table for {view}"
    rows = re.findall(r"<tr data-true=\"[a-z]+\">(.*?)</tr>", table.group(1), re.S)
    return [[int(n) for n in re.findall(r'<td class="num">(\d+)</td>', r)] for r in rows]


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script" not in lowered and "<link" not in lowered and "<iframe" not in lowered
    assert "url(" not in lowered and "@import" not in lowered
    for src in re.findall(r'\ssrc="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,"), src[:40]
    assert "default-src 'none'" in page  # the page's CSP forbids scripts and loads


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the report of a replayed session -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_report_of_a_replayed_session(replayed_log: Path, session, model, tmp_path: Path) -> None:
    records = read_log(replayed_log)
    kinds = {r["kind"] for r in records}
    assert {"session_start", "prediction", "marker", "summary", "session_end"} <= kinds
    out = tmp_path / "report.html"
    png_dir = tmp_path / "figures"
    rc, stdout, stderr = run_cli(str(replayed_log), "-o", str(out), "--png", str(png_dir))
    assert rc == 0, stderr
    assert f"wrote {out}" in stdout
    page = out.read_text(encoding="utf-8")

    assert_self_contained(page)
    assert mode_of(out) == 0o600 & ~_umask()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    for heading in SECTION_HEADINGS:
        assert any(h.startswith(heading) for h in headings), (heading, headings)
    images = re.findall(r'<img alt="([^"]*)" [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == [
        "Timeline",
        "Heart rate, respiration",
        "Latency",
        "Volume intervals and status",
    ]
    # header: who, what, and the two warnings
    start = records[0]
    assert f"<h1>Session report: {SESSION_ID}</h1>" in page
    assert start["model_id"] in page and start["software"] in page
    assert "not a medical device" in page and "personal health data" in page
    assert "Replayed 10x faster" in page  # the speed came from the log's meta

    # --png: the same figures, owner-only, byte for byte those in the page
    pngs = sorted(png_dir.iterdir())
    assert [p.name for p in pngs] == ["intervals.png", "latency.png", "physiology.png",
                                      "timeline.png"]  # fmt: skip
    embedded = {base64.b64decode(data) for _, data in images}
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and data in embedded
        assert mode_of(p) == 0o600 & ~_umask()

    # MQTT counters as the summary record has them
    summary = next(r for r in records if r["kind"] == "summary")
    assert f"<tr><th>sent</th><td>{summary['mqtt']['sent']}</td></tr>" in page
    assert summary["mqtt"]["dropped"] == 0 and summary["mqtt"]["sent"] > 0

    # trials: every marker pair of the session became a trial span
    trials = session.trials()
    assert f"<tr><th>trials</th><td>{len(trials)}</td></tr>" in page

    # the accuracy table == evaluate's figures for this session. evaluate labels the volumes of
    # the recording and scores the model's offline predictions; here the same, with the
    # predictions the engine logged (one per volume, in order: test_e2e pins that)
    cells = metric_cells(page)
    data = session_data(session)
    preds = [r for r in records if r["kind"] == "prediction"]
    assert [p["tr_index"] for p in preds] == list(range(data.n_volumes))
    probs = np.array([[p["probabilities"][c] for c in CATEGORY_LABELS] for p in preds])
    intensity = np.array([p["intensity"] for p in preds])
    figures = evaluate_arrays(
        [(probs, intensity, data.category, data.intensity, data.trial, data.category >= 0)]
    )
    for view in ("per_trial", "per_tr"):
        want, got = figures[view], cells[view]
        assert int(got["n"]) == want["n"] > 0
        for key in ("accuracy", "macro_f1", "chance_accuracy", "intensity_mae",
                    "intensity_mae_predicting_0", "intensity_pearson_r"):  # fmt: skip
            # float32 labels through float64 session seconds: equal to rounding
            assert float(got[key]) == pytest.approx(want[key], rel=1e-9, abs=1e-12), (view, key)
        assert confusion_cells(page, view) == want["confusion"]["counts"]
    # and evaluate itself (the model's offline predictions), where the live predictions equal
    # them (test_e2e: within 3e-5). On a loaded machine a late chunk can change a live step's
    # input (a rate missing); that is the engine's input, not the report, so it is named, not
    # failed on.
    offline = model.predict_sequence(data.roi, data.heart_rate, data.respiration_rate)
    differ = np.flatnonzero(np.abs(offline.intensity - intensity) > 1e-4)
    if differ.size == 0:
        want_all = evaluate_sessions(model, [data])
        for view in ("per_trial", "per_tr"):
            for key in ("accuracy", "intensity_mae"):
                assert float(cells[view][key]) == pytest.approx(want_all[view][key], abs=1e-3)
    else:
        warnings.warn(
            f"live predictions differ from offline at TR {differ.tolist()} (flags"
            f" {[preds[i]['flags'] for i in differ]}): compared with the logged ones only",
            stacklevel=1,
        )

    # ... and exactly evaluate's metric functions on the logged predictions
    t = np.array([p["volume_timestamp"] for p in preds])
    t0 = t[0]
    log_session = _session()
    log_session.markers = [
        Marker((r["timestamp"] - t0) * SPEED, r["text"]) for r in records if r["kind"] == "marker"
    ]
    category, target, trial = label_volumes(log_session, (t - t0) * SPEED, DEFAULT_LABEL_DELAY_S)
    exact = evaluate_arrays([(probs, intensity, category, target, trial, category >= 0)])
    for view in ("per_trial", "per_tr"):
        for key, value in cells[view].items():
            if key == "n":
                assert int(value) == exact[view]["n"]
            elif value:
                assert float(value) == exact[view][key], (view, key)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_report_opens_offline_in_chromium(replayed_log: Path, tmp_path: Path) -> None:
    """Headless Chromium with no network: every figure decodes, nothing is fetched, the page
    has its sections; the CSP blocks nothing the page needs (no console errors)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver_path)):
        pytest.skip("Debian's chromium and chromium-driver are needed")
    out = tmp_path / "report.html"
    assert run_cli(str(replayed_log), "-o", str(out))[0] == 0
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--proxy-server=127.0.0.1:9",
                "--window-size=1200,1600"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        driver.get(out.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
        )
        fetched = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        headings = driver.execute_script(
            "return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)"
        )
        console = driver.get_log("browser")
    finally:
        driver.quit()
    assert len(images) == 4 and all(done and width > 500 for done, width in images), images
    assert fetched == []
    assert any(h.startswith("Accuracy") for h in headings)
    assert [e for e in console if e.get("level") == "SEVERE"] == []


# -- hand-written logs, through the engine's own writer -----------------------------------------


def _prediction(i: int, t: float, **kw: Any) -> Prediction:
    p = np.array([0.2, 0.3, 0.5]) if i % 3 else np.array([0.6, 0.3, 0.1])
    fields: dict[str, Any] = {
        "session": "S01",
        "sequence": i,
        "tr_index": i,
        "volume_timestamp": t,
        "utc": f"2026-01-01T00:00:{i:02d}.000Z" if i < 60 else "2026-01-01T00:01:00.000Z",
        "probabilities": tuple(float(x) for x in p),
        "category": CATEGORY_LABELS[int(p.argmax())],
        "intensity": float(np.sin(i / 5.0) * 3),
        "heart_rate": 70.0 + i % 5,
        "heart_rate_valid": True,
        "respiration_rate": 15.0,
        "respiration_rate_valid": True,
        "model_id": "test-model",
        "latency_ms": 1.0 + (i % 7) / 10,
    }
    fields.update(kw)
    return Prediction(**fields)


def write_log(
    path: Path,
    *,
    session: str = "S01",
    model_id: str = "test-model",
    n: int = 40,
    markers: list[tuple[float, str]] = (),
    predictions: list[Prediction] | None = None,
) -> Path:
    log = JsonlLog(path, session=session, model_id=model_id, meta={"broker": "mqtt://x:1"})
    log.write_status("online")
    marker_log = MarkerLog(log)
    for t, text in markers:
        marker_log.on_marker(t, text)
    for p in predictions if predictions is not None else [_prediction(i, 100.0 + i)
                                                           for i in range(n)]:  # fmt: skip
        log.write_prediction(p)
    log.close()
    return path


def _payload(p: Prediction) -> dict[str, Any]:
    from emorecog_stream.sinks.payload import prediction_payload

    return prediction_payload(p)


def report_of(log: Path, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / f"{log.stem}.html"
    rc, _stdout, stderr = run_cli(str(log), "-o", str(out), *extra)
    assert rc == 0, stderr
    return out.read_text(encoding="utf-8")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_html_in_markers_and_ids_is_shown_as_text(tmp_path: Path) -> None:
    script = "<script>alert('x')</script>"
    hostile = [
        (101.0, script),
        (102.0, json.dumps({"event": "trial_start", "trial": 1, "category": script})),
        (103.0, make_marker("trial_start", 2, 1, 3) + '"><img src=x onerror=alert(1)>'),
    ]
    model_id = 'm"><img src=x onerror=alert(2)>'
    session = "S<img src=x onerror=alert(3)>"  # a valid session id: one topic level
    predictions = [_prediction(i, 100.0 + i, session=session) for i in range(20)]
    log = write_log(tmp_path / "s.jsonl", session=session, model_id=model_id,
                    markers=hostile, predictions=predictions)  # fmt: skip
    page = report_of(log, tmp_path)
    assert_self_contained(page)  # no <script anywhere: the marker's is text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<img src=x" not in page  # every <img in the page is a figure
    assert "<h1>Session report: S&lt;img src=x onerror=alert(3)&gt;</h1>" in page
    assert "<title>Session report: S&lt;img src=x onerror=alert(3)&gt;</title>" in page
    assert "m&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "are not trial markers" in page  # none of them was interpreted


def test_owner_only_whatever_was_there_and_stricter_umask_wins(tmp_path: Path) -> None:
    log = write_log(tmp_path / "s.jsonl")
    out = tmp_path / "r.html"
    out.write_text("old")
    out.chmod(0o644)  # an earlier, world-readable file is replaced, not reused
    assert run_cli(str(log), "-o", str(out))[0] == 0
    assert mode_of(out) == 0o600 and "Session report" in out.read_text()
    (tmp_path / "png").mkdir()  # (a 0o277 umask would make a new folder unwritable)
    old = os.umask(0o277)
    try:
        assert run_cli(str(log), "-o", str(out), "--png", str(tmp_path / "png"))[0] == 0
    finally:
        os.umask(old)
    assert mode_of(out) == 0o400
    assert {mode_of(p) for p in (tmp_path / "png").iterdir()} == {0o400}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_gaps_resets_and_framewise_displacement(tmp_path: Path) -> None:
    times = [100.0 + i for i in range(10)] + [115.0 + i for i in range(10)]
    predictions = []
    for k, t in enumerate(times):
        tr_index = k if k < 10 else k - 10
        flags = ("state_reset",) if k == 10 else ()
        if k == 5:
            continue  # a hole: sequence and TR index jump
        fd = None if k == 3 else 0.1 * (k % 4)
        predictions.append(
            _prediction(k, t, tr_index=tr_index, flags=flags, framewise_displacement=fd)
        )
    page = report_of(write_log(tmp_path / "g.jsonl", predictions=predictions), tmp_path)
    assert "<h2>Heart rate, respiration and framewise displacement</h2>" in page
    gaps = re.search(r"<h3>Gaps</h3>(.*?)</table>", page, re.S).group(1)
    assert "TR index 4 -&gt; 6: 1 TR index(es) missing" in gaps
    assert "sequence 4 -&gt; 6: 1 prediction(s) not in the log" in gaps
    assert "6.00 s between volumes at 109.00 s and 115.00 s" not in gaps  # session seconds:
    assert "6.00 s between volumes at 9.00 s and 15.00 s" in gaps  # from the first volume
    assert "the model state was reset; TR index restarts at 0" in gaps
    assert re.search(r'<td class="">state_reset</td><td class="num">1</td>', page)


def test_unlabelled_or_missing_markers_give_no_accuracy(tmp_path: Path) -> None:
    unlabelled = [(105.0, make_marker("trial_start", 0, None, None)),
                  (115.0, make_marker("trial_end", 0, None, None))]  # fmt: skip
    page = report_of(write_log(tmp_path / "u.jsonl", markers=unlabelled), tmp_path)
    assert 'id="metrics"' not in page and "Not computed" in page
    assert "carry no category" in page
    assert '<td class="">trial_start</td><td class="">0</td><td class=""></td>' in page
    page = report_of(write_log(tmp_path / "none.jsonl"), tmp_path)
    assert 'id="metrics"' not in page and "holds no trial markers" in page
    assert "No framewise displacement in this log" in page


def test_labelled_markers_on_a_hand_written_log_score_like_evaluate(tmp_path: Path) -> None:
    markers = []
    for k, (onset, category, level) in enumerate(((103.5, -1, -3), (118.5, 1, 2))):
        markers.append((onset, make_marker("trial_start", k, category, level)))
        markers.append((onset + 8.0, make_marker("trial_end", k, category, level)))
    log = write_log(tmp_path / "l.jsonl", markers=markers)
    page = report_of(log, tmp_path, "--label-delay", "2")
    view = session_view(read_session_log(log), label_delay=2.0)
    assert view.labelled_volumes == 16 and view.metrics is not None
    cells = metric_cells(page)
    assert int(cells["per_trial"]["n"]) == 2 and int(cells["per_tr"]["n"]) == 16
    assert float(cells["per_tr"]["accuracy"]) == view.metrics["per_tr"]["accuracy"]
    assert "onset + 2 s to its offset + 2 s" in page
    assert '<td class="">1</td><td class="">positive (+1)</td><td class="">2</td>' in page


def test_several_runs_in_one_file(tmp_path: Path) -> None:
    log = tmp_path / "two.jsonl"
    write_log(log, session="first", n=10)
    write_log(log, session="second", n=12)
    page = report_of(log, tmp_path)
    assert "<h1>Session report: second</h1>" in page and "This file holds 2 runs" in page
    page = report_of(log, tmp_path, "--run", "1")
    assert "<h1>Session report: first</h1>" in page
    rc, _, err = run_cli(str(log), "--run", "3")
    assert rc == 2 and "holds 2 run(s) (expected 1..2)" in err


# -- broken inputs: a clear error or a report with a note, never a traceback --------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty; expected a session log (JSONL)"),
        (b"\n \n", "is empty; expected a session log (JSONL)"),
        (b"time,value\n1,2\n", "line 1 is not JSON; expected a session log (JSONL)"),
        (PNG_SIGNATURE + bytes(range(256)), "line 1 is not JSON; expected a session log"),
        (b'[1, 2]\n{"kind": "prediction"}\n', "line 1 is JSON list without 'kind'"),
        (b'{"kind": "session_st', "holds no complete record (its only line was cut off)"),
    ],
    ids=["empty", "blank", "csv", "binary", "json-not-a-record", "only-a-cut-line"],
)
def test_files_that_are_not_logs_are_refused_clearly(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    rc, _, err = run_cli(str(path), "-o", str(tmp_path / "r.html"))
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_missing_file_directory_and_bad_output(tmp_path: Path) -> None:
    rc, _, err = run_cli(str(tmp_path / "nope.jsonl"))
    assert rc == 2 and "cannot read" in err and "No such file" in err
    rc, _, err = run_cli(str(tmp_path / ("n" * 300 + ".jsonl")))
    assert rc == 2 and "cannot read" in err and "File name too long" in err
    rc, _, err = run_cli(str(tmp_path))
    assert rc == 2 and "is a directory; expected a session log" in err
    log = write_log(tmp_path / "s.jsonl")
    rc, _, err = run_cli(str(log), "-o", str(tmp_path))
    assert rc == 2 and "is a directory; expected a file path" in err
    rc, _, err = run_cli(str(log), "-o", str(tmp_path / "no" / "r.html"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli(str(log), "-o", str(log))
    assert rc == 2 and "is the log itself" in err
    too_long = tmp_path / ("r" * 300 + ".html")  # the OS refuses the name (any user)
    rc, _, err = run_cli(str(log), "-o", str(too_long))
    assert rc == 2 and f"cannot write {str(too_long)!r}: File name too long" in err
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_cli(str(log), "-o", str(tmp_path / "r.html"), "--png", str(tmp_path / "afile"))
    assert rc == 2 and "is a file; expected a folder" in err


def test_a_crashed_run_gives_a_report_with_notes(tmp_path: Path) -> None:
    log = write_log(tmp_path / "crash.jsonl", n=30)
    lines = log.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["kind"] == "session_end"
    # as a killed engine leaves it: no session_end, the last prediction cut off mid-write
    log.write_bytes(b"\n".join(lines[:-2])[:-40])
    page = report_of(log, tmp_path)
    assert "The last line of the file was cut off mid-write" in page
    assert "No session_end record" in page
    assert "<tr><th>predictions</th><td>29</td></tr>" in page
    assert page.count("<img ") == 4


def test_damaged_middle_line_and_a_log_without_predictions(tmp_path: Path) -> None:
    log = write_log(tmp_path / "d.jsonl", n=10)
    lines = log.read_bytes().split(b"\n")
    lines[4] = b'{"kind": "predic\x00\xff'
    log.write_bytes(b"\n".join(lines))
    page = report_of(log, tmp_path)
    assert "1 damaged line(s) skipped (line 5)" in page
    assert "<tr><th>predictions</th><td>9</td></tr>" in page

    empty = write_log(tmp_path / "e.jsonl", predictions=[])
    page = report_of(empty, tmp_path)
    assert "The log holds no prediction" in page and "<img " not in page
    assert_self_contained(page)


def test_a_log_created_again_mid_run_says_so(tmp_path: Path) -> None:
    """What the writer does when the file is deleted under the engine: the new file starts
    with a ``log_reopened`` line, no ``session_start``."""
    log = tmp_path / "again.jsonl"
    reopened = {
        "kind": "log_reopened",
        "utc": "2026-01-01T00:00:20.000Z",
        "session": "S01",
        "reason": "the log file was deleted",
        "predictions_before": 20,
    }
    predictions = [
        {"kind": "prediction", **_payload(_prediction(i, 120.0 + i))} for i in range(20, 30)
    ]
    lines = [reopened, *predictions]
    log.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    page = report_of(log, tmp_path)
    assert "<h1>Session report: S01</h1>" in page
    assert "created again at 2026-01-01T00:00:20.000Z, after 20 prediction(s)" in page
    assert "unknown kind" not in page and page.count("<img ") == 4


def test_odd_values_in_records_do_not_break_the_report(tmp_path: Path) -> None:
    log = write_log(tmp_path / "o.jsonl", n=12)
    with log.open("ab") as f:
        for rec in (
            {"kind": "prediction", "volume_timestamp": "soon", "probabilities": {}},
            {"kind": "prediction", "volume_timestamp": 200.0, "probabilities": [1, 2]},
            {"kind": "marker", "timestamp": None, "text": 5},
            {"kind": "status", "state": None, "details": "x"},
            {"kind": "mystery"},
        ):
            f.write((json.dumps(rec) + "\n").encode())
    page = report_of(log, tmp_path)
    assert "2 prediction record(s) without a finite volume_timestamp" in page
    assert "1 record(s) of unknown kind &#x27;mystery&#x27; not shown" in page
    assert math.isfinite(float(re.search(r"<th>TR</th><td>([\d.]+) s", page).group(1)))
