"""Terminal dashboard (rich) and the headless one-line-per-TR log.

:func:`render` turns an :class:`~emorecog_stream.engine.telemetry.EngineSnapshot` into a rich
renderable and does nothing else, so it can be tested with ``Console(record=True)``.
:class:`Dashboard` shows it live: :meth:`Dashboard.update` only swaps a reference to the newest
(immutable) snapshot, and rich's own refresh thread renders it at a capped rate, so the engine
never waits for the terminal. Without a dashboard (``--no-dashboard``) the engine prints
:func:`format_log_line` once per TR instead.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import TextIO, TypeVar

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.constrain import Constrain
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from emorecog_stream.core.messages import Prediction
from emorecog_stream.core.streams import CATEGORY_LABELS, INTENSITY_RANGE
from emorecog_stream.engine.telemetry import EngineSnapshot, StreamState, StreamStats

__all__ = [
    "HEMODYNAMIC_NOTE",
    "MAX_REFRESH_HZ",
    "NO_SESSIONS",
    "Dashboard",
    "DashboardView",
    "HubDashboard",
    "HubView",
    "LogLinePrinter",
    "SessionsView",
    "bar",
    "format_hub_log_line",
    "format_log_line",
    "render",
    "render_hub",
    "render_sessions",
    "sparkline",
]

HEMODYNAMIC_NOTE = (
    "A prediction at volume t reflects brain activity about 4-6 s earlier (hemodynamic delay). "
    "Research software, not a medical device."
)

MAX_REFRESH_HZ = 10.0
"""Upper bound on screen refreshes: more only costs the engine CPU and shows nothing new."""

_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉"
_MISSING = "–"

_STATE_STYLE = {
    StreamState.CONNECTED: "green",
    StreamState.STALLED: "yellow",
    StreamState.LOST: "bold red",
    StreamState.ABSENT: "dim",
}


_RUNNING_STATES = frozenset({"running", "ok", "online"})
_OFFLINE_STATES = frozenset({"stopped", "offline", "error", "failed"})
_BUCKETS = ("running", "degraded", "offline")
_BUCKET_STYLE = {"running": "bold green", "degraded": "bold yellow", "offline": "bold red"}


def _bucket(status: str) -> str:
    """``running``, ``offline`` or ``degraded``: the three groups a hub operator counts.

    Everything that is neither predicting normally nor stopped (starting, waiting, paused,
    degraded, a state we do not know) is ``degraded``: it needs a look, but is not lost.
    """
    s = status.lower()
    if s in _RUNNING_STATES:
        return "running"
    if s in _OFFLINE_STATES:
        return "offline"
    return "degraded"


def _status_style(status: str) -> str:
    return _BUCKET_STYLE[_bucket(status)]


def _mqtt_style(state: str) -> str:
    s = state.lower()
    if s == "connected":
        return "green"
    if s in ("disabled", "closed"):
        return "dim"
    if s in ("idle", "connecting", "reconnecting"):
        return "yellow"
    return "bold red"


def sparkline(
    values: Sequence[float], lo: float = INTENSITY_RANGE[0], hi: float = INTENSITY_RANGE[1]
) -> str:
    """One block character per value, scaled from ``lo`` (lowest block) to ``hi`` (full block).

    The range is cut into eight equal bins; values outside it are clipped; non-finite values
    show as a space (a missing TR).
    """
    if not hi > lo:
        raise ValueError(f"sparkline needs lo < hi, got lo={lo}, hi={hi}")
    out = []
    top = len(_SPARK) - 1
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
            continue
        frac = (min(hi, max(lo, float(v))) - lo) / (hi - lo)
        out.append(_SPARK[min(top, int(frac * len(_SPARK)))])
    return "".join(out)


def bar(fraction: float, width: int) -> str:
    """A horizontal bar ``width`` cells wide filled to ``fraction`` (0..1), eighth-cell steps."""
    if width < 1:
        raise ValueError(f"bar width must be >= 1, got {width}")
    if not math.isfinite(fraction):
        return " " * width
    eighths = round(min(1.0, max(0.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    s = "█" * full + (_EIGHTHS[part] if part else "")
    return s.ljust(width)


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return _MISSING
    return f"{x:{spec}}{unit}"


def _fmt_rate(hz: float | None, *, nominal: bool = False) -> str:
    if hz is None or not math.isfinite(hz):
        return _MISSING
    if nominal:
        return "irregular" if hz == 0 else f"{hz:g} Hz"
    if hz >= 10:
        return f"{hz:.1f} Hz"
    return f"{hz:.2f} Hz"


def _fmt_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}"


WIDE = 100
"""From this many columns on, the streams table shows names, bars and notes."""


def _streams_table(streams: Sequence[StreamStats], width: int) -> Table:
    wide = width >= WIDE
    t = Table(
        title="Input streams",
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        expand=True,
        pad_edge=False,
        padding=(0, 1),
    )
    t.add_column("Stream", no_wrap=True)
    if wide:
        t.add_column("Name", no_wrap=True, overflow="ellipsis", max_width=24)
    for col in ("Nominal", "Measured", "Lag"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("Buffer", no_wrap=True)
    t.add_column("Gaps", justify="right", no_wrap=True)
    t.add_column("Ovf", justify="right", no_wrap=True)
    t.add_column("State", no_wrap=True, overflow="ellipsis", ratio=1)
    if not streams:
        t.add_row("(none yet)", *([""] * (len(t.columns) - 1)))
    for s in streams:
        state = Text(s.state.value, style=_STATE_STYLE.get(s.state, ""))
        if s.note:
            state.append(f" ({s.note})", style="dim")
        fill = _MISSING if s.buffer_fill is None else f"{s.buffer_fill * 100:3.0f}%"
        row: list[RenderableType] = [s.role]
        if wide:
            row.append(s.name)
        row += [
            _fmt_rate(s.nominal_rate, nominal=True),
            _fmt_rate(s.measured_rate),
            _fmt(s.lag_s, ".2f", " s"),
            f"{bar(s.buffer_fill, 6)} {fill}" if wide and s.buffer_fill is not None else fill,
            Text(str(s.gaps), style="yellow" if s.gaps else ""),
            Text(str(s.overflows), style="red" if s.overflows else ""),
            state,
        ]
        t.add_row(*row)
    return t


def _rate_value(value: float | None, valid: bool, unit: str, quality: float | None) -> Text:
    if not (valid and value is not None and math.isfinite(value)):
        return Text("missing", style="bold yellow")
    out = Text(f"{value:.1f} {unit}", style="bold")
    if quality is not None:
        out.append(f"  q {quality:.2f}", style="dim")
    return out


def _fd_value(fd: float | None, threshold: float | None) -> Text:
    """The last volume's framewise displacement, red above the flag threshold."""
    if fd is None or not math.isfinite(fd):
        return Text("unknown", style="bold yellow")
    above = threshold is not None and fd > threshold
    out = Text(f"{fd:.2f} mm", style="bold red" if above else "bold")
    if threshold is not None:
        out.append(f"  {'>' if above else '<='} {threshold:g} mm", style="red" if above else "dim")
    return out


def _side_panel(snap: EngineSnapshot) -> Panel:
    """Physiology, latency and MQTT: short label/value rows that fit half an 80-column screen."""
    g = Table.grid(padding=(0, 1))
    g.add_column(no_wrap=True, style="bold")
    g.add_column()
    g.add_row(
        "Heart rate",
        _rate_value(snap.heart_rate, snap.heart_rate_valid, "bpm", snap.heart_rate_quality),
    )
    g.add_row(
        "Resp. rate",
        _rate_value(
            snap.respiration_rate,
            snap.respiration_rate_valid,
            "breaths/min",
            snap.respiration_rate_quality,
        ),
    )
    if snap.fd_threshold is not None or snap.framewise_displacement is not None:
        g.add_row("Head FD", _fd_value(snap.framewise_displacement, snap.fd_threshold))
    lat = snap.latency
    latency = Text(f"p50 {_fmt(lat.p50_ms, '.1f', ' ms')}  p99 {_fmt(lat.p99_ms, '.1f', ' ms')}")
    latency.append(f"  max {_fmt(lat.max_ms, '.1f', ' ms')}  n={lat.count}", style="dim")
    g.add_row("Latency", latency)
    m = snap.mqtt
    state = Text(m.state, style=_mqtt_style(m.state))
    protocol = getattr(m, "protocol", None)  # sinks.mqtt's stats say which MQTT version
    if protocol:
        state.append(f" (MQTT {protocol})", style="dim")
    g.add_row("MQTT", state)
    if snap.broker_url:
        g.add_row("", Text(snap.broker_url, style="dim"))
    g.add_row("", f"sent {m.sent}  queued {m.queued}")
    g.add_row("", f"dropped {m.dropped}  reconnects {m.reconnects}")
    if m.last_error:
        g.add_row("", Text(f"last error: {m.last_error}", style="red"))
    return Panel(g, title="Physiology and outputs", title_align="left")


def _prediction_panel(snap: EngineSnapshot, width: int) -> Panel:
    title = "Emotion (last TR)"
    if snap.probabilities is None:
        return Panel(
            Text("waiting for the first prediction", style="dim"), title=title, title_align="left"
        )
    probs = snap.probabilities
    # label (9) + space + bar + " 100.0%" (7) inside the panel's border and padding (4)
    bar_width = max(6, min(30, width - 4 - 10 - 7))
    g = Table.grid(padding=(0, 1))
    g.add_column(no_wrap=True)
    g.add_column(no_wrap=True)
    top = max(range(len(probs)), key=lambda i: probs[i])
    for i, (label, p) in enumerate(zip(CATEGORY_LABELS, probs, strict=True)):
        line = Text(bar(p, bar_width), style="bold cyan" if i == top else "cyan")
        line.append(f" {p * 100:5.1f}%", style="bold" if i == top else "")
        g.add_row(label, line)
    lo, hi = INTENSITY_RANGE
    g.add_row("category", Text(snap.category or _MISSING, style="bold"))
    intensity = Text(_fmt(snap.intensity, "+.2f"), style="bold")
    intensity.append(f"  (scale {lo:+.0f}..{hi:+.0f})", style="dim")
    g.add_row("intensity", intensity)
    # the trend shows as many recent TRs as fit; the oldest drop off on the left
    room = max(4, width - 4 - 10 - 6)
    history = snap.intensity_history[-room:]
    trend = Text(f"{lo:+.0f} ", style="dim")
    trend.append(sparkline(history, lo, hi), style="magenta")
    trend.append(f" {hi:+.0f}", style="dim")
    g.add_row("trend", trend)
    g.add_row("", Text(f"last {len(history)} TRs, oldest left", style="dim"))
    if snap.flags:
        g.add_row("flags", Text(", ".join(snap.flags), style="yellow"))
    return Panel(g, title=title, title_align="left")


def _failure(exc: Exception) -> Text:
    """The line shown instead of a frame that could not be built (a bug upstream, on screen)."""
    return Text(f"dashboard rendering failed: {type(exc).__name__}: {exc}", style="bold red")


class DashboardView:
    """The dashboard for one snapshot; lays itself out for the width it is given.

    With ``safe`` (what :class:`Dashboard` uses) a snapshot that cannot be shown, a bug
    upstream, becomes an error line on screen instead of an exception in rich's refresh thread.
    """

    def __init__(self, snapshot: EngineSnapshot, *, safe: bool = False) -> None:
        self.snapshot = snapshot
        self.safe = safe

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        try:
            parts = self._parts(options.max_width)
        except Exception as exc:
            if not self.safe:
                raise
            parts = [_failure(exc)]
        yield from parts

    def _parts(self, width: int) -> list[RenderableType]:
        snap = self.snapshot
        head = Text()
        head.append("EmoRecog-Stream", style="bold")
        head.append("  session ")
        head.append(snap.session_id or _MISSING, style="cyan")
        head.append("  model ")
        head.append(snap.model_id or _MISSING, style="cyan")
        head.append(f"  uptime {_fmt_duration(snap.uptime_s)}")
        status = Text("Status: ")
        status.append(snap.status.upper(), style=_status_style(snap.status))
        if snap.status_reason:
            status.append(f" - {snap.status_reason}")
        status.append(f"   TR {snap.tr_index if snap.tr_index is not None else _MISSING}")
        status.append(f"   predictions {snap.predictions}")
        half = (width - 1) // 2
        # fixed widths: rich need not measure the nested panels (halves the cost of a frame)
        middle = Table.grid(padding=(0, 1))
        middle.add_column(width=half)
        middle.add_column(width=max(1, width - half - 1))
        middle.add_row(_prediction_panel(snap, half), _side_panel(snap))
        return [
            head,
            status,
            _streams_table(snap.streams, width),
            middle,
            Text(HEMODYNAMIC_NOTE, style="dim italic"),
        ]


def render(snapshot: EngineSnapshot) -> RenderableType:
    """The whole dashboard for one snapshot (pure: reads the snapshot, returns a renderable).

    The layout adapts to the console width at print time (names, bars and notes in the
    streams table from :data:`WIDE` columns on; the intensity trend as long as fits).
    """
    if not isinstance(snapshot, EngineSnapshot):
        raise TypeError(f"render expects an EngineSnapshot, got {type(snapshot).__name__}")
    return DashboardView(snapshot)


# --- several sessions (the hub) ------------------------------------------------------------

NO_SESSIONS = "no sessions yet: waiting for streams"

_CATEGORY_STYLE = {"negative": "magenta", "neutral": "cyan", "positive": "green"}
_TROUBLED_STREAMS = (StreamState.STALLED, StreamState.LOST)
_SESSIONS_CHROME = 2
"""Lines of the sessions view around its rows: the totals line and the column headings."""


def _natural_key(session_id: str) -> tuple[tuple[int, int | str], ...]:
    """Sort ``scanner2`` before ``scanner10``: ids often carry an unpadded number."""
    parts = re.split(r"(\d+)", session_id)  # odd positions are the numbers
    return tuple((0, int(p)) if i % 2 else (1, p) for i, p in enumerate(parts) if p)


def _troubled(snap: EngineSnapshot) -> list[StreamStats]:
    return [s for s in snap.streams if s.state in _TROUBLED_STREAMS]


def _severity(snap: EngineSnapshot) -> int:
    """0 offline, 1 degraded (or starting, paused), 2 running with a stalled/lost stream, 3 ok.

    When not every row fits, the lowest go on screen first: those are the ones to act on.
    """
    bucket = _bucket(snap.status)
    if bucket == "offline":
        return 0
    if bucket == "degraded":
        return 1
    return 2 if _troubled(snap) else 3


def _category_probability(snap: EngineSnapshot) -> float | None:
    """The probability of the shown category (the largest when the label is unknown)."""
    probs = snap.probabilities
    if not probs:
        return None
    if snap.category in CATEGORY_LABELS and len(probs) == len(CATEGORY_LABELS):
        return probs[CATEGORY_LABELS.index(snap.category)]
    return max(probs)


def _compact_rate(value: float | None, valid: bool) -> Text:
    """A rate in one short cell; ``?`` (yellow) marks one the engine does not trust."""
    if valid and value is not None and math.isfinite(value):
        return Text(f"{value:.1f}")
    return Text(_fmt(value, ".1f") + "?", style="yellow")


def _compact_fd(snap: EngineSnapshot) -> Text:
    fd, threshold = snap.framewise_displacement, snap.fd_threshold
    if fd is None or not math.isfinite(fd):
        return Text(_MISSING, style="dim")
    return Text(f"{fd:.2f}", style="bold red" if threshold is not None and fd > threshold else "")


def _short_reason(snap: EngineSnapshot) -> str:
    """Why a session is not simply running: its status reason, else its troubled streams."""
    if _bucket(snap.status) != "running":
        return snap.status_reason
    return ", ".join(f"{s.role} {s.state.value}" for s in _troubled(snap))


def _session_row(snap: EngineSnapshot, *, show_fd: bool) -> list[RenderableType]:
    p = _category_probability(snap)
    row: list[RenderableType] = [
        Text(snap.session_id or _MISSING, style="cyan"),
        Text(snap.status, style=_status_style(snap.status)),
        str(snap.tr_index) if snap.tr_index is not None else _MISSING,
        Text(snap.category or _MISSING, style=_CATEGORY_STYLE.get(snap.category or "", "")),
        _fmt(p, ".2f"),
        _fmt(snap.intensity, "+.1f"),
        _compact_rate(snap.heart_rate, snap.heart_rate_valid),
        _compact_rate(snap.respiration_rate, snap.respiration_rate_valid),
    ]
    if show_fd:
        row.append(_compact_fd(snap))
    row += [
        _fmt(snap.latency.p99_ms, ".1f"),
        str(snap.predictions),
        Text(_short_reason(snap), style="dim"),
    ]
    return row


def _sessions_table(snaps: Sequence[EngineSnapshot], width: int) -> Table:
    """One line per session: no box, no row lines, no vertical padding, one-space gutters."""
    show_fd = any(s.fd_threshold is not None or s.framewise_displacement is not None for s in snaps)
    t = Table(
        box=None,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        header_style="bold underline",
        width=width,
        expand=True,
    )
    t.add_column("Session", no_wrap=True, overflow="ellipsis", max_width=24)
    t.add_column("Status", no_wrap=True, overflow="ellipsis", max_width=10)
    right = ["TR", "Category", "P", "Int.", "HR", "RR", *(["FD"] if show_fd else [])]
    for col in right:
        t.add_column(col, no_wrap=True, justify="left" if col == "Category" else "right")
    t.add_column("p99 ms", no_wrap=True, justify="right")
    t.add_column("Preds", no_wrap=True, justify="right")
    t.add_column("Reason", no_wrap=True, overflow="ellipsis", ratio=1)
    for snap in snaps:
        t.add_row(*_session_row(snap, show_fd=show_fd))
    return t


def _counts(snaps: Sequence[EngineSnapshot]) -> dict[str, int]:
    counts = dict.fromkeys(_BUCKETS, 0)
    for s in snaps:
        counts[_bucket(s.status)] += 1
    return counts


def _sessions_header(snaps: Sequence[EngineSnapshot]) -> Text:
    """Totals on one line. The rate is each session's mean since its start, summed (cheap,
    and honest about being an average); the uptime is the longest session's, the hub's own
    to within its start-up."""
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append("EmoRecog-Stream hub", style="bold")
    head.append(f"  {len(snaps)} sessions: ")
    for i, (bucket, n) in enumerate(_counts(snaps).items()):
        head.append(", " if i else "")
        head.append(f"{n} {bucket}", style=_BUCKET_STYLE[bucket] if n else "dim")
    total = sum(s.predictions for s in snaps)
    rate = sum(s.predictions / s.uptime_s for s in snaps if s.uptime_s > 0)
    head.append(f"  predictions {total} (avg {rate:.1f}/s)")
    head.append(f"  uptime {_fmt_duration(max((s.uptime_s for s in snaps), default=0.0))}")
    head.append("  ? = rate not valid", style="dim")
    return head


def _pick_rows(
    snaps: Sequence[EngineSnapshot], height: int | None
) -> tuple[list[EngineSnapshot], list[EngineSnapshot]]:
    """(shown, left out): all by session id when they fit ``height`` lines, else worst first.

    A footer line is needed once rows are left out, so at most ``height - 3`` rows then.
    """
    by_id = sorted(snaps, key=lambda s: _natural_key(s.session_id))
    if height is None or len(by_id) + _SESSIONS_CHROME <= height:
        return by_id, []
    room = max(1, height - _SESSIONS_CHROME - 1)
    worst_first = sorted(by_id, key=_severity)  # stable: by id within a severity
    return worst_first[:room], worst_first[room:]


def _more_line(hidden: Sequence[EngineSnapshot]) -> Text:
    counts = _counts(hidden)
    what = ", ".join(f"{n} {b}" for b, n in counts.items() if n)
    return Text(f"+{len(hidden)} more ({what}): enlarge the terminal to see them", style="dim")


def _check_snapshots(snapshots: object) -> tuple[EngineSnapshot, ...]:
    snaps = tuple(snapshots)  # type: ignore[call-overload]
    for s in snaps:
        if not isinstance(s, EngineSnapshot):
            raise TypeError(f"expected EngineSnapshots, got {type(s).__name__}")
    return snaps


def _sessions_parts(
    snaps: Sequence[EngineSnapshot], width: int, height: int | None
) -> list[RenderableType]:
    """The sessions view, built now (so a bad snapshot fails here, not while printing)."""
    head = _sessions_header(snaps)
    if not snaps:
        return [head, Text(NO_SESSIONS, style="dim")]
    shown, hidden = _pick_rows(snaps, height)
    parts: list[RenderableType] = [head, _sessions_table(shown, width)]
    if hidden:
        parts.append(_more_line(hidden))
    return parts


class SessionsView:
    """The sessions table for a fixed list of snapshots, laid out at print time.

    ``width`` caps the table (the console's width otherwise); ``height`` is the number of
    lines it may take (None: every row, the way a file or a pipe wants it).
    """

    def __init__(
        self,
        snapshots: Sequence[EngineSnapshot],
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        self.snapshots = _check_snapshots(snapshots)
        self.width = width
        self.height = height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = min(self.width, options.max_width) if self.width else options.max_width
        yield Constrain(Group(*_sessions_parts(self.snapshots, width, self.height)), width)


def render_sessions(
    snapshots: Sequence[EngineSnapshot], *, width: int | None = None, height: int | None = None
) -> RenderableType:
    """A compact table with one line per session, sorted by session id (pure).

    Fits 64 sessions and its two heading lines into 66 lines; with ``height`` smaller than
    that, the worst sessions (offline, degraded, stalled streams) come first and a last line
    says how many were left out.
    """
    if width is not None and width < 1:
        raise ValueError(f"sessions table width must be >= 1, got {width}")
    if height is not None and height < 1:
        raise ValueError(f"sessions table height must be >= 1, got {height}")
    return SessionsView(snapshots, width=width, height=height)


class HubView:
    """What the hub shows for the snapshots ``source`` returns when it is printed.

    None: :data:`NO_SESSIONS`; one: the single-session dashboard (:func:`render`); more: the
    sessions table, cut to the screen's height with ``fit_screen``. With ``safe`` an error
    (in ``source`` or in a snapshot) becomes a red line instead of an exception.
    """

    def __init__(
        self,
        source: Callable[[], Sequence[EngineSnapshot]],
        *,
        fit_screen: bool = False,
        safe: bool = False,
    ) -> None:
        self.source = source
        self.fit_screen = fit_screen
        self.safe = safe

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        try:
            parts = self._parts(options)
        except Exception as exc:
            if not self.safe:
                raise
            parts = [_failure(exc)]
        yield from parts

    def _parts(self, options: ConsoleOptions) -> list[RenderableType]:
        snaps = _check_snapshots(self.source())
        if not snaps:
            return [Text(NO_SESSIONS, style="dim")]
        if len(snaps) == 1:
            return [DashboardView(snaps[0], safe=self.safe)]
        height = (options.height or options.size.height) if self.fit_screen else None
        return _sessions_parts(snaps, options.max_width, height)


def render_hub(snapshots: Sequence[EngineSnapshot]) -> RenderableType:
    """The hub's view of these snapshots (pure), as :class:`HubDashboard` shows them."""
    snaps = _check_snapshots(snapshots)
    return HubView(lambda: snaps)


_Screen = TypeVar("_Screen", bound="_LiveScreen")


class _LiveScreen:
    """What both live views share: rich's refresh thread, a capped rate, start/stop.

    Subclasses say what to show in :meth:`_current`, which rich calls from its own thread on
    every refresh (and once on :meth:`start` and :meth:`stop` from the caller's).
    """

    def __init__(self, console: Console | None, *, refresh_per_second: float, screen: bool) -> None:
        if not (0 < refresh_per_second <= MAX_REFRESH_HZ):
            raise ValueError(
                f"dashboard refresh rate must be in (0, {MAX_REFRESH_HZ:g}] Hz,"
                f" got {refresh_per_second}"
            )
        self.console = console or Console()
        self.refresh_per_second = float(refresh_per_second)
        self._live = Live(
            console=self.console,
            screen=screen,
            auto_refresh=True,
            refresh_per_second=self.refresh_per_second,
            get_renderable=self._current,
        )
        self._started = False
        self._lock = threading.Lock()

    def _current(self) -> RenderableType:
        raise NotImplementedError

    def start(self: _Screen) -> _Screen:
        with self._lock:
            if not self._started:
                self._live.start(refresh=True)
                self._started = True
        return self

    def stop(self) -> None:
        """Render once more and release the terminal (idempotent)."""
        with self._lock:
            if self._started:
                self._live.stop()
                self._started = False

    def __enter__(self: _Screen) -> _Screen:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Dashboard(_LiveScreen):
    """A live terminal view of the newest snapshot; ``update`` never blocks on the terminal.

    Use as a context manager or call :meth:`start`/:meth:`stop`. Refreshes at most
    ``refresh_per_second`` times a second (capped at :data:`MAX_REFRESH_HZ`) from rich's
    refresh thread; a rendering error shows on screen instead of killing that thread.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        refresh_per_second: float = 4.0,
        screen: bool = False,
    ) -> None:
        self._snapshot = EngineSnapshot()
        super().__init__(console, refresh_per_second=refresh_per_second, screen=screen)

    def _current(self) -> RenderableType:
        # one reference read (atomic); the snapshot is immutable, so no lock is needed
        return DashboardView(self._snapshot, safe=True)

    @property
    def snapshot(self) -> EngineSnapshot:
        """The snapshot shown next."""
        return self._snapshot

    def update(self, snapshot: EngineSnapshot) -> None:
        """Show this snapshot from the next refresh on (constant time, no rendering here)."""
        if not isinstance(snapshot, EngineSnapshot):
            raise TypeError(
                f"Dashboard.update expects an EngineSnapshot, got {type(snapshot).__name__}"
            )
        self._snapshot = snapshot

    async def follow(self, source: Callable[[], EngineSnapshot]) -> None:
        """Pull a fresh snapshot from ``source`` at the refresh rate until cancelled.

        Runs on the engine's event loop, so ``source`` (e.g. ``engine.snapshot``) is only ever
        called from the thread that owns the engine's state; it keeps lags and uptime moving
        while no prediction comes (a paused fMRI stream).
        """
        period = 1.0 / self.refresh_per_second
        while True:
            self.update(source())
            await asyncio.sleep(period)


class HubDashboard(_LiveScreen):
    """A live view of every session a hub serves, asked for afresh on each refresh.

    ``snapshots`` is called from rich's refresh thread (and on :meth:`start`/:meth:`stop` from
    the caller's), so it must be safe there: e.g. ``lambda: tuple(latest.values())`` over a
    dict whose values the hub's loop replaces with immutable snapshots. It shows the
    single-session dashboard for one session and the sessions table otherwise, cut to the
    terminal's height. If ``snapshots`` raises or a frame cannot be built, the error shows
    on screen and the next refresh tries again: the refresh thread never dies of it.
    """

    def __init__(
        self,
        snapshots: Callable[[], Sequence[EngineSnapshot]],
        console: Console | None = None,
        *,
        refresh_per_second: float = 2.0,
        screen: bool = False,
    ) -> None:
        if not callable(snapshots):
            raise TypeError(
                "HubDashboard expects a callable returning snapshots,"
                f" got {type(snapshots).__name__}"
            )
        self.snapshots = snapshots
        super().__init__(console, refresh_per_second=refresh_per_second, screen=screen)

    def _current(self) -> RenderableType:
        return HubView(self.snapshots, fit_screen=True, safe=True)


def _clock(utc: str | None) -> str:
    """``HH:MM:SS.mmm`` of an ISO 8601 time, or the text itself when it does not parse."""
    if not utc:
        return "--:--:--.---"
    try:
        dt = datetime.fromisoformat(utc.replace("Z", "+00:00"))
    except ValueError:
        return utc
    return dt.strftime("%H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def _log_rate(label: str, value: float | None, valid: bool, unit: str) -> str:
    if valid and value is not None and math.isfinite(value):
        return f"{label} {value:5.1f} {unit}"
    return f"{label} missing"


def _step_parts(
    utc: str | None,
    tr_index: int,
    category: str,
    probabilities: tuple[float, ...],
    intensity_text: str,
    heart_rate: tuple[float | None, bool],
    respiration_rate: tuple[float | None, bool],
    framewise_displacement: float | None = None,
) -> list[str]:
    """The fields a log line shows for one TR, whether it comes from a prediction or a snapshot.

    The framewise displacement is shown when known (a Motion stream delivers it).
    """
    fd = framewise_displacement
    motion = [f"FD {fd:.2f} mm"] if fd is not None and math.isfinite(fd) else []
    return [
        _clock(utc),
        f"TR {tr_index:4d}",
        f"{category:<8}",
        " ".join(
            f"{lab[:3]} {v:.2f}" for lab, v in zip(CATEGORY_LABELS, probabilities, strict=True)
        ),
        f"intensity {intensity_text}",
        _log_rate("HR", *heart_rate, "bpm"),
        _log_rate("RR", *respiration_rate, "/min"),
        *motion,
    ]


def format_log_line(item: Prediction | EngineSnapshot, *, mqtt_state: str | None = None) -> str:
    """One plain line per TR for headless runs (no colour codes, greppable).

    ``time TR n category neg/neu/pos intensity HR RR [FD] latency mqtt [flags]``; a missing
    rate is written ``missing``; FD (mm) appears when the volume's head motion is known. A
    snapshot carries its MQTT state; for a bare prediction pass ``mqtt_state`` (omitted from
    the line when None).
    """
    if isinstance(item, Prediction):
        p = item
        parts = _step_parts(
            p.utc, p.tr_index, p.category, p.probabilities, f"{p.intensity:+.2f}",
            (p.heart_rate, p.heart_rate_valid), (p.respiration_rate, p.respiration_rate_valid),
            p.framewise_displacement,
        )  # fmt: skip
        parts.append(f"latency {p.latency_ms:.1f} ms")
        if mqtt_state is not None:
            parts.append(f"mqtt {mqtt_state}")
        flags = p.flags
    elif isinstance(item, EngineSnapshot):
        s = item
        if s.probabilities is None or s.tr_index is None:
            parts = [_clock(s.utc), "TR    -", f"status {s.status}"]
            if s.status_reason:
                parts[-1] += f" ({s.status_reason})"
            parts.append("no prediction yet")
        else:
            parts = _step_parts(
                s.utc, s.tr_index, s.category or _MISSING, s.probabilities,
                _fmt(s.intensity, "+.2f"),
                (s.heart_rate, s.heart_rate_valid), (s.respiration_rate, s.respiration_rate_valid),
                s.framewise_displacement,
            )  # fmt: skip
            parts.append(f"latency {_fmt(s.latency.last_ms, '.1f', ' ms')}")
            if s.status.lower() not in ("online", "running"):
                parts.append(
                    f"status {s.status}" + (f" ({s.status_reason})" if s.status_reason else "")
                )
        parts.append(f"mqtt {mqtt_state if mqtt_state is not None else s.mqtt.state}")
        if s.mqtt.queued:
            parts[-1] += f" (queued {s.mqtt.queued})"
        flags = s.flags
    else:
        raise TypeError(
            f"format_log_line expects a Prediction or an EngineSnapshot, got {type(item).__name__}"
        )
    line = "  ".join(parts)
    if flags:
        line += "  [" + ",".join(flags) + "]"
    return line


def _ids(snaps: Sequence[EngineSnapshot], limit: int = 6) -> str:
    ids = sorted((s.session_id or _MISSING for s in snaps), key=_natural_key)
    more = f",+{len(ids) - limit}" if len(ids) > limit else ""
    return ",".join(ids[:limit]) + more


def format_hub_log_line(snapshots: Sequence[EngineSnapshot], *, now: datetime | None = None) -> str:
    """One plain line about all sessions, for a hub whose stdout is not a terminal.

    ``time  hub N sessions: a running, b degraded, c offline  predictions P`` and, when some
    are not running, which ones (the first few ids), so a log says whom to look at. Meant
    to be printed every few seconds next to the per-TR lines; ``now`` defaults to the clock.
    """
    snaps = _check_snapshots(snapshots)
    when = (now or datetime.now(timezone.utc)).isoformat(timespec="milliseconds")
    counts = _counts(snaps)
    parts = [
        _clock(when),
        f"hub {len(snaps)} sessions: " + ", ".join(f"{n} {b}" for b, n in counts.items()),
        f"predictions {sum(s.predictions for s in snaps)}",
    ]
    for bucket in ("offline", "degraded"):
        which = [s for s in snaps if _bucket(s.status) == bucket]
        if which:
            parts.append(f"{bucket}: {_ids(which)}")
    return "  ".join(parts)


class LogLinePrinter:
    """Headless output: one :func:`format_log_line` per prediction and a line per status change.

    Has the engine's output hooks (``on_prediction``, ``on_status``, ``aclose``); ``mqtt_state``
    (e.g. ``lambda: publisher.stats.state``) adds the broker connection to every line.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        mqtt_state: Callable[[], str] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.mqtt_state = mqtt_state
        self._last_status: tuple[str, str] | None = None

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def on_prediction(self, prediction: Prediction, step: object = None) -> None:
        state = self.mqtt_state() if self.mqtt_state is not None else None
        self._write(format_log_line(prediction, mqtt_state=state))

    def on_status(self, status: object) -> None:
        state = str(getattr(status, "state", status))
        reason = str(getattr(status, "reason", ""))
        if (state, reason) == self._last_status:
            return
        self._last_status = (state, reason)
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._write(f"{_clock(now)}  status {state}" + (f" ({reason})" if reason else ""))

    async def aclose(self) -> None:
        self.stream.flush()
