"""Training and evaluation data: sessions -> per-volume arrays with labels, and splits.

Why through the aligner. The live engine feeds the model the heart and respiration rates that
:func:`emorecog_stream.core.aligner.align_session`'s twin computes from the PPG and respiration
waveforms as they stream in (missing while a window is still filling, or when a sensor drops
out). Training on exactly those values, not on a generator's ground truth, is what makes training
and serving match.

Labels per volume. A trial (video) labels the volumes whose timestamps fall in
``[onset + label_delay, offset + label_delay)``: the BOLD response peaks some 4-6 s after what
caused it, so the volumes that carry a video's response come later than the video. The default
delay is 5 s for recordings with rest between videos, and 0 s for ICBHI challenge files, whose
25-volume trials are already the response windows the benchmark labels. Volumes outside every
trial (rest) carry no label: they are not in the loss or in the figures, yet the model sees them,
as it will live. A trial's *trial-level* prediction is the one at its last labelled volume.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emorecog_stream.recordings.session import Session

DEFAULT_LABEL_DELAY_S = 5.0
"""Hemodynamic delay used to label volumes of recordings with rest between trials."""

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT: dict[str, tuple[str, ...]] = {
    "train": tuple(f"P{i:02d}" for i in range(1, 13)),
    "val": ("P13", "P14"),
    "test": ("P15", "P16"),
}
"""Participant-wise split of the 16 ICBHI / synthetic participants (replay_data/ ships P15, P16)."""


@dataclass
class SessionData:
    """One session as the model trains on it (all arrays have one row per volume)."""

    participant: str
    roi: np.ndarray  # (T, R) float32, finite (the aligner replaced non-finite values)
    heart_rate: np.ndarray  # (T,) float32, NaN = missing
    respiration_rate: np.ndarray  # (T,) float32, NaN = missing
    category: np.ndarray  # (T,) int64: 0 negative, 1 neutral, 2 positive, -1 unlabelled
    intensity: np.ndarray  # (T,) float32, NaN where unknown
    trial: np.ndarray  # (T,) int64 trial index, -1 for rest
    label_delay: float
    source: str = ""

    @property
    def n_volumes(self) -> int:
        return int(self.roi.shape[0])

    def digest(self) -> str:
        """SHA-256 (16 hex) of what the model learns from: ROI values, rates and labels.

        Recorded per session in a checkpoint, it tells whether re-running the training command
        today would see the same data (a changed generator or aligner changes it).
        """
        h = hashlib.sha256(self.participant.encode())
        for array in (self.roi, self.heart_rate, self.respiration_rate, self.category,
                      self.intensity, self.trial):  # fmt: skip
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]


def default_label_delay(session: Session) -> float:
    layout = str(session.metadata.get("layout", ""))
    return 0.0 if layout.startswith("icbhi") else DEFAULT_LABEL_DELAY_S


def label_volumes(
    session: Session, timestamps: np.ndarray, label_delay: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(category 0..2 / -1, intensity / NaN, trial index / -1) for volumes at ``timestamps``."""
    n = timestamps.shape[0]
    category = np.full(n, -1, np.int64)
    intensity = np.full(n, np.nan, np.float32)
    trial = np.full(n, -1, np.int64)
    for tr in session.trials():
        inside = (timestamps >= tr.onset + label_delay) & (timestamps < tr.offset + label_delay)
        trial[inside] = tr.index
        if tr.category is not None:
            if tr.category not in (-1, 0, 1):
                raise ValueError(
                    f"session {session.participant!r} trial {tr.index}: category must be"
                    f" -1, 0 or 1, got {tr.category!r}"
                )
            category[inside] = int(tr.category) + 1
        if tr.intensity is not None:
            intensity[inside] = float(tr.intensity)
    return category, intensity, trial


def session_data(session: Session, label_delay: float | None = None) -> SessionData:
    """Align one session (as the live engine would) and label its volumes."""
    from emorecog_stream.core.aligner import align_session

    steps = align_session(session)
    if not steps:
        raise ValueError(f"session {session.participant!r}: no fMRI volumes to learn from")
    delay = default_label_delay(session) if label_delay is None else float(label_delay)
    timestamps = np.array([s.timestamp for s in steps])
    category, intensity, trial = label_volumes(session, timestamps, delay)
    return SessionData(
        participant=session.participant,
        roi=np.stack([s.roi for s in steps]).astype(np.float32),
        # as the engine feeds the model: a rate that is not valid is missing (NaN)
        heart_rate=np.array(
            [s.heart_rate if s.heart_rate_valid else np.nan for s in steps], np.float32
        ),
        respiration_rate=np.array(
            [s.respiration_rate if s.respiration_rate_valid else np.nan for s in steps],
            np.float32,
        ),
        category=category,
        intensity=intensity,
        trial=trial,
        label_delay=delay,
        source=str(session.metadata.get("source", session.metadata.get("generator", ""))),
    )


SYNTH_PREFIX = "synth"


def load_sessions_from(spec: str, participants: Iterable[str] | None = None) -> list[Session]:
    """Sessions named by ``spec``: ``synth`` / ``synth:SEED`` (the synthetic corpus, generated in
    memory) or a path :func:`emorecog_stream.recordings.load_sessions` reads (XDF file or folder,
    ICBHI ``.mat`` folder or official layout). ``participants`` keeps only those."""
    wanted = set(participants) if participants is not None else None
    if spec == SYNTH_PREFIX or spec.startswith(SYNTH_PREFIX + ":"):
        from emorecog_stream.recordings.synth import SynthConfig, generate_session

        seed_text = spec[len(SYNTH_PREFIX) + 1 :]
        try:
            config = SynthConfig(seed=int(seed_text)) if seed_text else SynthConfig()
        except ValueError as exc:
            raise ValueError(f"data {spec!r}: expected 'synth' or 'synth:SEED' ({exc})") from exc
        indices = [
            i
            for i in range(1, config.n_participants + 1)
            if wanted is None or f"P{i:02d}" in wanted
        ]
        return [generate_session(i, config) for i in indices]
    from emorecog_stream.recordings import load_sessions

    sessions = load_sessions(spec)
    if wanted is not None:
        sessions = [s for s in sessions if s.participant in wanted]
    return sessions


# --------------------------------------------------------------------------- splits

_TRIAL_REF = re.compile(r"P(\d+)_(\d+)", re.IGNORECASE)
_PARTICIPANT_REF = re.compile(r"^\s*P(\d+)\s*$", re.IGNORECASE)
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class Split:
    """Which split each participant or each (participant, trial) is in.

    Trial-level entries win over participant-level ones. Anything unlisted is in no split.
    """

    participants: dict[str, str]
    trials: dict[tuple[str, int], str]

    @classmethod
    def default(cls) -> Split:
        return cls({p: name for name, ps in DEFAULT_SPLIT.items() for p in ps}, {})

    @classmethod
    def from_lists(cls, train: Iterable[str], val: Iterable[str], test: Iterable[str]) -> Split:
        out: dict[str, str] = {}
        for name, ps in (("train", train), ("val", val), ("test", test)):
            for p in ps:
                if p in out:
                    raise ValueError(f"participant {p!r} is in both {out[p]!r} and {name!r}")
                out[p] = name
        return cls(out, {})

    def mask(self, data: SessionData, split: str) -> np.ndarray:
        """Volumes of ``data`` that are labelled and belong to ``split``."""
        labelled = data.category >= 0
        if not self.trials:
            in_split = self.participants.get(data.participant) == split
            return labelled & in_split
        per_trial = np.array(
            [
                self.trials.get((data.participant, int(t)), self.participants.get(data.participant))
                == split
                for t in data.trial
            ],
            dtype=bool,
        )
        return labelled & per_trial

    def describe(self) -> dict[str, object]:
        if self.trials:
            counts = {s: sum(1 for v in self.trials.values() if v == s) for s in SPLITS}
            return {"kind": "trials", "trials": counts}
        return {
            "kind": "participants",
            **{s: sorted(p for p, v in self.participants.items() if v == s) for s in SPLITS},
        }


def _participant(number: str) -> str:
    return f"P{int(number):02d}"


def _split_of_column(name: str) -> str | None:
    """The split a column holds: ``train``, ``train_list`` (the seed's file), ``Validation``..."""
    word = name.strip().lower()
    for suffix in ("_list", "_files", "_set"):
        word = word.removesuffix(suffix)
    return _SPLIT_WORDS.get(word)


_PADDING = ("", "0")
"""Cells that hold nothing: the seed's wide file pads its shorter columns with ``0``."""


def read_split_file(path: str | Path) -> Split:
    """A CSV split such as the seed's ``levelsplit.csv``.

    Accepted shapes:

    * **wide** (the seed's own file): columns headed ``train_list, val_list, test_list`` (or
      train / val(idation) / test), one trial per cell as a path such as
      ``./level/fmri_p1_data/N1\\P10_29_N1.npz`` (Windows or POSIX separators; the file name
      gives participant 10, trial 29), shorter columns padded with ``0``; other columns (the
      seed's ``*_distribution``) are ignored;
    * **long**: one row per trial (a cell with ``P{pp}_{trial}``) or participant (``P10``) and a
      cell naming its split.

    A trial named in two splits, or a cell of a split column that is neither a reference nor
    padding, is an error naming the line.
    """
    path = Path(path)
    where = f"split file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [
            (number, row)
            for number, row in enumerate(csv.reader(f), start=1)
            if any(cell.strip() for cell in row)
        ]
    if not rows:
        raise ValueError(f"{where}: empty")
    participants: dict[str, str] = {}
    trials: dict[tuple[str, int], str] = {}

    def add(cell: str, split: str, number: int) -> bool:
        name = re.split(r"[\\/]", cell.strip())[-1]  # the file name, whatever the separators
        m = _TRIAL_REF.search(name)
        if m:
            key = (_participant(m.group(1)), int(m.group(2)))
            if trials.get(key, split) != split:
                raise ValueError(
                    f"{where} line {number}: trial {key[1]} of {key[0]} is in both"
                    f" {trials[key]!r} and {split!r}"
                )
            trials[key] = split
            return True
        m = _PARTICIPANT_REF.match(cell)
        if m:
            participants[_participant(m.group(1))] = split
            return True
        return False

    first = rows[0][1]
    header = [_split_of_column(c) for c in first]
    if any(header) and not any(_TRIAL_REF.search(c) for c in first):
        for number, row in rows[1:]:
            for split, column, cell in zip(header, first, row, strict=False):
                if split and cell.strip() not in _PADDING and not add(cell, split, number):
                    raise ValueError(
                        f"{where} line {number}, column {column.strip()!r}: expected a trial"
                        " file such as ./level/fmri_p1_data/N1\\P10_29_N1.npz"
                        f" (P{{pp}}_{{trial}}), a participant P{{pp}} or 0 (nothing),"
                        f" found {cell!r}"
                    )
    else:
        for number, row in rows:
            words = [
                _SPLIT_WORDS[c.strip().lower()] for c in row if c.strip().lower() in _SPLIT_WORDS
            ]
            if not words:
                if number == rows[0][0]:
                    continue  # a header such as "path,label,split"
                raise ValueError(
                    f"{where} line {number}: no split name (train/val/test) in {row}; expected"
                    " a row per trial with its split, or columns headed train_list, val_list,"
                    " test_list (or train, val, test)"
                )
            if not any(add(cell, words[0], number) for cell in row):
                raise ValueError(
                    f"{where} line {number}: no trial reference"
                    f" (P{{pp}}_{{trial}}) or participant (P{{pp}}) in {row}"
                )
    if not participants and not trials:
        raise ValueError(
            f"{where}: found no trial references (P{{pp}}_{{trial}}) or"
            " participants with a train/val/test split"
        )
    return Split(participants, trials)


def parse_participants(text: str) -> list[str]:
    """``P01-P12`` / ``P13,P14`` / ``1-3,7`` -> participant ids."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"P?(\d+)\s*-\s*P?(\d+)", part, re.IGNORECASE)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"participant range {part!r}: end before start")
            out.extend(f"P{i:02d}" for i in range(a, b + 1))
        elif re.fullmatch(r"P?\d+", part, re.IGNORECASE):
            out.append(_participant(part.lstrip("Pp")))
        else:
            out.append(part)  # a free-form participant name from an XDF file
    return out
