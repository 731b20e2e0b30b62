"""Rigid registration candidates for the scanner bridge, side by side on the same volumes.

A real EPI volume (nibabel's ``example4d.nii.gz``) is resampled to the two benchmark grids
(64x64x36 at 3 mm, 104x104x72 at 2 mm), then moved by known rigid motions (up to 3 mm and 3
degrees, random axes) with a little thermal noise (1 % of the bright-tissue level) on both the
reference and the moved copy. Every candidate registers the same moved volumes to the same
reference, one thread, and is scored on time per volume and on the worst error against the
known motion:

* ``ours``: :class:`emorecog_stream.scanner.motion.RigidRegistration` (inverse-compositional
  Gauss-Newton, compiled, strongest-gradient voxels).
* ``simpleitk-10pct`` / ``simpleitk-all``: SimpleITK 2.x as a lab would write it (Euler3D about
  the volume centre, mean squares, regular-step gradient descent, shrink 2/1, smoothing 1/0,
  10 % random sampling or all voxels).
* ``dipy``: dipy's ``affine_registration`` with a rigid transform and mutual information.

Candidates that are not installed are reported as missing. Usage::

    python benchmarks/bench_registration.py [--cases 20] [--slow-cases 5]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
from scipy import ndimage

from emorecog_stream.scanner import rigid
from emorecog_stream.scanner.motion import RigidRegistration

GRIDS = {"64x64x36": ((64, 64, 36), 3.0), "104x104x72": ((104, 104, 72), 2.0)}


def real_epi() -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    from nibabel.testing import data_path

    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    return img.get_fdata()[..., 0].astype(np.float32), img.affine


def on_grid(shape: tuple[int, int, int], voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """The real EPI volume resampled to an axial grid of ``shape`` at ``voxel`` mm."""
    data, affine = real_epi()
    centre = rigid.fov_centre(data.shape, affine)
    target = np.diag([voxel, voxel, voxel, 1.0])
    target[:3, 3] = centre - voxel * (np.asarray(shape) - 1) / 2.0
    vox = np.linalg.inv(affine) @ target
    out = ndimage.affine_transform(
        data, vox[:3, :3], offset=vox[:3, 3], output_shape=shape, order=3, mode="grid-constant"
    )
    return np.clip(out, 0, None).astype(np.float32), target


def make_cases(
    ref: np.ndarray, affine: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    noise = 0.01 * float(np.percentile(ref, 99))
    reference = ref + rng.normal(0, noise, ref.shape).astype(np.float32)
    cases = []
    for _ in range(n):
        params = np.r_[rng.uniform(-3, 3, 3), np.deg2rad(rng.uniform(-3, 3, 3))]
        moved = rigid.move_volume(ref, affine, params)
        moved += rng.normal(0, noise, ref.shape).astype(np.float32)
        cases.append((params, moved))
    return reference, cases


def errors(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    d = np.abs(np.asarray(found) - truth)
    return float(d[:3].max()), float(np.rad2deg(d[3:]).max())


def run_ours(reference, affine, cases):
    reg = RigidRegistration(reference, affine)
    reg.register(cases[0][1])  # compile / warm caches outside the timing
    out = []
    for params, moved in cases:
        reg.reset()  # each case from identity: the worst start the bridge can have
        t0 = time.perf_counter()
        est = reg.register(moved)
        out.append((time.perf_counter() - t0, *errors(est.params, params)))
    return out


_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    lps = _FLIP @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return image


def run_simpleitk(reference, affine, cases, fraction: float | None):
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    fixed = _to_sitk(reference, affine)
    centre = rigid.fov_centre(reference.shape, affine)
    out = []
    for params, moved in cases:
        moving = _to_sitk(moved, affine)
        t0 = time.perf_counter()
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        if fraction is not None:
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(fraction, 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=200
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1, 0])
        init = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.GEOMETRY,
        )
        reg.SetInitialTransform(init, inPlace=False)
        result = reg.Execute(
            sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
        )
        elapsed = time.perf_counter() - t0
        tx = sitk.CompositeTransform(result).GetNthTransform(0)
        euler = sitk.Euler3DTransform(tx) if not isinstance(tx, sitk.Euler3DTransform) else tx
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(euler.GetMatrix()).reshape(3, 3)
        c = np.asarray(euler.GetCenter())
        lps[:3, 3] = np.asarray(euler.GetTranslation()) + c - lps[:3, :3] @ c
        found = rigid.params_from_matrix(_FLIP @ lps @ _FLIP, centre)
        out.append((elapsed, *errors(found, params)))
    return out


def run_dipy(reference, affine, cases):
    from dipy.align import affine_registration

    centre = rigid.fov_centre(reference.shape, affine)
    out = []
    for params, moved in cases:
        t0 = time.perf_counter()
        _, matrix = affine_registration(
            moved, reference, moving_affine=affine, static_affine=affine,
            pipeline=["center_of_mass", "translation", "rigid"],
            level_iters=[100, 30], sigmas=[1.0, 0.0], factors=[2, 1],
        )
        elapsed = time.perf_counter() - t0
        out.append((elapsed, *errors(rigid.params_from_matrix(matrix, centre), params)))
    return out


def summarise(rows) -> dict[str, float]:
    t = np.array([r[0] for r in rows]) * 1e3
    return {
        "n": len(rows),
        "p50_ms": round(float(np.percentile(t, 50)), 2),
        "p99_ms": round(float(np.percentile(t, 99)), 2),
        "worst_translation_mm": round(max(r[1] for r in rows), 4),
        "worst_rotation_deg": round(max(r[2] for r in rows), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30, help="moved volumes for ours")
    parser.add_argument("--slow-cases", type=int, default=3, help="moved volumes for the others")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    logging.getLogger("dipy").setLevel(logging.WARNING)  # its per-step INFO lines
    results: dict[str, dict[str, dict[str, float] | str]] = {}
    for grid, (shape, voxel) in GRIDS.items():
        ref, affine = on_grid(shape, voxel)
        reference, cases = make_cases(ref, affine, args.cases, args.seed)
        slow = cases[: args.slow_cases]
        row: dict[str, dict[str, float] | str] = {
            "ours": summarise(run_ours(reference, affine, cases))
        }
        for name, fn, extra in (
            ("simpleitk-10pct", run_simpleitk, (0.1,)),
            ("simpleitk-all", run_simpleitk, (None,)),
            ("dipy", run_dipy, ()),
        ):
            try:
                row[name] = summarise(fn(reference, affine, slow, *extra))
            except ImportError as exc:
                row[name] = f"not installed ({exc.name})"
        results[grid] = row
        print(f"== {grid} ({voxel:g} mm), motions up to 3 mm / 3 deg, 1 % noise", file=sys.stderr)
        for name, s in row.items():
            print(f"   {name:16s} {s}", file=sys.stderr)
    ours = {g: r["ours"] for g, r in results.items()}
    speedups = {}
    for g, r in results.items():
        other = r.get("simpleitk-10pct")
        if isinstance(other, dict):
            speedups[g] = round(other["p50_ms"] / ours[g]["p50_ms"], 1)  # type: ignore[index]
    print(json.dumps({"benchmark": "registration", "results": results,
                      "speedup_vs_simpleitk_10pct_p50": speedups}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
