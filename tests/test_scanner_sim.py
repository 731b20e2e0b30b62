"""The rehearsal scanner: phantom, atlas, truth, motion, every file format, pacing, the command.

Files are written to disk and read back with nibabel's and pydicom's own readers (no reader of
ours), so a format the simulator gets wrong fails here, not in the bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from emorecog_stream.core.streams import N_ROIS
from emorecog_stream.scanner import rigid, sim

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def session():
    return sim.default_session()[0]


@pytest.fixture(scope="module")
def rehearsal(session) -> sim.Rehearsal:
    """Six files (one dummy), default motion, 3 mm grid."""
    return sim.prepare(session, sim.SimSettings(volumes=6, dummies=1, seed=3))


_PLANS: dict[float, sim.Rehearsal] = {}


def _planned(session, fmt: str, oblique: float) -> sim.Rehearsal:
    """Four files on a grid tilted by ``oblique`` degrees, in ``fmt`` (planned once per tilt)."""
    if oblique not in _PLANS:
        _PLANS[oblique] = sim.prepare(session, sim.SimSettings(volumes=4, oblique_deg=oblique))
    return _with_format(_PLANS[oblique], fmt)


def _with_format(rehearsal: sim.Rehearsal, fmt: str) -> sim.Rehearsal:
    """The same plan written in another format (everything but the encoder is shared)."""
    settings = sim.SimSettings(**{**rehearsal.settings.__dict__, "fmt": fmt})
    return sim.Rehearsal(**{**rehearsal.__dict__, "settings": settings})


def _dicomwrappers():
    with warnings.catch_warnings():
        # nibabel calls its DICOM readers "experimental" on import
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers
    return dicomwrappers


# ------------------------------------------------------------------------------------------
# Determinism, atlas, truth


def test_same_seed_same_files_other_seed_other_head(session, rehearsal) -> None:
    again = sim.prepare(session, sim.SimSettings(volumes=6, dummies=1, seed=3))
    np.testing.assert_array_equal(again.atlas, rehearsal.atlas)
    for a, b in zip(again.trajectories, rehearsal.trajectories, strict=True):
        np.testing.assert_array_equal(a, b)
    for fmt in ("nifti", "dicom"):
        info = rehearsal.volume_info(1, 5)
        first = sim.encode_volume(_with_format(rehearsal, fmt), info, rehearsal.volume(1, 5))
        second = sim.encode_volume(_with_format(again, fmt), info, again.volume(1, 5))
        assert first == second  # byte for byte, UIDs included
    other = sim.prepare(session, sim.SimSettings(volumes=6, dummies=1, seed=4))
    assert not np.array_equal(other.atlas, rehearsal.atlas)
    assert not np.array_equal(other.volume(1, 5), rehearsal.volume(1, 5))


@pytest.mark.parametrize("grid", ["3mm", "2mm"])
def test_every_label_has_voxels_and_parcels_are_compact(grid: str) -> None:
    shape, voxel = sim.GRIDS[grid]
    affine = sim.grid_affine(shape, voxel)
    phantom = sim.make_phantom(shape, affine, seed=0)
    atlas = sim.make_atlas(phantom, seed=0)
    assert atlas.shape == shape
    assert set(np.unique(atlas)) == set(range(N_ROIS + 1))
    counts = np.bincount(atlas.ravel(), minlength=N_ROIS + 1)[1:]
    assert counts.min() >= 20
    world = sim.world_coordinates(shape, affine)
    for label in (1, 2, 123, 246):
        points = world[atlas == label]
        # compact: no voxel of a parcel is far from its centre (a parcel is ~1/123 hemisphere)
        assert np.linalg.norm(points - points.mean(axis=0), axis=1).max() < 30.0
        # odd labels on the left (x < 0), even on the right, as Brainnetome numbers them
        assert np.sign(points[:, 0].mean()) == (-1 if label % 2 else 1)
    # tissue only: the ventricles and everything outside the brain are 0
    assert not atlas[~phantom.brain].any()


def test_truth_is_the_label_means_of_the_unmoved_noiseless_volume(rehearsal, session) -> None:
    truth = rehearsal.truth_roi()
    assert truth.shape == (5, N_ROIS)  # 6 files, one of them a dummy
    for t in (0, 4):
        clean = rehearsal.clean_volume(t)
        by_mask = [
            clean[rehearsal.atlas == label].astype(np.float64).mean() for label in (1, 77, 246)
        ]
        np.testing.assert_allclose(truth[t, [0, 76, 245]], by_mask, rtol=1e-6)
    # the truth is the session's fMRI series plus one offset per ROI, constant in time
    offset = rehearsal.roi_offset()
    np.testing.assert_allclose(truth, session.fmri.data[:5] + offset, atol=2e-3)
    # and the unmoved noisy file of the first real volume (no motion yet) measures it
    measured = sim.label_means(rehearsal.volume(1, 2), rehearsal.atlas)
    counts = np.bincount(rehearsal.atlas.ravel(), minlength=N_ROIS + 1)[1:]
    assert np.all(np.abs(measured - truth[0]) < 6 * rehearsal.settings.noise_sd / np.sqrt(counts))


def test_files_hold_the_moved_volume_plus_noise(session) -> None:
    noiseless = sim.prepare(
        session, sim.SimSettings(volumes=40, seed=1, noise_sd=0.0, motion="strong")
    )
    index = 40
    info = noiseless.volume_info(1, index)
    assert np.any(info.params)
    expected = rigid.move_volume(noiseless.clean_volume(index - 1), noiseless.affine, info.params)
    np.testing.assert_allclose(noiseless.volume(1, index), sim.quantise(expected), atol=1e-4)


def test_dummies_are_brighter_and_precede_the_session(session) -> None:
    r = sim.prepare(session, sim.SimSettings(volumes=6, dummies=3, noise_sd=0.0, motion="none"))
    means = [float(r.volume(1, i).mean()) for i in range(1, 7)]
    assert means[0] > means[1] > means[2] > means[3]
    assert means[3] == pytest.approx(float(r.clean_volume(0).mean()), rel=1e-4)
    assert [r.volume_info(1, i).session_volume for i in range(1, 7)] == [None, None, None, 0, 1, 2]


# ------------------------------------------------------------------------------------------
# Motion


@pytest.mark.parametrize("kind", ["default", "strong"])
def test_trajectory_stays_within_3mm_and_3_degrees(kind: str) -> None:
    params = sim.motion_trajectory(1060, kind, seed=0, still=2)
    assert np.abs(params[:, :3]).max() <= 3.0
    assert np.abs(params[:, 3:]).max() <= np.deg2rad(3.0)
    assert not params[:2].any()  # the reference volumes do not move
    fd = sim.framewise_displacement(params)
    above = fd > sim.FD_THRESHOLD_MM
    assert above.any()  # some jerks cross the threshold ...
    assert above.mean() < (0.1 if kind == "strong" else 0.02)  # ... most volumes do not
    # and no volume is a near miss: flags can be checked exactly against the truth
    for seed in range(8):
        others = sim.framewise_displacement(sim.motion_trajectory(300, kind, seed, 2, 1))
        assert np.abs(others - sim.FD_THRESHOLD_MM).min() >= 0.1
        assert (others > sim.FD_THRESHOLD_MM).any()
    # a shorter run's motion is the start of a longer one's
    np.testing.assert_array_equal(sim.motion_trajectory(50, kind, seed=0, still=2), params[:50])
    assert not sim.motion_trajectory(50, "none").any()


def test_default_motion_of_a_session_has_some_jerks_above_threshold(session) -> None:
    r = sim.prepare(session, sim.SimSettings(motion="default"))
    fd = np.array([info.fd for info in r.plan()])
    crossings = int((fd > sim.FD_THRESHOLD_MM).sum())
    assert 2 <= crossings <= 20
    assert np.median(fd) < 0.1


def test_motion_tsv_and_session_json(tmp_path: Path, session) -> None:
    r = sim.prepare(session, sim.SimSettings(volumes=120, dummies=2, series=2, motion="strong"))
    meta = r.write_truth(tmp_path)
    lines = (tmp_path / "truth" / "motion.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[4:] == [*rigid.PARAMETER_NAMES, "framewise_displacement"]
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 240
    for series in ("1", "2"):
        mine = [row for row in rows if row[0] == series]
        params = np.array([[float(v) for v in row[4:10]] for row in mine])
        fd = np.array([float(row[10]) for row in mine])
        expected = [
            rigid.framewise_displacement(params[i - 1] if i else None, params[i])
            for i in range(len(params))
        ]
        np.testing.assert_allclose(fd, expected, atol=1e-8)
        np.testing.assert_allclose(params, r.trajectories[int(series) - 1], atol=1e-9)
        assert [row[3] for row in mine[:3]] == ["n/a", "n/a", "0"]
    assert not np.array_equal(r.trajectories[0], r.trajectories[1])
    written = json.loads((tmp_path / "session.json").read_text())
    assert written == json.loads(json.dumps(meta))
    assert written["fd_crossings"] == [
        {"series": int(row[0]), "volume": int(row[1]), "fd_mm": round(float(row[10]), 4)}
        for row in rows
        if float(row[10]) > sim.FD_THRESHOLD_MM
    ]
    assert written["fd_crossings"]
    assert written["session"]["participant"] == session.participant
    assert np.load(tmp_path / "truth" / "roi.npy").shape == (118, N_ROIS)
    labels = (tmp_path / "atlas_labels.txt").read_text().splitlines()
    assert labels[0] == "1 BN001" and labels[-1] == "246 BN246" and len(labels) == N_ROIS
    import nibabel as nib

    atlas = nib.load(tmp_path / "atlas.nii.gz")
    np.testing.assert_array_equal(np.asarray(atlas.dataobj), r.atlas)
    np.testing.assert_allclose(atlas.affine, r.affine, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Formats, read back by nibabel and pydicom


def _write(tmp_path: Path, r: sim.Rehearsal, index: int) -> tuple[list[Path], np.ndarray]:
    info = r.volume_info(1, index)
    data = r.volume(1, index)
    paths = []
    for name, payload in sim.encode_volume(r, info, data):
        (tmp_path / name).write_bytes(payload)
        paths.append(tmp_path / name)
    return paths, data


@pytest.mark.parametrize("oblique", [0.0, 15.0])
@pytest.mark.parametrize("fmt", ["nifti", "nifti-gz"])
def test_nifti_reads_back(tmp_path: Path, session, fmt: str, oblique: float) -> None:
    import nibabel as nib

    r = _planned(session, fmt, oblique)
    paths, data = _write(tmp_path, r, 4)
    assert [p.name for p in paths] == [
        "series001_vol_00004.nii" + (".gz" if fmt == "nifti-gz" else "")
    ]
    img = nib.load(paths[0])
    assert img.shape == (64, 64, 36)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(img.affine, r.affine, atol=1e-4)
    assert img.header.get_sform(coded=True)[1] == 1
    assert float(img.header["pixdim"][4]) == pytest.approx(r.tr)
    assert img.header.get_xyzt_units() == ("mm", "sec")


@pytest.mark.parametrize("oblique", [0.0, 15.0])
def test_siemens_mosaic_reads_back_through_nibabel(tmp_path: Path, session, oblique: float) -> None:
    import pydicom

    r = _planned(session, "dicom", oblique)
    paths, data = _write(tmp_path, r, 3)
    assert [p.name for p in paths] == ["001_000001_000003.dcm"]
    ds = pydicom.dcmread(paths[0])  # valid Part 10 file: preamble, file meta, transfer syntax
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Rows == ds.Columns == 64 * 6  # 36 slices tiled 6 x 6
    assert float(ds.RepetitionTime) == pytest.approx(r.tr * 1000.0)
    assert (ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber) == (1, 3, 3)
    wrapper = _dicomwrappers().wrapper_from_data(ds)
    assert wrapper.is_mosaic and wrapper.n_mosaic == 36
    got = wrapper.get_data()
    assert got.shape == data.shape
    np.testing.assert_allclose(got, data, atol=1e-4)
    np.testing.assert_allclose(RAS_TO_LPS @ wrapper.affine, r.affine, atol=1e-4)


@pytest.mark.parametrize("oblique", [0.0, 15.0])
def test_ge_slices_read_back_through_nibabel(tmp_path: Path, session, oblique: float) -> None:
    import pydicom

    r = _planned(session, "dicom-slices", oblique)
    paths, data = _write(tmp_path, r, 2)
    assert len(paths) == 36
    # written in interleaved acquisition order, not in position order
    written_order = [int(p.stem.rsplit("_", 1)[1]) for p in paths]
    assert written_order[:3] == [1, 3, 5] and sorted(written_order) == list(range(1, 37))
    wrappers = []
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.ImagesInAcquisition == 36
        assert ds.TemporalPositionIdentifier == 2 and ds.AcquisitionNumber == 2
        assert float(ds.RepetitionTime) == pytest.approx(r.tr * 1000.0)
        wrappers.append(_dicomwrappers().wrapper_from_data(ds))
    assert len({w.get("SeriesInstanceUID") for w in wrappers}) == 1
    assert sorted(w.instance_number for w in wrappers) == list(range(37, 73))
    wrappers.sort(key=lambda w: w.slice_indicator)
    assert all(wrappers[0].is_same_series(w) for w in wrappers)
    np.testing.assert_allclose(np.diff([w.slice_indicator for w in wrappers]), 3.0, atol=1e-4)
    got = np.stack([w.get_data() for w in wrappers], axis=-1)
    np.testing.assert_allclose(got, data, atol=1e-4)
    np.testing.assert_allclose(RAS_TO_LPS @ wrappers[0].affine, r.affine, atol=1e-4)


@pytest.mark.parametrize("oblique", [0.0, 15.0])
def test_enhanced_multiframe_reads_back_through_nibabel(
    tmp_path: Path, session, oblique: float
) -> None:
    import pydicom

    r = _planned(session, "dicom-enhanced", oblique)
    paths, data = _write(tmp_path, r, 4)
    assert [p.name for p in paths] == ["series001_vol_00004.dcm"]
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert (ds.NumberOfFrames, ds.AcquisitionNumber) == (36, 4)
    timing = ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0]
    assert float(timing.RepetitionTime) == pytest.approx(r.tr * 1000.0)
    frames = ds.PerFrameFunctionalGroupsSequence
    assert [f.FrameContentSequence[0].InStackPositionNumber for f in frames] == list(range(1, 37))
    wrapper = _dicomwrappers().wrapper_from_data(ds)
    assert wrapper.is_multiframe
    got = wrapper.get_data()
    assert got.shape == data.shape
    np.testing.assert_allclose(got, data, atol=1e-4)
    np.testing.assert_allclose(RAS_TO_LPS @ wrapper.affine, r.affine, atol=1e-4)


def test_every_format_stores_the_same_voxels(rehearsal, tmp_path: Path) -> None:
    """One rehearsal, five formats: the readers see one array (formats differ in bytes only)."""
    import nibabel as nib
    import pydicom

    data = rehearsal.volume(1, 4)
    got = {}
    for fmt in sim.FORMATS:
        folder = tmp_path / fmt
        folder.mkdir()
        paths, _ = _write(folder, _with_format(rehearsal, fmt), 4)
        if fmt.startswith("nifti"):
            got[fmt] = nib.load(paths[0]).get_fdata(dtype=np.float32)
        elif fmt in ("dicom", "dicom-enhanced"):
            got[fmt] = _dicomwrappers().wrapper_from_data(pydicom.dcmread(paths[0])).get_data()
        else:
            ws = [_dicomwrappers().wrapper_from_data(pydicom.dcmread(p)) for p in paths]
            ws.sort(key=lambda w: w.slice_indicator)
            got[fmt] = np.stack([w.get_data() for w in ws], axis=-1)
    for fmt, array in got.items():
        np.testing.assert_allclose(array, data, atol=1e-4, err_msg=fmt)


# ------------------------------------------------------------------------------------------
# Writing like a scanner


def test_writer_keeps_tr_pace_renames_into_place_and_stops(tmp_path: Path, session) -> None:
    r = sim.prepare(session, sim.SimSettings(volumes=40, tr=1.0))
    seen: list[sim.WrittenVolume] = []
    writer = sim.ScannerSim(tmp_path, r, speed=4.0, delay_s=0.05, on_volume=seen.append)
    writer.start()
    deadline = time.monotonic() + 20
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.stop()
    assert not writer.running
    count = len(writer.written)
    assert 3 <= count < 40  # stopped early
    # volume n is due at origin + (n * TR + delay) / speed, and never lands before
    assert writer.written[0].due_at == pytest.approx(writer.origin + 0.2625)
    np.testing.assert_allclose(np.diff([d.due_at for d in writer.written]), 0.25)
    for done in writer.written:
        assert done.written_at >= done.due_at - 1e-3
    assert writer.session_origin() == writer.origin  # no dummies: session starts with file 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"series001_vol_{i:05d}.nii" for i in range(1, count + 1)]  # no .part left


def test_slow_write_leaves_a_partial_file_visible(tmp_path: Path) -> None:
    path = tmp_path / "vol.nii"
    payload = bytes(range(256)) * 400
    import threading

    sizes = []
    writing = threading.Thread(target=sim.write_slowly, args=(path, payload, 0.4, 4))
    writing.start()
    while writing.is_alive():
        if path.exists():
            sizes.append(path.stat().st_size)
        time.sleep(0.01)
    assert path.read_bytes() == payload
    assert any(0 < s < len(payload) for s in sizes)


def test_simulate_library_call_with_dummies_and_two_series(tmp_path: Path, session) -> None:
    result = sim.simulate(
        tmp_path,
        session,
        settings=sim.SimSettings(fmt="dicom", volumes=3, dummies=1, series=2, noise_sd=0.5),
        fast=True,
    )
    assert [(d.info.series, d.info.index) for d in result.written] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    assert result.export_dir == tmp_path / "export"
    # the export folder holds nothing but volumes; atlas and truth are beside it
    names = sorted(p.name for p in result.export_dir.iterdir())
    assert names == [f"001_{s:06d}_{i:06d}.dcm" for s in (1, 2) for i in (1, 2, 3)]
    assert np.load(tmp_path / "truth" / "roi.npy").shape == (2, N_ROIS)
    assert result.description["dummies"] == 1
    assert json.loads((tmp_path / "session.json").read_text())["export_dir"] == "export"
    assert (tmp_path / "atlas.nii.gz").is_file()
    assert result.writer.session_origin(1) == pytest.approx(result.writer.origin + r_tr(result))


def r_tr(result: sim.SimResult) -> float:
    return result.rehearsal.tr


def test_settings_errors_name_what_was_expected(session) -> None:
    with pytest.raises(ValueError, match="format 'minc'"):
        sim.SimSettings(fmt="minc")
    with pytest.raises(ValueError, match="leave none after 3 dummies"):
        sim.prepare(session, sim.SimSettings(volumes=3, dummies=3))
    with pytest.raises(ValueError, match="more than the 1060 volumes of session P15"):
        sim.prepare(session, sim.SimSettings(volumes=1062, dummies=1))


# ------------------------------------------------------------------------------------------
# The command, through the installed console entry


def _console() -> str:
    script = Path(sys.executable).with_name("emorecog-stream")
    if not script.exists():
        pytest.skip("the emorecog-stream console script is not installed next to python")
    return str(script)


def test_cli_writes_a_rehearsal(tmp_path: Path) -> None:
    out = tmp_path / "export"
    proc = subprocess.run(
        [_console(), "scanner-sim", str(out), "--fast", "--volumes", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    volumes = sorted(p.name for p in (out / "export").iterdir())
    assert volumes == [f"series001_vol_{i:05d}.nii" for i in range(1, 6)]
    lines = proc.stdout.splitlines()
    assert len([line for line in lines if line.startswith("series 1 volume")]) == 5
    for name in (
        "atlas.nii.gz",
        "atlas_labels.txt",
        "session.json",
        "truth/roi.npy",
        "truth/motion.tsv",
        "truth/roi_offset.npy",
    ):
        assert (out / name).is_file(), name
    meta = json.loads((out / "session.json").read_text())
    assert meta["volumes_per_series"] == 5 and meta["format"] == "nifti"
    # it says how to bridge the rehearsal
    assert f"emorecog-stream scanner {out / 'export'} --atlas {out / 'atlas.nii.gz'}" in (
        proc.stderr
    )
    # a second run into the same folder would mix runs: refused, with the reason
    again = subprocess.run(
        [_console(), "scanner-sim", str(out), "--fast", "--volumes", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2
    assert "already holds 5 file(s)" in again.stderr and "--force" in again.stderr


def test_ge_slices_land_one_by_one_over_the_tr(tmp_path: Path, session) -> None:
    r = sim.prepare(session, sim.SimSettings(fmt="dicom-slices", volumes=3, tr=1.0))
    writer = sim.ScannerSim(tmp_path, r, speed=4.0, delay_s=0.0).start()
    assert writer.join(30)
    assert len(writer.written) == 3
    last = writer.written[-1]
    landed = sorted(p.stat().st_mtime for p in last.paths)
    # 36 slices over one TR (0.25 s at speed 4): not all at once, and the volume ends when due
    assert landed[-1] - landed[0] > 0.1
    assert last.written_at >= last.due_at - 1e-3
    assert not list(tmp_path.glob(".*.part"))


def test_unknown_format_is_named() -> None:
    from emorecog_stream.scanner import sim_files

    with pytest.raises(ValueError, match=r"expected one of nifti, .* got 'minc'"):
        next(
            sim_files.volume_files(
                "minc", np.zeros((8, 8, 8)), np.eye(4), tr=1.0, series=1, index=1, n_volumes=1
            )
        )


@pytest.mark.parametrize("fmt", sim.FORMATS)
def test_the_bridge_reader_reads_every_format_and_the_atlas(
    tmp_path: Path, session, fmt: str
) -> None:
    """What the rehearsal writes is what the bridge's own reader and atlas loader accept."""
    from emorecog_stream.scanner import atlas as atlas_module
    from emorecog_stream.scanner import files

    r = _planned(session, fmt, 15.0)
    r.write_truth(tmp_path)
    export = tmp_path / "export"
    writer = sim.ScannerSim(export, r, fast=True).start()
    assert writer.join(30)
    reader = files.VolumeReader()
    volumes = []
    for path in sorted(export.iterdir()):
        volumes.extend(reader.read(str(path)))
    assert [v.index for v in volumes] == [0, 1, 2, 3]
    assert len({v.series for v in volumes}) == 1
    labels = atlas_module.load_atlas(tmp_path / "atlas.nii.gz", tmp_path / "atlas_labels.txt")
    assert labels.names[0] == "BN001" and labels.n_labels == N_ROIS
    for n, volume in enumerate(volumes, start=1):
        np.testing.assert_allclose(volume.data, r.volume(1, n), atol=1e-4)
        np.testing.assert_allclose(volume.affine, r.affine, atol=1e-4)
        assert volume.tr == pytest.approx(r.tr)
        labels.check_grid(volume.data.shape, volume.affine, volume.source)


def test_writer_waits_for_start_at_and_reports_a_failure(
    tmp_path: Path, session, monkeypatch
) -> None:
    r = sim.prepare(session, sim.SimSettings(volumes=3, tr=1.0))
    start = time.monotonic() + 1.0
    writer = sim.ScannerSim(tmp_path / "a", r, speed=10.0, delay_s=0.0).start(start_at=start)
    time.sleep(0.5)
    assert not list((tmp_path / "a").iterdir())  # volumes are made ahead, not written
    assert writer.join(20)
    assert writer.written[0].written_at >= start + 0.1 - 1e-3
    assert len(writer.written) == 3

    def broken(series: int, index: int) -> np.ndarray:
        raise RuntimeError(f"cannot make volume {index}")

    monkeypatch.setattr(r, "volume", broken)
    failing = sim.ScannerSim(tmp_path / "b", r, fast=True).start()
    with pytest.raises(RuntimeError, match="cannot make volume 1"):
        failing.join(20)
