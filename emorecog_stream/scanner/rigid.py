"""Rigid-body geometry shared by the registration, the simulator and the tests.

One convention, written down once, so that a motion the simulator applies is the motion the
registration reports:

* Parameters are ``(trans_x, trans_y, trans_z, rot_x, rot_y, rot_z)`` as FSL MCFLIRT and
  fMRIPrep report them: translations in millimetres along the scanner (world) axes, rotations in
  radians about the world axes through the centre of the volume's field of view.
* The rotation is ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` with right-handed elementary
  rotations; the motion moves a world point ``x`` of the reference head to
  ``R (x - c) + c + t``, with ``c`` the field-of-view centre.
* A volume acquired after the head moved by ``params`` shows at world point ``x`` what the
  reference showed at ``motion⁻¹ x``; correcting it samples the moved volume at ``motion x``.
"""

from __future__ import annotations

import numpy as np

PARAMETER_NAMES: tuple[str, ...] = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
"""Order of the six rigid parameters everywhere (LSL Motion stream, logs, benchmarks)."""

FD_RADIUS_MM = 50.0
"""Power et al. (2012): rotations count as arc length on a sphere of this radius."""


def rotation_matrix(rot_x: float, rot_y: float, rot_z: float) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles in radians (3x3, float64)."""
    cx, sx = np.cos(rot_x), np.sin(rot_x)
    cy, sy = np.cos(rot_y), np.sin(rot_y)
    cz, sz = np.cos(rot_z), np.sin(rot_z)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


def fov_centre(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of the centre of a volume's field of view."""
    centre_voxel = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    return np.asarray(affine, dtype=float)[:3, :3] @ centre_voxel + np.asarray(affine)[:3, 3]


def motion_matrix(params: np.ndarray | tuple[float, ...], centre: np.ndarray) -> np.ndarray:
    """4x4 world transform of a head motion ``params`` about ``centre`` (see module docstring)."""
    p = np.asarray(params, dtype=float)
    if p.shape != (6,):
        raise ValueError(f"rigid parameters: expected 6 values, got shape {p.shape}")
    rot = rotation_matrix(p[3], p[4], p[5])
    c = np.asarray(centre, dtype=float)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + p[:3]
    return out


def params_from_matrix(matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Inverse of :func:`motion_matrix`: the six parameters of a rigid 4x4 world transform.

    The angles follow the ``Rz @ Ry @ Rx`` decomposition (``rot_y`` in [-pi/2, pi/2]).
    """
    m = np.asarray(matrix, dtype=float)
    rot = m[:3, :3]
    rot_y = float(np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0)))
    rot_x = float(np.arctan2(rot[2, 1], rot[2, 2]))
    rot_z = float(np.arctan2(rot[1, 0], rot[0, 0]))
    c = np.asarray(centre, dtype=float)
    trans = m[:3, 3] - (c - rot @ c)
    return np.array([trans[0], trans[1], trans[2], rot_x, rot_y, rot_z])


def voxel_matrix(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A world transform expressed on voxel indices of a grid with ``affine``."""
    a = np.asarray(affine, dtype=float)
    return np.linalg.inv(a) @ np.asarray(world, dtype=float) @ a


def framewise_displacement(previous: np.ndarray | None, current: np.ndarray) -> float:
    """Power et al. (2012) FD between two parameter vectors (mm); 0 for the first volume."""
    if previous is None:
        return 0.0
    diff = np.abs(np.asarray(current, dtype=float) - np.asarray(previous, dtype=float))
    return float(diff[:3].sum() + FD_RADIUS_MM * diff[3:].sum())


def resample(data: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int = 1) -> np.ndarray:
    """Sample ``data`` at ``world @ x`` for every voxel ``x`` of its own grid (float32 out).

    Outside the field of view reads 0, as the scanner sees nothing there (``grid-constant``:
    scipy's plain ``constant`` mode bends spline interpolation near the edges of the grid).
    """
    from scipy import ndimage

    vox = voxel_matrix(world, affine)
    out = ndimage.affine_transform(
        np.asarray(data, dtype=np.float32),
        vox[:3, :3],
        offset=vox[:3, 3],
        order=order,
        mode="grid-constant",
        cval=0.0,
    )
    return out.astype(np.float32, copy=False)


def move_volume(
    data: np.ndarray, affine: np.ndarray, params: np.ndarray | tuple[float, ...], order: int = 3
) -> np.ndarray:
    """What the scanner would see after the head moved by ``params`` (for the simulator, tests)."""
    centre = fov_centre(data.shape, affine)
    return resample(data, affine, np.linalg.inv(motion_matrix(params, centre)), order=order)


def correct_volume(
    data: np.ndarray, affine: np.ndarray, params: np.ndarray | tuple[float, ...], order: int = 1
) -> np.ndarray:
    """Undo a head motion ``params``: the volume back on the reference's anatomy."""
    centre = fov_centre(data.shape, affine)
    return resample(data, affine, motion_matrix(params, centre), order=order)
