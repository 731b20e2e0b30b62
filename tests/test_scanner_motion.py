"""Rigid registration and ROI means on a real EPI volume (nibabel's example4d.nii.gz).

Known motions up to 3 mm and 3 degrees are applied with cubic-spline resampling (the shared
convention of ``scanner.rigid``) and must come back within 0.1 mm and 0.1 degree; the ROI means
after correction must follow those of the unmoved volume (r >= 0.99) and clearly better than
the uncorrected ones.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emorecog_stream.scanner import rigid
from emorecog_stream.scanner.motion import LabelMeans, RigidRegistration, half_resolution

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def epi() -> tuple[np.ndarray, np.ndarray]:
    from nibabel.testing import data_path

    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    return img.get_fdata()[..., 0].astype(np.float32), img.affine  # 128x96x24, oblique


@pytest.fixture(scope="module")
def registration(epi) -> RigidRegistration:
    return RigidRegistration(*epi)


def block_atlas(data: np.ndarray, block: tuple[int, int, int] = (10, 10, 4)) -> np.ndarray:
    """A parcellation of the bright voxels into blocks: labels 1..n, 0 outside the head."""
    mask = data > 0.2 * np.percentile(data, 99)
    ijk = np.indices(data.shape)
    blocks = (ijk[0] // block[0]) * 10_000 + (ijk[1] // block[1]) * 100 + ijk[2] // block[2]
    labels = np.zeros(data.shape, dtype=np.int32)
    _ids, inverse = np.unique(blocks[mask], return_inverse=True)
    labels[mask] = inverse + 1
    return labels


angles = st.floats(-0.3, 0.3)
shifts = st.floats(-20.0, 20.0)


@settings(max_examples=100, deadline=None)
@given(st.tuples(shifts, shifts, shifts, angles, angles, angles))
def test_parameters_survive_the_matrix_round_trip(params):
    centre = np.array([3.0, -12.0, 40.0])
    matrix = rigid.motion_matrix(params, centre)
    np.testing.assert_allclose(rigid.params_from_matrix(matrix, centre), params, atol=1e-9)
    # the rotation part is a proper rotation
    np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(matrix[:3, :3]) == pytest.approx(1.0)


def test_rotation_is_about_the_centre_of_the_field_of_view():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-50.0, -60.0, -20.0]
    centre = rigid.fov_centre((51, 61, 21), affine)
    np.testing.assert_allclose(centre, [0.0, 0.0, 10.0])
    matrix = rigid.motion_matrix([0, 0, 0, 0.1, -0.2, 0.3], centre)
    np.testing.assert_allclose(matrix[:3, :3] @ centre + matrix[:3, 3], centre, atol=1e-12)


def test_framewise_displacement_follows_power_2012():
    previous = np.array([0.1, -0.2, 0.0, 0.001, 0.0, -0.002])
    current = np.array([0.3, -0.1, -0.1, 0.0, 0.002, 0.0])
    expected = 0.2 + 0.1 + 0.1 + 50.0 * (0.001 + 0.002 + 0.002)
    assert rigid.framewise_displacement(previous, current) == pytest.approx(expected)
    assert rigid.framewise_displacement(None, current) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_known_motions_on_a_real_epi_volume_are_recovered(epi, registration, seed):
    data, affine = epi
    rng = np.random.default_rng(seed)
    truth = np.r_[rng.uniform(-3, 3, 3), np.deg2rad(rng.uniform(-3, 3, 3))]
    # one case at the corner of the range: 3 mm and 3 degrees on every axis at once
    if seed == 0:
        truth = np.r_[3.0, -3.0, 3.0, np.deg2rad([3.0, -3.0, 3.0])]
    moved = rigid.move_volume(data, affine, truth)
    registration.reset()
    estimate = registration.register(moved)
    error = estimate.params - truth
    assert np.abs(error[:3]).max() < 0.1, f"translation error {error[:3]} mm"
    assert np.rad2deg(np.abs(error[3:])).max() < 0.1, f"rotation error {np.rad2deg(error[3:])} deg"
    # the matrix and the parameters describe the same motion
    np.testing.assert_allclose(
        estimate.matrix, rigid.motion_matrix(estimate.params, registration.centre), atol=1e-9
    )


def test_roi_means_after_correction_follow_the_unmoved_volume(epi, registration):
    data, affine = epi
    labels = block_atlas(data)
    n_labels = int(labels.max())
    assert n_labels > 100
    means = LabelMeans(labels, affine, n_labels)
    truth_means = means.means(data)
    # with no motion the sampler reads voxel values exactly: the plain label means
    plain = np.bincount(labels.ravel(), weights=data.ravel().astype(float))[1:]
    np.testing.assert_allclose(truth_means, plain / np.bincount(labels.ravel())[1:], rtol=1e-6)
    rng = np.random.default_rng(7)
    corrected_r, uncorrected_r = [], []
    for _ in range(4):
        motion = np.r_[rng.uniform(-3, 3, 3), np.deg2rad(rng.uniform(-3, 3, 3))]
        moved = rigid.move_volume(data, affine, motion)
        registration.reset()
        estimate = registration.register(moved)
        corrected = means.means(moved, estimate.matrix)
        uncorrected = means.means(moved)
        ok = np.isfinite(corrected)
        assert ok.mean() > 0.97  # only labels at the edge of the slab may leave the view
        corrected_r.append(np.corrcoef(corrected[ok], truth_means[ok])[0, 1])
        uncorrected_r.append(np.corrcoef(uncorrected[ok], truth_means[ok])[0, 1])
    assert min(corrected_r) >= 0.99, corrected_r
    # "clearly better": the uncorrected residual is several times the corrected one
    assert max(1 - r for r in corrected_r) * 5 < min(1 - r for r in uncorrected_r), (
        corrected_r,
        uncorrected_r,
    )


def test_consecutive_volumes_start_from_the_previous_estimate(epi):
    data, affine = epi
    registration = RigidRegistration(data, affine)
    trajectory = np.array(
        [[0.0] * 6, [0.2, 0.1, 0.0, 0.002, 0, 0], [1.0, 0.4, -0.3, 0.01, 0.0, -0.005]]
    )
    fds = []
    for params in trajectory:
        estimate = registration.register(rigid.move_volume(data, affine, params))
        fds.append(estimate.framewise_displacement)
        assert np.abs(estimate.params - params)[:3].max() < 0.1
    expected = [0.0] + [
        rigid.framewise_displacement(a, b) for a, b in itertools.pairwise(trajectory)
    ]
    np.testing.assert_allclose(fds, expected, atol=0.15)
    registration.reset()
    assert registration.register(data).framewise_displacement == 0.0


def test_wrong_shape_and_flat_reference_are_clear_errors(epi):
    data, affine = epi
    registration = RigidRegistration(data, affine)
    with pytest.raises(ValueError, match=r"volume shape \(10, 10, 10\) does not match"):
        registration.register(np.zeros((10, 10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="no contrast"):
        RigidRegistration(np.zeros((20, 20, 20)), np.eye(4))


def test_half_resolution_keeps_world_positions():
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 0.0]
    data = np.arange(16 * 16 * 16, dtype=float).reshape(16, 16, 16)
    coarse, coarse_affine = half_resolution(data, affine)
    assert coarse.shape == (8, 8, 8)
    # a coarse voxel sits at the centre of the 2x2x2 block it averages
    block_centre = affine @ np.array([0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(coarse_affine @ np.array([0, 0, 0, 1.0]), block_centre)
    assert coarse[0, 0, 0] == pytest.approx(data[:2, :2, :2].mean())
