"""The hub's dashboard: the sessions table, the live hub view and the hub's log line.

Checked on the text (and colours) a real rich Console records, as a user would see them.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import pytest
from rich.console import Console, RenderableType

from emorecog_stream.engine.telemetry import (
    EngineSnapshot,
    LatencySummary,
    StreamState,
    StreamStats,
)
from emorecog_stream.sinks.dashboard import (
    NO_SESSIONS,
    HubDashboard,
    format_hub_log_line,
    render,
    render_hub,
    render_sessions,
)


def _snap(i: int, **kw: object) -> EngineSnapshot:
    """Session ``s<i>`` with values derived from ``i``, so every row is recognisable."""
    base: dict[str, object] = dict(
        session_id=f"s{i:02d}",
        model_id="emorecog-net-test",
        status="online",
        tr_index=100 + i,
        probabilities=(0.1, 0.2, 0.7),
        category="positive",
        intensity=round(-3.2 + i * 0.1, 2),
        heart_rate=60.0 + i,
        heart_rate_valid=True,
        respiration_rate=10.0 + i / 10,
        respiration_rate_valid=True,
        latency=LatencySummary(count=5, last_ms=2.0, p50_ms=2.0, p99_ms=5.0 + i, max_ms=80.0),
        uptime_s=100.0 + i,
        predictions=1000 + i,
    )
    base.update(kw)
    return EngineSnapshot(**base)  # type: ignore[arg-type]


def _console(width: int = 160, height: int = 70, **kw: object) -> Console:
    return Console(
        record=True, width=width, height=height, file=io.StringIO(), color_system=None, **kw
    )  # type: ignore[arg-type]


def _text(renderable: RenderableType, width: int = 160) -> str:
    console = _console(width)
    console.print(renderable)
    return console.export_text()


def _row(text: str, session_id: str) -> list[str]:
    """The cells of a session's line (cells hold no spaces, except the reason at the end)."""
    line = next(ln for ln in text.splitlines() if ln.startswith(session_id + " "))
    return line.split()


def _sixty_four() -> list[EngineSnapshot]:
    return [_snap(i) for i in range(64, 0, -1)]  # given in reverse: the table sorts


# --- the sessions table ----------------------------------------------------------------------


def test_sixty_four_sessions_fit_one_screen_with_every_value() -> None:
    text = _text(render_sessions(_sixty_four()))
    lines = text.splitlines()
    assert len(lines) <= 66
    assert max(len(ln) for ln in lines) <= 160
    assert "64 sessions: 64 running, 0 degraded, 0 offline" in lines[0]
    assert "uptime 0:02:44" in lines[0]  # the longest session's
    assert "Session" in lines[1] and "p99 ms" in lines[1] and "FD" not in lines[1]
    ids = [ln.split()[0] for ln in lines[2:]]
    assert ids == [f"s{i:02d}" for i in range(1, 65)]  # one line each, sorted by id
    for i in range(1, 65):
        cells = _row(text, f"s{i:02d}")
        assert cells == [
            f"s{i:02d}",
            "online",
            str(100 + i),
            "positive",
            "0.70",
            f"{-3.2 + i * 0.1:+.1f}",
            f"{60.0 + i:.1f}",
            f"{10.0 + i / 10:.1f}",
            f"{5.0 + i:.1f}",
            str(1000 + i),
        ]


def test_sessions_table_keeps_one_line_per_session_at_a_given_width() -> None:
    snaps = [_snap(i, status="degraded", status_reason="PPG stalled " * 20) for i in range(1, 9)]
    lines = _text(render_sessions(snaps, width=100)).splitlines()
    assert len(lines) == 2 + 8
    assert max(len(ln.rstrip()) for ln in lines) <= 100
    assert all(ln.rstrip().endswith("…") for ln in lines[2:])  # the long reason is cut


def test_sessions_table_sorts_numbers_in_ids_naturally() -> None:
    snaps = [_snap(1, session_id=sid) for sid in ("scanner10", "scanner2", "scanner1")]
    lines = _text(render_sessions(snaps)).splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["scanner1", "scanner2", "scanner10"]


def test_sessions_table_marks_invalid_rates_and_shows_fd_when_known() -> None:
    snaps = [
        _snap(1, heart_rate=72.26, heart_rate_valid=False),
        _snap(2, respiration_rate=None, respiration_rate_valid=False),
        _snap(3, framewise_displacement=0.83, fd_threshold=0.5),
    ]
    text = _text(render_sessions(snaps))
    assert "? = rate not valid" in text.splitlines()[0]
    assert _row(text, "s01")[6:9] == ["72.3?", "10.1", "–"]  # HR, RR, FD unknown
    assert _row(text, "s02")[6:9] == ["62.0", "–?", "–"]
    assert _row(text, "s03")[6:9] == ["63.0", "10.3", "0.83"]


def test_sessions_table_colours_status_and_category() -> None:
    snaps = [
        _snap(1),
        _snap(2, status="degraded", status_reason="PPG stalled", category="negative"),
        _snap(3, status="offline", status_reason="engine stopped", category="neutral"),
    ]
    console = Console(record=True, width=160, file=io.StringIO(), color_system="standard")
    console.print(render_sessions(snaps))
    styled = console.export_text(styles=True, clear=False)
    green, yellow, red = "\x1b[1;32m", "\x1b[1;33m", "\x1b[1;31m"
    assert f"{green}online" in styled and f"{green}1 running" in styled
    assert f"{yellow}degraded" in styled and f"{yellow}1 degraded" in styled
    assert f"{red}offline" in styled and f"{red}1 offline" in styled
    assert "\x1b[35mnegative" in styled and "\x1b[36mneutral" in styled
    assert "\x1b[32mpositive" in styled
    plain = console.export_text()
    assert _row(plain, "s02")[-2:] == ["PPG", "stalled"]
    assert _row(plain, "s03")[-2:] == ["engine", "stopped"]
    assert _row(plain, "s01")[-1] == "1001"  # running: no reason


def test_short_screen_shows_the_worst_sessions_first_and_counts_the_rest() -> None:
    lost = (StreamStats("ppg", "EmoRecog-PPG", 400.0, state=StreamState.LOST),)
    snaps = _sixty_four()
    snaps[10] = _snap(54, status="offline", status_reason="engine stopped")
    snaps[20] = _snap(44, status="starting", status_reason="waiting for the fMRI stream")
    snaps[30] = _snap(34, streams=lost)  # online, but a stream is lost: stale
    snaps[40] = _snap(24, status="degraded", status_reason="PPG stalled")
    lines = _text(render_sessions(snaps, height=10)).splitlines()
    assert len(lines) == 10
    shown = [ln.split()[0] for ln in lines[2:9]]
    assert shown == ["s54", "s24", "s44", "s34", "s01", "s02", "s03"]
    assert _row("\n".join(lines), "s34")[-2:] == ["ppg", "lost"]
    assert lines[9].startswith("+57 more (57 running)")
    assert "1 offline" in lines[0] and "2 degraded" in lines[0]  # totals count every session


def test_no_sessions_say_so() -> None:
    assert NO_SESSIONS == "no sessions yet: waiting for streams"
    table = _text(render_sessions([]))
    assert "0 sessions" in table and NO_SESSIONS in table
    assert _text(render_hub([])).strip() == NO_SESSIONS


def test_one_session_looks_like_the_single_session_dashboard() -> None:
    snap = _snap(7, heart_rate_quality=0.9)
    assert _text(render_hub([snap])) == _text(render(snap))
    assert "session s07" in _text(render_hub([snap]))
    two = _text(render_hub([snap, _snap(8)]))
    assert "2 sessions" in two and "session s07" not in two


def test_sessions_table_checks_its_input() -> None:
    with pytest.raises(TypeError, match="expected EngineSnapshots, got dict"):
        render_sessions([{}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="height must be >= 1"):
        render_sessions([], height=0)


# --- the headless hub line -------------------------------------------------------------------


def test_hub_log_line_counts_sessions_and_predictions() -> None:
    now = datetime(2026, 11, 25, 10, 15, 41, 123000, tzinfo=timezone.utc)
    snaps = [
        *(_snap(i) for i in range(1, 6)),
        _snap(6, status="paused"),
        _snap(7, status="degraded"),
        _snap(8, status="offline"),
    ]
    line = format_hub_log_line(snaps, now=now)
    assert line == (
        "10:15:41.123  hub 8 sessions: 5 running, 2 degraded, 1 offline  predictions 8036"
        "  offline: s08  degraded: s06,s07"
    )
    assert "\x1b" not in line and "\n" not in line
    assert format_hub_log_line([], now=now).endswith("0 offline  predictions 0")
    many = format_hub_log_line([_snap(i, status="offline") for i in range(1, 10)], now=now)
    assert many.endswith("offline: s01,s02,s03,s04,s05,s06,+3")


# --- the live hub dashboard ------------------------------------------------------------------


def _wait_for(out: io.StringIO, pattern: str, timeout: float = 5.0) -> str:
    """Poll what the refresh thread wrote until ``pattern`` shows (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, out.getvalue()):
        assert time.monotonic() < deadline, f"no {pattern!r} on screen within {timeout} s"
        time.sleep(0.01)
    return out.getvalue()


def _live_console(out: io.StringIO) -> Console:
    return Console(file=out, force_terminal=True, width=160, height=70, color_system=None)


def test_hub_dashboard_follows_the_sessions_it_is_given() -> None:
    current: list[Sequence[EngineSnapshot]] = [()]
    out = io.StringIO()
    with HubDashboard(lambda: current[0], _live_console(out), refresh_per_second=10) as dash:
        _wait_for(out, NO_SESSIONS)
        current[0] = (_snap(1), _snap(2))
        _wait_for(out, r"2 sessions: 2 running")
        current[0] = (_snap(1), _snap(2), _snap(3, status="offline", status_reason="gone"))
        _wait_for(out, r"s03 +offline .* gone")
        current[0] = (_snap(9),)
        _wait_for(out, r"session s09  model emorecog-net-test")  # the single-session view
    dash.stop()  # idempotent
    assert dash.snapshots() == (_snap(9),)


def test_hub_dashboard_cuts_the_table_to_the_terminal_height() -> None:
    snaps = _sixty_four()
    snaps[0] = _snap(64, status="offline", status_reason="engine stopped")
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, height=12, color_system=None)
    with HubDashboard(lambda: snaps, console, refresh_per_second=10):
        text = _wait_for(out, r"\+55 more \(55 running\)")
    frame = text[text.rindex("EmoRecog-Stream hub") :]
    rows = [ln.split()[0] for ln in frame.splitlines()[2:11]]
    assert rows == ["s64", *(f"s{i:02d}" for i in range(1, 9))]  # the offline one first


def test_hub_dashboard_survives_a_failing_source() -> None:
    broken = [True]

    def source() -> Sequence[EngineSnapshot]:
        if broken[0]:
            raise RuntimeError("sessions dict changed size")
        return (_snap(1), _snap(2))

    out = io.StringIO()
    with HubDashboard(source, _live_console(out), refresh_per_second=10):
        _wait_for(out, "dashboard rendering failed: RuntimeError: sessions dict changed size")
        broken[0] = False
        _wait_for(out, "2 sessions: 2 running")  # the refresh thread went on


def test_hub_dashboard_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="callable"):
        HubDashboard([_snap(1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refresh rate"):
        HubDashboard(list, Console(file=io.StringIO()), refresh_per_second=0)
