"""The rehearsal scanner's file formats: one volume as the bytes a scanner's export would hold.

Why a module of its own: each format is a small contract with a reader that is not ours
(nibabel's NIfTI and DICOM wrappers, pydicom), written down here once and read back by the
tests with those readers. Every format stores the same voxel values (multiples of
:data:`INTENSITY_STEP`), so a rehearsal's truth does not depend on the format.

* ``nifti`` / ``nifti-gz``: one 3-D NIfTI-1 file per volume, float32, sform = qform = the
  RAS+ affine, TR in ``pixdim[4]`` (seconds).
* ``dicom``: a Siemens-style mosaic per volume: all slices tiled into one image, the slice
  count, slice normal and slice times in the private CSA header that nibabel's
  ``MosaicWrapper`` reads, ImagePositionPatient at the mosaic's corner as Siemens writes it.
* ``dicom-slices``: GE-style, one MR image per slice (ImagesInAcquisition, InstanceNumber
  counting slices across the run, TemporalPositionIdentifier = volume).
* ``dicom-enhanced``: one Enhanced MR multi-frame image per volume, geometry and timing in
  the functional groups.

DICOM holds unsigned 16-bit integers with RescaleSlope :data:`INTENSITY_STEP`; every DICOM
file carries SeriesNumber, SeriesInstanceUID and AcquisitionNumber = the volume's number in
its series (from 1). UIDs are derived from the seed, so the same rehearsal gives the same bytes.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS: tuple[str, ...] = ("nifti", "nifti-gz", "dicom", "dicom-slices", "dicom-enhanced")
"""``dicom`` is a Siemens-style mosaic (one file per volume, CSA header); ``dicom-slices`` is
GE-style (one file per slice); ``dicom-enhanced`` is an Enhanced MR multi-frame file per
volume (one frame per slice), as Philips and Siemens XA consoles write."""

INTENSITY_STEP = 0.01
"""Quantum of stored voxel values (DICOM RescaleSlope): 1e-4 of the tissue mean, far below noise."""


def quantise(data: np.ndarray) -> np.ndarray:
    """Values on the :data:`INTENSITY_STEP` grid, non-negative, as every format stores them."""
    steps = np.clip(np.rint(np.asarray(data, dtype=np.float64) / INTENSITY_STEP), 0, 65535)
    return (steps * INTENSITY_STEP).astype(np.float32)


FILE_PATTERNS: dict[str, str] = {
    "nifti": "series{series:03d}_vol_{index:05d}.nii",
    "nifti-gz": "series{series:03d}_vol_{index:05d}.nii.gz",
    "dicom": "001_{series:06d}_{index:06d}.dcm",
    "dicom-slices": "series{series:03d}_vol_{index:05d}_slice_{slice:03d}.dcm",
    "dicom-enhanced": "series{series:03d}_vol_{index:05d}.dcm",
}
"""Names in the export folder. ``dicom`` follows the Siemens real-time export pattern that pyneal
matches; readers should still take series and volume from the headers."""


def file_names(fmt: str, series: int, index: int, n_slices: int) -> list[str]:
    """The file(s) of one volume, in the order they are written (slices: interleaved)."""
    pattern = FILE_PATTERNS[fmt]
    if fmt != "dicom-slices":
        return [pattern.format(series=series, index=index)]
    return [
        pattern.format(series=series, index=index, slice=k + 1)
        for k in slice_acquisition_order(n_slices)
    ]


def slice_acquisition_order(n_slices: int) -> list[int]:
    """Interleaved ascending (0, 2, 4, ..., 1, 3, ...), the usual single-band EPI order."""
    return list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))


def nifti_bytes(
    data: np.ndarray, affine: np.ndarray, tr: float, series: int, index: int, gz: bool = False
) -> bytes:
    """One 3-D NIfTI-1 volume (float32, sform = qform = affine, TR in pixdim[4])."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr["pixdim"][4] = tr
    hdr["descrip"] = f"scanner-sim series={series} volume={index} tr={tr:g}".encode()[:79]
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


@dataclass(frozen=True)
class _DicomContext:
    """Identifiers shared by every file of one series."""

    study_uid: str
    series_uid: str
    frame_uid: str
    series: int
    n_volumes: int
    tr: float


def _lps(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)


def _geometry(affine: np.ndarray) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
    """ImageOrientationPatient, PixelSpacing, slice step (LPS) and voxel-0 position (LPS).

    nibabel's DICOM wrappers return the pixel array as (rows, columns): rows step along the
    second IOP vector by PixelSpacing[0], columns along the first by PixelSpacing[1]. Our
    array axis 0 is therefore DICOM's row index, axis 1 its column index.
    """
    lps = _lps(affine)
    sizes = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    unit = lps[:3, :3] / sizes
    iop = [float(v) for v in np.concatenate([unit[:, 1], unit[:, 0]])]
    spacing = [float(sizes[0]), float(sizes[1])]
    return iop, spacing, lps[:3, 2], lps[:3, 3]


def _ds(value: float) -> str:
    """A DICOM decimal string (<= 16 characters) that keeps as many digits as fit."""
    for digits in range(10, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(value)


def _base_dataset(
    ctx: _DicomContext,
    index: int,
    manufacturer: str,
    image_type: list[str],
    sop_uid: str,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    enhanced = sop_class == ENHANCED_MR_STORAGE

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = ctx.series_uid
    ds.FrameOfReferenceUID = ctx.frame_uid
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "emorecog-stream scanner-sim"
    ds.PatientName = "Rehearsal^Phantom"
    ds.PatientID = "SCANNER-SIM"
    ds.StudyID = "1"
    ds.SeriesNumber = ctx.series
    ds.SeriesDescription = "scanner-sim EPI rehearsal"
    ds.AcquisitionNumber = index
    ds.ImageType = image_type
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = "3"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if enhanced:
        return ds  # timing and scaling live in the functional groups
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.RepetitionTime = _ds(ctx.tr * 1000.0)
    ds.EchoTime = "30"
    ds.FlipAngle = "75"
    ds.NumberOfTemporalPositions = ctx.n_volumes
    ds.TemporalPositionIdentifier = index
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = _ds(INTENSITY_STEP)
    ds.RescaleType = "US"
    return ds


ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def enhanced_dataset(
    data: np.ndarray, affine: np.ndarray, ctx: _DicomContext, index: int, sop_uid: str
) -> Any:
    """One volume as an Enhanced MR image: one frame per slice, geometry in functional groups.

    Frames are stored in position order. nibabel 5.4's ``MultiframeWrapper`` takes the slice
    spacing from the first two frames indexed by their position ranks, which is wrong when
    frames come in acquisition (interleaved) order: such a file would read with the wrong
    voxel size.
    """
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    rows, cols, n_slices = data.shape
    iop, spacing, slice_step, origin = _geometry(affine)
    thickness = float(np.linalg.norm(slice_step))
    ds = _base_dataset(
        ctx, index, "SIEMENS", ["ORIGINAL", "PRIMARY", "M", "NONE"], sop_uid, ENHANCED_MR_STORAGE
    )
    ds.InstanceNumber = index
    ds.ContentQualification = "PRODUCT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = n_slices
    ds.DimensionOrganizationUID = _uid(0, 99)
    organisation = Dataset()
    organisation.DimensionOrganizationUID = ds.DimensionOrganizationUID
    ds.DimensionOrganizationSequence = Sequence([organisation])
    dims = []
    for keyword in ("StackID", "InStackPositionNumber"):
        dim = Dataset()
        dim.DimensionOrganizationUID = ds.DimensionOrganizationUID
        dim.DimensionIndexPointer = tag_for_keyword(keyword)
        dim.FunctionalGroupPointer = tag_for_keyword("FrameContentSequence")
        dims.append(dim)
    ds.DimensionIndexSequence = Sequence(dims)

    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in spacing]
    measures.SliceThickness = _ds(thickness)
    measures.SpacingBetweenSlices = _ds(thickness)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in iop]
    scaling = Dataset()
    scaling.RescaleIntercept = "0"
    scaling.RescaleSlope = _ds(INTENSITY_STEP)
    scaling.RescaleType = "US"
    timing = Dataset()
    timing.RepetitionTime = ctx.tr * 1000.0
    timing.FlipAngle = 75.0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([scaling])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames = []
    for k in range(n_slices):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.TemporalPositionIndex = index
        content.DimensionIndexValues = [1, k + 1]
        position = Dataset()
        position.ImagePositionPatient = [_ds(v) for v in origin + k * slice_step]
        frame = Dataset()
        frame.FrameContentSequence = Sequence([content])
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = _pixels(data)
    ds.PixelData = np.ascontiguousarray(np.moveaxis(pixels, 2, 0)).tobytes()
    return ds


def _pixels(data: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(data, dtype=np.float64) / INTENSITY_STEP), 0, 65535).astype(
        "<u2"
    )


def _dicom_bytes(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _csa_header(tags: list[tuple[str, str, list[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``(name, VR, values)`` tags.

    The layout is the one nibabel's ``csareader`` and SPM read: a 16-byte preamble, then per
    tag a 64-byte name, VM, a 4-byte VR, the syngo data type, the item count and a 77 marker;
    each item is four int32 (length, length, 77, length) and its NUL-terminated text padded
    to 4 bytes.
    """
    out = bytearray(b"SV10\x04\x03\x02\x01")
    out += struct.pack("<2I", len(tags), 77)
    for name, vr, values in tags:
        n_items = max(6, len(values))
        out += struct.pack(
            "<64si4s3i", name.encode("ascii"), len(values), vr.encode("ascii"), 0, n_items, 77
        )
        for i in range(n_items):
            text = (values[i].encode("ascii") + b"\x00") if i < len(values) else b""
            out += struct.pack("<4i", len(text), len(text), 77, len(text))
            out += text + b"\x00" * (-len(text) % 4)
    return bytes(out)


def mosaic_dataset(
    data: np.ndarray, affine: np.ndarray, ctx: _DicomContext, index: int, sop_uid: str
) -> Any:
    """A Siemens-style mosaic: all slices tiled into one image, slice count in the CSA header."""
    rows, cols, n_slices = data.shape
    tiles = int(np.ceil(np.sqrt(n_slices)))
    mosaic = np.zeros((tiles * rows, tiles * cols), dtype="<u2")
    pixels = _pixels(data)
    for k in range(n_slices):
        br, bc = divmod(k, tiles)
        mosaic[br * rows : (br + 1) * rows, bc * cols : (bc + 1) * cols] = pixels[:, :, k]
    iop, spacing, slice_step, origin = _geometry(affine)
    # Siemens puts ImagePositionPatient at the corner of the whole mosaic, not of slice 0;
    # nibabel undoes that with the shift below, so we apply its inverse.
    q = np.array(iop).reshape(2, 3).T[:, ::-1] * np.array(spacing)
    fixes = (np.array([tiles * rows, tiles * cols]) - np.array([rows, cols])) / 2.0
    ipp = origin - q @ fixes
    thickness = float(np.linalg.norm(slice_step))
    normal = slice_step / thickness
    ds = _base_dataset(ctx, index, "SIEMENS", ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"], sop_uid)
    ds.InstanceNumber = index
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(thickness)
    ds.AcquisitionMatrix = [0, cols, rows, 0]
    ds.Rows, ds.Columns = mosaic.shape
    order = slice_acquisition_order(n_slices)
    times = np.empty(n_slices)
    times[order] = np.arange(n_slices) * ctx.tr * 1000.0 / n_slices
    csa = _csa_header(
        [
            ("NumberOfImagesInMosaic", "US", [str(n_slices)]),
            ("AcquisitionMatrixText", "SH", [f"{rows}p*{cols}"]),
            ("SliceNormalVector", "FD", [f"{v:.8f}" for v in normal]),
            ("MosaicRefAcqTimes", "FD", [f"{v:.8f}" for v in times]),
        ]
    )
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x10, "OB", csa)
    ds.PixelData = mosaic.tobytes()
    return ds


def slice_dataset(
    data: np.ndarray, affine: np.ndarray, ctx: _DicomContext, index: int, k: int, sop_uid: str
) -> Any:
    """GE-style: slice ``k`` of one volume as its own image."""
    rows, cols, n_slices = data.shape
    iop, spacing, slice_step, origin = _geometry(affine)
    position = origin + k * slice_step
    thickness = float(np.linalg.norm(slice_step))
    ds = _base_dataset(ctx, index, "GE MEDICAL SYSTEMS", ["ORIGINAL", "PRIMARY", "EPI"], sop_uid)
    ds.InstanceNumber = (index - 1) * n_slices + k + 1
    ds.ImagesInAcquisition = n_slices
    ds.InStackPositionNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.SliceLocation = _ds(float(position @ (slice_step / thickness)))
    ds.PixelSpacing = [_ds(v) for v in spacing]
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(thickness)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = _pixels(data[:, :, k]).tobytes()
    return ds


def _uid(seed: int, *parts: int) -> str:
    from pydicom.uid import generate_uid

    return str(
        generate_uid(entropy_srcs=["emorecog-scanner-sim", str(seed)] + [str(p) for p in parts])
    )


def volume_files(
    fmt: str,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    tr: float,
    series: int,
    index: int,
    n_volumes: int,
    seed: int = 0,
) -> Iterator[tuple[str, bytes]]:
    """The file(s) of volume ``index`` (from 1) of ``series`` as ``(name, bytes)``, in write
    order, each encoded only when asked for. ``data`` should already be :func:`quantise`-d."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    names = file_names(fmt, series, index, data.shape[2])
    if fmt in ("nifti", "nifti-gz"):
        yield names[0], nifti_bytes(data, affine, tr, series, index, gz=fmt == "nifti-gz")
        return
    ctx = _DicomContext(
        study_uid=_uid(seed, 0),
        series_uid=_uid(seed, series),
        frame_uid=_uid(seed, 0, 0),
        series=series,
        n_volumes=n_volumes,
        tr=tr,
    )
    if fmt in ("dicom", "dicom-enhanced"):
        uid = _uid(seed, series, index)
        make = mosaic_dataset if fmt == "dicom" else enhanced_dataset
        yield names[0], _dicom_bytes(make(data, affine, ctx, index, uid))
        return
    for name, k in zip(names, slice_acquisition_order(data.shape[2]), strict=True):
        ds = slice_dataset(data, affine, ctx, index, k, _uid(seed, series, index, k + 1))
        yield name, _dicom_bytes(ds)
