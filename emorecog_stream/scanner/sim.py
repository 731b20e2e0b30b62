"""A rehearsal scanner: a synthetic session written as volume files at TR pace.

Why: the bridge (export folder -> motion correction -> ROI means -> LSL) can only be rehearsed
end to end with files that look like a scanner's and whose truth is known. This module makes
them from the project's synthetic corpus, so that ``scanner-sim -> scanner -> run`` runs on one
machine and every number the bridge reports can be checked.

The generative model, and the one promise it keeps:

* **Head phantom** (defined in world millimetres, so every grid samples the same head): an
  ellipsoid brain (semi-axes 60 x 75 x 44 mm) with a brighter cortical ribbon and a smooth random
  texture, two lateral ventricles and a third ventricle (CSF, brighter than tissue as in T2*
  EPI), skull (dark) and scalp. Edges in all three axes give rigid registration a grip.
* **Atlas**: 246 compact parcels of the brain voxels (ventricles excluded), k-means of the voxel
  positions on the left hemisphere, mirrored to the right (odd labels left, even right, as in
  Brainnetome), fixed seed. Every label has voxels on every grid.
* **Signal**: voxel ``x`` of parcel ``l`` shows ``A(x) + w(x) * (roi[t, l] - base[l])``:
  ``A`` is the static anatomy (smoothed by a 2 mm point-spread function, as EPI is), ``roi``
  the session's 246-ROI series, ``base`` its per-ROI session mean and ``w`` a smooth weight
  scaled to mean 1 inside each parcel. So the label means of the unmoved, noiseless volume are
  exactly ``roi[t] + offset`` with ``offset[l] = mean of A over l - base[l]``, constant in time:
  a perfect bridge reports the session's own ROI changes on their own scale (the model compares
  each ROI with its running mean, so a constant offset does not change what it sees). Why not
  the session values themselves: their baselines jump by up to 40 units between neighbouring
  parcels, sharp edges that no resampling carries without error, which real anatomy does not
  have. Unlabelled voxels (CSF, skull, scalp) are constant over time.
* **Acquisition**: the head moves by a known rigid trajectory (``rigid.move_volume``, the
  shared convention), then thermal noise makes a Rician magnitude image (sd ``noise_sd``,
  0.5 % of the mean tissue intensity by default: an image SNR of 200, within the thermal SNR
  of 3 mm EPI at 3 T; physiological noise is already in the session's ROI series, so it is
  not added twice). Values are stored in steps of
  :data:`INTENSITY_STEP` in every format (DICOM holds integers with a rescale slope), so the
  same rehearsal gives the same voxel values whatever the format.
* **Dummies**: the first ``dummies`` volumes of a series are brighter (magnetisation not yet at
  steady state), show the session's first volume, and precede session volume 0.

Time: file ``n`` (0-based within a series, dummies included) holds the acquisition from
``origin + n * TR`` to ``origin + (n + 1) * TR``; session volume ``t`` is file ``dummies + t``,
so session time 0 (the session's own clock, where its physiology and markers live) is
``origin + dummies * TR``. All of this is divided by ``speed``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emorecog_stream.core.streams import N_ROIS, roi_labels
from emorecog_stream.scanner import rigid
from emorecog_stream.scanner.sim_files import (
    FILE_PATTERNS,
    FORMATS,
    INTENSITY_STEP,
    file_names,
    quantise,
    volume_files,
)

if TYPE_CHECKING:
    from emorecog_stream.recordings.session import Session

GENERATOR = "emorecog_stream.scanner.sim"
GENERATOR_VERSION = 1
"""Bumped whenever the phantom, atlas, motion or noise model changes."""

MOTION_KINDS: tuple[str, ...] = ("none", "default", "strong")

GRIDS: dict[str, tuple[tuple[int, int, int], float]] = {
    "3mm": ((64, 64, 36), 3.0),
    "2mm": ((104, 104, 72), 2.0),
}
"""Single-band EPI (64x64x36 at 3 mm) and HCP-style multiband EPI (104x104x72 at 2 mm)."""

EXPORT_DIR = "export"
"""Sub-folder of a rehearsal that holds the volumes (atlas and truth stay beside it, so a
bridge watching the export folder sees only what a scanner would write)."""

FD_THRESHOLD_MM = 0.5
"""Power et al. (2012); the crossings are listed in ``session.json``."""

DRIFT_FD_MM = 0.12
"""The slow drift alone never moves the head more than this between volumes (FD, mm)."""

MAX_TRANSLATION_MM = 3.0
MAX_ROTATION_RAD = float(np.deg2rad(3.0))

PSF_MM = 2.0
"""Standard deviation of the Gaussian point-spread function that smooths the static anatomy
(FWHM 4.7 mm, about 1.6 voxels at 3 mm, as EPI's own blurring). Sharper anatomy makes every
resampling leave errors in the ROI means that move with the head: with the true motion undone
(cubic) at 3 mm and no noise, the per-ROI correlation with the truth over 200 volumes of
``strong`` motion was at worst 0.77 at 1.3 mm, 0.97 at 2 mm and 0.996 at 3 mm (medians 0.996,
1.000, 1.000; without correction the worst was 0.35-0.46)."""

DEFAULT_PARTICIPANT = 15
"""P15: the demo's shipped replay session (held out from the default model's training)."""

# Phantom geometry in head millimetres (x right, y anterior, z superior), centred at world 0.
_BRAIN_AXES = np.array([60.0, 75.0, 44.0])
_SKULL_AXES = np.array([66.0, 82.0, 50.0])
_HEAD_AXES = np.array([72.0, 89.0, 56.0])
_TISSUE_LEVEL = 100.0
_CSF_LEVEL = 150.0
_SCALP_LEVEL = 45.0
_SKULL_LEVEL = 4.0
_RIBBON_MM = 5.0
_RIBBON_GAIN = 0.12
_TEXTURE_SD = 0.06
_DUMMY_EXTRA = (1.0, 0.55, 0.3, 0.16, 0.08)

(_RNG_TEXTURE, _RNG_ATLAS, _RNG_MOTION, _RNG_NOISE) = range(4)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# --------------------------------------------------------------------------------------------
# Grid, phantom, atlas


def grid_affine(
    shape: tuple[int, int, int], voxel_mm: float, oblique_deg: float = 0.0
) -> np.ndarray:
    """RAS+ voxel-to-world affine whose field-of-view centre is world 0.

    ``oblique_deg`` tilts the slab about the left-right axis (as an AC-PC aligned acquisition
    would), so the DICOM orientation is not the identity.
    """
    rot = rigid.rotation_matrix(np.deg2rad(oblique_deg), 0.0, 0.0)
    affine = np.eye(4)
    affine[:3, :3] = rot * float(voxel_mm)
    centre_voxel = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_voxel
    return affine


def world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World position (mm) of every voxel centre, shape ``shape + (3,)``."""
    idx = np.indices(shape, dtype=float).reshape(3, -1)
    world = np.asarray(affine)[:3, :3] @ idx + np.asarray(affine)[:3, 3:4]
    return world.T.reshape(*shape, 3)


def _ellipsoid_radius(world: np.ndarray, axes: np.ndarray, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid."""
    d = (world - np.asarray(centre)) / axes
    return np.sqrt((d**2).sum(axis=-1))


@dataclass
class Phantom:
    """The head on one grid: where tissue is, its static image and the signal weight."""

    affine: np.ndarray
    brain: np.ndarray  # bool, tissue that carries ROI signal (ventricles excluded)
    anatomy: np.ndarray  # float32, the static image A(x) of the whole head
    weight: np.ndarray  # float32, signal weight of tissue voxels (scaled to mean 1 per parcel)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)  # type: ignore[return-value]


def make_phantom(
    shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0, psf_mm: float = PSF_MM
) -> Phantom:
    """The synthetic head sampled on a grid (deterministic for ``seed`` and grid)."""
    from scipy import ndimage

    world = world_coordinates(shape, affine)
    r_brain = _ellipsoid_radius(world, _BRAIN_AXES)
    r_skull = _ellipsoid_radius(world, _SKULL_AXES)
    r_head = _ellipsoid_radius(world, _HEAD_AXES)
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        # lateral ventricles: elongated anterior-posterior, bent outward at the back
        ventricles |= _ellipsoid_radius(world, np.array([6.0, 26.0, 9.0]), (side * 11, 2, 9)) < 1
        ventricles |= _ellipsoid_radius(world, np.array([5.0, 8.0, 12.0]), (side * 17, -22, 2)) < 1
    ventricles |= _ellipsoid_radius(world, np.array([2.5, 12.0, 8.0]), (0, -2, -4)) < 1
    brain = (r_brain < 1.0) & ~ventricles
    # cortical ribbon: tissue within _RIBBON_MM of the brain surface (approximate: radial)
    depth_mm = (1.0 - r_brain) * float(np.min(_BRAIN_AXES))
    ribbon = brain & (depth_mm < _RIBBON_MM)
    voxel_mm = float(np.sqrt((np.asarray(affine)[:3, 0] ** 2).sum()))
    noise = _rng(seed, _RNG_TEXTURE).standard_normal(shape)
    texture = ndimage.gaussian_filter(noise, sigma=6.0 / voxel_mm)
    texture *= _TEXTURE_SD / max(float(texture[brain].std()), 1e-12)
    sharp = np.zeros(shape)
    sharp[(r_head < 1.0) & (r_skull >= 1.0)] = _SCALP_LEVEL
    sharp[(r_skull < 1.0) & (r_brain >= 1.0)] = _SKULL_LEVEL
    sharp[ventricles & (r_brain < 1.0)] = _CSF_LEVEL
    sharp[brain] = _TISSUE_LEVEL * (1.0 + texture[brain] + _RIBBON_GAIN * ribbon[brain])
    anatomy = ndimage.gaussian_filter(sharp, sigma=psf_mm / voxel_mm, mode="constant")
    weight = np.where(brain, 1.0 + 0.5 * texture, 0.0)
    return Phantom(
        affine=np.asarray(affine, dtype=float),
        brain=brain,
        anatomy=anatomy.astype(np.float32),
        weight=weight.astype(np.float32),
    )


def _assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(centroids).query(points)[1]


def _lloyd(
    points: np.ndarray, centroids: np.ndarray, iterations: int, rng: np.random.Generator
) -> np.ndarray:
    """k-means iterations; an empty cluster restarts at a point of the largest one."""
    centroids = centroids.copy()
    k = centroids.shape[0]
    for _ in range(iterations):
        nearest = _assign(points, centroids)
        counts = np.bincount(nearest, minlength=k)
        for empty in np.flatnonzero(counts == 0):
            largest = int(np.argmax(counts))
            members = np.flatnonzero(nearest == largest)
            pick = members[rng.integers(members.size)]
            nearest[pick] = empty
            counts[empty] += 1
            counts[largest] -= 1
        for axis in range(3):
            centroids[:, axis] = np.bincount(nearest, weights=points[:, axis], minlength=k)
        centroids /= counts[:, None]
    return centroids


def make_atlas(phantom: Phantom, n_labels: int = N_ROIS, seed: int = 0) -> np.ndarray:
    """A label image (int16, 1..``n_labels``, 0 outside tissue) of compact parcels.

    Left-hemisphere tissue is split by k-means into ``n_labels // 2`` parcels, ordered from
    anterior to posterior; each is mirrored to the right. Label ``2i - 1`` is the i-th left
    parcel and ``2i`` its mirror, as Brainnetome numbers hemispheres.
    """
    if n_labels % 2 or n_labels < 2:
        raise ValueError(f"atlas: expected an even number of labels >= 2, got {n_labels}")
    world = world_coordinates(phantom.shape, phantom.affine)
    points = world[phantom.brain]
    half = n_labels // 2
    left = points[points[:, 0] < 0]
    if left.shape[0] < half:
        raise ValueError(
            f"atlas: the grid holds {left.shape[0]} left-hemisphere tissue voxels, fewer than"
            f" the {half} parcels per hemisphere; use a finer grid"
        )
    rng = _rng(seed, _RNG_ATLAS)
    start = left[rng.choice(left.shape[0], size=half, replace=False)]
    centroids = _lloyd(left, start, 25, rng)
    centroids = centroids[np.lexsort((centroids[:, 2], -centroids[:, 1]))]
    mirrored = centroids * np.array([-1.0, 1.0, 1.0])
    both = np.empty((n_labels, 3))
    both[0::2] = centroids
    both[1::2] = mirrored
    nearest = _assign(points, both)
    if np.bincount(nearest, minlength=n_labels).min() == 0:
        both = _lloyd(points, both, 5, rng)
        nearest = _assign(points, both)
    atlas = np.zeros(phantom.shape, dtype=np.int16)
    atlas[phantom.brain] = (nearest + 1).astype(np.int16)
    return atlas


def label_means(volume: np.ndarray, atlas: np.ndarray, n_labels: int = N_ROIS) -> np.ndarray:
    """Mean of each label's voxels (float64, ``n_labels``), plain numpy: the truth's definition."""
    labels = np.asarray(atlas).ravel()
    inside = labels > 0
    sums = np.bincount(
        labels[inside], weights=np.asarray(volume, float).ravel()[inside], minlength=n_labels + 1
    )
    counts = np.bincount(labels[inside], minlength=n_labels + 1)
    return sums[1:] / counts[1:]


def normalise_weight(phantom: Phantom, atlas: np.ndarray, n_labels: int = N_ROIS) -> np.ndarray:
    """The signal weight scaled to mean 1 inside each parcel (0 outside tissue)."""
    means = label_means(phantom.weight, atlas, n_labels)
    scale = np.concatenate([[0.0], 1.0 / means])
    return (phantom.weight * scale[atlas]).astype(np.float32)


def label_table(n_labels: int = N_ROIS) -> str:
    """The label table file's text: ``index name`` per line, names as the fMRI stream's labels."""
    return "".join(f"{i} {name}\n" for i, name in enumerate(roi_labels(n_labels), start=1))


# --------------------------------------------------------------------------------------------
# Motion


def motion_trajectory(
    n_volumes: int, kind: str = "default", seed: int = 0, series: int = 1, still: int = 1
) -> np.ndarray:
    """Head position (n, 6) in the rigid convention, relative to the run's first volume.

    ``still`` leading volumes (the dummies and the first real volume) stay at 0, so the
    reference is the same whichever of them a bridge takes. After that: a slow drift (smooth
    random curves plus a small jitter, whose framewise displacement together stays under
    :data:`DRIFT_FD_MM`) and sudden jerks, each a jump held for 1-3 volumes that then mostly
    returns, the rest settling over about half a minute. A jerk is either small (FD <= 0.25 mm
    at onset and return) or large (>= 0.9 mm at onset, >= 0.75 mm back); the first is large,
    later ones with probability 0.3 (0.65 with ``strong``),
    so with the drift every FD stays at least 0.1 mm away from the 0.5 mm threshold: which
    volumes a bridge should flag is never a matter of its last 0.1 mm of precision. Bounded
    by 3 mm and 3 degrees. The trajectory of a shorter run is the start of a longer one's.
    """
    if kind not in MOTION_KINDS:
        raise ValueError(f"motion: expected one of {', '.join(MOTION_KINDS)}, got {kind!r}")
    out = np.zeros((n_volumes, 6))
    if kind == "none" or n_volumes <= still:
        return out
    strong = kind == "strong"
    rng = _rng(seed, _RNG_MOTION, series)
    # the model is drawn for a long run (1 h at 1 s) and cut, so prefixes agree
    horizon = max(n_volumes, 3600)
    t = np.arange(horizon - still, dtype=float)
    drift = np.zeros((t.size, 6))
    for k, period in enumerate((1800.0, 700.0, 300.0)):
        amp = rng.normal(0.0, 1.0, size=6) / (k + 1)
        phase = rng.uniform(0, 2 * np.pi, size=6)
        drift += amp * (np.sin(2 * np.pi * t[:, None] / period + phase) - np.sin(phase))
    reach = 2.6 if strong else 1.0  # the largest excursion, mm (and mm on the FD sphere)
    drift *= reach / max(float(np.abs(drift).max()), 1e-12)
    drift = _cap_fd(drift, 0.05)
    # small volume-to-volume jitter (breathing, swallowing): AR(1) in every parameter
    from scipy.signal import lfilter

    shake = rng.normal(0.0, 0.03 if strong else 0.015, size=drift.shape)
    drift += _cap_fd(lfilter([1.0], [1.0, -0.6], shake, axis=0), DRIFT_FD_MM - 0.05)
    drift[:, 3:] /= rigid.FD_RADIUS_MM  # radians that count like millimetres in FD
    jerks = np.zeros_like(drift)
    mean_gap = 60.0 if strong else 120.0
    onset = float(rng.uniform(8.0, 25.0))
    first = True
    while onset < t.size:
        # the first jerk is large, so any run longer than ~30 volumes exercises the flags
        big = first or rng.random() < (0.65 if strong else 0.3)
        first = False
        fd = rng.uniform(0.9, 2.2 if strong else 1.4) if big else rng.uniform(0.08, 0.25)
        direction = rng.normal(size=6)
        direction[3:] /= rigid.FD_RADIUS_MM
        direction *= fd / (
            np.abs(direction[:3]).sum() + rigid.FD_RADIUS_MM * np.abs(direction[3:]).sum()
        )
        hold = int(rng.integers(1, 4))
        residual = rng.uniform(0.0, 0.15)
        start = int(onset)
        profile = np.zeros(t.size)
        profile[start : start + hold] = 1.0
        after = np.arange(t.size - start - hold, dtype=float)
        profile[start + hold :] = residual * np.exp(-after / 30.0)
        jerks += profile[:, None] * direction
        onset += max(8.0, rng.exponential(mean_gap))
    moving = drift + jerks
    limits = np.array([MAX_TRANSLATION_MM] * 3 + [MAX_ROTATION_RAD] * 3)
    moving = np.clip(moving, -0.97 * limits, 0.97 * limits)
    out[still:] = moving[: n_volumes - still]
    return out


def _cap_fd(curves: np.ndarray, cap: float) -> np.ndarray:
    """``curves`` (n, 6, all in mm) scaled so that no step moves more than ``cap`` in FD."""
    steps = np.abs(np.diff(curves, axis=0)).sum(axis=1)
    largest = float(steps.max()) if steps.size else 0.0
    return curves * (cap / largest) if largest > cap else curves


def framewise_displacement(params: np.ndarray) -> np.ndarray:
    """Power et al. (2012) FD of each volume of a trajectory (0 for the first)."""
    fd = np.zeros(len(params))
    for i in range(1, len(params)):
        fd[i] = rigid.framewise_displacement(params[i - 1], params[i])
    return fd


# --------------------------------------------------------------------------------------------
# The rehearsal: everything about a run decided up front


@dataclass(frozen=True)
class SimSettings:
    """What a rehearsal looks like. ``tr=None`` takes the session's TR."""

    fmt: str = "nifti"
    shape: tuple[int, int, int] = GRIDS["3mm"][0]
    voxel_mm: float = GRIDS["3mm"][1]
    oblique_deg: float = 0.0
    tr: float | None = None
    volumes: int | None = None  # files per series, dummies included (default: whole session)
    dummies: int = 0
    series: int = 1
    motion: str = "default"
    seed: int = 0
    noise_sd: float = 0.5
    psf_mm: float = PSF_MM

    def __post_init__(self) -> None:
        problems = []
        if self.fmt not in FORMATS:
            problems.append(f"format {self.fmt!r} (expected one of {', '.join(FORMATS)})")
        if self.motion not in MOTION_KINDS:
            problems.append(f"motion {self.motion!r} (expected {', '.join(MOTION_KINDS)})")
        if len(self.shape) != 3 or min(self.shape) < 8:
            problems.append(f"shape {self.shape} (expected 3 sizes >= 8)")
        if not self.voxel_mm > 0:
            problems.append(f"voxel size {self.voxel_mm} mm (expected > 0)")
        if self.tr is not None and not self.tr > 0:
            problems.append(f"TR {self.tr} s (expected > 0)")
        if self.volumes is not None and self.volumes < 1:
            problems.append(f"volumes {self.volumes} (expected >= 1)")
        if self.dummies < 0:
            problems.append(f"dummies {self.dummies} (expected >= 0)")
        if self.series < 1:
            problems.append(f"series {self.series} (expected >= 1)")
        if self.psf_mm < 0:
            problems.append(f"point-spread sd {self.psf_mm} mm (expected >= 0)")
        if self.noise_sd < 0:
            problems.append(f"noise sd {self.noise_sd} (expected >= 0)")
        if self.seed < 0:
            problems.append(f"seed {self.seed} (expected >= 0)")
        if problems:
            raise ValueError("scanner-sim settings: invalid " + "; ".join(problems))


@dataclass(frozen=True)
class VolumeInfo:
    """One file-to-be (or one slice group, for ``dicom-slices``) of the run."""

    series: int  # 1-based
    index: int  # 1-based within the series, dummies included
    dummy: bool
    session_volume: int | None  # 0-based row of the session's fMRI series; None for dummies
    params: np.ndarray = field(repr=False)
    fd: float = 0.0


@dataclass
class Rehearsal:
    """A planned run: the head, atlas, ROI series and motion, with its truth. Pure and cheap to
    query; :class:`ScannerSim` writes it."""

    session: Session
    session_source: str
    settings: SimSettings
    phantom: Phantom
    atlas: np.ndarray
    weight: np.ndarray  # signal weight, mean 1 per parcel
    roi: np.ndarray  # (T, 246) float64, the session's fMRI rows written in each series
    base: np.ndarray  # (246,) float64, per-ROI mean of the whole session's fMRI series
    trajectories: list[np.ndarray]  # per series, (volumes, 6)

    @property
    def affine(self) -> np.ndarray:
        return self.phantom.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.phantom.shape

    @property
    def tr(self) -> float:
        return float(self.settings.tr if self.settings.tr is not None else self.session.tr)

    @property
    def volumes_per_series(self) -> int:
        return self.settings.dummies + self.roi.shape[0]

    def volume_info(self, series: int, index: int) -> VolumeInfo:
        params = self.trajectories[series - 1]
        n = index - 1
        dummy = n < self.settings.dummies
        fd = rigid.framewise_displacement(params[n - 1] if n else None, params[n])
        return VolumeInfo(
            series=series,
            index=index,
            dummy=dummy,
            session_volume=None if dummy else n - self.settings.dummies,
            params=params[n].copy(),
            fd=fd,
        )

    def plan(self) -> list[VolumeInfo]:
        """Every volume of the run, in acquisition order."""
        return [
            self.volume_info(s, i)
            for s in range(1, self.settings.series + 1)
            for i in range(1, self.volumes_per_series + 1)
        ]

    def clean_volume(self, session_volume: int, brightness: float = 1.0) -> np.ndarray:
        """The unmoved, noiseless volume showing session row ``session_volume`` (float32)."""
        change = np.concatenate([[0.0], self.roi[session_volume] - self.base])
        data = self.phantom.anatomy + change[self.atlas] * self.weight
        return (data * brightness).astype(np.float32)

    def volume(self, series: int, index: int) -> np.ndarray:
        """What file ``index`` of ``series`` holds: moved, noisy, quantised (float32)."""
        info = self.volume_info(series, index)
        n = index - 1
        if info.dummy:
            extra = _DUMMY_EXTRA[min(n, len(_DUMMY_EXTRA) - 1)] * (0.5 ** max(0, n - 4))
            clean = self.clean_volume(0, 1.0 + extra)
        else:
            clean = self.clean_volume(int(info.session_volume))  # type: ignore[arg-type]
        moved = (
            clean
            if not np.any(info.params)
            else rigid.move_volume(clean, self.affine, info.params, order=3)
        )
        if self.settings.noise_sd > 0:
            rng = _rng(self.settings.seed, _RNG_NOISE, series, index)
            sd = self.settings.noise_sd
            real = moved + rng.normal(0.0, sd, size=moved.shape).astype(np.float32)
            imag = rng.normal(0.0, sd, size=moved.shape).astype(np.float32)
            moved = np.sqrt(real * real + imag * imag)
        return quantise(moved)

    def truth_roi(self) -> np.ndarray:
        """(T, 246) float64: label means of each unmoved, noiseless volume (``roi + offset``).

        Computed as :meth:`clean_volume` then :func:`label_means` would, on the labelled voxels
        only (the others do not enter any mean), to keep a whole 2 mm session quick.
        """
        inside = self.atlas.ravel() > 0
        labels = self.atlas.ravel()[inside].astype(np.intp)
        anatomy = self.phantom.anatomy.ravel()[inside]
        weight = self.weight.ravel()[inside]
        counts = np.bincount(labels, minlength=N_ROIS + 1)[1:]
        truth = np.empty(self.roi.shape)
        for t in range(self.roi.shape[0]):
            change = np.concatenate([[0.0], self.roi[t] - self.base])
            values = (anatomy + change[labels] * weight).astype(np.float32)
            sums = np.bincount(labels, weights=values, minlength=N_ROIS + 1)[1:]
            truth[t] = sums / counts
        return truth

    def roi_offset(self) -> np.ndarray:
        """(246,) float64: truth minus the session's fMRI values, the same for every volume."""
        return label_means(self.phantom.anatomy, self.atlas) - self.base

    def file_names(self, info: VolumeInfo) -> list[str]:
        return file_names(self.settings.fmt, info.series, info.index, self.shape[2])

    def write_truth(
        self, out_dir: str | Path, export_dir: str | Path = EXPORT_DIR
    ) -> dict[str, Any]:
        """Write ``atlas.nii.gz``, ``atlas_labels.txt``, ``session.json`` and ``truth/``.

        ``export_dir`` (relative to ``out_dir``, or absolute) is only recorded in
        ``session.json``: where the volumes go."""
        import nibabel as nib

        out = Path(out_dir)
        (out / "truth").mkdir(parents=True, exist_ok=True)
        atlas_img = nib.Nifti1Image(self.atlas, self.affine)
        atlas_img.header.set_xyzt_units("mm")
        atlas_img.header.set_sform(self.affine, code=1)
        atlas_img.header.set_qform(self.affine, code=1)
        atlas_img.header["descrip"] = b"scanner-sim synthetic 246-label atlas"
        nib.save(atlas_img, out / "atlas.nii.gz")
        (out / "atlas_labels.txt").write_text(label_table(), encoding="utf-8")
        truth = self.truth_roi().astype(np.float32)
        np.save(out / "truth" / "roi.npy", truth)
        np.save(out / "truth" / "roi_offset.npy", self.roi_offset().astype(np.float32))
        rows = self.plan()
        lines = [
            "series\tvolume\tdummy\tsession_volume\t"
            + "\t".join(rigid.PARAMETER_NAMES)
            + "\tframewise_displacement"
        ]
        for r in rows:
            sv = "n/a" if r.session_volume is None else str(r.session_volume)
            values = "\t".join(f"{v:.10g}" for v in r.params)
            lines.append(f"{r.series}\t{r.index}\t{int(r.dummy)}\t{sv}\t{values}\t{r.fd:.10g}")
        (out / "truth" / "motion.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        meta = self.description(rows)
        meta["export_dir"] = str(export_dir)
        (out / "session.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return meta

    def description(self, rows: list[VolumeInfo] | None = None) -> dict[str, Any]:
        """What ``session.json`` holds."""
        rows = self.plan() if rows is None else rows
        s = self.settings
        params = np.array([r.params for r in rows])
        return {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "format": s.fmt,
            "export_dir": EXPORT_DIR,
            "file_pattern": FILE_PATTERNS[s.fmt],
            "tr_s": self.tr,
            "shape": list(self.shape),
            "voxel_mm": s.voxel_mm,
            "oblique_deg": s.oblique_deg,
            "affine": np.round(self.affine, 6).tolist(),
            "series": s.series,
            "volumes_per_series": self.volumes_per_series,
            "dummies": s.dummies,
            "session_volumes_per_series": int(self.roi.shape[0]),
            "motion": s.motion,
            "seed": s.seed,
            "noise_sd": s.noise_sd,
            "psf_mm": s.psf_mm,
            "intensity_step": INTENSITY_STEP,
            "session": {
                "participant": self.session.participant,
                "source": self.session_source,
                "tr_s": float(self.session.tr),
                "n_volumes": int(self.session.n_volumes),
                "first_volume_timestamp": float(self.session.fmri.timestamps[0]),
                "time_origin": "session volume t (row t of truth/roi.npy) is file"
                " dummies + t + 1 of each series; its acquisition starts at session time"
                " first_volume_timestamp + t * tr_s, the clock of the session's PPG,"
                " respiration and markers",
            },
            "truth": {
                "roi": "truth/roi.npy: (session volumes, 246) float32, label means of the"
                " unmoved noiseless volumes (what a perfect bridge reports); equals the"
                " session's fMRI rows plus truth/roi_offset.npy (246,), constant in time",
                "motion": "truth/motion.tsv: one row per file, rigid parameters in the"
                " emorecog_stream.scanner.rigid convention (mm, radians about the FOV centre)"
                " relative to the run's first volume, and Power 2012 FD",
            },
            "fd_threshold_mm": FD_THRESHOLD_MM,
            "fd_crossings": [
                {"series": r.series, "volume": r.index, "fd_mm": round(r.fd, 4)}
                for r in rows
                if r.fd > FD_THRESHOLD_MM
            ],
            "max_abs_translation_mm": float(np.abs(params[:, :3]).max()) if rows else 0.0,
            "max_abs_rotation_deg": float(np.rad2deg(np.abs(params[:, 3:]).max())) if rows else 0.0,
        }


def default_session() -> tuple[Session, str]:
    """The demo's session: ``replay_data/P15.xdf`` of a source checkout, else P15 generated.

    Both hold the same values (replay_data/README.md); reading the file keeps the rehearsal
    identical to what ``demo`` replays on LSL.
    """
    path = Path(__file__).resolve().parents[2] / "replay_data" / "P15.xdf"
    if path.is_file():
        from emorecog_stream.recordings import load_sessions

        return load_sessions(path)[0], str(path)
    from emorecog_stream.recordings.synth import SynthConfig, generate_session

    config = SynthConfig()
    return generate_session(DEFAULT_PARTICIPANT, config), (
        f"generated P{DEFAULT_PARTICIPANT:02d} (seed {config.seed})"
    )


def prepare(
    session: Session | None = None,
    settings: SimSettings | None = None,
    session_source: str | None = None,
) -> Rehearsal:
    """Plan a rehearsal of ``session`` (default: :func:`default_session`)."""
    settings = settings or SimSettings()
    if session is None:
        session, source = default_session()
    else:
        source = session_source or f"session {session.participant}"
    roi = np.asarray(session.fmri.data, dtype=np.float64)
    if roi.ndim != 2 or roi.shape[1] != N_ROIS:
        raise ValueError(f"session fMRI: expected (T, {N_ROIS}), got {roi.shape}")
    if not np.all(np.isfinite(roi)):
        raise ValueError("session fMRI: the ROI series holds NaN or infinite values")
    base = roi.mean(axis=0)
    if settings.volumes is not None:
        if settings.volumes <= settings.dummies:
            raise ValueError(
                f"scanner-sim settings: {settings.volumes} volumes leave none after"
                f" {settings.dummies} dummies"
            )
        if settings.volumes - settings.dummies > roi.shape[0]:
            raise ValueError(
                f"scanner-sim settings: {settings.volumes} volumes ({settings.dummies} dummies)"
                f" ask for more than the {roi.shape[0]} volumes of session"
                f" {session.participant}"
            )
        roi = roi[: settings.volumes - settings.dummies]
    affine = grid_affine(settings.shape, settings.voxel_mm, settings.oblique_deg)
    phantom = make_phantom(settings.shape, affine, settings.seed, settings.psf_mm)
    atlas = make_atlas(phantom, N_ROIS, settings.seed)
    n_files = settings.dummies + roi.shape[0]
    trajectories = [
        motion_trajectory(n_files, settings.motion, settings.seed, series, settings.dummies + 1)
        for series in range(1, settings.series + 1)
    ]
    return Rehearsal(
        session=session,
        session_source=source,
        settings=settings,
        phantom=phantom,
        atlas=atlas,
        weight=normalise_weight(phantom, atlas),
        roi=roi,
        base=base,
        trajectories=trajectories,
    )


def encode_volume(
    rehearsal: Rehearsal, info: VolumeInfo, data: np.ndarray
) -> list[tuple[str, bytes]]:
    """The file(s) of one volume as ``(name, bytes)``, in write order."""
    return list(iter_volume_files(rehearsal, info, data))


def iter_volume_files(
    rehearsal: Rehearsal, info: VolumeInfo, data: np.ndarray
) -> Iterator[tuple[str, bytes]]:
    """Like :func:`encode_volume`, encoding each file only when it is asked for (so a writer
    can encode the next slice while it waits for that slice's time)."""
    return volume_files(
        rehearsal.settings.fmt,
        data,
        rehearsal.affine,
        tr=rehearsal.tr,
        series=info.series,
        index=info.index,
        n_volumes=rehearsal.volumes_per_series,
        seed=rehearsal.settings.seed,
    )


# --------------------------------------------------------------------------------------------
# Writing like a scanner


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a hidden temporary name in the same folder, then rename into place."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_slowly(
    path: Path, payload: bytes, seconds: float, pieces: int = 4, stop: threading.Event | None = None
) -> None:
    """Write straight to the final name in ``pieces`` spread over ``seconds``: a reader can see
    a partial file, as on a network share that a scanner console writes to."""
    step = max(1, -(-len(payload) // pieces))
    with open(path, "wb") as f:
        for start in range(0, len(payload), step):
            f.write(payload[start : start + step])
            f.flush()
            if start + step < len(payload) and seconds > 0:
                if stop is not None:
                    stop.wait(seconds / pieces)
                else:
                    time.sleep(seconds / pieces)


@dataclass(frozen=True)
class WrittenVolume:
    """Reported after each volume's files are in place."""

    info: VolumeInfo
    paths: list[Path]
    written_at: float  # clock time the last file landed
    due_at: float  # clock time it was scheduled for


class ScannerSim:
    """Writes a :class:`Rehearsal` into ``out_dir`` at TR pace on a background thread.

    ``clock`` is the time base for ``start_at`` and the reported times (pass
    ``pylsl.local_clock`` to share the LSL clock with a replay of the session's physiology).
    Volume ``index`` (1-based) of series ``s`` is complete at ``origin + (offset_s + index *
    TR + delay_s) / speed``, ``offset_s`` being the duration of the series before it (their
    volumes plus ``series_gap_s`` each); GE-style slices land one by one over the TR before
    that. ``fast`` writes as fast as the volumes are made.

    A second thread makes and encodes up to ``lookahead`` volumes ahead of the writer, so the
    time a volume takes to make (tens of milliseconds at 3 mm, a few hundred at 2 mm or on a
    busy machine) overlaps the wait for its turn. If making one volume takes longer than a
    TR on average the run falls behind; each volume's lateness is ``written_at - due_at``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        rehearsal: Rehearsal,
        *,
        speed: float = 1.0,
        fast: bool = False,
        delay_s: float = 0.2,
        series_gap_s: float = 2.0,
        slow_write: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_volume: Callable[[WrittenVolume], None] | None = None,
        lookahead: int = 4,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed: expected > 0, got {speed}")
        if lookahead < 1:
            raise ValueError(f"lookahead: expected >= 1 volume, got {lookahead}")
        if delay_s < 0 or series_gap_s < 0:
            raise ValueError("delay and series gap: expected >= 0 s")
        self.out_dir = Path(out_dir)
        self.rehearsal = rehearsal
        self.speed = float(speed)
        self.fast = fast
        self.delay_s = float(delay_s)
        self.series_gap_s = float(series_gap_s)
        self.slow_write = slow_write
        self.clock = clock
        self.on_volume = on_volume
        self.lookahead = int(lookahead)
        self.written: list[WrittenVolume] = []
        self.origin: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due_time(self, info: VolumeInfo) -> float:
        """Clock time at which a volume's file lands (needs :attr:`origin`)."""
        if self.origin is None:
            raise RuntimeError("the writer has not started")
        tr = self.rehearsal.tr
        n_per = self.rehearsal.volumes_per_series
        offset = (info.series - 1) * (n_per * tr + self.series_gap_s)
        return self.origin + (offset + info.index * tr + self.delay_s) / self.speed

    def session_origin(self, series: int = 1) -> float:
        """Clock time of session time ``first_volume_timestamp`` (session volume 0 starts)."""
        if self.origin is None:
            raise RuntimeError("the writer has not started")
        tr = self.rehearsal.tr
        n_per = self.rehearsal.volumes_per_series
        offset = (series - 1) * (n_per * tr + self.series_gap_s)
        return self.origin + (offset + self.rehearsal.settings.dummies * tr) / self.speed

    def start(self, start_at: float | None = None) -> ScannerSim:
        """Begin the run: the first acquisition starts at ``start_at`` (default: now)."""
        if self._thread is not None:
            raise RuntimeError("the writer was already started")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.origin = self.clock() if start_at is None else float(start_at)
        made: queue.Queue[tuple[VolumeInfo, list[tuple[str, bytes]]] | BaseException | None]
        made = queue.Queue(maxsize=self.lookahead)
        maker = threading.Thread(
            target=self._make, args=(made,), name="scanner-sim-maker", daemon=True
        )
        self._thread = threading.Thread(
            target=self._run, args=(made,), name="scanner-sim", daemon=True
        )
        maker.start()
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the file being written (never leaves a half-renamed file)."""
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True when it has. Re-raises a writer error."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self.error is not None:
            raise self.error
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _make(self, made: queue.Queue) -> None:
        """Producer: each volume's files, in order; then None (or the error that stopped it)."""
        item: Any = None
        try:
            for info in self.rehearsal.plan():
                data = self.rehearsal.volume(info.series, info.index)
                item = (info, encode_volume(self.rehearsal, info, data))
                while not self._stop.is_set():
                    try:
                        made.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            item = None
        except BaseException as exc:  # handed to the writer, which reports it via join()
            item = exc
        while not self._stop.is_set():
            try:
                made.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, made: queue.Queue) -> None:
        tr = self.rehearsal.tr / self.speed
        try:
            while not self._stop.is_set():
                try:
                    item = made.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                info, files = item
                due = self.clock() if self.fast else self.due_time(info)
                paths = []
                for j, (name, payload) in enumerate(files):
                    if not self.fast:
                        # one file lands when it is due; slices land one by one over the TR
                        # (GE reconstructs each as it is acquired), the last one when due
                        slot = due - (len(files) - 1 - j) * tr / len(files)
                        if self._stop.wait(max(0.0, slot - self.clock())):
                            return
                    path = self.out_dir / name
                    if self.slow_write:
                        seconds = 0.0 if self.fast else min(0.2, tr / 5) / len(files)
                        write_slowly(path, payload, seconds, stop=self._stop)
                    else:
                        write_atomic(path, payload)
                    paths.append(path)
                record = WrittenVolume(info=info, paths=paths, written_at=self.clock(), due_at=due)
                self.written.append(record)
                if self.on_volume is not None:
                    self.on_volume(record)
        except BaseException as exc:  # reported by join(); the thread must not die silently
            self.error = exc
        finally:
            self._stop.set()  # the maker stops too


@dataclass
class SimResult:
    """What :func:`simulate` did: the plan, the truth it wrote and the files."""

    rehearsal: Rehearsal
    description: dict[str, Any]
    written: list[WrittenVolume]
    writer: ScannerSim
    export_dir: Path


def simulate(
    out_dir: str | Path,
    session: Session | None = None,
    *,
    settings: SimSettings | None = None,
    export_dir: str | Path | None = None,
    speed: float = 1.0,
    fast: bool = False,
    delay_s: float = 0.2,
    slow_write: bool = False,
    clock: Callable[[], float] = time.monotonic,
    start_at: float | None = None,
    on_volume: Callable[[WrittenVolume], None] | None = None,
    lookahead: int = 4,
    wait: bool = True,
) -> SimResult:
    """Plan a rehearsal, write its atlas and truth into ``out_dir`` and its volumes into
    ``export_dir`` (default ``out_dir/export``: the folder a bridge watches, which holds
    nothing but volumes, as a scanner's export folder).

    With ``wait=False`` it returns as soon as the writer thread runs: stop it with
    ``result.writer.stop()``; ``result.written`` fills as volumes land.
    """
    rehearsal = prepare(session, settings)
    export = Path(out_dir) / EXPORT_DIR if export_dir is None else Path(export_dir)
    description = rehearsal.write_truth(out_dir, os.path.relpath(export, out_dir))
    writer = ScannerSim(
        export,
        rehearsal,
        speed=speed,
        fast=fast,
        delay_s=delay_s,
        slow_write=slow_write,
        clock=clock,
        on_volume=on_volume,
        lookahead=lookahead,
    )
    writer.start(start_at)
    if wait:
        try:
            while not writer.join(0.5):
                pass
        except KeyboardInterrupt:
            writer.stop()
            raise
    return SimResult(
        rehearsal=rehearsal,
        description=description,
        written=writer.written,
        writer=writer,
        export_dir=export,
    )
