"""Terminal dashboard (rich) and the headless one-line-per-TR log.

:func:`render` turns an :class:`~emorecog_stream.telemetry.EngineSnapshot` into a rich
renderable and does nothing else, so it can be tested with ``Console(record=True)``.
:class:`Dashboard` shows it live: :meth:`Dashboard.update` only swaps a reference to the newest
(immutable) snapshot, and rich's own refresh thread renders it at a capped rate, so the engine
never waits for the terminal. Without a dashboard (``--no-dashboard``) the engine prints
:func:`format_log_line` once per TR instead.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from emorecog_stream.messages import Prediction
from emorecog_stream.streams import CATEGORY_LABELS, INTENSITY_RANGE
from emorecog_stream.telemetry import EngineSnapshot, StreamState, StreamStats

__all__ = [
    "HEMODYNAMIC_NOTE",
    "MAX_REFRESH_HZ",
    "Dashboard",
    "LogLinePrinter",
    "bar",
    "format_log_line",
    "render",
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


def _status_style(status: str) -> str:
    s = status.lower()
    if s in ("running", "ok", "online"):
        return "bold green"
    if s in ("stopped", "offline", "error", "failed"):
        return "bold red"
    return "bold yellow"  # starting, waiting, degraded, paused, ...


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


def _streams_table(streams: Sequence[StreamStats]) -> Table:
    t = Table(title="Input streams", title_justify="left", expand=True, pad_edge=False)
    for col, justify in (
        ("Stream", "left"),
        ("Name", "left"),
        ("Nominal", "right"),
        ("Measured", "right"),
        ("Lag", "right"),
        ("Buffer", "left"),
        ("Gaps", "right"),
        ("Overflows", "right"),
        ("State", "left"),
    ):
        t.add_column(col, justify=justify, no_wrap=col != "Name")
    if not streams:
        t.add_row("(none yet)", "", "", "", "", "", "", "", "")
    for s in streams:
        state = Text(s.state.value, style=_STATE_STYLE.get(s.state, ""))
        if s.note:
            state.append(f" ({s.note})", style="dim")
        t.add_row(
            s.role,
            s.name,
            _fmt_rate(s.nominal_rate, nominal=True),
            _fmt_rate(s.measured_rate),
            _fmt(s.lag_s, ".2f", " s"),
            f"{bar(s.buffer_fill, 6)} {s.buffer_fill * 100:3.0f}%",
            Text(str(s.gaps), style="yellow" if s.gaps else ""),
            Text(str(s.overflows), style="red" if s.overflows else ""),
            state,
        )
    return t


def _rate_line(
    label: str, value: float | None, valid: bool, unit: str, quality: float | None
) -> Text:
    line = Text(f"{label:<17}")
    if valid and value is not None and math.isfinite(value):
        line.append(f"{value:6.1f} {unit}", style="bold")
        if quality is not None:
            line.append(f"  quality {quality:.2f}", style="dim")
    else:
        line.append("missing", style="bold yellow")
    return line


def _physio_panel(snap: EngineSnapshot) -> Panel:
    body = Group(
        _rate_line(
            "Heart rate", snap.heart_rate, snap.heart_rate_valid, "bpm", snap.heart_rate_quality
        ),
        _rate_line(
            "Respiration rate",
            snap.respiration_rate,
            snap.respiration_rate_valid,
            "breaths/min",
            snap.respiration_rate_quality,
        ),
    )
    return Panel(body, title="Physiology", title_align="left")


def _prediction_panel(snap: EngineSnapshot, bar_width: int = 24) -> Panel:
    if snap.probabilities is None:
        return Panel(
            Text("waiting for the first prediction", style="dim"),
            title="Emotion",
            title_align="left",
        )
    lines: list[RenderableType] = []
    top = max(range(len(snap.probabilities)), key=lambda i: snap.probabilities[i])  # type: ignore[index]
    for i, (label, p) in enumerate(zip(CATEGORY_LABELS, snap.probabilities, strict=True)):
        style = "bold cyan" if i == top else "cyan"
        line = Text(f"{label:<9} ")
        line.append(bar(p, bar_width), style=style)
        line.append(f" {p * 100:5.1f}%")
        lines.append(line)
    lo, hi = INTENSITY_RANGE
    cat = Text("category  ")
    cat.append(snap.category or _MISSING, style="bold")
    cat.append("   intensity ")
    cat.append(_fmt(snap.intensity, "+.2f"), style="bold")
    cat.append(f"  ({lo:+.0f}..{hi:+.0f})", style="dim")
    lines.append(cat)
    trend = Text(f"trend     {lo:+.0f} ")
    trend.append(sparkline(snap.intensity_history, lo, hi) or " ", style="magenta")
    trend.append(f" {hi:+.0f}  ")
    trend.append(f"last {len(snap.intensity_history)} TRs", style="dim")
    lines.append(trend)
    if snap.flags:
        lines.append(Text("flags     " + ", ".join(snap.flags), style="yellow"))
    return Panel(Group(*lines), title="Emotion (last TR)", title_align="left")


def _outputs_panel(snap: EngineSnapshot) -> Panel:
    lat = snap.latency
    lat_line = Text("Latency  ")
    lat_line.append(f"p50 {_fmt(lat.p50_ms, '.1f', ' ms')}  p99 {_fmt(lat.p99_ms, '.1f', ' ms')}  ")
    lat_line.append(f"max {_fmt(lat.max_ms, '.1f', ' ms')}  (n={lat.count})", style="dim")
    m = snap.mqtt
    mq = Text("MQTT     ")
    mq.append(m.state, style=_mqtt_style(m.state))
    protocol = getattr(m, "protocol", None)  # sinks.mqtt's stats say which MQTT version
    if protocol:
        mq.append(f" (MQTT {protocol})", style="dim")
    if snap.broker_url:
        mq.append(f"  {snap.broker_url}", style="dim")
    mq.append(f"\n         sent {m.sent}  queued {m.queued}  dropped {m.dropped}")
    mq.append(f"  reconnects {m.reconnects}")
    lines: list[RenderableType] = [lat_line, mq]
    if m.last_error:
        lines.append(Text(f"         last error: {m.last_error}", style="red"))
    return Panel(Group(*lines), title="Outputs", title_align="left")


def render(snapshot: EngineSnapshot) -> RenderableType:
    """The whole dashboard for one snapshot (pure: reads the snapshot, returns a renderable)."""
    snap = snapshot
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

    middle = Table.grid(expand=True, padding=(0, 1))
    middle.add_column(ratio=1)
    middle.add_column(ratio=1)
    middle.add_row(_prediction_panel(snap), Group(_physio_panel(snap), _outputs_panel(snap)))
    return Group(
        head,
        status,
        _streams_table(snap.streams),
        middle,
        Text(HEMODYNAMIC_NOTE, style="dim italic"),
    )


class Dashboard:
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
        if not (0 < refresh_per_second <= MAX_REFRESH_HZ):
            raise ValueError(
                f"dashboard refresh rate must be in (0, {MAX_REFRESH_HZ:g}] Hz,"
                f" got {refresh_per_second}"
            )
        self.console = console or Console()
        self.refresh_per_second = float(refresh_per_second)
        self._snapshot = EngineSnapshot()
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
        snap = self._snapshot  # one reference read: atomic, the snapshot is immutable
        try:
            return render(snap)
        except Exception as exc:  # show, do not kill the refresh thread
            return Text(
                f"dashboard rendering failed: {type(exc).__name__}: {exc}", style="bold red"
            )

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

    def start(self) -> Dashboard:
        with self._lock:
            if not self._started:
                self._live.start(refresh=True)
                self._started = True
        return self

    def stop(self) -> None:
        """Render the last snapshot once more and release the terminal (idempotent)."""
        with self._lock:
            if self._started:
                self._live.stop()
                self._started = False

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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


def format_log_line(item: Prediction | EngineSnapshot, *, mqtt_state: str | None = None) -> str:
    """One plain line per TR for headless runs (no colour codes, greppable).

    ``time TR n category neg/neu/pos intensity HR RR latency mqtt [flags]``; a missing rate is
    written ``missing``. A snapshot carries its MQTT state; for a bare prediction pass
    ``mqtt_state`` (omitted from the line when None).
    """
    if isinstance(item, Prediction):
        p = item
        parts = [_clock(p.utc), f"TR {p.tr_index:4d}", f"{p.category:<8}"]
        parts.append(
            " ".join(
                f"{lab[:3]} {v:.2f}"
                for lab, v in zip(CATEGORY_LABELS, p.probabilities, strict=True)
            )
        )
        parts.append(f"intensity {p.intensity:+.2f}")
        parts.append(_log_rate("HR", p.heart_rate, p.heart_rate_valid, "bpm"))
        parts.append(_log_rate("RR", p.respiration_rate, p.respiration_rate_valid, "/min"))
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
            parts = [_clock(s.utc), f"TR {s.tr_index:4d}", f"{s.category or _MISSING:<8}"]
            parts.append(
                " ".join(
                    f"{lab[:3]} {v:.2f}"
                    for lab, v in zip(CATEGORY_LABELS, s.probabilities, strict=True)
                )
            )
            parts.append(f"intensity {_fmt(s.intensity, '+.2f')}")
            parts.append(_log_rate("HR", s.heart_rate, s.heart_rate_valid, "bpm"))
            parts.append(_log_rate("RR", s.respiration_rate, s.respiration_rate_valid, "/min"))
            parts.append(f"latency {_fmt(s.latency.last_ms, '.1f', ' ms')}")
            if s.status.lower() != "running":
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
