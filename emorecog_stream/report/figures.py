"""The report's figures: matplotlib with the Agg renderer -> PNG bytes.

Why matplotlib and PNG (not plotly or bokeh): the report is a static file that holds personal
health data, must open on an offline PC and must print. Plotly and bokeh draw in the browser with
JavaScript (several MB of it inlined, or fetched from a CDN), so the file would run scripts and
print whatever the screen happened to show; a PNG prints as drawn and lets the page forbid every
script (its Content-Security-Policy does). Figures are built with the object-oriented API
(``matplotlib.figure.Figure``), so no pyplot state and no GUI backend are involved.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from emorecog_stream.core.streams import CATEGORY_LABELS
from emorecog_stream.report.log_data import SessionView

__all__ = ["CATEGORY_COLOURS", "FigureImage", "make_figures"]

# Okabe-Ito colours (readable with the common colour-vision deficiencies, and in greyscale print)
CATEGORY_COLOURS = {"negative": "#D55E00", "neutral": "#7F7F7F", "positive": "#009E73"}
UNLABELLED_COLOUR = "#56B4E9"
STATE_COLOURS = {
    "starting": "#BBBBBB",
    "online": "#009E73",
    "degraded": "#E69F00",
    "paused": "#7F7F7F",
    "offline": "#333333",
}
DPI = 110
WIDTH_IN = 11.0


@dataclass(frozen=True)
class FigureImage:
    """One figure: ``name`` is its PNG file stem, ``title`` and ``caption`` go into the page."""

    name: str
    title: str
    caption: str
    png: bytes


def _png(fig: object) -> bytes:
    buf = io.BytesIO()
    # no "Software" entry: the file says what made it, not where matplotlib lives on the web
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": "emorecog-stream report"})
    return buf.getvalue()


def _broken(view: SessionView, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(time, values)`` with a NaN row inserted at every time gap and model reset, so a line
    is not drawn across a stretch with no volume."""
    breaks = [
        int(np.searchsorted(view.time, g.time))
        for g in view.gaps
        if g.kind in ("time gap", "model state reset")
    ]
    if not breaks:
        return view.time, values
    at = sorted(set(breaks))
    gap_row = np.full((len(at), *values.shape[1:]), np.nan)
    time = np.insert(view.time, at, np.nan)
    return time, np.insert(values.astype(np.float64), at, gap_row, axis=0)


def _shade_trials(ax: object, view: SessionView, *, labels: bool = False) -> None:
    few = len(view.trials) <= 40  # beyond that, the number alone stays legible
    for trial in view.trials:
        colour = CATEGORY_COLOURS.get(trial.category or "", UNLABELLED_COLOUR)
        ax.axvspan(trial.onset, trial.offset, color=colour, alpha=0.15, lw=0)
        if labels:
            text = f"{trial.index}"
            if few and trial.category is not None:
                text += f"\n{trial.category[:3]}"
            if few and trial.intensity is not None:
                text += f"\n{trial.intensity:+g}"
            ax.text(
                (trial.onset + trial.offset) / 2,
                1.02,
                text,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=6.5,
                color=colour,
                clip_on=False,
            )


def _mark_breaks(ax: object, view: SessionView) -> None:
    for gap in view.gaps:
        if gap.kind in ("time gap", "model state reset"):
            ax.axvline(gap.time, color="#CC79A7", lw=1.0, ls="--")


def timeline(view: SessionView) -> FigureImage:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, 6.4), layout="constrained")
    ax_p, ax_i = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    time, probabilities = _broken(view, view.probabilities)
    for k, label in enumerate(CATEGORY_LABELS):
        ax_p.plot(time, probabilities[:, k], color=CATEGORY_COLOURS[label], lw=1.2,
                  label=f"p({label})")  # fmt: skip
    _shade_trials(ax_p, view, labels=True)
    _mark_breaks(ax_p, view)
    ax_p.set_ylim(0, 1)
    ax_p.set_ylabel("probability")
    ax_p.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)

    ax_i.plot(*_broken(view, view.intensity), color="#0072B2", lw=1.2,
              label="predicted intensity")  # fmt: skip
    _shade_trials(ax_i, view)
    _mark_breaks(ax_i, view)
    shown = False
    for trial in view.trials:
        if trial.intensity is None:
            continue
        ax_i.hlines(
            trial.intensity,
            trial.onset + view.label_delay,
            trial.offset + view.label_delay,
            color="black",
            lw=2.0,
            label=None if shown else f"true intensity\n(scored window,\n+{view.label_delay:g} s)",
        )
        shown = True
    ax_i.axhline(0, color="#999999", lw=0.6)
    ax_i.set_ylim(-4.3, 4.3)
    ax_i.set_yticks(range(-4, 5, 2))
    ax_i.set_ylabel("intensity (-4..+4)")
    ax_i.set_xlabel("session time (s from the first prediction)")
    ax_i.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)
    caption = (
        "Predicted probabilities (top) and intensity (bottom) per TR. Shaded spans: trials from"
        " the start/end markers, coloured by their true category (blue: no category); above"
        " each: trial number, category and true intensity. Black bars: the true intensity over"
        f" the volumes scored for that trial (the span shifted by the {view.label_delay:g} s"
        " label delay). Dashed lines: time gaps and model state resets."
    )
    return FigureImage("timeline", "Timeline", caption, _png(fig))


def physiology(view: SessionView) -> FigureImage:
    from matplotlib.figure import Figure

    fd = view.framewise_displacement
    rows = 3 if fd is not None else 2
    fig = Figure(figsize=(WIDTH_IN, 1.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True)
    series = [
        (view.heart_rate, "heart rate (bpm)", "#CC3311"),
        (view.respiration_rate, "respiration (breaths/min)", "#0077BB"),
    ]
    if fd is not None:
        series.append((fd, "framewise displacement (mm)", "#6B4C9A"))
    for ax, (values, label, colour) in zip(axes, series, strict=True):
        _shade_trials(ax, view)
        ax.plot(*_broken(view, values), color=colour, lw=1.2)
        missing = ~np.isfinite(values)
        if missing.any():  # where the rate was missing, a tick on the bottom edge
            ax.plot(view.time[missing], np.zeros(int(missing.sum())), "|", color="#999999",
                    transform=ax.get_xaxis_transform(), ms=8)  # fmt: skip
        ax.set_ylabel(label, fontsize=9)
    axes[-1].set_xlabel("session time (s from the first prediction)")
    caption = (
        "Heart and respiration rate as fed to the model at each TR"
        + (", and framewise displacement" if fd is not None else "")
        + ". Grey ticks on the bottom edge: TRs where the value was missing."
    )
    title = "Heart rate, respiration" + (" and framewise displacement" if fd is not None else "")
    return FigureImage("physiology", title, caption, _png(fig))


def latency(view: SessionView) -> FigureImage:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, 3.4), layout="constrained")
    ax_h, ax_t = fig.subplots(1, 2, width_ratios=[1, 1.6])
    lat = view.latency_ms
    ok = np.isfinite(lat)
    pct = view.latency_percentiles()
    if pct is not None:
        ax_h.hist(lat[ok], bins=min(60, max(10, int(ok.sum()) // 5)), color="#0072B2")
        for q, style in (("p50", "-"), ("p99", "--")):
            ax_h.axvline(pct[q], color="black", ls=style, lw=1.0, label=f"{q} {pct[q]:.2f} ms")
        ax_h.legend(fontsize=8)
    ax_h.set_xlabel("latency (ms)")
    ax_h.set_ylabel("predictions")
    ax_t.plot(view.time[ok], lat[ok], ".", ms=3, color="#0072B2")
    ax_t.set_xlabel("session time (s)")
    ax_t.set_ylabel("latency (ms)")
    caption = (
        "Per-prediction latency as logged by the engine (step ready -> hand-off to the"
        " outputs): distribution (left) and over the session (right)."
    )
    return FigureImage("latency", "Latency", caption, _png(fig))


def intervals(view: SessionView) -> FigureImage:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, 3.2), layout="constrained")
    ax_d, ax_s = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if view.time.size > 1:
        steps = np.diff(view.time)
        ax_d.plot(view.time[1:], steps, ".-", ms=3, lw=0.8, color="#0072B2")
        # from 0, so clock jitter of microseconds stays flat and a gap stands out
        top = max(float(steps.max()), 2 * (view.tr or 0.0))
        ax_d.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    if view.tr:
        ax_d.axhline(view.tr, color="black", lw=0.8, ls=":", label=f"TR {view.tr:.3g} s")
        ax_d.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)
    _mark_breaks(ax_d, view)
    ax_d.set_ylabel("s since previous\nvolume", fontsize=9)
    timed = [s for s in view.statuses if s.time is not None]
    end = float(view.time[-1]) if view.time.size else 0.0
    for k, s in enumerate(timed):
        stop = timed[k + 1].time if k + 1 < len(timed) else max(end, s.time)
        ax_s.broken_barh([(s.time, max(stop - s.time, 1e-9))], (0, 1),
                         color=STATE_COLOURS.get(s.state, "#CC79A7"))  # fmt: skip
    for state in sorted({s.state for s in timed}):
        ax_s.plot([], [], "s", color=STATE_COLOURS.get(state, "#CC79A7"), label=state)
    if timed:
        ax_s.legend(loc="center left", bbox_to_anchor=(1.005, 0.5), fontsize=7, frameon=False)
    ax_s.set_yticks([])
    ax_s.set_ylabel("status", fontsize=9)
    ax_s.set_xlabel("session time (s)")
    caption = (
        "Interval between consecutive volumes (top; a jump is a gap) and the engine's status"
        " over the session (bottom; placed through the predictions' UTC times)."
    )
    return FigureImage("intervals", "Volume intervals and status", caption, _png(fig))


def make_figures(view: SessionView) -> list[FigureImage]:
    """The report's figures, in page order (none when the log holds no prediction)."""
    if view.n_predictions == 0:
        return []
    return [timeline(view), physiology(view), latency(view), intervals(view)]
