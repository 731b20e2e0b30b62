"""The scanner bridge's readers on real scanner files shipped by nibabel and pydicom.

Every reader must give the same voxels as nibabel's own readers, and tell a half-written file
(retry it) from a broken one (skip it).
"""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from emorecog_stream.scanner.files import (
    DPCS_TO_RAS,
    DicomSlice,
    IncompleteFile,
    SliceAssembler,
    VolumeReader,
    VolumeReadError,
    classify,
    read_dicom,
    read_nifti,
)

NIBABEL_DATA = Path(data_path)
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
FUNCTIONAL = NIBABEL_DATA / "functional.nii"
EXAMPLE4D = NIBABEL_DATA / "example4d.nii.gz"


def test_philips_epi_phantom_par_rec_matches_nibabel(tmp_path):
    """nibabel's real Philips EPI phantom (64x64x9, 3 volumes): same arrays, affine and TR."""
    par = NIBABEL_DATA / "phantom_EPI_asc_CLEAR_2_1.PAR"
    assert classify(str(par)).kind == "parrec"
    volumes = VolumeReader().read(str(par))
    img = nib.load(str(par))
    expected = img.get_fdata()
    assert len(volumes) == expected.shape[3] == 3
    for i, volume in enumerate(volumes):
        assert volume.index == i and volume.tr == pytest.approx(2.0)
        np.testing.assert_array_equal(volume.data, expected[..., i].astype(np.float32))
        np.testing.assert_allclose(volume.affine, img.affine)
    # the pair lands in two files: the header first is a file still being written
    copy_par = tmp_path / par.name
    shutil.copy(par, copy_par)
    with pytest.raises(IncompleteFile, match="REC"):
        VolumeReader().read(str(copy_par))
    rec = NIBABEL_DATA / "phantom_EPI_asc_CLEAR_2_1.REC"
    (tmp_path / rec.name).write_bytes(rec.read_bytes()[: rec.stat().st_size // 2])
    with pytest.raises(IncompleteFile, match="shorter than its header says"):
        VolumeReader().read(str(copy_par))
    shutil.copy(rec, tmp_path / rec.name)
    assert len(VolumeReader().read(str(copy_par))) == 3


def _wrapper(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

        return dicomwrappers.wrapper_from_data(pydicom.dcmread(path))


def gunzip(name: str, folder: Path, as_name: str | None = None) -> Path:
    """A gzip-compressed test file of nibabel's, decompressed into ``folder``."""
    out = folder / (as_name or name.removesuffix(".gz"))
    out.write_bytes(gzip.decompress((NICOM_DATA / name).read_bytes()))
    return out


# ------------------------------------------------------------------------------------ NIfTI


def test_functional_4d_matches_nibabel():
    img = nib.load(FUNCTIONAL)
    expected = np.asarray(img.dataobj, dtype=np.float32)
    volumes = read_nifti(str(FUNCTIONAL))
    assert len(volumes) == 20
    for i, vol in enumerate(volumes):
        assert vol.index == i
        assert vol.data.dtype == np.float32 and vol.data.shape == (17, 21, 3)
        np.testing.assert_array_equal(vol.data, expected[..., i])
        np.testing.assert_array_equal(vol.affine, img.affine)
        assert vol.tr == pytest.approx(2.0)
        assert vol.series == os.path.abspath(FUNCTIONAL)
        assert vol.source == "functional.nii"
        assert vol.warnings == ()


def test_example4d_tr_unit_mistake_is_reported_and_read_as_ms():
    img = nib.load(EXAMPLE4D)
    assert img.header.get_xyzt_units()[1] == "sec" and img.header["pixdim"][4] == 2000
    volumes = read_nifti(str(EXAMPLE4D))
    assert [v.index for v in volumes] == [0, 1]
    assert all(v.tr == pytest.approx(2.0) for v in volumes)
    (warning,) = volumes[0].warnings
    assert warning.kind == "tr_units"
    assert "example4d.nii.gz" in warning.message and "2000" in warning.message
    np.testing.assert_array_equal(volumes[1].data, img.get_fdata(dtype=np.float32)[..., 1])


def test_one_file_per_volume_index_and_series_from_name(tmp_path):
    img = nib.load(FUNCTIONAL)
    data = np.asarray(img.dataobj)
    for i in (6, 7):
        one = nib.Nifti1Image(data[..., i], img.affine, img.header)
        nib.save(one, tmp_path / f"run1_{i:05d}.nii.gz")
    (vol,) = read_nifti(str(tmp_path / "run1_00007.nii.gz"))
    assert vol.index == 6  # names count from 1 by default, as the scanner does
    assert read_nifti(str(tmp_path / "run1_00007.nii.gz"), number_base=0)[0].index == 7
    assert vol.series == str(tmp_path / "run1_*.nii.gz")
    assert vol.data.shape == (17, 21, 3)
    saved = nib.load(tmp_path / "run1_00007.nii.gz")
    np.testing.assert_array_equal(vol.data, np.asarray(saved.dataobj, dtype=np.float32))
    np.testing.assert_allclose(vol.data, img.get_fdata(dtype=np.float32)[..., 7], rtol=1e-4)
    other = read_nifti(str(tmp_path / "run1_00006.nii.gz"))[0]
    assert other.series == vol.series and other.index == 5


def test_growing_4d_file_gives_each_volume_once(tmp_path):
    """A run written volume by volume into one .nii: each read hands out the new whole ones."""
    raw = FUNCTIONAL.read_bytes()
    img = nib.load(FUNCTIONAL)
    offset = int(img.dataobj.offset)
    per_volume = 17 * 21 * 3 * 2  # int16
    expected = np.asarray(img.dataobj, dtype=np.float32)
    target = tmp_path / "growing.nii"
    reader = VolumeReader()
    seen = []
    for n_bytes in (offset + per_volume - 1, offset + 3 * per_volume + 10, offset + 3 * per_volume,
                    len(raw)):
        target.write_bytes(raw[:n_bytes])
        seen.append([v.index for v in reader.read(str(target))])
    assert seen == [[], [0, 1, 2], [], list(range(3, 20))]
    target.write_bytes(raw)
    assert reader.read(str(target)) == []
    reader2 = VolumeReader()
    vols = reader2.read(str(target))
    np.testing.assert_array_equal(np.stack([v.data for v in vols], -1), expected)


@pytest.mark.parametrize("cut", [100, 352, 5000, -1])
def test_truncated_nii_is_incomplete(tmp_path, cut):
    raw = nib.load(FUNCTIONAL)
    data = np.asarray(raw.dataobj)[..., 0]
    whole = tmp_path / "whole.nii"
    nib.save(nib.Nifti1Image(data, raw.affine), whole)
    part = tmp_path / "vol_0001.nii"
    part.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(IncompleteFile) as info:
        read_nifti(str(part))
    assert "vol_0001.nii" in str(info.value)


def test_truncated_nii_gz_is_incomplete(tmp_path):
    part = tmp_path / "vol_0001.nii.gz"
    part.write_bytes(EXAMPLE4D.read_bytes()[:5000])
    with pytest.raises(IncompleteFile):
        read_nifti(str(part))


def test_garbage_nii_is_broken_not_incomplete(tmp_path):
    bad = tmp_path / "vol_0003.nii"
    bad.write_bytes(b"this is not a NIfTI header at all " * 40)
    with pytest.raises(VolumeReadError) as info:
        read_nifti(str(bad))
    assert not isinstance(info.value, IncompleteFile)
    assert info.value.path == str(bad)
    assert "vol_0003.nii" in str(info.value)


# ---------------------------------------------------------------------------- Siemens mosaic


@pytest.mark.parametrize("name", ["siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"])
def test_siemens_mosaic_matches_nibabel(tmp_path, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom.dicomreaders import mosaic_to_nii

    path = gunzip(name, tmp_path)
    wrapper = _wrapper(path)
    assert type(wrapper).__name__ == "MosaicWrapper"
    (vol,) = read_dicom(str(path))
    assert vol.data.shape == (128, 128, 48) and vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, wrapper.get_data())
    # Same world frame as nibabel's own DICOM -> NIfTI conversion (RAS).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nii = mosaic_to_nii(pydicom.dcmread(path))
    np.testing.assert_allclose(vol.affine, nii.affine)
    np.testing.assert_allclose(vol.affine, DPCS_TO_RAS @ wrapper.affine)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert vol.series == ds.SeriesInstanceUID
    assert vol.index == int(ds.AcquisitionNumber) - 1
    assert vol.tr == pytest.approx(float(ds.RepetitionTime) / 1000.0)
    assert vol.source == path.name


def test_truncated_mosaic_is_incomplete_and_names_file(tmp_path):
    whole = gunzip("siemens_dwi_0.dcm.gz", tmp_path)
    raw = whole.read_bytes()
    for cut in (60, 2000, len(raw) // 2, len(raw) - 1000):
        part = tmp_path / "001_000007_000042.dcm"
        part.write_bytes(raw[:cut])
        with pytest.raises(IncompleteFile) as info:
            read_dicom(str(part))
        assert "001_000007_000042.dcm" in str(info.value)


def test_not_dicom_with_dcm_name_is_broken(tmp_path):
    bad = tmp_path / "vol.dcm"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(VolumeReadError) as info:
        read_dicom(str(bad))
    assert not isinstance(info.value, IncompleteFile)


# ------------------------------------------------------------------------ enhanced multi-frame


def test_enhanced_multiframe_matches_nibabel(tmp_path):
    path = gunzip("philips_mprage.dcm.gz", tmp_path)
    wrapper = _wrapper(path)
    assert type(wrapper).__name__ == "MultiframeWrapper"
    (vol,) = read_dicom(str(path))
    assert vol.data.shape == (256, 256, 176)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = wrapper.get_data()
    np.testing.assert_array_equal(vol.data, expected.astype(np.float32))
    np.testing.assert_allclose(vol.affine, DPCS_TO_RAS @ wrapper.affine)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert vol.series == ds.SeriesInstanceUID
    # Enhanced MR keeps RepetitionTime in the shared functional groups.
    shared_tr = ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0]
    assert vol.tr == pytest.approx(float(shared_tr.RepetitionTime) / 1000.0)


def make_enhanced_4d(out: Path, n_slices: int = 8, n_times: int = 3, size: int = 64) -> Path:
    """An enhanced MR file whose frames span slices and time, cut from nibabel's real Philips
    file: its first ``n_slices`` slices (top-left ``size`` pixels, so the positions stay true),
    repeated over ``n_times`` time points (+100 per time point), with TemporalPositionIndex as a
    third dimension."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(gunzip("philips_mprage.dcm.gz", out.parent, "mprage_source.dcm"))
    pixels = ds.pixel_array
    frames = list(ds.PerFrameFunctionalGroupsSequence)
    chosen = [
        i for i, f in enumerate(frames)
        if f.FrameContentSequence[0].InStackPositionNumber <= n_slices
    ]
    new_frames, planes = [], []
    for t in range(n_times):
        for i in chosen:
            frame = copy.deepcopy(frames[i])
            content = frame.FrameContentSequence[0]
            content.TemporalPositionIndex = t + 1
            content.DimensionIndexValues = [1, int(content.InStackPositionNumber), t + 1]
            new_frames.append(frame)
            planes.append(pixels[i, :size, :size] + 100 * t)
    temporal = Dataset()
    temporal.DimensionOrganizationUID = ds.DimensionIndexSequence[0].DimensionOrganizationUID
    temporal.DimensionIndexPointer = 0x00209128  # TemporalPositionIndex
    temporal.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
    ds.DimensionIndexSequence.append(temporal)
    ds.PerFrameFunctionalGroupsSequence = Sequence(new_frames)
    ds.NumberOfFrames = len(new_frames)
    ds.Rows = ds.Columns = size
    ds.PixelData = np.stack(planes).astype(pixels.dtype).tobytes()
    ds.save_as(out)
    return out


def test_enhanced_multiframe_over_time_gives_one_volume_per_time_point(tmp_path):
    path = make_enhanced_4d(tmp_path / "enhanced_run.dcm")
    wrapper = _wrapper(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = wrapper.get_data()
    assert expected.shape == (64, 64, 8, 3)
    volumes = read_dicom(str(path))
    assert [v.index for v in volumes] == [0, 1, 2]
    for t, vol in enumerate(volumes):
        assert vol.data.shape == (64, 64, 8)
        np.testing.assert_array_equal(vol.data, expected[..., t].astype(np.float32))
        np.testing.assert_allclose(vol.affine, DPCS_TO_RAS @ wrapper.affine)
    np.testing.assert_array_equal(volumes[2].data - volumes[0].data, 200.0)


# --------------------------------------------------------------------------- per-slice DICOM


def make_slices(
    folder: Path,
    *,
    n_volumes: int,
    n_slices: int,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    images_in_acquisition: bool = True,
    spacing: float = 3.0,
) -> dict[tuple[int, int], Path]:
    """GE-style export from pydicom's real MR slice: one file per slice, distinct voxels each.

    Returns {(volume, slice): path}; slice k sits ``spacing`` mm above slice k-1 (+z).
    """
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pixels = base.pixel_array.astype(np.int16)
    paths = {}
    for vol in range(n_volumes):
        for k in range(n_slices):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = series_uid
            ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + spacing * k]
            ds.InstanceNumber = vol * n_slices + k + 1
            ds.RepetitionTime = "2000"
            if images_in_acquisition:
                ds.ImagesInAcquisition = n_slices
            ds.PixelData = (pixels + 10 * k + 100 * vol).astype(np.int16).tobytes()
            path = folder / f"i{ds.InstanceNumber}.MRDC.{k + 1}"
            ds.save_as(path)
            paths[(vol, k)] = path
    return paths


def expected_slice_volume(vol: int, n_slices: int) -> np.ndarray:
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    return np.stack([base + 10 * k + 100 * vol for k in range(n_slices)], axis=2)


def test_slices_out_of_order_assemble_into_volumes(tmp_path):
    paths = make_slices(tmp_path, n_volumes=2, n_slices=5)
    reader = VolumeReader()
    order = [(0, 3), (0, 0), (0, 4), (1, 2), (0, 1), (1, 0), (1, 4), (0, 2), (1, 3), (1, 1)]
    out = []
    for key in order:
        got = reader.read(str(paths[key]))
        out.append([v.index for v in got])
        for vol in got:
            expected = expected_slice_volume(vol.index, 5)
            # Slices run along +z in the files; nibabel's slice normal for this orientation
            # points to -z, so the volume holds them from the top down.
            np.testing.assert_array_equal(vol.data, expected[..., ::-1])
            assert vol.tr == pytest.approx(2.0)
            assert vol.series == "1.2.826.0.1.3680043.8.498.1"
    assert out == [[], [], [], [], [], [], [], [0], [], [1]]
    assert reader.assembler.pending_slices == 0


def test_slice_volume_affine_places_every_slice_where_its_header_says(tmp_path):
    paths = make_slices(tmp_path, n_volumes=1, n_slices=4, spacing=3.5)
    reader = VolumeReader()
    volumes = [v for k in (2, 0, 3, 1) for v in reader.read(str(paths[(0, k)]))]
    (vol,) = volumes
    assert vol.data.shape == (64, 64, 4)
    for k in range(4):
        wrapper = _wrapper(paths[(0, k)])
        ras_ipp = (DPCS_TO_RAS @ np.r_[wrapper.image_position, 1.0])[:3]
        where = 3 - k  # stacked along nibabel's slice normal (-z here)
        np.testing.assert_allclose((vol.affine @ [0, 0, where, 1])[:3], ras_ipp, atol=1e-4)
        np.testing.assert_array_equal(vol.data[..., where], wrapper.get_data())
    # In-plane: the single-slice affine nibabel gives, flipped to RAS.
    np.testing.assert_allclose(vol.affine[:3, :2], (DPCS_TO_RAS @ wrapper.affine)[:3, :2])
    assert np.linalg.norm(vol.affine[:3, 2]) == pytest.approx(3.5)


def test_slice_count_learned_when_headers_do_not_say(tmp_path):
    paths = make_slices(tmp_path, n_volumes=3, n_slices=3, images_in_acquisition=False)
    reader = VolumeReader()
    got = []
    for vol in range(3):
        for k in (1, 2, 0):
            got.append([v.index for v in reader.read(str(paths[(vol, k)]))])
    # Volume 0 is known complete when a slice position repeats (volume 1 began).
    assert got == [[], [], [], [0], [], [1], [], [], [2]]


def test_slice_count_from_user(tmp_path):
    paths = make_slices(tmp_path, n_volumes=2, n_slices=2, images_in_acquisition=False)
    reader = VolumeReader(slices_per_volume=2)
    got = [[v.index for v in reader.read(str(paths[key]))] for key in sorted(paths)]
    assert got == [[], [0], [], [1]]


def test_duplicate_slice_is_an_error_naming_both_files(tmp_path):
    paths = make_slices(tmp_path, n_volumes=1, n_slices=3)
    reader = VolumeReader()
    reader.read(str(paths[(0, 0)]))
    copy_path = tmp_path / "copy_of_first.dcm"
    shutil.copy(paths[(0, 0)], copy_path)
    with pytest.raises(VolumeReadError) as info:
        reader.read(str(copy_path))
    assert "copy_of_first.dcm" in str(info.value) and paths[(0, 0)].name in str(info.value)


def test_two_series_of_slices_do_not_mix(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_slices(tmp_path / "a", n_volumes=1, n_slices=2, series_uid="1.2.3.1")
    b = make_slices(tmp_path / "b", n_volumes=1, n_slices=2, series_uid="1.2.3.2")
    assembler = SliceAssembler()
    pieces = [read_dicom(str(p)) for p in (a[(0, 0)], b[(0, 0)], b[(0, 1)], a[(0, 1)])]
    assert all(isinstance(p, DicomSlice) for p in pieces)
    out = [[(v.series, v.index) for v in assembler.add(p)] for p in pieces]
    assert out == [[], [], [("1.2.3.2", 0)], [("1.2.3.1", 0)]]


def test_reading_a_file_twice_gives_its_volume_once(tmp_path):
    path = gunzip("siemens_dwi_0.dcm.gz", tmp_path)
    reader = VolumeReader()
    assert len(reader.read(str(path))) == 1
    assert reader.read(str(path)) == []
    reader.forget([str(path)])
    assert len(reader.read(str(path))) == 1


def _real_file_bytes(kind: str, tmp_path: Path) -> tuple[str, bytes]:
    if kind == "mosaic":
        return "001_000012_000001.dcm", gzip.decompress(
            (NICOM_DATA / "siemens_dwi_0.dcm.gz").read_bytes()
        )
    if kind == "slice":
        return "i1.MRDC.1.dcm", Path(get_testdata_file("MR_small.dcm")).read_bytes()
    if kind == "nii.gz":
        return "example4d.nii.gz", EXAMPLE4D.read_bytes()
    img = nib.load(FUNCTIONAL)
    return "vol_00001.nii", nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine).to_bytes()


@pytest.mark.parametrize("kind", ["mosaic", "slice", "nii.gz", "nii"])
def test_every_prefix_of_a_real_file_is_incomplete_never_broken(tmp_path, kind):
    """What a reader sees of a file still being written: any prefix of it. All of them must be
    retried (IncompleteFile), none reported broken."""
    name, raw = _real_file_bytes(kind, tmp_path)
    rng = np.random.default_rng(7)
    cuts = sorted({0, 1, 131, 132, *range(0, min(len(raw) - 200, 1200), 23),
                   *rng.integers(1, len(raw) - 200, 25).tolist()})
    path = tmp_path / name
    for cut in cuts:
        path.write_bytes(raw[:cut])
        with pytest.raises(IncompleteFile):
            (read_dicom if name.endswith(".dcm") else read_nifti)(str(path))
    path.write_bytes(raw)
    assert (read_dicom if name.endswith(".dcm") else read_nifti)(str(path))


def test_corrupt_files_are_broken_not_incomplete(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("vol_00001.dcm", "vol_00001.nii", "vol_00001.nii.gz"):
        path = tmp_path / name
        path.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
        with pytest.raises(VolumeReadError) as info:
            (read_dicom if name.endswith(".dcm") else read_nifti)(str(path))
        assert not isinstance(info.value, IncompleteFile), name
        assert name in str(info.value)


# ------------------------------------------------------------------------------- classify


def test_classify_names_and_contents(tmp_path):
    ge = make_slices(tmp_path, n_volumes=1, n_slices=1)[(0, 0)]
    (tmp_path / "notes.txt").write_text("run 1 started")
    (tmp_path / "console.log").write_text("x" * 500)
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 500)
    (tmp_path / "vol_0003.nii.tmp").write_bytes(b"\0" * 500)
    (tmp_path / "README").write_bytes(b"plain text, long enough to sniff " * 10)
    (tmp_path / "tiny").write_bytes(b"abc")
    assert classify(str(ge)).kind == "dicom"  # GE name i1.MRDC.1: found by its DICM magic
    assert classify(str(tmp_path / "vol_0001.nii")).kind == "nifti"
    assert classify(str(tmp_path / "run.nii.gz")).kind == "nifti"
    assert classify(str(tmp_path / "001_000001_000001.dcm")).kind == "dicom"
    for name, reason in [
        ("notes.txt", "not an image"),
        ("console.log", "not an image"),
        (".DS_Store", "hidden"),
        ("vol_0003.nii.tmp", "temporary"),
        ("README", "neither NIfTI nor DICOM"),
        ("tiny", "too short"),
    ]:
        kind = classify(str(tmp_path / name))
        assert kind.kind == "ignored" and not kind.is_image, name
        assert reason in kind.reason, (name, kind.reason)
    reader = VolumeReader()
    with pytest.raises(VolumeReadError):
        reader.read(str(tmp_path / "notes.txt"))
