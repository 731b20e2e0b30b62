"""Rigid (6-DOF) registration of each new volume to the run's reference: the bridge's hot loop.

Why a registration of our own rather than SimpleITK or dipy: a neurofeedback display waits for
this step on every TR, and the general-purpose toolkits spend their time on generality (metric
objects, optimiser callbacks, whole-image resampling per iteration). ``benchmarks/bench_scanner.py``
runs them side by side on the same volumes; docs/scanner.md has the figures.

The method is inverse-compositional Gauss-Newton (Baker & Matthews 2004) on the sum of squared
differences, over a two-level pyramid:

* Everything that depends only on the reference is computed once per run: the sample points
  (the voxels with the strongest intensity gradient, where the information about position is),
  their world coordinates and the six steepest-descent values of each point.
* Each iteration is one compiled pass over the points: sample the new volume at the current
  estimate (trilinear), accumulate the 6x6 normal equations and the right-hand side. Points that
  the current estimate moves outside the new volume's field of view drop out of that pass.
* The estimate is composed with the inverse of each update, so the reference's gradients never
  need recomputing; it starts from the previous volume's estimate (heads move little per TR).

Parameters follow :mod:`emorecog_stream.scanner.rigid` (MCFLIRT's conventions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from emorecog_stream.scanner.rigid import (
    fov_centre,
    framewise_displacement,
    motion_matrix,
    params_from_matrix,
)

_CACHE = True


#: Voxel coordinates this far outside the grid still count as on it: a voxel centre mapped
#: through an affine and its inverse lands a rounding error away from where it started.
_EDGE = 1e-6


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _on_grid(x: float, y: float, z: float, nx: int, ny: int, nz: int) -> bool:
    return (
        -_EDGE <= x <= nx - 1 + _EDGE
        and -_EDGE <= y <= ny - 1 + _EDGE
        and -_EDGE <= z <= nz - 1 + _EDGE
    )


@numba.njit(cache=_CACHE, nogil=True)
def _trilinear(vol: np.ndarray, x: float, y: float, z: float) -> tuple[float, bool]:
    """Trilinear sample of ``vol`` at voxel coordinates; (0, False) outside the grid."""
    nx, ny, nz = vol.shape
    if not _on_grid(x, y, z, nx, ny, nz):
        return 0.0, False
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    z = min(max(z, 0.0), nz - 1.0)
    i = min(int(x), nx - 2) if nx > 1 else 0
    j = min(int(y), ny - 2) if ny > 1 else 0
    k = min(int(z), nz - 2) if nz > 1 else 0
    fx = x - i
    fy = y - j
    fz = z - k
    i1 = min(i + 1, nx - 1)
    j1 = min(j + 1, ny - 1)
    k1 = min(k + 1, nz - 1)
    c00 = vol[i, j, k] * (1.0 - fx) + vol[i1, j, k] * fx
    c10 = vol[i, j1, k] * (1.0 - fx) + vol[i1, j1, k] * fx
    c01 = vol[i, j, k1] * (1.0 - fx) + vol[i1, j, k1] * fx
    c11 = vol[i, j1, k1] * (1.0 - fx) + vol[i1, j1, k1] * fx
    c0 = c00 * (1.0 - fy) + c10 * fy
    c1 = c01 * (1.0 - fy) + c11 * fy
    return c0 * (1.0 - fz) + c1 * fz, True


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _keys_weights(f: float) -> tuple[float, float, float, float]:
    """Keys (1981) cubic convolution weights, a = -0.5, for the taps at -1, 0, 1, 2."""
    f2 = f * f
    f3 = f2 * f
    w0 = -0.5 * f3 + f2 - 0.5 * f
    w1 = 1.5 * f3 - 2.5 * f2 + 1.0
    w2 = -1.5 * f3 + 2.0 * f2 + 0.5 * f
    w3 = 0.5 * f3 - 0.5 * f2
    return w0, w1, w2, w3


@numba.njit(cache=_CACHE, nogil=True)
def _cubic(vol: np.ndarray, x: float, y: float, z: float) -> tuple[float, bool]:
    """Cubic-convolution sample (interpolating, third-order accurate); taps clamp at the edges.

    Used for the last iterations: trilinear sampling smooths the image a little differently at
    every sub-voxel shift, which leaves a bias of several hundredths of a millimetre.
    """
    nx, ny, nz = vol.shape
    if not _on_grid(x, y, z, nx, ny, nz):
        return 0.0, False
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    z = min(max(z, 0.0), nz - 1.0)
    i = int(x)
    j = int(y)
    k = int(z)
    wx = _keys_weights(x - i)
    wy = _keys_weights(y - j)
    wz = _keys_weights(z - k)
    total = 0.0
    for c in range(4):
        kk = min(max(k + c - 1, 0), nz - 1)
        plane = 0.0
        for b in range(4):
            jj = min(max(j + b - 1, 0), ny - 1)
            row = 0.0
            for a in range(4):
                ii = min(max(i + a - 1, 0), nx - 1)
                row += wx[a] * vol[ii, jj, kk]
            plane += wy[b] * row
        total += wz[c] * plane
    return total, True


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _sample_at(
    moving: np.ndarray, to_voxel: np.ndarray, points: np.ndarray, n: int, cubic: bool
) -> tuple[float, bool]:
    """The moving volume at world point ``points[n]`` mapped by ``to_voxel`` (3x4)."""
    px = points[n, 0]
    py = points[n, 1]
    pz = points[n, 2]
    vx = to_voxel[0, 0] * px + to_voxel[0, 1] * py + to_voxel[0, 2] * pz + to_voxel[0, 3]
    vy = to_voxel[1, 0] * px + to_voxel[1, 1] * py + to_voxel[1, 2] * pz + to_voxel[1, 3]
    vz = to_voxel[2, 0] * px + to_voxel[2, 1] * py + to_voxel[2, 2] * pz + to_voxel[2, 3]
    if cubic:
        return _cubic(moving, vx, vy, vz)
    return _trilinear(moving, vx, vy, vz)


@numba.njit(cache=_CACHE, nogil=True)
def _normal_equations(
    moving: np.ndarray,
    to_voxel: np.ndarray,
    points: np.ndarray,
    steepest: np.ndarray,
    template: np.ndarray,
    hessian: np.ndarray,
    rhs: np.ndarray,
    cubic: bool,
) -> tuple[int, float]:
    """One Gauss-Newton pass: fill ``hessian`` (6x6) and ``rhs`` (6,) from the in-FOV points.

    ``to_voxel`` (3x4) maps a reference world point to the moving volume's voxel coordinates
    under the current estimate. Returns the number of points used and their squared error.
    """
    hessian[:, :] = 0.0
    rhs[:] = 0.0
    used = 0
    sse = 0.0
    for n in range(points.shape[0]):
        value, inside = _sample_at(moving, to_voxel, points, n, cubic)
        if not inside:
            continue
        err = value - template[n]
        sse += err * err
        used += 1
        for a in range(6):
            sa = steepest[n, a]
            rhs[a] += sa * err
            for b in range(a, 6):
                hessian[a, b] += sa * steepest[n, b]
    for a in range(6):
        for b in range(a):
            hessian[a, b] = hessian[b, a]
    return used, sse


@numba.njit(cache=_CACHE, nogil=True)
def _label_sums(
    moving: np.ndarray,
    to_voxel: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    cubic: bool,
) -> None:
    """Add the corrected value of every atlas voxel to its label's sum."""
    sums[:] = 0.0
    counts[:] = 0
    for n in range(points.shape[0]):
        value, inside = _sample_at(moving, to_voxel, points, n, cubic)
        if inside:
            sums[labels[n]] += value
            counts[labels[n]] += 1


@dataclass(frozen=True)
class RegistrationSettings:
    """How hard the registration works; the defaults meet 0.1 mm / 0.1 degree on real EPI."""

    max_points: int = 40_000  # strongest-gradient voxels used at full resolution
    coarse_points: int = 15_000  # at half resolution
    coarse_iterations: int = 12
    fine_iterations: int = 10
    cubic_iterations: int = 3  # last iterations at full resolution with cubic sampling
    tolerance_mm: float = 1e-3  # stop when an update moves no point of a 50 mm sphere further
    mask_fraction: float = 0.1  # voxels darker than this fraction of the 99th percentile are air


@dataclass(frozen=True)
class MotionEstimate:
    """One volume's rigid motion relative to the reference."""

    params: np.ndarray  # (6,) trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad)
    matrix: np.ndarray  # 4x4 world transform: the reference point x is at matrix @ x now
    framewise_displacement: float  # mm, Power et al. 2012, against the previous volume
    iterations: int
    points_used: int  # sample points inside the new volume's field of view at the end
    rms_error: float  # root mean square intensity difference at the end (after correction)


class _Level:
    """The reference at one pyramid level: its sample points and steepest-descent values."""

    def __init__(self, data: np.ndarray, affine: np.ndarray, centre: np.ndarray, n_points: int,
                 mask_fraction: float) -> None:
        self.affine = affine
        self.inverse_affine = np.linalg.inv(affine)
        grad_vox = np.stack(np.gradient(data.astype(np.float64)), axis=-1)
        # world gradient: d/dx = A^-T d/dv (only the linear part of the affine matters)
        grad_world = grad_vox @ np.linalg.inv(affine[:3, :3])
        magnitude = np.linalg.norm(grad_world, axis=-1)
        threshold = mask_fraction * float(np.percentile(data, 99))
        # a point counts if it or its neighbourhood holds tissue: edges of the head included
        near_tissue = ndimage.maximum_filter(data, size=3) > threshold
        candidates = np.flatnonzero(near_tissue.ravel() & (magnitude.ravel() > 0))
        if candidates.size == 0:
            raise ValueError("reference volume has no contrast to register to (all voxels equal)")
        if candidates.size > n_points:
            strongest = np.argpartition(magnitude.ravel()[candidates], -n_points)[-n_points:]
            candidates = np.sort(candidates[strongest])
        ijk = np.stack(np.unravel_index(candidates, data.shape), axis=-1).astype(np.float64)
        world = ijk @ affine[:3, :3].T + affine[:3, 3]
        g = grad_world.reshape(-1, 3)[candidates]
        d = world - centre
        steepest = np.empty((candidates.size, 6))
        steepest[:, :3] = g
        steepest[:, 3:] = np.cross(d, g)
        self.points = np.ascontiguousarray(world)
        self.steepest = steepest
        self.template = data.ravel()[candidates].astype(np.float64)


@numba.njit(cache=_CACHE, nogil=True)
def _block_means(data: np.ndarray, fx: int, fy: int, fz: int) -> np.ndarray:
    """Means of ``fx x fy x fz`` blocks (float32 out); a partial block at the end is dropped."""
    nx, ny, nz = data.shape[0] // fx, data.shape[1] // fy, data.shape[2] // fz
    out = np.empty((nx, ny, nz), dtype=np.float32)
    scale = 1.0 / (fx * fy * fz)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                total = 0.0
                for a in range(fx):
                    for b in range(fy):
                        for c in range(fz):
                            total += data[i * fx + a, j * fy + b, k * fz + c]
                out[i, j, k] = total * scale
    return out


def half_resolution(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2x2 block means (an axis shorter than 8 keeps its size) and the coarser grid's affine."""
    factors = [2 if n >= 8 else 1 for n in data.shape]
    coarse = _block_means(np.ascontiguousarray(data, dtype=np.float32), *factors)
    scale = np.diag([*factors, 1]).astype(float)
    shift = np.eye(4)
    shift[:3, 3] = [(f - 1) / 2.0 for f in factors]  # a block's centre in fine voxels
    return coarse, affine @ shift @ scale


class RigidRegistration:
    """Registers volumes of one run to its reference (first volume unless given).

    ``register`` is called once per volume, in order; it starts from the previous estimate and
    reports framewise displacement against the previous volume.
    """

    def __init__(
        self,
        reference: np.ndarray,
        affine: np.ndarray,
        settings: RegistrationSettings | None = None,
    ) -> None:
        self.settings = settings or RegistrationSettings()
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim != 3:
            raise ValueError(f"reference volume: expected 3-D, got shape {ref.shape}")
        self.shape = ref.shape
        self.affine = np.asarray(affine, dtype=np.float64)
        self.centre = fov_centre(ref.shape, self.affine)
        s = self.settings
        self._fine = _Level(ref, self.affine, self.centre, s.max_points, s.mask_fraction)
        coarse, coarse_affine = half_resolution(ref, self.affine)
        self._coarse = _Level(coarse, coarse_affine, self.centre, s.coarse_points,
                              s.mask_fraction)
        self._previous: MotionEstimate | None = None
        self._hessian = np.zeros((6, 6))
        self._rhs = np.zeros(6)

    def reset(self) -> None:
        """Forget the previous volume (a new segment): FD starts again at 0."""
        self._previous = None

    def register(self, volume: np.ndarray) -> MotionEstimate:
        """Estimate ``volume``'s rigid motion relative to the reference."""
        data = np.asarray(volume)
        if data.shape != self.shape:
            raise ValueError(
                f"volume shape {data.shape} does not match the reference's {self.shape}"
            )
        fine = np.ascontiguousarray(data, dtype=np.float32)
        start = self._previous.matrix if self._previous is not None else np.eye(4)
        coarse, _ = half_resolution(fine, self.affine)
        s = self.settings
        matrix, it_coarse, _, _ = self._iterate(self._coarse, coarse, start, s.coarse_iterations)
        matrix, it_fine, used, sse = self._iterate(self._fine, fine, matrix, s.fine_iterations)
        if s.cubic_iterations:
            matrix, it_cubic, used, sse = self._iterate(
                self._fine, fine, matrix, s.cubic_iterations, cubic=True
            )
            it_fine += it_cubic
        params = params_from_matrix(matrix, self.centre)
        previous = self._previous.params if self._previous is not None else None
        estimate = MotionEstimate(
            params=params,
            matrix=matrix,
            framewise_displacement=framewise_displacement(previous, params),
            iterations=it_coarse + it_fine,
            points_used=used,
            rms_error=float(np.sqrt(sse / used)) if used else float("nan"),
        )
        self._previous = estimate
        return estimate

    def _iterate(
        self,
        level: _Level,
        moving: np.ndarray,
        matrix: np.ndarray,
        iterations: int,
        cubic: bool = False,
    ) -> tuple[np.ndarray, int, int, float]:
        tol = self.settings.tolerance_mm
        used, sse = 0, float("nan")
        done = 0
        for done in range(1, iterations + 1):  # noqa: B007 - the count is reported
            to_voxel = (level.inverse_affine @ matrix)[:3]
            used, sse = _normal_equations(
                moving, to_voxel, level.points, level.steepest, level.template,
                self._hessian, self._rhs, cubic,
            )
            if used < 6:
                raise ValueError("the volume does not overlap the reference any more")
            try:
                delta = np.linalg.solve(self._hessian, self._rhs)
            except np.linalg.LinAlgError:
                break
            matrix = matrix @ np.linalg.inv(motion_matrix(delta, self.centre))
            # largest displacement of the update on a 50 mm sphere, in mm
            if np.abs(delta[:3]).sum() + 50.0 * np.abs(delta[3:]).sum() < tol:
                break
        return matrix, done, used, sse


class LabelMeans:
    """Mean of each atlas label's voxels in a volume, after undoing its motion.

    Sampling the moving volume at the corrected atlas positions gives the same numbers as
    resampling the whole volume first and then averaging, at a fraction of the cost (only atlas
    voxels are touched). Sampling is cubic by default: trilinear sampling blurs each voxel with
    its neighbours by an amount that changes with the sub-voxel shift, which on real EPI moved
    by 3 mm / 3 degrees costs about 0.006 of correlation with the unmoved ROI means.
    """

    def __init__(
        self, labels: np.ndarray, affine: np.ndarray, n_labels: int, cubic: bool = True
    ) -> None:
        lab = np.asarray(labels)
        self.cubic = cubic
        idx = np.flatnonzero(lab.ravel() > 0)
        ijk = np.stack(np.unravel_index(idx, lab.shape), axis=-1).astype(np.float64)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.inverse_affine = np.linalg.inv(self.affine)
        self.points = np.ascontiguousarray(ijk @ self.affine[:3, :3].T + self.affine[:3, 3])
        self.labels = (lab.ravel()[idx].astype(np.int64) - 1).copy()
        self.n_labels = n_labels
        self.voxels = np.bincount(self.labels, minlength=n_labels)
        self._sums = np.zeros(n_labels)
        self._counts = np.zeros(n_labels, dtype=np.int64)

    def means(self, volume: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
        """(n_labels,) float64; a label whose every voxel left the field of view is NaN."""
        m = np.eye(4) if matrix is None else matrix
        to_voxel = (self.inverse_affine @ m)[:3]
        data = np.ascontiguousarray(volume, dtype=np.float32)
        _label_sums(
            data, to_voxel, self.points, self.labels, self._sums, self._counts, self.cubic
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._sums / self._counts


def warm_up() -> None:
    """Load (or compile, on a fresh install) the compiled loops before the first volume.

    numba compiles on first call and caches on disk; without this the first volume of a
    session would wait for it (about a second on a fresh install, ~50 ms from the cache).
    """
    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.random((16, 16, 16)), 2.0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    reg = RigidRegistration(data, affine, RegistrationSettings(max_points=500, coarse_points=200))
    estimate = reg.register(data)
    labels = np.ones((16, 16, 16), dtype=np.int32)
    LabelMeans(labels, affine, 1).means(data, estimate.matrix)
