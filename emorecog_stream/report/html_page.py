"""The report as one HTML file, and writing it (and the PNGs) readable by the owner only.

Self-contained on purpose: figures are ``data:`` PNGs, the style sheet is inline, and there is
no script and no URL, so the file opens on an offline control-room PC and can be mailed or
archived as one object. A Content-Security-Policy in the page forbids scripts and every load
that is not an embedded image, so even text that slipped past escaping could not run or call out.

Everything that comes from the log (session and model ids, marker texts, status reasons, file
names) is written through :func:`html.escape`: the log is written from messages that others send
(a marker stream is any LSL outlet on the network).
"""

from __future__ import annotations

import base64
import html
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from emorecog_stream.report.figures import FigureImage
from emorecog_stream.report.log_data import SessionView

__all__ = ["render_report", "write_private"]

DISCLAIMER = "Research software, not a medical device: not for diagnosis or treatment."
PRIVACY = (
    "This file holds personal health data (brain-state predictions, heart and respiration rate"
    " of one participant's session). Store, share and delete it as your ethics approval and"
    " data-protection rules require; it was written readable by its owner only."
)
METRIC_COLUMNS = (
    ("n", "n", 0),
    ("accuracy", "accuracy", 3),
    ("chance_accuracy", "chance", 3),
    ("macro_f1", "macro-F1", 3),
    ("intensity_mae", "intensity MAE", 2),
    ("intensity_mae_predicting_0", "MAE if 0", 2),
    ("intensity_pearson_r", "Pearson r", 3),
)
MQTT_ORDER = ("sent", "queued", "dropped", "unsent_at_close", "reconnects", "last_error", "url")
ENGINE_ORDER = ("predictions", "steps", "resets", "rejected_chunks", "model_errors", "markers")

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1a1a1a; margin: 24px auto; max-width: 1180px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; border-bottom: 1px solid #ccc; padding-bottom: 3px; margin-top: 28px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.banner { border: 1px solid #c9a227; background: #fff8e1; padding: 8px 12px; margin: 10px 0;
          border-radius: 4px; }
.notes { border-left: 4px solid #E69F00; padding: 2px 12px; background: #fafafa; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { background: #f3f3f3; font-weight: 600; }
thead th { background: #f3f3f3; }
table.status td:first-child { white-space: nowrap; }
td.text { font-family: ui-monospace, "DejaVu Sans Mono", monospace; word-break: break-all;
          max-width: 520px; }
figure { margin: 8px 0 16px; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; }
.muted { color: #666; }
footer { margin-top: 30px; font-size: 12px; color: #666; }
@page { size: A4; margin: 14mm; }
@media print {
  body { margin: 0; max-width: none; font-size: 11px; }
  table { font-size: 10px; }
  section { break-before: page; }
  section.first { break-before: auto; }
  figure, table, h2, h3 { break-inside: avoid; }
  h2 { break-after: avoid; }
  .banner { background: none; }
}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits == 0:
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    cls: str = "",
    numeric: Iterable[int] = (),
    text_column: int | None = None,
) -> str:
    """A table of escaped cells; ``numeric`` columns right-aligned, ``text_column`` monospace."""
    numeric = set(numeric)

    def kind(i: int) -> str:
        return "num" if i in numeric else "text" if i == text_column else ""

    out = [f'<table class="{_esc(cls)}"><thead><tr>']
    out += [f'<th class="{kind(i)}">{_esc(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = "".join(f'<td class="{kind(i)}">{_esc(v)}</td>' for i, v in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _facts(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="facts">{rows}</table>'


def _figure(fig: FigureImage) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    # the PNG's own size (IHDR), so the page is laid out before the image is decoded
    width, height = struct.unpack(">II", fig.png[16:24])
    return (
        f'<figure id="fig-{_esc(fig.name)}"><img alt="{_esc(fig.title)}" width="{width}"'
        f' height="{height}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(fig.caption)}</figcaption></figure>"
    )


def _time(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _header(view: SessionView, generated_utc: str, version: str) -> str:
    end = view.end_utc or "(no session_end record)"
    if view.end_reason:
        end += f" ({view.end_reason})"
    pct = view.latency_percentiles()
    facts = [
        ("session", view.session or "(unknown)"),
        ("model", view.model_id or "(unknown)"),
        ("started (UTC)", view.start_utc or "(unknown)"),
        ("ended (UTC)", end),
        ("software that ran the session", view.software or "(unknown)"),
        ("log file", f"{view.path.name} (run {view.run_number} of {view.n_runs})"),
        ("predictions", view.n_predictions),
        ("TR", "-" if view.tr is None else f"{view.tr:.3g} s (median interval between volumes)"),
        ("trials", len(view.trials)),
        ("latency p50 / p99", "-" if pct is None else f"{pct['p50']:.2f} / {pct['p99']:.2f} ms"),
    ]
    if view.time_scale != 1.0:
        facts.append(("replay speed", f"{view.time_scale:g}x"))
    notes = ""
    if view.notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in view.notes)
        notes = f'<div class="notes"><h3>Notes</h3><ul>{items}</ul></div>'
    return (
        '<section class="first" id="session"><header>'
        f"<h1>Session report: {_esc(view.session or '(unknown session)')}</h1>"
        f'<p class="muted">Made {_esc(generated_utc)} by emorecog-stream {_esc(version)} from'
        f" {_esc(view.path.name)}.</p>"
        f'<p class="banner"><strong>{_esc(DISCLAIMER)}</strong><br>{_esc(PRIVACY)}</p>'
        "</header><h2>Session</h2>"
        f"{_facts(facts)}{notes}</section>"
    )


def _accuracy(view: SessionView) -> str:
    head = '<section id="accuracy"><h2>Accuracy against the trial labels</h2>'
    if view.metrics is None:
        return head + (
            "<p>Not computed: the log holds no trial markers with a category (record the"
            " markers stream with labels to score a session).</p></section>"
        )
    m = view.metrics
    rows = []
    for key, label in (("per_trial", "per trial"), ("per_tr", "per TR")):
        f = m.get(key, {})
        cells = [f'<th>{_esc(label)}</th>']
        for name, _title, digits in METRIC_COLUMNS:
            value = f.get(name, 0 if name == "n" else None)
            exact = "" if value is None else repr(float(value)) if name != "n" else str(value)
            cells.append(
                f'<td class="num" data-key="{_esc(name)}" data-value="{_esc(exact)}">'
                f"{_esc(_num(value, digits))}</td>"
            )
        rows.append(f'<tr data-view="{_esc(key)}">{"".join(cells)}</tr>')
    header = "".join(f'<th class="num">{_esc(t)}</th>' for _, t, _ in METRIC_COLUMNS)
    table = (
        f'<table class="metrics" id="metrics"><thead><tr><th>view</th>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    explain = (
        "<p>The definitions of <code>emorecog-stream evaluate</code>: a trial labels the volumes"
        f" from its onset + {view.label_delay:g} s to its offset + {view.label_delay:g} s (the"
        " hemodynamic delay; <code>--label-delay</code>); <em>per TR</em> scores every labelled"
        " volume, <em>per trial</em> the prediction at each trial's last labelled volume. The"
        " predicted category is the most probable one; intensity MAE is on the -4..+4 scale,"
        f" beside the MAE of always predicting 0. {view.labelled_volumes} labelled volume(s).</p>"
    )
    confusion = []
    for key, label in (("per_trial", "per trial"), ("per_tr", "per TR")):
        conf = m.get(key, {}).get("confusion")
        if not conf:
            continue
        counts = conf["counts"]
        head_row = "".join(
            f'<th class="num">{_esc(c)}</th>' for c in conf["rows_true_cols_pred"]
        )
        body = "".join(
            f'<tr data-true="{_esc(true)}"><th>{_esc(true)}</th>'
            + "".join(f'<td class="num">{int(n)}</td>' for n in counts[i])
            + "</tr>"
            for i, true in enumerate(conf["rows_true_cols_pred"])
        )
        confusion.append(
            f"<h3>Confusion, {_esc(label)} (rows: true category; columns: predicted)</h3>"
            f'<table class="confusion" data-view="{_esc(key)}"><thead><tr><th>true \\ predicted'
            f"</th>{head_row}</tr></thead><tbody>{body}</tbody></table>"
        )
    note = f'<p class="muted">{_esc(m.get("finalscore", ""))}</p>' if m.get("finalscore") else ""
    return head + table + explain + "".join(confusion) + note + "</section>"


def _status_and_gaps(view: SessionView, figures: dict[str, FigureImage]) -> str:
    parts = ['<section id="status"><h2>Status changes and gaps</h2>']
    if "intervals" in figures:
        parts.append(_figure(figures["intervals"]))
    parts.append("<h3>Status changes</h3>")
    durations = view.time_in_states()
    if durations:
        total = sum(durations.values())
        parts.append(
            _table(
                ("state", "session time (s)", "share"),
                (
                    (state, f"{d:.1f}", f"{100 * d / total:.1f} %" if total > 0 else "-")
                    for state, d in durations.items()
                ),
                numeric={1, 2},
            )
        )
    if view.statuses:
        parts.append(
            _table(
                ("UTC", "session time (s)", "state", "reason", "missing"),
                ((s.utc, _time(s.time), s.state, s.reason, s.missing) for s in view.statuses),
                numeric={1},
                cls="status",
            )
        )
    else:
        parts.append("<p>No status record in this run.</p>")
    parts.append("<h3>Gaps</h3>")
    if view.gaps:
        parts.append(
            _table(
                ("session time (s)", "what", "detail"),
                ((_time(g.time), g.kind, g.detail) for g in view.gaps),
                numeric={0},
            )
        )
    elif view.n_predictions:
        parts.append(
            "<p>None: every volume followed the previous one within 1.5 TR, with consecutive TR"
            " indices and sequence numbers.</p>"
        )
    if view.flag_counts:
        parts.append("<h3>Prediction flags</h3>")
        parts.append(
            _table(
                ("flag", "predictions"),
                sorted(view.flag_counts.items()),
                numeric={1},
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _counters(values: dict[str, Any], first: Sequence[str]) -> str:
    keys = [k for k in first if k in values] + sorted(k for k in values if k not in first)
    shown = (
        (k, ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v)
        for k, v in ((k, values[k]) for k in keys)
    )
    return _facts((k, "-" if v is None else v) for k, v in shown)


def _mqtt(view: SessionView) -> str:
    head = '<section id="mqtt"><h2>MQTT delivery and engine counters</h2>'
    if view.mqtt is None:
        body = (
            "<p>Not recorded: this log has no <code>summary</code> record (logs of runs that"
            " died, and of versions before it, have none). The engine printed the counters"
            " when it stopped (<code>stopped: ... MQTT sent N, unsent N, dropped N</code>).</p>"
        )
    else:
        body = (
            "<p>At the end of the run, after the queue was flushed: <em>sent</em> = acknowledged"
            " by the broker, <em>queued</em> = still waiting, <em>dropped</em> = removed from a"
            " full queue (oldest first), <em>unsent_at_close</em> = lost at shutdown.</p>"
            + _counters(view.mqtt, MQTT_ORDER)
        )
    if view.engine_counters is not None:
        body += "<h3>Engine</h3>" + _counters(view.engine_counters, ENGINE_ORDER)
    return head + body + "</section>"


def _markers(view: SessionView) -> str:
    head = '<section id="markers"><h2>Trial markers</h2>'
    if not view.markers:
        return head + "<p>No marker in this run.</p></section>"
    rows = (
        (
            _time(m.time),
            m.event,
            m.trial,
            m.category,
            m.intensity,
            "yes" if m.is_trial_marker else "no",
            "" if m.is_trial_marker else m.text,
        )
        for m in view.markers
    )
    return (
        head
        + "<p>Every marker as logged; the text as it came for markers that are not trial"
        " markers.</p>"
        + _table(
            ("session time (s)", "event", "trial", "category", "intensity", "used", "text"),
            rows,
            cls="markers",
            numeric={0},
            text_column=6,
        )
        + "</section>"
    )


def render_report(
    view: SessionView, figures: Sequence[FigureImage], *, generated_utc: str, version: str
) -> str:
    """The whole HTML document for ``view`` with ``figures`` embedded."""
    by_name = {f.name: f for f in figures}
    sections = [_header(view, generated_utc, version)]
    if "timeline" in by_name:
        sections.append(f'<section id="timeline"><h2>Timeline</h2>{_figure(by_name["timeline"])}')
        sections.append("</section>")
    if "physiology" in by_name:
        fig = by_name["physiology"]
        sections.append(f'<section id="physiology"><h2>{_esc(fig.title)}</h2>{_figure(fig)}')
        if view.framewise_displacement is None:
            sections.append(
                '<p class="muted">No framewise displacement in this log (no motion stream).</p>'
            )
        sections.append("</section>")
    if "latency" in by_name:
        pct = view.latency_percentiles()
        sections.append(f'<section id="latency"><h2>Latency</h2>{_figure(by_name["latency"])}')
        if pct is not None:
            sections.append(
                _table(
                    ("predictions", "p50 (ms)", "p99 (ms)", "max (ms)"),
                    [(pct["n"], f"{pct['p50']:.2f}", f"{pct['p99']:.2f}", f"{pct['max']:.2f}")],
                    numeric={0, 1, 2, 3},
                )
            )
        sections.append("</section>")
    sections.append(_status_and_gaps(view, by_name))
    sections.append(_mqtt(view))
    sections.append(_accuracy(view))
    sections.append(_markers(view))
    title = f"Session report: {view.session or '(unknown session)'}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';'
        " img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(sections)
        + f"<footer>{_esc(DISCLAIMER)}</footer></body></html>\n"
    )


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path``, readable and writable by its owner only (0600, or less where
    the umask says so), replacing any earlier file in one step.

    Why a new file and a rename (:func:`emorecog_stream.private_files.replace_private`): a report
    or figure holds personal health data, so it must never exist, even for a moment, with wider
    permissions (``open()`` then ``chmod`` would leave a window, and rewriting an existing file
    would keep *its* mode); a failed write leaves the target as it was.
    """
    from emorecog_stream.private_files import replace_private

    target = Path(path)
    with replace_private(target) as f:
        f.write(data)
    return target
