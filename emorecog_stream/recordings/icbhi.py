"""ICBHI 2024 challenge data: the seed's per-trial ``.mat`` files and the official layout.

Two forms exist (see shared/domain.md):

* **Per-trial ``.mat``** (the EmoRecog-Net authors' conversion): ``P{pp}_{trial}.mat`` with
  ``mri_d`` (246 ROIs x 25 time points), ``pnr_rate`` ([pulse rate bpm, respiration rate
  breaths/min]) and ``lab_d`` ([category -1/0/1, level -4..4]). Physiology is already reduced to
  one pair of rates per trial, so it becomes the 2-channel rates stream. MATLAB v7.3 files (HDF5)
  are read with h5py; their arrays come transposed, which the ROI-axis detection absorbs.
* **Official per-participant folders** (``Train/P01`` ... ``Test/P20``): ``fMRI_data.npz``,
  ``PPG_data.npz``, ``resp_data.npz`` and optionally ``labels.npz``, each array under key
  ``data``: fMRI (trials, 246, T) or (trials, T, 246), PPG (trials, n) over the trial's
  T x TR seconds (10000 samples in 25 s = 400 Hz), respiration likewise, labels (trials, 2).

The recordings hold trials only, no rest. Trials are laid end to end on one clock starting at 0 s
(``rest_s`` inserts a gap without samples between them); trial i's volumes are at
``onset_i + k * TR``. Markers mark each trial's start and end with its labels (None when a Test
participant has no labels).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emorecog_stream.core.streams import (
    ATLAS,
    DEFAULT_LSL_NAME,
    DEFAULT_LSL_TYPE,
    N_ROIS,
    RATES_CHANNELS,
    RATES_UNITS,
    Role,
    roi_labels,
)
from emorecog_stream.recordings.session import Marker, Session, SignalStream, make_marker

log = logging.getLogger(__name__)

MAT_NAME = re.compile(r"^P(\d+)_(\d+)(?:_[^.]*)?\.mat$", re.IGNORECASE)
"""``P10_29.mat`` (also ``P10_29_N1.mat``): participant 10, trial 29."""

OFFICIAL_FILES = ("fMRI_data.npz", "PPG_data.npz", "resp_data.npz", "labels.npz")


class IcbhiError(ValueError):
    """A challenge file that does not hold what it should: names file, key, expected and found."""


@dataclass(frozen=True)
class _Trial:
    index: int
    volumes: np.ndarray  # (T, 246)
    category: int | None
    level: int | None


def _roi_major(path: Path, key: str, array: np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """(T, 246) from a (246, T) or (T, 246) array, and which layout was found."""
    if array.ndim != 2 or N_ROIS not in array.shape:
        raise IcbhiError(
            f"{path}: {key!r} should be {what} with one axis of {N_ROIS} ROIs,"
            f" found shape {array.shape}"
        )
    if array.shape[0] == N_ROIS and array.shape[1] != N_ROIS:
        return array.T, "rois x time"
    return array, "time x rois"


# --------------------------------------------------------------------------- per-trial .mat


MAT_KEYS = ("mri_d", "pnr_rate", "lab_d")
"""The variables a trial file is read for; anything else in it is left unread."""
_MAT_NUMERIC = {
    "double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "logical",
}  # fmt: skip
_DEFLATE_MAX_RATIO = 1032
"""zlib cannot expand data by more than this, so a compressed array larger than the file times
this ratio is a corrupt size field, not data."""


def _load_mat(path: Path) -> dict[str, np.ndarray]:
    """The trial's variables from a MATLAB v5 file (scipy) or a v7.3 file (HDF5, h5py).

    Only :data:`MAT_KEYS` are read, and each one's declared size is checked against what the
    file can hold before anything is allocated: the readers below allocate from size fields.
    """
    import h5py

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IcbhiError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if h5py.is_hdf5(path):
        try:
            return _load_mat_v73(path, io.BytesIO(raw), len(raw))
        except IcbhiError:
            raise
        except (
            OSError,
            KeyError,
            RuntimeError,
            ValueError,
            TypeError,
            AttributeError,
            OverflowError,  # h5py's file-object driver: an address beyond any offset
        ) as exc:
            raise IcbhiError(
                f"{path}: not a readable MATLAB v7.3 (HDF5) file: {type(exc).__name__}: {exc}"
            ) from None
    return _load_mat_v5(path, raw)


def _load_mat_v5(path: Path, raw: bytes) -> dict[str, np.ndarray]:
    import scipy.io

    if raw[124:126] in (b"\x00\x01", b"\x01\x00"):  # a v5 header; v4 files have none
        problem = _mat5_element_sizes(raw)
        if problem:
            raise IcbhiError(f"{path}: corrupt MATLAB file: {problem}")
    try:
        # from memory: a file object's read(n) allocates n bytes before reading, and scipy
        # reads lengths taken from the file
        found = scipy.io.whosmat(io.BytesIO(raw))
        for name, shape, kind in found:
            if name not in MAT_KEYS:
                continue
            if kind not in _MAT_NUMERIC:
                raise IcbhiError(f"{path}: {name!r} should be a numeric array, found a {kind}")
            _check_size(path, name, shape, 8, len(raw) * _DEFLATE_MAX_RATIO)
        data = scipy.io.loadmat(io.BytesIO(raw), variable_names=list(MAT_KEYS))
    except IcbhiError:
        raise
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ...
        raise IcbhiError(
            f"{path}: not a readable MATLAB file: {type(exc).__name__}: {exc}"
        ) from exc
    return {k: v for k, v in data.items() if not k.startswith("__")}


_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MAT5_MAX_DEPTH = 32


def _mat5_element_sizes(raw: bytes) -> str | None:
    """Why a MATLAB v5 file's element tags cannot be right, or None.

    scipy allocates the byte count of every data element's tag (variable headers included,
    also for variables it then skips) before reading it; so each count is checked against the
    bytes its container holds (the file, a variable, a decompressed variable), walking the
    tags only. Compressed variables are decompressed here to check what they hold (zlib
    bounds that to ~1000 x their size).
    """
    endian = "<" if raw[126:128] == b"IM" else ">"
    return _mat5_walk(raw, 128, len(raw), endian, 0, "byte")


def _mat5_walk(buf: bytes, start: int, end: int, endian: str, depth: int, where: str) -> str | None:
    if depth > _MAT5_MAX_DEPTH:
        return f"arrays nested more than {_MAT5_MAX_DEPTH} deep"
    pos = start
    while pos + 8 <= end:
        mdtype, nbytes = struct.unpack(endian + "II", buf[pos : pos + 8])
        if mdtype >> 16:  # small data element: its (<= 4) bytes are inside the tag
            pos += 8
            continue
        body = pos + 8
        if nbytes > end - body:
            return (
                f"the data element at {where} {pos} declares {nbytes} bytes, but only"
                f" {end - body} follow it"
            )
        if mdtype == _MI_COMPRESSED and depth == 0:
            try:
                inner = zlib.decompressobj().decompress(buf[body : body + nbytes])
            except zlib.error as exc:
                return f"the compressed variable at byte {pos} is corrupt ({exc})"
            where_inner = f"byte (of the variable decompressed from byte {pos})"
            problem = _mat5_walk(inner, 0, len(inner), endian, depth + 1, where_inner)
        elif mdtype == _MI_MATRIX:
            problem = _mat5_walk(buf, body, body + nbytes, endian, depth + 1, where)
        else:
            problem = None
        if problem:
            return problem
        pos = body + nbytes + (0 if depth == 0 else -nbytes % 8)  # sub-elements are padded
    return None


def _load_mat_v73(path: Path, raw: io.BytesIO, size: int) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(raw, "r") as f:
        for key in MAT_KEYS:
            node = f.get(key)
            if not isinstance(node, h5py.Dataset):
                continue
            if node.dtype.kind not in "fiub":
                raise IcbhiError(
                    f"{path}: {key!r} should be a numeric array, found HDF5 type {node.dtype}"
                )
            _check_size(path, key, node.shape, node.dtype.itemsize, size * _DEFLATE_MAX_RATIO)
            # MATLAB stores column-major: h5py shows the transpose
            out[key] = np.asarray(node[()]).T
    return out


def _check_size(path: Path, key: str, shape: tuple[int, ...], itemsize: int, room: int) -> None:
    n = int(np.prod([int(d) for d in shape], dtype=object)) if shape else 1
    if n * itemsize > room:
        raise IcbhiError(
            f"{path}: {key!r} declares shape {tuple(shape)} ({n * itemsize} bytes), more than"
            f" a file of this size can hold"
        )


def _pair(path: Path, data: dict[str, np.ndarray], key: str, what: str) -> np.ndarray | None:
    if key not in data:
        return None
    value = np.asarray(data[key], dtype=np.float64).squeeze()
    if value.shape != (2,):
        raise IcbhiError(
            f"{path}: {key!r} should hold 2 values ({what}), found shape {np.shape(data[key])}"
        )
    return value


def _read_mat_trial(path: Path, index: int) -> tuple[_Trial, np.ndarray]:
    data = _load_mat(path)
    if "mri_d" not in data:
        raise IcbhiError(
            f"{path}: no key 'mri_d' (246 x 25 ROI series); keys found: {sorted(data)}"
        )
    volumes, _ = _roi_major(path, "mri_d", np.asarray(data["mri_d"], dtype=np.float64), "246 x T")
    rates = _pair(path, data, "pnr_rate", "pulse rate, respiration rate")
    if rates is None:
        raise IcbhiError(
            f"{path}: no key 'pnr_rate' ([pulse rate, respiration rate]); keys: {sorted(data)}"
        )
    labels = _pair(path, data, "lab_d", "category -1/0/1, level -4..4")
    category = level = None
    if labels is not None:
        category, level = _check_labels(path, "lab_d", labels)
    return _Trial(index=index, volumes=volumes, category=category, level=level), rates


def _check_labels(path: Path, key: str, labels: np.ndarray) -> tuple[int, int]:
    category, level = float(labels[0]), float(labels[1])
    if category not in (-1.0, 0.0, 1.0) or not (level.is_integer() and -4 <= level <= 4):
        raise IcbhiError(
            f"{path}: {key!r} should be [category -1/0/1, level -4..4], found"
            f" [{labels[0]:g}, {labels[1]:g}]"
        )
    return int(category), int(level)


def mat_files(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """Trial files by participant id (``P10``), each list sorted by trial index."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(Path(folder).iterdir()):
        m = MAT_NAME.match(path.name)
        if m and path.is_file():
            found.setdefault(f"P{int(m.group(1)):02d}", []).append((int(m.group(2)), path))
    for trials in found.values():
        trials.sort()
        indices = [i for i, _ in trials]
        if len(set(indices)) != len(indices):
            dup = sorted({i for i in indices if indices.count(i) > 1})
            raise IcbhiError(f"{folder}: trial indices {dup} appear in more than one file")
    return found


def read_mat_folder(folder: str | Path, *, tr: float = 1.0, rest_s: float = 0.0) -> list[Session]:
    """One session per participant from a folder of ``P{pp}_{trial}.mat`` files."""
    folder = Path(folder)
    by_participant = mat_files(folder)
    if not by_participant:
        raise IcbhiError(f"{folder}: no P{{pp}}_{{trial}}.mat files (e.g. P10_29.mat)")
    sessions = []
    for pid, files in sorted(by_participant.items()):
        trials, rates = [], []
        for index, path in files:
            trial, rate = _read_mat_trial(path, index)
            trials.append(trial)
            rates.append(rate)
        lengths = {t.volumes.shape[0] for t in trials}
        if len(lengths) != 1:
            raise IcbhiError(
                f"{folder}: {pid}'s trials differ in length: {sorted(lengths)} volumes"
            )
        sessions.append(
            _session(
                pid,
                trials,
                tr=tr,
                rest_s=rest_s,
                rates=np.asarray(rates),
                source=str(folder),
                layout="icbhi-mat",
            )
        )
    return sessions


# --------------------------------------------------------------------------- official layout


def is_participant_dir(path: Path) -> bool:
    return (path / "fMRI_data.npz").is_file()


def participant_dirs(root: str | Path) -> list[Path]:
    """Participant folders under ``root``: itself, its children or grandchildren (Train/Test),
    in participant order."""
    root = Path(root)
    if is_participant_dir(root):
        return [root]
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and is_participant_dir(p)]
    if found:
        return found
    for sub in sorted(root.iterdir()):
        if sub.is_dir():
            found += [p for p in sorted(sub.iterdir()) if p.is_dir() and is_participant_dir(p)]
    return sorted(found, key=lambda p: (p.name, str(p)))  # P01..P16 (Train) before P17 (Test)


def _npz(path: Path, required: bool = True) -> np.ndarray | None:
    if not path.is_file():
        if required:
            raise IcbhiError(f"{path}: file missing (the official layout has {OFFICIAL_FILES})")
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "data" not in npz.files:
                raise IcbhiError(f"{path}: no key 'data'; keys found: {npz.files}")
            _check_npy_size(path, npz.zip)
            return np.asarray(npz["data"])
    except IcbhiError:
        raise
    except Exception as exc:
        raise IcbhiError(f"{path}: not a readable .npz file: {type(exc).__name__}: {exc}") from exc


def _check_npy_size(path: Path, archive: Any) -> None:
    """Refuse an array whose header declares more bytes than its zip member can hold.

    numpy allocates the whole array from the ``.npy`` header's shape before it reads a byte
    of a zip member, so a corrupt shape in a small file would ask for gigabytes.
    """
    info = archive.getinfo("data.npy")
    room = min(info.file_size, max(info.compress_size, 1) * _DEFLATE_MAX_RATIO)
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(member)
    _check_size(path, "data", shape, dtype.itemsize, room)


def read_participant_dir(folder: str | Path, *, tr: float = 1.0, rest_s: float = 0.0) -> Session:
    """One participant of the official layout (``Train/P01``): waveforms, labels if present."""
    folder = Path(folder)
    fmri_path = folder / "fMRI_data.npz"
    fmri = _npz(fmri_path)
    assert fmri is not None
    if fmri.ndim != 3 or N_ROIS not in fmri.shape[1:]:
        raise IcbhiError(
            f"{fmri_path}: key 'data' should be (trials, {N_ROIS}, T) or (trials, T, {N_ROIS}),"
            f" found shape {fmri.shape}"
        )
    if fmri.shape[1] == N_ROIS and fmri.shape[2] != N_ROIS:
        layout = "trials x rois x time"
        fmri = np.transpose(fmri, (0, 2, 1))
    else:
        layout = "trials x time x rois"
    n_trials, n_time = fmri.shape[0], fmri.shape[1]
    log.info("%s: fMRI layout %s (%d trials x %d volumes)", fmri_path, layout, n_trials, n_time)
    trial_s = n_time * tr

    waves: dict[str, tuple[np.ndarray, float]] = {}
    for name, file in (("ppg", "PPG_data.npz"), ("resp", "resp_data.npz")):
        path = folder / file
        wave = _npz(path)
        assert wave is not None
        if wave.ndim == 3 and wave.shape[2] == 1:
            wave = wave[:, :, 0]
        if wave.ndim != 2 or wave.shape[0] != n_trials or wave.shape[1] < 2:
            raise IcbhiError(
                f"{path}: key 'data' should be ({n_trials} trials, samples), found shape"
                f" {wave.shape}"
            )
        waves[name] = (wave.astype(np.float32), wave.shape[1] / trial_s)

    labels_path = folder / "labels.npz"
    labels = _npz(labels_path, required=False)
    if labels is not None and labels.shape != (n_trials, 2):
        raise IcbhiError(
            f"{labels_path}: key 'data' should be ({n_trials}, 2) = [class, level] per trial,"
            f" found shape {labels.shape}"
        )
    trials = []
    for i in range(n_trials):
        category = level = None
        if labels is not None:
            category, level = _check_labels(labels_path, f"data[{i}]", labels[i])
        trials.append(_Trial(index=i, volumes=fmri[i], category=category, level=level))
    session = _session(
        folder.name,
        trials,
        tr=tr,
        rest_s=rest_s,
        rates=None,
        source=str(folder),
        layout="icbhi-official",
    )
    period = trial_s + rest_s
    for name, (wave, fs) in waves.items():
        role = Role.PPG if name == "ppg" else Role.RESP
        n = wave.shape[1]
        stamps = (np.arange(n_trials)[:, None] * period + np.arange(n)[None, :] / fs).ravel()
        stream = SignalStream(
            role=role,
            name=DEFAULT_LSL_NAME[role],
            type=DEFAULT_LSL_TYPE[role],
            data=wave.reshape(-1, 1),
            timestamps=stamps,
            nominal_srate=fs,
            channel_labels=["ppg" if name == "ppg" else "respiration"],
            units=["a.u."],
            source_id=f"icbhi-{folder.name}-{name}",
        )
        setattr(session, name, stream)
    session.metadata.update(
        fmri_layout=layout,
        ppg_rate=waves["ppg"][1],
        resp_rate=waves["resp"][1],
        split=folder.parent.name,
        labelled=labels is not None,
    )
    return session


def read_official(root: str | Path, *, tr: float = 1.0, rest_s: float = 0.0) -> list[Session]:
    """Every participant folder found under ``root`` (see :func:`participant_dirs`)."""
    dirs = participant_dirs(root)
    if not dirs:
        raise IcbhiError(
            f"{root}: no participant folders holding fMRI_data.npz (expected e.g. Train/P01/)"
        )
    return [read_participant_dir(d, tr=tr, rest_s=rest_s) for d in dirs]


# --------------------------------------------------------------------------- shared


def _session(
    pid: str,
    trials: list[_Trial],
    *,
    tr: float,
    rest_s: float,
    rates: np.ndarray | None,
    source: str,
    layout: str,
) -> Session:
    if not tr > 0 or rest_s < 0:
        raise ValueError(f"need tr > 0 and rest_s >= 0, got tr={tr}, rest_s={rest_s}")
    n_time = trials[0].volumes.shape[0]
    period = n_time * tr + rest_s
    stamps, volumes, markers, rate_rows = [], [], [], []
    for position, trial in enumerate(trials):
        onset = position * period
        t = onset + np.arange(n_time) * tr
        stamps.append(t)
        volumes.append(trial.volumes)
        markers.append(
            Marker(onset, make_marker("trial_start", trial.index, trial.category, trial.level))
        )
        markers.append(
            Marker(
                onset + n_time * tr,
                make_marker("trial_end", trial.index, trial.category, trial.level),
            )
        )
        if rates is not None:
            rate_rows.append(np.repeat(rates[position][None, :], n_time, axis=0))
    t_all = np.concatenate(stamps)
    fmri = SignalStream(
        role=Role.FMRI,
        name=DEFAULT_LSL_NAME[Role.FMRI],
        type=DEFAULT_LSL_TYPE[Role.FMRI],
        data=np.concatenate(volumes).astype(np.float32),
        timestamps=t_all,
        nominal_srate=1.0 / tr,
        channel_labels=roi_labels(),
        units=["a.u."] * N_ROIS,
        source_id=f"icbhi-{pid}-fmri",
    )
    rate_stream = None
    if rates is not None:
        rate_stream = SignalStream(
            role=Role.RATES,
            name=DEFAULT_LSL_NAME[Role.RATES],
            type=DEFAULT_LSL_TYPE[Role.RATES],
            data=np.concatenate(rate_rows).astype(np.float32),
            timestamps=t_all.copy(),
            nominal_srate=0.0,
            channel_labels=list(RATES_CHANNELS),
            units=list(RATES_UNITS),
            source_id=f"icbhi-{pid}-rates",
        )
    metadata: dict[str, Any] = {"source": source, "layout": layout, "trial_volumes": n_time}
    return Session(
        participant=pid,
        tr=tr,
        fmri=fmri,
        rates=rate_stream,
        markers=markers,
        atlas=ATLAS,
        metadata=metadata,
    )
