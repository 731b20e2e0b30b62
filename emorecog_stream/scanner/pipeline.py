"""Volumes in, ROI means and motion out: the bridge's processing, free of files and sockets.

One :class:`VolumePipeline` serves a whole session. Each run (DICOM series, NIfTI series) is a
*segment*: its own reference, its own registration state, its own framewise-displacement
history, so two runs are never mixed. The reference is the first volume of the run after the
``skip`` dummy volumes (not yet at steady-state magnetisation, brighter than the rest), unless
the user gives one; dummy volumes are dropped and said so, never published as brain data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from emorecog_stream.scanner.atlas import Atlas
from emorecog_stream.scanner.motion import (
    LabelMeans,
    MotionEstimate,
    RegistrationSettings,
    RigidRegistration,
)


@dataclass(frozen=True)
class ProcessedVolume:
    """What the bridge publishes for one volume (one sample on each LSL outlet)."""

    series: str
    segment: int  # 1 for the first run the bridge saw, 2 for the next, ...
    index: int  # volume number within the run (0-based, as the files say or as they came)
    roi: np.ndarray  # (n_labels,) float32 ROI means after motion correction
    motion: np.ndarray  # (7,) float32: six rigid parameters and framewise displacement
    fd_exceeded: bool  # framewise displacement above the threshold
    registration_ms: float
    roi_ms: float
    rms_error: float  # intensity difference to the reference after correction

    @property
    def framewise_displacement(self) -> float:
        return float(self.motion[6])


@dataclass(frozen=True)
class Skipped:
    """A volume that is not published, and why (a dummy volume before the reference)."""

    series: str
    index: int
    reason: str


@dataclass
class _Segment:
    series: str
    number: int
    registration: RigidRegistration | None = None
    seen: int = 0  # volumes of this run received so far (dummies included)
    last_index: int = -1
    notes: list[str] = field(default_factory=list)


class VolumePipeline:
    """Turns each volume of a session into ROI means and motion, segment by segment."""

    def __init__(
        self,
        atlas: Atlas,
        *,
        reference: np.ndarray | None = None,
        skip: int = 0,
        fd_threshold: float = 0.5,
        settings: RegistrationSettings | None = None,
    ) -> None:
        if skip < 0:
            raise ValueError(f"skip: expected 0 or more dummy volumes, got {skip}")
        if not fd_threshold > 0:
            raise ValueError(f"fd_threshold: expected a positive number of mm, got {fd_threshold}")
        self.atlas = atlas
        self.skip = skip
        self.fd_threshold = float(fd_threshold)
        self.settings = settings or RegistrationSettings()
        self._means = LabelMeans(atlas.labels, atlas.affine, atlas.n_labels)
        self._fixed_reference: RigidRegistration | None = None
        if reference is not None:
            atlas.check_grid(reference.shape, atlas.affine, "the reference volume")
            self._fixed_reference = RigidRegistration(reference, atlas.affine, self.settings)
        self._segment: _Segment | None = None
        self.segments = 0

    @property
    def segment(self) -> int:
        return self._segment.number if self._segment else 0

    def is_new_series(self, series: str) -> bool:
        return self._segment is None or self._segment.series != series

    def process(
        self,
        data: np.ndarray,
        affine: np.ndarray,
        series: str,
        index: int | None,
        on_motion: Callable[[int, int, np.ndarray], None] | None = None,
    ) -> ProcessedVolume | Skipped:
        """Register one volume and take its ROI means (raises AtlasError on a foreign grid).

        ``on_motion(segment, index, motion)`` is called as soon as the motion is known, before
        the ROI means: the bridge pushes the ``Motion`` sample then, so that it reaches the
        engine well before the volume's ``fMRI`` sample.
        """
        if self.is_new_series(series):
            self.segments += 1
            self._segment = _Segment(series=series, number=self.segments)
        seg = self._segment
        assert seg is not None
        number = index if index is not None else seg.last_index + 1
        seg.last_index = max(seg.last_index, number)
        seg.seen += 1
        self.atlas.check_grid(data.shape, affine, f"volume {number} of series {series}")
        if seg.seen <= self.skip:
            return Skipped(series, number, f"dummy volume {seg.seen} of {self.skip}, dropped")
        if seg.registration is None:
            if self._fixed_reference is not None:
                seg.registration = self._fixed_reference
                seg.registration.reset()
            else:
                seg.registration = RigidRegistration(data, affine, self.settings)
        t0 = time.perf_counter()
        estimate: MotionEstimate = seg.registration.register(data)
        t1 = time.perf_counter()
        motion = np.empty(7, dtype=np.float32)
        motion[:6] = estimate.params
        motion[6] = estimate.framewise_displacement
        if on_motion is not None:
            on_motion(seg.number, number, motion)
        t_roi = time.perf_counter()
        roi = self._means.means(data, estimate.matrix)
        t2 = time.perf_counter()
        return ProcessedVolume(
            series=series,
            segment=seg.number,
            index=number,
            roi=roi.astype(np.float32),
            motion=motion,
            fd_exceeded=estimate.framewise_displacement > self.fd_threshold,
            registration_ms=(t1 - t0) * 1e3,
            roi_ms=(t2 - t_roi) * 1e3,
            rms_error=estimate.rms_error,
        )
