"""Recorded sessions and the files they live in (XDF, ICBHI challenge files, synthetic corpus).

:func:`load_sessions` is the one entry point that commands use: it looks at what a path is and
calls the matching reader.
"""

from __future__ import annotations

from pathlib import Path

from emorecog_stream.recordings.session import Marker, Session, SignalStream, Trial
from emorecog_stream.recordings.xdf import XDF_SUFFIXES, RoleSpecs, XdfError

__all__ = [
    "Marker",
    "RecordingError",
    "Session",
    "SignalStream",
    "Trial",
    "XdfError",
    "load_session",
    "load_sessions",
]


class RecordingError(ValueError):
    """A path that is none of the recording kinds we read."""


def _is_xdf(path: Path) -> bool:
    return path.suffix in XDF_SUFFIXES or path.suffixes[-2:] == [".xdf", ".gz"]


def load_sessions(
    path: str | Path,
    roles: RoleSpecs = None,
    *,
    tr: float | None = None,
    rest_s: float = 0.0,
    dejitter: bool = False,
    strict: bool = True,
) -> list[Session]:
    """Sessions from ``path``, dispatching on what it is:

    * an ``.xdf``/``.xdfz`` file -> one session (``roles``, ``dejitter``, ``strict`` apply;
      ``tr`` overrides the TR the file gives);
    * a folder of ``.xdf``/``.xdfz`` files -> one session per file, in name order;
    * a folder of ``P{pp}_{trial}.mat`` files -> one session per participant (``tr`` default 1 s,
      ``rest_s`` seconds between trials);
    * an official ICBHI folder (``Train/P01/fMRI_data.npz`` ..., a ``Train`` folder, or one
      participant folder) -> one session per participant (same ``tr``/``rest_s``).
    """
    from emorecog_stream.recordings import icbhi
    from emorecog_stream.recordings.xdf import read_xdf_session

    path = Path(path)
    if not path.exists():
        raise RecordingError(f"{path}: no such file or folder")
    if path.is_file():
        if _is_xdf(path):
            return [read_xdf_session(path, roles, tr=tr, dejitter=dejitter, strict=strict)]
        if icbhi.MAT_NAME.match(path.name):
            raise RecordingError(
                f"{path}: a single trial file; give the folder that holds all of the"
                " participant's P{pp}_{trial}.mat files"
            )
        raise RecordingError(
            f"{path}: unknown recording file (expected .xdf or .xdfz, or a folder of"
            " P{pp}_{trial}.mat files or of ICBHI participant folders)"
        )
    xdf_files = sorted(p for p in path.iterdir() if p.is_file() and _is_xdf(p))
    if xdf_files:
        return [
            read_xdf_session(p, roles, tr=tr, dejitter=dejitter, strict=strict) for p in xdf_files
        ]
    icbhi_tr = 1.0 if tr is None else tr
    if icbhi.mat_files(path):
        return icbhi.read_mat_folder(path, tr=icbhi_tr, rest_s=rest_s)
    if icbhi.participant_dirs(path):
        return icbhi.read_official(path, tr=icbhi_tr, rest_s=rest_s)
    raise RecordingError(
        f"{path}: a folder without recordings: expected .xdf/.xdfz files, P{{pp}}_{{trial}}.mat"
        " files, or ICBHI participant folders holding fMRI_data.npz (e.g. Train/P01/)"
    )


def load_session(path: str | Path, roles: RoleSpecs = None, **options: object) -> list[Session]:
    """Alias of :func:`load_sessions` (the name used in docs/ARCHITECTURE.md)."""
    return load_sessions(path, roles, **options)  # type: ignore[arg-type]
