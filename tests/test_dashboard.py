"""Dashboard rendering and the headless log line, checked on the text a user would see."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from emorecog_stream.core.messages import Prediction
from emorecog_stream.engine.telemetry import (
    EngineSnapshot,
    LatencySummary,
    MqttStats,
    StreamState,
    StreamStats,
)
from emorecog_stream.sinks.dashboard import (
    MAX_REFRESH_HZ,
    Dashboard,
    LogLinePrinter,
    bar,
    format_log_line,
    render,
    sparkline,
)


def _text(snapshot: EngineSnapshot, width: int = 140) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(render(snapshot))
    return console.export_text()


def _snapshot(**kw: object) -> EngineSnapshot:
    base: dict[str, object] = dict(
        session_id="S07",
        model_id="emorecog-net-test",
        status="online",
        tr_index=41,
        streams=(
            StreamStats(
                "fmri", "EmoRecog-fMRI", 1.0, 1.0, 0.3, 0.1, 0, 0, StreamState.CONNECTED, 42
            ),
            StreamStats(
                "ppg", "EmoRecog-PPG", 400.0, 399.6, 0.02, 0.5, 0, 1, StreamState.CONNECTED, 16800
            ),
        ),
        heart_rate=71.4,
        heart_rate_valid=True,
        heart_rate_quality=0.93,
        respiration_rate=14.2,
        respiration_rate_valid=True,
        probabilities=(0.1, 0.2, 0.7),
        category="positive",
        intensity=2.25,
        intensity_history=(-4.0, 0.0, 4.0),
        latency=LatencySummary(count=42, last_ms=3.0, p50_ms=2.5, p99_ms=7.75, max_ms=9.0),
        mqtt=MqttStats(state="connected", sent=42),
        broker_url="mqtt://127.0.0.1:1883",
        uptime_s=3725.0,
        predictions=42,
    )
    base.update(kw)
    return EngineSnapshot(**base)  # type: ignore[arg-type]


def _pred(**kw: object) -> Prediction:
    base: dict[str, object] = dict(
        session="S07",
        sequence=12,
        tr_index=12,
        volume_timestamp=512.25,
        utc="2026-11-25T10:15:41.123Z",
        probabilities=(0.1, 0.2, 0.7),
        category="positive",
        intensity=2.3125,
        heart_rate=72.06,
        heart_rate_valid=True,
        respiration_rate=None,
        respiration_rate_valid=False,
        model_id="m",
        latency_ms=3.24,
    )
    base.update(kw)
    return Prediction(**base)  # type: ignore[arg-type]


# --- small pieces ----------------------------------------------------------------------------


def test_sparkline_maps_minus4_to_plus4_onto_blocks() -> None:
    assert sparkline([-4.0, 0.0, 4.0]) == "▁▅█"
    assert sparkline([-10.0, 10.0]) == "▁█"  # clipped
    assert sparkline([1.0, math.nan, 1.0]) == "▆ ▆"  # a missing TR stays visible as a hole
    assert sparkline([]) == ""
    with pytest.raises(ValueError, match="lo < hi"):
        sparkline([0.0], lo=1.0, hi=1.0)


def test_bar_fills_in_eighths() -> None:
    assert bar(0.5, 4) == "██  "
    assert bar(1.0, 3) == "███"
    assert bar(0.25, 1) == "▎"
    assert bar(-1.0, 2) == "  " and bar(2.0, 2) == "██"
    assert bar(math.nan, 2) == "  "
    with pytest.raises(ValueError, match="width"):
        bar(0.5, 0)


# --- render ----------------------------------------------------------------------------------


def test_render_shows_everything_of_a_healthy_snapshot() -> None:
    text = _text(_snapshot())
    for needle in (
        "EmoRecog-Stream",
        "session S07",
        "model emorecog-net-test",
        "uptime 1:02:05",
        "ONLINE",
        "TR 41",
        "predictions 42",
        "EmoRecog-PPG",
        "400 Hz",
        "399.6 Hz",  # measured beside nominal
        "0.02 s",
        "50%",  # buffer fill
        "71.4 bpm",
        "q 0.93",
        "14.2 breaths/min",
        "70.0%",
        "10.0%",
        "category  positive",
        "intensity +2.25",
        "▁▅█",
        "last 3 TRs",
        "p50 2.5 ms",
        "p99 7.8 ms",
        "connected",
        "mqtt://127.0.0.1:1883",
        "sent 42",
        "4-6 s earlier (hemodynamic delay)",
        "not a medical device",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert "missing" not in text


def test_render_marks_missing_heart_rate() -> None:
    text = _text(_snapshot(heart_rate=None, heart_rate_valid=False, flags=("heart_rate_missing",)))
    line = next(ln for ln in text.splitlines() if "Heart rate" in ln)
    assert "missing" in line and "bpm" not in line
    assert "heart_rate_missing" in text
    assert "14.2 breaths/min" in text  # respiration unaffected


def test_render_shows_stalled_and_lost_streams_with_reasons() -> None:
    streams = (
        StreamStats("fmri", "EmoRecog-fMRI", 1.0, 1.0, 0.4, 0.1, 0, 0, StreamState.CONNECTED, 40),
        StreamStats(
            "ppg",
            "EmoRecog-PPG",
            400.0,
            120.0,
            4.5,
            0.9,
            3,
            2,
            StreamState.STALLED,
            9000,
            note="no samples for 4.5 s",
        ),
        StreamStats("resp", "EmoRecog-Resp", 50.0, 0.0, 31.0, 0.0, 0, 1, StreamState.LOST, 200),
        StreamStats("rates", "EmoRecog-Rates", 0.0, None, None, None, 0, 0, StreamState.ABSENT, 0),
    )
    text = _text(_snapshot(streams=streams, status="degraded", status_reason="PPG stalled"))
    ppg = next(ln for ln in text.splitlines() if "EmoRecog-PPG" in ln)
    assert "stalled" in ppg and "no samples for 4.5 s" in ppg and "4.50 s" in ppg
    resp = next(ln for ln in text.splitlines() if "EmoRecog-Resp" in ln)
    assert "lost" in resp and "31.00 s" in resp
    rates = next(ln for ln in text.splitlines() if "EmoRecog-Rates" in ln)
    assert "irregular" in rates and "absent" in rates
    assert rates.split().count("–") == 3  # measured, lag and buffer unknown
    assert "DEGRADED - PPG stalled" in text


def test_render_shows_disconnected_mqtt_with_backlog_and_error() -> None:
    mq = MqttStats(
        state="disconnected",
        sent=30,
        queued=12,
        dropped=1,
        reconnects=3,
        last_error="[Errno 111] Connection refused",
    )
    text = _text(_snapshot(mqtt=mq))
    assert "disconnected" in text
    assert "sent 30  queued 12" in text and "dropped 1  reconnects 3" in text
    assert "last error: [Errno 111] Connection refused" in text


def test_render_fits_an_80_column_terminal() -> None:
    snap = _snapshot(intensity_history=tuple(float(i % 9 - 4) for i in range(200)))
    text = _text(snap, width=80)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "EmoRecog-PPG" not in text  # names only from 100 columns on
    assert "Stream" in text and "400 Hz" in text and "399.6 Hz" in text
    trend = next(ln for ln in text.splitlines() if "trend" in ln)
    assert "-4 " in trend and " +4" in trend  # scale kept, oldest TRs dropped to fit
    assert "70.0%" in text and "not a medical device" in text.replace("\n", " ")


def test_render_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="expects an EngineSnapshot, got dict"):
        render({})  # type: ignore[arg-type]


def test_render_before_the_first_prediction() -> None:
    text = _text(EngineSnapshot())
    assert "waiting for the first prediction" in text
    assert "STARTING" in text and "TR –" in text
    assert "(none yet)" in text  # no streams yet
    assert "not a medical device" in text


# --- headless log line -----------------------------------------------------------------------


def test_log_line_for_a_prediction() -> None:
    line = format_log_line(_pred(flags=("respiration_rate_missing",)), mqtt_state="connected")
    assert line == (
        "10:15:41.123  TR   12  positive  neg 0.10 neu 0.20 pos 0.70  intensity +2.31  "
        "HR  72.1 bpm  RR missing  latency 3.2 ms  mqtt connected  [respiration_rate_missing]"
    )
    assert "mqtt" not in format_log_line(_pred())


def test_log_line_for_a_snapshot_carries_status_and_mqtt() -> None:
    snap = _snapshot(
        utc="2026-11-25T10:15:42.5Z",
        status="degraded",
        status_reason="PPG lost",
        heart_rate=None,
        heart_rate_valid=False,
        mqtt=MqttStats(state="disconnected", queued=4),
    )
    line = format_log_line(snap)
    assert line.startswith("10:15:42.500  TR   41  positive  neg 0.10 neu 0.20 pos 0.70")
    assert "HR missing" in line and "RR  14.2 /min" in line
    assert "latency 3.0 ms" in line
    assert "status degraded (PPG lost)" in line
    assert line.endswith("mqtt disconnected (queued 4)")
    assert "\x1b" not in line  # plain text, no colour codes
    healthy = format_log_line(_snapshot(utc="2026-11-25T10:15:43Z"))
    assert "status" not in healthy  # online is the normal case: not repeated every TR
    assert healthy.endswith("latency 3.0 ms  mqtt connected")


def test_log_line_before_any_prediction() -> None:
    line = format_log_line(EngineSnapshot(status="paused", status_reason="waiting for fMRI"))
    assert line == (
        "--:--:--.---  TR    -  status paused (waiting for fMRI)  no prediction yet  mqtt disabled"
    )


def test_log_line_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="Prediction or an EngineSnapshot, got dict"):
        format_log_line({})  # type: ignore[arg-type]


# --- live dashboard --------------------------------------------------------------------------


def test_dashboard_shows_the_latest_snapshot_and_stops_cleanly() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with Dashboard(console, refresh_per_second=10) as dash:
        dash.update(_snapshot(session_id="first"))
        dash.update(_snapshot(session_id="LATEST", tr_index=99))
        assert dash.snapshot.session_id == "LATEST"
    dash.stop()  # idempotent
    text = out.getvalue()
    assert "session LATEST" in text and "TR 99" in text  # the final frame on stop


def test_dashboard_refresh_rate_is_capped() -> None:
    with pytest.raises(ValueError, match=f"\\(0, {MAX_REFRESH_HZ:g}\\] Hz, got 50"):
        Dashboard(Console(file=io.StringIO()), refresh_per_second=50)
    with pytest.raises(ValueError):
        Dashboard(Console(file=io.StringIO()), refresh_per_second=0)


def test_dashboard_update_checks_its_input() -> None:
    dash = Dashboard(Console(file=io.StringIO()))
    with pytest.raises(TypeError, match="expects an EngineSnapshot, got Prediction"):
        dash.update(_pred())  # type: ignore[arg-type]


def test_dashboard_survives_a_snapshot_it_cannot_render() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    dash = Dashboard(console, refresh_per_second=10)
    # probabilities of the wrong length: a bug upstream; the screen says so, nothing crashes
    dash.update(_snapshot(probabilities=(0.5, 0.5)))
    dash.start()
    dash.stop()
    assert "dashboard rendering failed: ValueError" in out.getvalue()
    with pytest.raises(ValueError):  # render() itself does not hide the bug
        Console(file=io.StringIO()).print(render(_snapshot(probabilities=(0.5, 0.5))))


def test_render_takes_the_publishers_own_stats() -> None:
    """``MqttPublisher.stats`` goes into a snapshot as it is (no copy needed)."""
    from emorecog_stream.sinks.mqtt import MqttStats as PublisherStats

    stats = PublisherStats(
        url="mqtt://127.0.0.1:1883",
        state="refused",
        connected=False,
        protocol="5",
        sent=7,
        queued=2,
        inflight=1,
        dropped=0,
        reconnects=1,
        last_error="not authorised",
        last_error_utc="2026-11-25T10:00:00.000Z",
        unsent_at_close=0,
    )
    snap = _snapshot(mqtt=stats)
    text = _text(snap)
    assert "refused (MQTT 5)" in text
    assert "sent 7  queued 2" in text and "dropped 0  reconnects 1" in text
    assert "last error: not authorised" in text
    assert format_log_line(snap).endswith("mqtt refused (queued 2)")
    copied = MqttStats.copy_of(stats)
    assert (copied.state, copied.sent, copied.queued, copied.last_error) == (
        "refused",
        7,
        2,
        "not authorised",
    )


async def test_dashboard_follows_a_snapshot_source() -> None:
    import asyncio

    out = io.StringIO()
    dash = Dashboard(Console(file=out, width=100), refresh_per_second=10)
    calls = 0

    def source() -> EngineSnapshot:
        nonlocal calls
        calls += 1
        return _snapshot(tr_index=calls)

    task = asyncio.create_task(dash.follow(source))
    while calls < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dash.snapshot.tr_index == calls


async def test_log_line_printer_as_engine_output() -> None:
    from emorecog_stream.engine.state import EngineStatus

    out = io.StringIO()
    printer = LogLinePrinter(out, mqtt_state=lambda: "connected")
    printer.on_status(EngineStatus("online"))
    printer.on_prediction(_pred(), None)
    printer.on_status(EngineStatus("degraded", "PPG stalled", ("heart_rate",)))
    printer.on_status(EngineStatus("degraded", "PPG stalled", ("heart_rate",)))  # unchanged
    await printer.aclose()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("status online")
    assert lines[1] == format_log_line(_pred(), mqtt_state="connected")
    assert lines[2].endswith("status degraded (PPG stalled)")


def test_dashboard_refresh_thread_picks_up_updates_while_running() -> None:
    """Frames appear without ``stop()``: rich's refresh thread renders the newest snapshot."""
    import time

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    with Dashboard(console, refresh_per_second=10) as dash:
        for name in ("ALPHA", "BRAVO"):
            dash.update(_snapshot(session_id=name))
            deadline = time.monotonic() + 10.0  # generous: a loaded CI machine
            while f"session {name}" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert f"session {name}" in out.getvalue()


# --- head motion (the Motion stream) ---------------------------------------------------------


def test_render_shows_framewise_displacement_against_the_threshold() -> None:
    calm = _text(_snapshot(framewise_displacement=0.12, fd_threshold=0.5), width=80)
    row = next(ln for ln in calm.splitlines() if "Head FD" in ln)
    assert "0.12 mm" in row and "<= 0.5 mm" in row
    assert max(len(ln) for ln in calm.splitlines()) <= 80
    moved = _text(_snapshot(framewise_displacement=0.83, fd_threshold=0.5, flags=("motion",)))
    row = next(ln for ln in moved.splitlines() if "Head FD" in ln)
    assert "0.83 mm" in row and "> 0.5 mm" in row
    assert "motion" in next(ln for ln in moved.splitlines() if "flags" in ln)
    late = _text(_snapshot(framewise_displacement=None, fd_threshold=0.5))
    assert "unknown" in next(ln for ln in late.splitlines() if "Head FD" in ln)
    assert "Head FD" not in _text(_snapshot())  # no Motion stream: no row, as before


def test_log_line_carries_the_framewise_displacement_when_known() -> None:
    line = format_log_line(_pred(framewise_displacement=0.734, flags=("motion",)))
    assert "RR missing  FD 0.73 mm  latency 3.2 ms" in line and line.endswith("[motion]")
    assert "FD" not in format_log_line(_pred())  # no Motion stream: the line is as before
    snap = format_log_line(_snapshot(utc="2026-11-25T10:15:43Z", framewise_displacement=0.2))
    assert "RR  14.2 /min  FD 0.20 mm  latency 3.0 ms" in snap
