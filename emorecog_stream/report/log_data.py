"""Read a JSONL session log and derive what the report shows.

The log is the audit record ``run --log`` writes (:mod:`emorecog_stream.sinks.jsonl`): one JSON
object per line with a ``kind``. A file opened for appending may hold several runs, each starting
with ``session_start``; the report shows one run (the last by default).

Why this reader is lenient where :func:`~emorecog_stream.sinks.jsonl.read_log` is strict: a
report is how people look at a session *after* something went wrong, so a cut-off last line (the
engine was killed mid-write) or a damaged line in the middle becomes a note in the report, not a
refusal. A file that is not a session log at all (its first line is not a log record) or holds no
record is refused with a message naming what was expected.

Accuracy uses ``evaluate``'s own definitions, not a copy of them: the volumes are labelled by
:func:`emorecog_stream.model.data.label_volumes` (a trial labels the volumes in
``[onset + label_delay, offset + label_delay)``) and scored by
:func:`emorecog_stream.model.metrics.evaluate_arrays` (per TR: every labelled volume; per trial:
the prediction at each trial's last labelled volume).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from emorecog_stream.core.streams import CATEGORY_LABELS

__all__ = [
    "Gap",
    "LoadedLog",
    "LogRun",
    "MarkerRow",
    "ReportInputError",
    "SessionView",
    "StatusRow",
    "TrialSpan",
    "read_session_log",
    "session_view",
]

LOG_HINT = "a session log (JSONL) as written by 'emorecog-stream run --log FILE'"
MAX_LISTED_BAD_LINES = 5


class ReportInputError(ValueError):
    """The file is not a session log the report can read (the message says what was expected)."""


@dataclass
class LogRun:
    """The records of one engine run (from one ``session_start`` to the next)."""

    start: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    markers: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None  # a ``summary`` record, where the engine wrote one
    reopened: list[dict[str, Any]] = field(default_factory=list)  # ``log_reopened`` records
    other_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class LoadedLog:
    """A log file read back: its runs and what had to be skipped."""

    path: Path
    runs: list[LogRun]
    cut_off_bytes: int = 0  # bytes of a last line cut off mid-write (0: none)
    bad_lines: list[int] = field(default_factory=list)  # damaged lines in the middle, skipped


def _add(run: LogRun, rec: dict[str, Any]) -> None:
    kind = rec["kind"]
    if kind == "prediction":
        run.predictions.append(rec)
    elif kind == "status":
        run.statuses.append(rec)
    elif kind == "marker":
        run.markers.append(rec)
    elif kind == "session_end":
        run.end = rec
    elif kind == "summary":
        run.summary = rec
    elif kind == "log_reopened":  # the file was deleted under the engine and created again
        run.reopened.append(rec)
    else:
        run.other_kinds[str(kind)] = run.other_kinds.get(str(kind), 0) + 1


def read_session_log(path: str | Path) -> LoadedLog:
    """Read every record of ``path``, split into runs; raise :class:`ReportInputError` when the
    file cannot be read, is empty, or does not start like a session log."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ReportInputError(f"{str(p)!r} is a directory; expected {LOG_HINT}")
        data = p.read_bytes()
    except OSError as exc:
        raise ReportInputError(
            f"cannot read {str(p)!r}: {exc.strerror or exc} (expected {LOG_HINT})"
        ) from None
    if not data.strip():
        raise ReportInputError(f"{str(p)!r} is empty; expected {LOG_HINT}")
    lines = data.split(b"\n")
    runs: list[LogRun] = []
    bad: list[int] = []
    cut_off = 0
    first_seen = False
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rec: Any
        try:
            rec = json.loads(raw)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("kind"), str)):
            if number == len(lines):  # no newline after it: a write cut off when the run died
                cut_off = len(raw)
                continue
            if not first_seen:
                found = "not JSON" if rec is None else f"JSON {type(rec).__name__} without 'kind'"
                raise ReportInputError(
                    f"{str(p)!r} line {number} is {found}; expected {LOG_HINT}"
                    " (one JSON object with a 'kind' per line)"
                )
            bad.append(number)
            continue
        first_seen = True
        if rec["kind"] == "session_start" or not runs:
            runs.append(LogRun())
        if rec["kind"] == "session_start":
            runs[-1].start = rec
        else:
            _add(runs[-1], rec)
    if not runs:
        raise ReportInputError(
            f"{str(p)!r} holds no complete record (its only line was cut off); expected {LOG_HINT}"
        )
    return LoadedLog(path=p, runs=runs, cut_off_bytes=cut_off, bad_lines=bad)


# -- what the report shows ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSpan:
    """A trial from its start/end markers, on the report's time axis (session seconds)."""

    index: int
    onset: float
    offset: float
    category: str | None  # "negative" | "neutral" | "positive"; None when not labelled
    intensity: float | None


@dataclass(frozen=True)
class MarkerRow:
    """One marker record as logged; ``text`` is shown verbatim (escaped) in the report."""

    time: float | None  # session seconds
    event: str
    trial: str
    category: str
    intensity: str
    text: str
    is_trial_marker: bool


@dataclass(frozen=True)
class StatusRow:
    utc: str
    state: str
    reason: str
    missing: str
    time: float | None  # session seconds, mapped from UTC through the predictions' UTC times


@dataclass(frozen=True)
class Gap:
    kind: str  # "time gap" | "TR index jump" | "model state reset" | "sequence jump"
    time: float  # session seconds of the prediction after the gap
    detail: str


@dataclass
class SessionView:
    """Everything one report shows, derived from one run of a log."""

    path: Path
    run_number: int  # 1-based
    n_runs: int
    session: str
    model_id: str
    software: str
    start_utc: str
    end_utc: str
    end_reason: str
    meta: dict[str, Any]
    time_scale: float
    label_delay: float
    tr: float | None  # seconds (median interval between volumes), None with < 2 predictions
    time: np.ndarray  # (N,) session seconds of each volume, 0 = first prediction
    tr_index: np.ndarray
    sequence: np.ndarray
    probabilities: np.ndarray  # (N, 3) in CATEGORY_LABELS order
    intensity: np.ndarray
    heart_rate: np.ndarray  # NaN where missing
    respiration_rate: np.ndarray
    framewise_displacement: np.ndarray | None  # None: the log carries no FD at all
    latency_ms: np.ndarray
    flag_counts: dict[str, int]
    trials: list[TrialSpan]
    markers: list[MarkerRow]
    statuses: list[StatusRow]
    gaps: list[Gap]
    mqtt: dict[str, Any] | None  # the publisher's counters from the run's summary record
    engine_counters: dict[str, Any] | None  # the engine's counters from the same record
    metrics: dict[str, Any] | None  # evaluate_arrays' figures; None when markers carry no labels
    labelled_volumes: int
    notes: list[str]

    @property
    def n_predictions(self) -> int:
        return int(self.time.shape[0])

    def time_in_states(self) -> dict[str, float]:
        """Session seconds spent in each status, from the first timed status change to the last
        prediction (or the last change, if later); in order of first appearance."""
        timed = [s for s in self.statuses if s.time is not None]
        out: dict[str, float] = {}
        if not timed:
            return out
        end = max(float(self.time[-1]) if self.time.size else timed[-1].time, timed[-1].time)
        for k, s in enumerate(timed):
            stop = timed[k + 1].time if k + 1 < len(timed) else end
            out[s.state] = out.get(s.state, 0.0) + max(0.0, stop - s.time)
        return out

    def latency_percentiles(self) -> dict[str, float] | None:
        """p50/p99/max of the logged per-step latency (linear-interpolated, as the engine's)."""
        lat = self.latency_ms[np.isfinite(self.latency_ms)]
        if lat.size == 0:
            return None
        p50, p99 = np.percentile(lat, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "max": float(lat.max()), "n": int(lat.size)}


def _float(value: Any) -> float:
    """A logged number as float; NaN for null, missing or anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _utc_seconds(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _trial_marker(info: dict[str, Any] | None) -> bool:
    """A marker the trial logic can use: our event names, an integer trial, a known category
    and a numeric intensity (or none). Anything else is shown, never interpreted."""
    if info is None or info.get("event") not in ("trial_start", "trial_end"):
        return False
    trial = info.get("trial")
    if isinstance(trial, bool) or not isinstance(trial, int):
        return False
    category = info.get("category")
    if category is not None and (isinstance(category, bool) or category not in (-1, 0, 1)):
        return False
    intensity = info.get("intensity")
    return intensity is None or (
        isinstance(intensity, (int, float))
        and not isinstance(intensity, bool)
        and math.isfinite(intensity)
    )


def _category_name(value: Any) -> str | None:
    if value is None:
        return None
    return CATEGORY_LABELS[int(value) + 1]


def _predictions(
    records: list[dict[str, Any]], notes: list[str]
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Prediction records usable on a time axis, with their timestamps and probabilities."""
    kept: list[dict[str, Any]] = []
    stamps: list[float] = []
    probs: list[list[float]] = []
    dropped = 0
    for rec in records:
        t = _float(rec.get("volume_timestamp"))
        p = rec.get("probabilities")
        row = [_float(p.get(lab)) for lab in CATEGORY_LABELS] if isinstance(p, dict) else []
        if not math.isfinite(t) or len(row) != 3 or not all(math.isfinite(v) for v in row):
            dropped += 1
            continue
        kept.append(rec)
        stamps.append(t)
        probs.append(row)
    if dropped:
        notes.append(
            f"{dropped} prediction record(s) without a finite volume_timestamp and three"
            " probabilities were left out."
        )
    return kept, np.array(stamps, np.float64), np.array(probs, np.float64).reshape(-1, 3)


def _tr_of(time: np.ndarray, resets: np.ndarray) -> float | None:
    if time.size < 2:
        return None
    steps = np.diff(time)[~resets[1:]]
    steps = steps[steps > 0]
    return float(np.median(steps)) if steps.size else None


def _gaps(
    time: np.ndarray, tr_index: np.ndarray, sequence: np.ndarray, resets: np.ndarray, tr: float
) -> list[Gap]:
    gaps: list[Gap] = []
    for i in range(1, time.size):
        dt = time[i] - time[i - 1]
        if dt > 1.5 * tr:
            missing = max(0, round(dt / tr) - 1)
            gaps.append(
                Gap(
                    "time gap",
                    float(time[i]),
                    f"{dt:.2f} s between volumes at {time[i - 1]:.2f} s and {time[i]:.2f} s"
                    f" (about {missing} volume(s) at TR {tr:.3g} s)",
                )
            )
        if resets[i]:
            gaps.append(
                Gap(
                    "model state reset",
                    float(time[i]),
                    f"the model state was reset; TR index restarts at {tr_index[i]}",
                )
            )
        elif tr_index[i] != tr_index[i - 1] + 1:
            lost = int(tr_index[i] - tr_index[i - 1] - 1)
            what = f"{lost} TR index(es) missing" if lost > 0 else "TR index went backwards"
            gaps.append(
                Gap(
                    "TR index jump",
                    float(time[i]),
                    f"TR index {tr_index[i - 1]} -> {tr_index[i]}: {what}",
                )
            )
        if sequence[i] != sequence[i - 1] + 1:
            lost = int(sequence[i] - sequence[i - 1] - 1)
            gaps.append(
                Gap(
                    "sequence jump",
                    float(time[i]),
                    f"sequence {sequence[i - 1]} -> {sequence[i]}"
                    + (f": {lost} prediction(s) not in the log" if lost > 0 else ""),
                )
            )
    return gaps


def _run_notes(log: LoadedLog, r: LogRun, number: int) -> list[str]:
    """Notes on the file and the run's framing: several runs, cut or damaged lines, missing
    start or end, a file created again mid-run, record kinds the report does not know."""
    notes: list[str] = []
    if len(log.runs) > 1:
        notes.append(
            f"This file holds {len(log.runs)} runs (the log is opened for appending); this"
            f" report shows run {number}. Choose another with --run N."
        )
    if log.cut_off_bytes:
        notes.append(
            f"The last line of the file was cut off mid-write ({log.cut_off_bytes} bytes"
            " ignored): the engine stopped without closing its log."
        )
    if log.bad_lines:
        listed = ", ".join(str(n) for n in log.bad_lines[:MAX_LISTED_BAD_LINES])
        more = len(log.bad_lines) - MAX_LISTED_BAD_LINES
        notes.append(
            f"{len(log.bad_lines)} damaged line(s) skipped (line {listed}"
            + (f" and {more} more" if more > 0 else "")
            + ")."
        )
    if r.start is None:
        notes.append("No session_start record: session, model and software are unknown.")
    if r.end is None:
        notes.append(
            "No session_end record: the run did not close its log (it crashed, was killed, or"
            " is still running)."
        )
    for rec in r.reopened:
        before = rec.get("predictions_before")
        notes.append(
            "The log file was deleted or replaced while the engine ran and was created again"
            f" at {_text(rec.get('utc')) or 'an unknown time'}"
            + (f", after {before} prediction(s)" if isinstance(before, int) else "")
            + ": the lines written before that are not in this file."
        )
    for kind, count in sorted(r.other_kinds.items()):
        notes.append(f"{count} record(s) of unknown kind {kind!r} not shown.")
    return notes


def _int_column(records: list[dict[str, Any]], key: str) -> np.ndarray:
    values = (_float(rec.get(key)) for rec in records)
    return np.array([int(v) if math.isfinite(v) else -1 for v in values], np.int64)


def _float_column(records: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([_float(rec.get(key)) for rec in records], np.float64)


def _markers(
    records: list[dict[str, Any]], session_time: Any, participant: str, tr: float | None
) -> tuple[list[MarkerRow], Any]:
    """Every marker as a row, and a :class:`Session` holding the usable trial markers on the
    session-time axis (what ``label_volumes`` and ``Session.trials`` work on)."""
    from emorecog_stream.core.streams import N_ROIS, Role
    from emorecog_stream.recordings.session import Marker, Session, SignalStream, parse_marker

    rows: list[MarkerRow] = []
    usable_markers: list[Marker] = []
    for m in records:
        t = _float(m.get("timestamp"))
        text = _text(m.get("text"))
        info = parse_marker(text) if isinstance(m.get("text"), str) else None
        usable = _trial_marker(info) and math.isfinite(t)
        shown = info or {}
        rows.append(
            MarkerRow(
                time=session_time(t) if math.isfinite(t) else None,
                event=_text(shown.get("event")),
                trial=_text(shown.get("trial")),
                category=(
                    f"{_category_name(shown['category'])} ({int(shown['category']):+d})"
                    if usable and shown.get("category") is not None
                    else _text(shown.get("category"))
                ),
                intensity=_text(shown.get("intensity")),
                text=text,
                is_trial_marker=usable,
            )
        )
        if usable:
            usable_markers.append(Marker(session_time(t), text))
    session = Session(
        participant=participant or "log",
        tr=tr or 1.0,
        # no volumes: label_volumes needs only the trials, which come from the markers
        fmri=SignalStream(
            Role.FMRI, "log", "fMRI", np.zeros((0, N_ROIS), np.float32), np.zeros(0), 0.0
        ),
        markers=usable_markers,
    )
    return rows, session


def _status_rows(
    records: list[dict[str, Any]], preds: list[dict[str, Any]], time: np.ndarray, scale: float
) -> list[StatusRow]:
    """Status changes, placed on the session-time axis through the predictions' own UTC times
    (a status record carries only its UTC time)."""
    pairs = [(_utc_seconds(p.get("utc")), t) for p, t in zip(preds, time, strict=True)]
    offsets = [u * scale - t for u, t in pairs if u is not None]
    offset = float(np.median(offsets)) if offsets else None
    rows = []
    for s in records:
        u = _utc_seconds(s.get("utc"))
        details = s.get("details") if isinstance(s.get("details"), dict) else {}
        missing = details.get("missing")
        rows.append(
            StatusRow(
                utc=_text(s.get("utc")),
                state=_text(s.get("state")),
                reason=_text(s.get("reason")),
                missing=", ".join(str(x) for x in missing) if isinstance(missing, list) else "",
                time=None if u is None or offset is None else u * scale - offset,
            )
        )
    return rows


def session_view(
    log: LoadedLog,
    *,
    run: int | None = None,
    time_scale: float | None = None,
    label_delay: float | None = None,
) -> SessionView:
    """Derive the report's content from run ``run`` (1-based; default the last) of ``log``.

    ``time_scale``: the replay speed the session ran at (``demo --speed X``), which turns LSL
    seconds back into session seconds; default: the log's ``meta.time_scale``, else 1 (live).
    ``label_delay``: seconds between a trial and the volumes it labels, as ``evaluate
    --label-delay`` (default :data:`emorecog_stream.model.data.DEFAULT_LABEL_DELAY_S`).
    """
    from emorecog_stream.model.data import DEFAULT_LABEL_DELAY_S, label_volumes
    from emorecog_stream.model.metrics import evaluate_arrays

    n_runs = len(log.runs)
    number = n_runs if run is None else run
    if not 1 <= number <= n_runs:
        raise ReportInputError(
            f"run {number} asked for, but {str(log.path)!r} holds {n_runs} run(s)"
            f" (expected 1..{n_runs})"
        )
    r = log.runs[number - 1]
    notes = _run_notes(log, r, number)
    start = r.start or {}
    meta = start.get("meta") if isinstance(start.get("meta"), dict) else {}

    scale = time_scale
    if scale is None:
        logged = _float(meta.get("time_scale"))
        scale = logged if math.isfinite(logged) and logged > 0 else 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise ReportInputError(f"time scale must be a positive number, got {scale}")
    if scale != 1.0:
        notes.append(
            f"Replayed {scale:g}x faster than real time: times are shown in session seconds"
            " (LSL seconds x the replay speed)."
        )
    delay = DEFAULT_LABEL_DELAY_S if label_delay is None else float(label_delay)

    preds, stamps, probabilities = _predictions(r.predictions, notes)
    if stamps.size:
        t0 = float(stamps[0])
    else:
        marker_stamps = [_float(m.get("timestamp")) for m in r.markers]
        t0 = min((t for t in marker_stamps if math.isfinite(t)), default=0.0)
        notes.append("The log holds no prediction: there is nothing to plot against time.")

    def session_time(t: float) -> float:
        return (t - t0) * scale

    time = (stamps - t0) * scale
    tr_index = _int_column(preds, "tr_index")
    sequence = _int_column(preds, "sequence")
    intensity = _float_column(preds, "intensity")
    flags = [p.get("flags") if isinstance(p.get("flags"), list) else [] for p in preds]
    resets = np.array(["state_reset" in f for f in flags], bool)
    flag_counts: dict[str, int] = {}
    for f in flags:
        for name in f:
            flag_counts[str(name)] = flag_counts.get(str(name), 0) + 1
    # logs carry ``framewise_displacement`` (null without a motion stream) since the motion
    # stream exists; older logs have no such field. Either way: no finite value, no FD panel.
    fd = _float_column(preds, "framewise_displacement")
    tr = _tr_of(time, resets)
    session_id = _text(
        start.get("session")
        or (r.reopened[0].get("session") if r.reopened else "")
        or (preds[0].get("session") if preds else "")
    )

    # markers: every one shown; only well-formed trial markers define trials
    markers, session = _markers(r.markers, session_time, session_id, tr)
    unused = sum(not m.is_trial_marker for m in markers)
    if unused:
        notes.append(
            f"{unused} marker(s) are not trial markers (a JSON object with event"
            " trial_start/trial_end, an integer trial, category -1/0/1 or null, a numeric"
            " intensity or null): listed, not used."
        )
    if not r.markers:
        notes.append(
            "The log holds no trial markers (the markers stream was not recorded or not"
            " present): no trial spans, no accuracy."
        )
    trials = [
        TrialSpan(
            index=t.index,
            onset=t.onset,
            offset=t.offset,
            category=_category_name(t.category),
            intensity=None if t.intensity is None else float(t.intensity),
        )
        for t in session.trials()
    ]

    # accuracy: evaluate's labelling and scoring, on the volumes that carry a label
    metrics = None
    labelled = 0
    if any(t.category is not None for t in trials) and time.size:
        category, target, trial = label_volumes(session, time, delay)
        mask = (category >= 0) & np.isfinite(intensity)  # evaluate: labelled and ready
        labelled = int(mask.sum())
        metrics = evaluate_arrays([(probabilities, intensity, category, target, trial, mask)])
        if labelled == 0:
            notes.append(
                f"No prediction falls in a trial's labelled window (onset + {delay:g} s to"
                f" offset + {delay:g} s): accuracy has nothing to score."
            )
    elif trials:
        notes.append("The trial markers carry no category: accuracy is not computed.")

    summary = r.summary or {}
    end = r.end or {}
    return SessionView(
        path=log.path,
        run_number=number,
        n_runs=n_runs,
        session=session_id,
        model_id=_text(start.get("model_id") or (preds[0].get("model_id") if preds else "")),
        software=_text(start.get("software")),
        start_utc=_text(start.get("utc")),
        end_utc=_text(end.get("utc")),
        end_reason=_text(end.get("reason")),
        meta=meta,
        time_scale=scale,
        label_delay=delay,
        tr=tr,
        time=time,
        tr_index=tr_index,
        sequence=sequence,
        probabilities=probabilities,
        intensity=intensity,
        heart_rate=_float_column(preds, "heart_rate"),
        respiration_rate=_float_column(preds, "respiration_rate"),
        framewise_displacement=fd if np.isfinite(fd).any() else None,
        latency_ms=_float_column(preds, "latency_ms"),
        flag_counts=flag_counts,
        trials=trials,
        markers=markers,
        statuses=_status_rows(r.statuses, preds, time, scale),
        gaps=_gaps(time, tr_index, sequence, resets, tr) if tr else [],
        mqtt=summary.get("mqtt") if isinstance(summary.get("mqtt"), dict) else None,
        engine_counters=summary.get("engine") if isinstance(summary.get("engine"), dict) else None,
        metrics=metrics,
        labelled_volumes=labelled,
        notes=notes,
    )
