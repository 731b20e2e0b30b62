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
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from emorecog_stream.messages import Prediction
from emorecog_stream.private_files import open_private
from emorecog_stream.sinks.payload import (
    SCHEMA_VERSION,
    prediction_payload,
    status_payload,
    utc_now,
    validate_session_id,
)

__all__ = ["LOG_FORMAT_VERSION", "JsonlLog", "JsonlLogError", "read_log"]

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
        self._file: BinaryIO | None = self._open(self.path)
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
            return open_private(path, "ab", buffering=0)  # owned until close()
        except OSError as exc:
            raise JsonlLogError(
                f"cannot open session log {str(path)!r} for appending: "
                f"{exc.strerror or exc} (expected a writable file path)"
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
        data = (line + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                n = self._file.write(view)  # a raw file may write less than asked
                if not n:
                    raise OSError(f"write returned {n!r}")
                view = view[n:]
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise JsonlLogError(
                f"cannot write to session log {str(self.path)!r}: {exc.strerror or exc}"
            ) from exc
        self.lines += 1

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
        """Engine hook: log the prediction now (one unbuffered write, microseconds)."""
        self.write_prediction(prediction)

    def on_status(self, status: object) -> None:
        """Engine hook: log a status object with ``state``, ``reason`` and ``missing``."""
        missing = tuple(getattr(status, "missing", ()) or ())
        self.write_status(
            str(getattr(status, "state", status)),
            str(getattr(status, "reason", "")),
            details={"missing": list(missing)} if missing else None,
        )

    async def aclose(self) -> None:
        """Engine hook: close the log (writes ``session_end``)."""
        self.close()

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


def read_log(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """Read a session log back (all records, or those of one ``kind``).

    A last line cut off mid-write (the engine died while writing it) is skipped; a malformed
    line anywhere else is an error naming its line number.
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
            raise ValueError(f"{p}: line {i} is not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict) or "kind" not in rec:
            raise ValueError(f"{p}: line {i} is not a log record (expected an object with 'kind')")
        if kind is None or rec["kind"] == kind:
            records.append(rec)
    return records
