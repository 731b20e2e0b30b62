"""The session report: one JSONL audit log -> one self-contained HTML file (and PNG figures).

Three modules, one job each:

- :mod:`.log_data`: read the log (tolerating a run that died mid-write) and derive what the report
  shows: time series, trials, gaps, status changes, latency, MQTT counters and the accuracy
  figures, the latter through ``evaluate``'s own functions (:mod:`emorecog_stream.model.metrics`,
  :func:`emorecog_stream.model.data.label_volumes`);
- :mod:`.figures`: matplotlib figures (Agg, object-oriented API, no pyplot state) -> PNG bytes;
- :mod:`.html_page`: the HTML text (every value from the log escaped) and the owner-only writes.
"""

from __future__ import annotations

from emorecog_stream.report.html_page import render_report, write_private
from emorecog_stream.report.log_data import (
    LogRun,
    ReportInputError,
    SessionView,
    read_session_log,
    session_view,
)

__all__ = [
    "LogRun",
    "ReportInputError",
    "SessionView",
    "read_session_log",
    "render_report",
    "session_view",
    "write_private",
]
