"""JSONL session log: the audit record of every prediction, written as each one is made.

One JSON object per line, each with a ``kind``:

- ``session_start``: first line of every run (the file is opened for appending, so several
  runs can share one file), with the session, model, software version and caller metadata;
- ``prediction``: exactly the MQTT prediction payload (:func:`sinks.payload.prediction_payload`)
  plus ``"kind": "prediction"``, so the log and the broker carry the same record;
- ``status``: each status change, as the MQTT status payload plus ``kind``;
- ``session_end``: written by :meth:`JsonlLog.close`; its absence marks a run that died.

Every line goes to the operating system in one unbuffered ``write`` as soon as it is made, so
a crash of the engine loses nothing already logged (pass ``fsync=True`` to survive a power cut
too, at the cost of a disk sync per line).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from emorecog_stream.core.messages import Prediction
from emorecog_stream.private_files import open_private
from emorecog_stream.sinks.payload import (
    SCHEMA_VERSION,
    prediction_payload,
    status_payload,
    utc_now,
    validate_session_id,
)

log = logging.getLogger(__name__)

__all__ = [
    "LOG_FORMAT_VERSION",
    "JsonlLog",
    "JsonlLogError",
    "LogResume",
    "read_log",
    "resume_point",
]

LOG_FORMAT_VERSION = 1
"""Version of the line kinds and their framing (payload fields follow ``SCHEMA_VERSION``)."""


class JsonlLogError(OSError):
    """The session log cannot be opened or written (the message names the path and why)."""


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("emorecog-stream")
    except Exception:
        return "unknown"


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN), tuples -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class JsonlLog:
    """Append-mode JSONL audit log for one engine run.

    ``session`` (validated like an MQTT session id) and ``model_id`` go into the
    ``session_start`` line; ``meta`` adds any other
    JSON-serialisable facts worth keeping with the record (broker URL, stream names, config
    file). Opening fails with :class:`JsonlLogError` when the path cannot be written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        session: str,
        model_id: str = "",
        meta: dict[str, Any] | None = None,
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.session = validate_session_id(session)  # status lines need it; fail before opening
        self.fsync = fsync
        self.predictions = 0
        self.lines = 0
        self._last_status: tuple[str, str] | None = None
        # Failures while the session runs (disk full, file too large, file deleted) must not
        # stop predictions: the engine's hooks count them instead of raising (see _hook).
        self.write_errors = 0  # lines the OS refused after the session began
        self.last_error: str | None = None
        self.reopened = 0  # times the file was found deleted or replaced and created again
        self.on_error: Callable[[str | None], None] | None = None  # failing (text) / ok (None)
        self._failing = False
        self._torn = False  # a write stopped mid-line: start the next one on a fresh line
        self._file: BinaryIO | None = self._open(self.path)
        self._identity = _identity(os.fstat(self._file.fileno()))
        start: dict[str, Any] = {
            "log_format": LOG_FORMAT_VERSION,
            "schema_version": SCHEMA_VERSION,
            "utc": utc_now(),
            "session": session,
            "model_id": model_id,
            "software": f"emorecog-stream {_software_version()}",
            "pid": os.getpid(),
        }
        if meta:
            start["meta"] = meta
        self.write_record("session_start", start)

    @staticmethod
    def _open(path: Path) -> BinaryIO:
        if path.is_dir():
            raise JsonlLogError(
                f"session log path {str(path)!r} is a directory; expected a file path such as "
                f"{str(path / 'session.jsonl')!r}"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # owner-only when created: the log holds a participant's physiology
            f = open_private(path, "ab", buffering=0)  # owned until close()
        except OSError as exc:
            raise JsonlLogError(
                f"cannot open session log {str(path)!r} for appending: "
                f"{exc.strerror or exc} (expected a writable file path)"
            ) from exc
        try:
            # an earlier run killed mid-write left a torn last line: keep it on its own line
            if f.seek(0, os.SEEK_END) > 0:
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        f.write(b"\n")
            return f
        except OSError as exc:
            f.close()
            raise JsonlLogError(
                f"cannot write to session log {str(path)!r}: {exc.strerror or exc}"
            ) from exc

    @property
    def closed(self) -> bool:
        return self._file is None

    def write_record(self, kind: str, fields: dict[str, Any]) -> None:
        """Write one line ``{"kind": kind, **fields}`` and hand it to the OS before returning."""
        if self._file is None:
            raise JsonlLogError(f"session log {str(self.path)!r} is closed; cannot write {kind!r}")
        if "kind" in fields:
            raise ValueError(f"record fields must not contain 'kind' (it is set to {kind!r})")
        record = {"kind": kind, **fields}
        try:
            line = json.dumps(record, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        except ValueError:  # NaN/Inf somewhere in caller metadata: keep the record, as null
            line = json.dumps(
                _json_safe(record), allow_nan=False, ensure_ascii=False, separators=(",", ":")
            )
        data = (("\n" if self._torn else "") + line + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                n = self._file.write(view)  # a raw file may write less than asked
                if not n:
                    raise OSError(f"write returned {n!r}")
                if n < len(view):
                    self._torn = True
                view = view[n:]
            self._torn = False
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise JsonlLogError(
                f"cannot write to session log {str(self.path)!r}: {exc.strerror or exc}"
            ) from exc
        self.lines += 1

    def record(self, kind: str, fields: dict[str, Any]) -> bool:
        """:meth:`write_record` for a running session: a line the OS refuses (disk full, file
        too large) or a file deleted under the engine is counted, reported once through
        ``on_error`` and a warning, never raised (predictions and MQTT must go on). A file
        that was deleted or replaced is created again at the same path, starting with a
        ``log_reopened`` line. Returns whether the line was written."""
        if self._file is None:
            return False
        try:
            self._follow_path()
            self.write_record(kind, fields)
        except JsonlLogError as exc:
            self.write_errors += 1
            self.last_error = str(exc)
            if not self._failing or self.write_errors % 100 == 0:
                log.warning("%s (%d line(s) not written so far)", exc, self.write_errors)
            if not self._failing:
                self._failing = True
                if self.on_error is not None:
                    self.on_error(str(exc))
            return False
        if self._failing:
            self._failing = False
            log.warning("session log %r written again", str(self.path))
            if self.on_error is not None:
                self.on_error(None)
        return True

    def _follow_path(self) -> None:
        """Deleted (or replaced) while open, the file would swallow every later line with no
        error: create it again at its path and say so in its first line."""
        try:
            current = _identity(os.stat(self.path))
        except FileNotFoundError:
            current = None
        except OSError:
            return
        if current == self._identity or self._file is None:
            return
        old, self._file = self._file, None
        old.close()
        self._file = self._open(self.path)  # JsonlLogError when it cannot be created again
        self._identity = _identity(os.fstat(self._file.fileno()))
        self._torn = False
        self.reopened += 1
        log.warning("session log %r was deleted or replaced: created it again", str(self.path))
        self.write_record(
            "log_reopened",
            {
                "utc": utc_now(),
                "session": self.session,
                "reason": "the log file was deleted or replaced while the engine ran; earlier"
                " lines of this run are not in this file",
                "predictions_before": self.predictions,
            },
        )

    def write_prediction(self, prediction: Prediction) -> dict[str, Any]:
        """Log one prediction; return the payload written (same as the MQTT payload)."""
        payload = prediction_payload(prediction)
        self.write_record("prediction", payload)
        self.predictions += 1
        return payload

    def write_status(
        self,
        state: str,
        reason: str = "",
        *,
        details: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Log a status change; an unchanged (state, reason) is skipped unless ``force``.

        Returns True when a line was written.
        """
        if not force and self._last_status == (state, reason):
            return False
        payload = status_payload(self.session, state, reason, details=details)
        self.write_record("status", payload)
        self._last_status = (state, reason)
        return True

    # -- the engine's Output protocol (engine.Output): sync hand-off, nothing queued -----------

    def on_prediction(self, prediction: Prediction, step: object = None) -> None:
        """Engine hook: log the prediction now (one unbuffered write, microseconds); a failed
        write is counted (:meth:`record`), not raised."""
        if self.record("prediction", prediction_payload(prediction)):
            self.predictions += 1

    def on_status(self, status: object) -> None:
        """Engine hook: log a status object with ``state``, ``reason`` and ``missing``."""
        state, reason = str(getattr(status, "state", status)), str(getattr(status, "reason", ""))
        if self._last_status == (state, reason):
            return
        missing = tuple(getattr(status, "missing", ()) or ())
        details = {"missing": list(missing)} if missing else None
        if self.record("status", status_payload(self.session, state, reason, details=details)):
            self._last_status = (state, reason)

    async def aclose(self) -> None:
        """Engine hook: close the log (writes ``session_end``; a failed write is counted)."""
        if self._file is None:
            return
        self.record(
            "session_end",
            {"utc": utc_now(), "session": self.session, "predictions": self.predictions,
             "reason": ""},
        )  # fmt: skip
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def close(self, reason: str = "") -> None:
        """Write the ``session_end`` line and close the file (idempotent)."""
        if self._file is None:
            return
        try:
            self.write_record(
                "session_end",
                {
                    "utc": utc_now(),
                    "session": self.session,
                    "predictions": self.predictions,
                    "reason": reason,
                },
            )
        finally:
            f, self._file = self._file, None
            f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close(f"error: {exc_type.__name__}")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"JsonlLog({str(self.path)!r}, {state}, predictions={self.predictions})"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def read_log(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """Read a session log back (all records, or those of one ``kind``).

    A line cut off mid-write (the engine died while writing it) is skipped when it is the last
    one or a later run's ``session_start`` follows it; a malformed line anywhere else is an
    error naming its line number.
    """
    p = Path(path)
    records: list[dict[str, Any]] = []
    lines = p.read_bytes().split(b"\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # no newline after it: an interrupted final write
                break
            if raw.startswith(b'{"kind":') and _next_starts_run(lines, i):
                # one of our lines cut off (a run killed mid-write), then a new run appended
                continue
            raise ValueError(f"{p}: line {i} is not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict) or "kind" not in rec:
            raise ValueError(f"{p}: line {i} is not a log record (expected an object with 'kind')")
        if kind is None or rec["kind"] == kind:
            records.append(rec)
    return records


def _next_starts_run(lines: list[bytes], i: int) -> bool:
    """Whether the first non-empty line after line ``i`` (1-based) starts a run."""
    for raw in lines[i:]:
        if raw.strip():
            return raw.startswith(b'{"kind":"session_start"')
    return False


@dataclass(frozen=True)
class LogResume:
    """Where an earlier run of a session left its log (:func:`resume_point`)."""

    last_sequence: int | None  # the last prediction's sequence number, None if none was logged
    clean: bool  # the run ended with a session_end line (else it was killed or crashed)


def resume_point(path: str | os.PathLike[str], session: str) -> LogResume | None:
    """The last sequence number of ``session`` in an existing log, and whether its last run
    stopped cleanly; None when the file does not exist or holds nothing of that session.

    Why: after a crash (SIGKILL, power loss) the engine is restarted with the same
    ``--session`` and ``--log``; numbering its predictions from 0 again would give
    subscribers, which de-duplicate on ``sequence``, a number already used for another volume.
    Reads backwards from the end in blocks (an 8-hour log is tens of MB), skipping a torn line.
    """
    p = Path(path)
    if not p.is_file():
        return None
    key = json.dumps(session)
    clean: bool | None = None
    with open(p, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        pos = end
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step) + carry
            lines = block.split(b"\n")
            carry = lines.pop(0) if pos > 0 else b""  # maybe cut: read with the next block
            for raw in reversed(lines):
                if not raw.strip() or key.encode() not in raw:
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a torn line
                if not isinstance(rec, dict) or rec.get("session") != session:
                    continue
                kind = rec.get("kind")
                if clean is None and kind in ("session_end", "prediction", "status", "marker"):
                    clean = kind == "session_end"
                if kind == "prediction" and isinstance(rec.get("sequence"), int):
                    return LogResume(rec["sequence"], bool(clean))
    return None if clean is None else LogResume(None, clean)
