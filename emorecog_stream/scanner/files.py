"""Read the scanner's real-time export files into :class:`Volume` messages.

Every format goes through nibabel and pydicom, never a parser of our own:

* NIfTI ``.nii`` / ``.nii.gz``: one 3-D file per volume (dcm2niix, AFNI Dimon, vendor tools) or a
  4-D file that grows as the run goes on (each volume in it is handed out once).
* DICOM, one file per volume: Siemens mosaic (slices from the CSA header, nibabel's
  ``MosaicWrapper``) and enhanced multi-frame MR (Philips; nibabel's ``MultiframeWrapper``, frames
  are slices, or slices and time).
* DICOM, one file per slice (GE): :class:`SliceAssembler` stacks the slices of a volume once its
  slice count is reached, whatever order they arrived in.

Geometry: voxel arrays are in nibabel's order (DICOM: rows, columns, slices), and every affine maps
voxels to scanner world millimetres in RAS+ as NIfTI does. DICOM wrappers give the patient (LPS)
frame, so their affine is flipped as nibabel's own ``mosaic_to_nii`` does; one frame for all
formats keeps motion parameters comparable whatever the export.

A file that is still being written (short header, missing or short pixel data, a gzip stream
without its end) raises :class:`IncompleteFile` so the watcher retries it; any other failure
raises :class:`VolumeReadError`. Both name the file; neither ever escapes as a crash.

What a volume costs to read (CPU ms per volume on the 2-core development machine, files from
``scanner-sim``; 64x64x36 / 104x104x72): NIfTI 1.1 / 1.7, NIfTI.gz 5.9, Siemens mosaic 3.2 / 5.1,
per-slice DICOM 64 / 97 (about 1.5 ms per slice, mostly pydicom and nibabel's per-file work),
enhanced MR 40 (36 frames; its per-frame header groups dominate). Per-slice and enhanced exports
therefore spend a good part of a 100 ms latency budget on reading alone.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DICOM_SUFFIXES",
    "DPCS_TO_RAS",
    "NIFTI_SUFFIXES",
    "DicomSlice",
    "FileKind",
    "IncompleteFile",
    "ReadWarning",
    "SliceAssembler",
    "Volume",
    "VolumeReadError",
    "VolumeReader",
    "classify",
    "read_dicom",
    "read_nifti",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".ima", ".dicom")
PARREC_SUFFIXES: tuple[str, ...] = (".par",)
"""Philips PAR/REC: the ``.PAR`` header names the pair (the ``.REC`` beside it holds the data)."""
TEMPORARY_SUFFIXES: tuple[str, ...] = (
    ".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", ".lock", "~",
)
"""Names that writers use while a file is not finished; the final rename brings it in."""
NOT_IMAGE_SUFFIXES: tuple[str, ...] = (
    ".txt", ".log", ".json", ".csv", ".tsv", ".xml", ".ini", ".cfg", ".md", ".bval", ".bvec",
    ".mat", ".hdr", ".img", ".rec", ".zip", ".tar", ".gz", ".py", ".sh", ".bat",
)
"""Side files that share export folders (dcm2niix sidecars, logs). ``.gz`` here means not
``.nii.gz``; Analyze and PAR/REC pairs are offline formats, not real-time exports."""

DPCS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) -> NIfTI scanner coordinates (RAS)."""

_DICOM_MAGIC_OFFSET = 128
_NIFTI1_HEADER_BYTES = 348
_TR_LOOKS_LIKE_MS = 100.0
"""A TR over 100 s labelled seconds is a unit mistake: fMRI TRs are 0.1 to ~10 s."""


class VolumeReadError(Exception):
    """A file that is not a readable image volume; the message names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class IncompleteFile(VolumeReadError):
    """A file that looks truncated: most likely still being written, so worth reading again."""


@dataclass(frozen=True)
class ReadWarning:
    """Something a header got wrong that the reader worked around (kind e.g. ``tr_units``)."""

    kind: str
    message: str


@dataclass(frozen=True)
class Volume:
    """One fMRI volume as the bridge passes it on."""

    data: np.ndarray
    """(X, Y, Z) float32 in nibabel's voxel order."""
    affine: np.ndarray
    """(4, 4) float64: voxel -> scanner world mm, RAS+."""
    series: str
    """Identity of the run: DICOM SeriesInstanceUID (else SeriesNumber); NIfTI: see readers."""
    index: int | None
    """0-based volume number in its series when known."""
    tr: float | None
    """Seconds, from the header; None when absent."""
    source: str
    """File name (first and last file, joined by ``..``, for slice-assembled volumes)."""
    warnings: tuple[ReadWarning, ...] = field(default=())
    """Header problems met while reading (the TR unit mistake, ...)."""


@dataclass(frozen=True)
class FileKind:
    """What :func:`classify` made of a path: ``nifti``, ``dicom`` or ``ignored`` (with why)."""

    kind: str
    reason: str = ""

    @property
    def is_image(self) -> bool:
        return self.kind in ("nifti", "dicom", "parrec")


def _lower_name(path: str) -> str:
    return os.path.basename(path).lower()


def classify(path: str) -> FileKind:
    """Image or not, from the name and, for names that do not say, the DICOM magic bytes.

    GE names its slice files like ``i1234.MRDC.5``, so a name without a known image suffix is
    sniffed for ``DICM`` at byte 128 rather than dismissed. A file too short to tell is reported
    as ignored; the watcher looks again when it changes.
    """
    name = _lower_name(path)
    if name.startswith((".", "~$")):
        return FileKind("ignored", "hidden file")
    if name.endswith(TEMPORARY_SUFFIXES):
        return FileKind("ignored", "temporary name (a writer's file in progress)")
    if name.endswith(NIFTI_SUFFIXES):
        return FileKind("nifti")
    if name.endswith(DICOM_SUFFIXES):
        return FileKind("dicom")
    if name.endswith(PARREC_SUFFIXES):
        return FileKind("parrec")
    if name.endswith(NOT_IMAGE_SUFFIXES):
        return FileKind("ignored", "not an image file name")
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError as exc:
        return FileKind("ignored", f"cannot open: {exc.strerror or exc}")
    if head[_DICOM_MAGIC_OFFSET:] == b"DICM":
        return FileKind("dicom")
    if len(head) < _DICOM_MAGIC_OFFSET + 4:
        return FileKind("ignored", "too short to be an image (yet)")
    return FileKind("ignored", "neither NIfTI nor DICOM")


# --------------------------------------------------------------------------------------- PAR/REC


def _rec_beside(path: str) -> str | None:
    stem, _ = os.path.splitext(path)
    for suffix in (".REC", ".rec"):
        if os.path.exists(stem + suffix):
            return stem + suffix
    return None


def read_parrec(path: str) -> list[Volume]:
    """Every volume of a Philips PAR/REC run, as nibabel reads it (its default scaling).

    PAR/REC is Philips' offline export (the scanner writes the pair when the run ends), so a
    pair is read whole; a ``.REC`` not there yet, or shorter than the header says, is a file
    still being written.
    """
    import nibabel as nib

    rec = _rec_beside(path)
    if rec is None:
        raise IncompleteFile(path, "its .REC data file is not there (yet)")
    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape)
        defs = img.header.image_defs
        expected = int(np.sum(defs["recon resolution"].prod(axis=1) * defs["image pixel size"]))
        if os.path.getsize(rec) * 8 < expected:
            raise IncompleteFile(path, f"{os.path.basename(rec)} is shorter than its header says")
        data = np.asarray(img.dataobj, dtype=np.float32)
        tr_ms = np.asarray(img.header.general_info.get("repetition_time", [np.nan]), float)
    except (IncompleteFile, FileNotFoundError):
        raise
    except Exception as exc:  # nibabel raises many kinds for a broken header
        raise VolumeReadError(path, f"not a readable PAR/REC pair ({exc})") from exc
    if len(shape) not in (3, 4):
        raise VolumeReadError(path, f"expected a 3-D or 4-D image, got shape {shape}")
    tr = float(tr_ms.ravel()[0]) / 1000.0 if tr_ms.size and np.isfinite(tr_ms.ravel()[0]) else None
    affine = np.asarray(img.affine, dtype=np.float64)
    series = os.path.abspath(path)
    name = os.path.basename(path)
    if len(shape) == 3:
        return [Volume(data, affine, series, 0, tr, name)]
    return [
        Volume(np.ascontiguousarray(data[..., i]), affine, series, i, tr, name)
        for i in range(shape[3])
    ]


# --------------------------------------------------------------------------------------- NIfTI

_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def _split_number(name: str) -> tuple[str, int | None]:
    """``run1_00007.nii.gz`` -> (``run1_*.nii.gz``, 7): the last number in the name."""
    match = _NUMBER.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + "*" + name[match.end() :], int(match.group(1))


def _nifti_tr(header, path: str) -> tuple[float | None, tuple[ReadWarning, ...]]:
    """TR in seconds from pixdim[4] and xyzt_units, noticing the ms-labelled-seconds mistake."""
    value = float(header["pixdim"][4])
    if not np.isfinite(value) or value <= 0:
        return None, ()
    try:
        unit = header.get_xyzt_units()[1]
    except KeyError:  # a unit code NIfTI does not define: no telling what pixdim[4] is
        return None, ()
    if unit == "msec":
        return value / 1000.0, ()
    if unit == "usec":
        return value / 1e6, ()
    if unit == "sec" and value > _TR_LOOKS_LIKE_MS:
        return value / 1000.0, (
            ReadWarning(
                "tr_units",
                f'{os.path.basename(path)}: header TR is {value:g} with time unit "sec"; '
                f"no fMRI TR is that long, so it is read as {value:g} ms = {value / 1000:g} s",
            ),
        )
    if unit == "sec":
        return value, ()
    # No time unit: pixdim[4] is then nibabel's default 1, not a measured TR. Hz, ppm, rad/s:
    # the fourth axis is not time.
    return None, ()


def _gzip_stream_ends_early(path: str) -> bool:
    """True when a gzip file stops before its end-of-stream marker (still being written)."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except EOFError:
        return True
    except (OSError, zlib.error):  # corrupt, not short
        return False
    return False


def _nifti_failure(path: str, exc: Exception, size: int) -> VolumeReadError:
    text = str(exc) or type(exc).__name__
    if path.lower().endswith(".gz"):
        # Under 18 bytes not even gzip's header and trailer are there.
        truncated = size < 18 or _gzip_stream_ends_early(path)
    else:
        truncated = (
            size < _NIFTI1_HEADER_BYTES + 4
            or "not enough data" in text.lower()
            or "could the file be damaged" in text
        )
    cls = IncompleteFile if truncated else VolumeReadError
    return cls(path, f"NIfTI not readable ({type(exc).__name__}: {text.splitlines()[0]})")


def read_nifti(path: str, *, start: int = 0, number_base: int = 1) -> list[Volume]:
    """Volumes ``start``, ``start+1``, ... of a NIfTI file, as far as the file holds them whole.

    A 3-D file (or 4-D with one volume) is one volume whose series is the folder plus the name
    with its last number replaced by ``*``, and whose index is that number minus
    ``number_base``: 1 for names that count volumes like the scanner does (``vol_00001.nii`` is
    the first, as DICOM's AcquisitionNumber and the project's simulator count), 0 for names that
    count from 0 (fslsplit's ``vol0000``). A number below the base gives no index.
    A 4-D file is a growing run: its series is the file's path, index the position in it; an
    uncompressed file hands out every volume whose bytes are all there, so a run written volume
    by volume is read as it grows. A ``.nii.gz`` is read only once its gzip stream is whole.
    """
    return _read_nifti(path, start, number_base)[0]


def _read_nifti(path: str, start: int, number_base: int = 1) -> tuple[list[Volume], bool]:
    """:func:`read_nifti`, and whether the file may still grow (an uncompressed 4-D run)."""
    import nibabel as nib

    size = 0
    try:
        size = os.path.getsize(path)
        img = nib.load(path, mmap=False)
        header = img.header
        shape = tuple(int(n) for n in img.shape)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise _nifti_failure(path, exc, size) from exc
    if len(shape) < 3 or len(shape) > 4 or (len(shape) == 4 and shape[3] < 1):
        raise VolumeReadError(path, f"expected a 3-D or 4-D NIfTI image, got shape {shape}")
    tr, notes = _nifti_tr(header, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    name = os.path.basename(path)
    n_volumes = shape[3] if len(shape) == 4 else 1
    try:
        if n_volumes == 1:
            if start > 0:
                return [], False
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape[:3])
            pattern, number = _split_number(name)
            series = os.path.join(os.path.dirname(os.path.abspath(path)), pattern)
            index = number - number_base if number is not None else None
            index = index if index is not None and index >= 0 else None
            return [Volume(data, affine, series, index, tr, name, notes)], False
        available = n_volumes
        growing = not path.lower().endswith(".gz")
        if growing:
            # A growing run: count the volumes whose bytes are all written.
            volume_bytes = int(np.prod(shape[:3])) * img.get_data_dtype().itemsize
            available = min(n_volumes, max(0, (size - int(img.dataobj.offset)) // volume_bytes))
        volumes = []
        for i in range(start, available):
            data = np.asarray(img.dataobj[..., i], dtype=np.float32)
            volumes.append(
                Volume(data, affine, os.path.abspath(path), i, tr, name, notes if i == 0 else ())
            )
        return volumes, growing
    except Exception as exc:
        raise _nifti_failure(path, exc, size) from exc


# --------------------------------------------------------------------------------------- DICOM


def _dicomwrappers():
    """nibabel's DICOM wrappers, without the 'experimental' warning nibabel prints on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers
    return dicomwrappers


def _dicom_tr(ds) -> float | None:
    """RepetitionTime (ms) -> seconds; enhanced MR keeps it in the shared functional groups."""
    value = ds.get("RepetitionTime")
    if value is None:
        try:
            shared = ds.SharedFunctionalGroupsSequence[0]
            value = shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime
        except (AttributeError, IndexError, KeyError):
            value = None
    try:
        tr = float(value) / 1000.0 if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return tr if tr is not None and tr > 0 else None


def _dicom_series(ds) -> str:
    uid = ds.get("SeriesInstanceUID")
    if uid:
        return str(uid)
    number = ds.get("SeriesNumber")
    return f"series {number}" if number not in (None, "") else "series ?"


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _volume_index(ds) -> int | None:
    """0-based volume number: AcquisitionNumber - 1, else InstanceNumber - 1.

    Siemens counts each volume of a run as one acquisition from 1 (and numbers instances the
    same way); AcquisitionNumber is used first because InstanceNumber can also count files of
    other kinds. A missing or zero AcquisitionNumber falls back to InstanceNumber.
    """
    acquisition = _int_or_none(ds.get("AcquisitionNumber"))
    if acquisition is not None and acquisition > 0:
        return acquisition - 1
    instance = _int_or_none(ds.get("InstanceNumber"))
    return instance - 1 if instance is not None and instance > 0 else None


@dataclass(frozen=True)
class DicomSlice:
    """One 2-D slice of a per-slice export, waiting for the rest of its volume."""

    data: np.ndarray
    """(rows, columns) float32."""
    affine: np.ndarray
    """(4, 4) RAS affine of the slice alone (nibabel's, flipped)."""
    series: str
    instance: int | None
    """InstanceNumber (counts slices across the whole series on GE)."""
    temporal_position: int | None
    """TemporalPositionIdentifier (0020,0100) when the scanner writes it (1-based)."""
    position: float
    """Position along the slice normal (nibabel's ``slice_indicator``), for sorting."""
    normal: tuple[float, float, float]
    images_in_acquisition: int | None
    tr: float | None
    source: str


def _pixel_data_short(ds) -> bool:
    """True when the parsed dataset has not reached the end of its pixel data yet.

    A DICOM file being written is a prefix of the final file and pixel data comes last, so a
    prefix parses (pydicom reads leniently) into a dataset without PixelData, or with less of
    it than Rows x Columns x frames x samples x bytes say (uncompressed syntaxes).
    """
    pixels = ds.get("PixelData") if ds is not None else None
    if pixels is None:
        return True
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or getattr(syntax, "is_compressed", False):
        return syntax is None
    try:
        expected = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1)
            * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated) // 8
        )
    except (AttributeError, TypeError, ValueError):
        return False
    return len(pixels) < expected


def _dicom_failure(path: str, exc: Exception, size: int, ds) -> VolumeReadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if ds is None:
        # pydicom gave up: a prefix too short for the preamble, or cut inside an element. A
        # file of 132+ bytes without the DICM marker is not DICOM at all.
        not_dicom = size >= _DICOM_MAGIC_OFFSET + 4 and "DICM" in text
        truncated = not not_dicom
    else:
        try:
            truncated = _pixel_data_short(ds)
        except Exception:
            truncated = False  # too broken to be a file still being written
    cls = IncompleteFile if truncated else VolumeReadError
    return cls(path, f"DICOM not readable ({type(exc).__name__}: {text})")


def read_dicom(path: str) -> list[Volume] | DicomSlice:
    """A DICOM file: its volume(s), or one :class:`DicomSlice` of a per-slice export.

    Mosaic files give one volume; enhanced multi-frame files give one volume, or one per time
    point when their frames span time (index = time point); a plain 2-D image is a slice.
    """
    import pydicom

    dicomwrappers = _dicomwrappers()
    size = 0
    ds = None
    try:
        size = os.path.getsize(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # from memory: on a file, pydicom's read(length) first allocates the length an
            # element declares, so one corrupt length field asked for gigabytes
            with open(path, "rb") as f:
                ds = pydicom.dcmread(io.BytesIO(f.read()))
            wrapper = dicomwrappers.wrapper_from_data(ds)
            data = wrapper.get_data()
            affine = DPCS_TO_RAS @ np.asarray(wrapper.affine, dtype=np.float64)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise _dicom_failure(path, exc, size, ds) from exc
    name = os.path.basename(path)
    series = _dicom_series(ds)
    tr = _dicom_tr(ds)
    data = np.asarray(data, dtype=np.float32)
    if getattr(wrapper, "is_multiframe", False) and data.ndim == 4:
        return [
            Volume(np.ascontiguousarray(data[..., t]), affine, series, t, tr, name)
            for t in range(data.shape[3])
        ]
    if data.ndim == 3:
        return [Volume(data, affine, series, _volume_index(ds), tr, name)]
    if data.ndim != 2:
        raise VolumeReadError(path, f"expected a 2-D slice or a 3-D/4-D volume, got {data.shape}")
    position = wrapper.slice_indicator
    normal = wrapper.slice_normal
    if position is None or normal is None:
        raise VolumeReadError(
            path, "a single slice without ImagePositionPatient / ImageOrientationPatient"
        )
    return DicomSlice(
        data=data,
        affine=affine,
        series=series,
        instance=_int_or_none(ds.get("InstanceNumber")),
        temporal_position=_int_or_none(ds.get("TemporalPositionIdentifier")),
        position=float(position),
        normal=tuple(float(v) for v in normal),
        images_in_acquisition=_int_or_none(ds.get("ImagesInAcquisition")),
        tr=tr,
        source=name,
    )


class SliceAssembler:
    """Stack per-slice DICOM files into volumes once each volume's slice count is reached.

    The slice count comes from the user (``slices_per_volume``), else from the slices'
    ImagesInAcquisition (0020,1002), else it is learned: slices are held until a slice position
    repeats, and the number of distinct positions seen is the count. The volume a slice belongs
    to is TemporalPositionIdentifier - 1 when the scanner writes it, else
    ``(InstanceNumber - 1) // slices_per_volume`` (GE numbers instances across the whole run).
    Slices are sorted by position along the slice normal, so arrival order does not matter;
    the affine's slice axis is the measured step between neighbouring slice positions.
    """

    def __init__(self, slices_per_volume: int | None = None) -> None:
        if slices_per_volume is not None and slices_per_volume < 1:
            raise ValueError(f"slices_per_volume must be >= 1, got {slices_per_volume}")
        self.slices_per_volume = slices_per_volume
        self._counts: dict[str, int] = {}
        self._pending: dict[tuple[str, int], dict[float, DicomSlice]] = {}
        self._learning: dict[str, list[DicomSlice]] = {}

    @property
    def pending_slices(self) -> int:
        """Slices received for volumes that are not complete yet."""
        waiting = sum(len(v) for v in self._pending.values())
        return waiting + sum(len(v) for v in self._learning.values())

    def _count_for(self, piece: DicomSlice) -> int | None:
        if self.slices_per_volume is not None:
            return self.slices_per_volume
        if piece.series in self._counts:
            return self._counts[piece.series]
        if piece.images_in_acquisition and piece.images_in_acquisition > 0:
            self._counts[piece.series] = piece.images_in_acquisition
            return piece.images_in_acquisition
        return None

    def add(self, piece: DicomSlice) -> list[Volume]:
        """Take one slice; return the volumes it completes (usually none or one)."""
        count = self._count_for(piece)
        if count is None:
            held = self._learning.setdefault(piece.series, [])
            positions = {round(s.position, 3) for s in held}
            if round(piece.position, 3) not in positions:
                held.append(piece)
                return []
            self._counts[piece.series] = count = len(positions)
            queued = [*self._learning.pop(piece.series), piece]
            return [vol for s in queued for vol in self._place(s, count)]
        return self._place(piece, count)

    def _place(self, piece: DicomSlice, count: int) -> list[Volume]:
        if piece.temporal_position is not None and piece.temporal_position > 0:
            volume = piece.temporal_position - 1
        elif piece.instance is not None and piece.instance > 0:
            volume = (piece.instance - 1) // count
        else:
            raise VolumeReadError(
                piece.source, "slice has neither TemporalPositionIdentifier nor InstanceNumber"
            )
        key = (piece.series, volume)
        slices = self._pending.setdefault(key, {})
        where = round(piece.position, 3)
        if where in slices:
            raise VolumeReadError(
                piece.source,
                f"second slice at position {piece.position:.3f} mm for volume {volume} of "
                f"series {piece.series} (first: {slices[where].source})",
            )
        slices[where] = piece
        if len(slices) < count:
            return []
        del self._pending[key]
        return [self._stack(list(slices.values()), volume)]

    @staticmethod
    def _stack(slices: list[DicomSlice], volume: int) -> Volume:
        ordered = sorted(slices, key=lambda s: s.position)
        first, last = ordered[0], ordered[-1]
        shapes = {s.data.shape for s in ordered}
        if len(shapes) != 1:
            raise VolumeReadError(
                f"{first.source}..{last.source}", f"slices of different sizes {sorted(shapes)}"
            )
        if any(not np.allclose(s.normal, first.normal, atol=1e-4) for s in ordered):
            raise VolumeReadError(
                f"{first.source}..{last.source}", "slices with different orientations"
            )
        affine = first.affine.copy()
        if len(ordered) > 1:
            steps = np.diff([s.position for s in ordered])
            if not np.allclose(steps, steps.mean(), rtol=1e-3, atol=1e-3):
                raise VolumeReadError(
                    f"{first.source}..{last.source}",
                    f"uneven slice spacing {np.round(steps, 3).tolist()} mm",
                )
            affine[:3, 2] = (last.affine[:3, 3] - first.affine[:3, 3]) / (len(ordered) - 1)
        data = np.stack([s.data for s in ordered], axis=2)
        by_instance = sorted(ordered, key=lambda s: (s.instance is None, s.instance or 0))
        names = (by_instance[0].source, by_instance[-1].source)
        source = names[0] if len(ordered) == 1 else f"{names[0]}..{names[1]}"
        tr = first.tr
        return Volume(data, affine, first.series, volume, tr, source)


class VolumeReader:
    """One object that turns export files into volumes, keeping what spans files.

    It remembers how many volumes of each growing 4-D NIfTI it has handed out and holds the
    slices of per-slice DICOM volumes until they are complete, so every volume comes out once.
    """

    def __init__(
        self, slices_per_volume: int | None = None, name_number_base: int = 1
    ) -> None:
        self.assembler = SliceAssembler(slices_per_volume)
        self.name_number_base = name_number_base
        """What the first volume's file is numbered in per-volume NIfTI names (see read_nifti)."""
        self._given: dict[str, int] = {}
        self._done: set[str] = set()
        self._growing: set[str] = set()

    def read(self, path: str, kind: FileKind | None = None) -> list[Volume]:
        """The volumes this file completes (possibly none: a slice, or no new 4-D volume yet).

        Raises :class:`IncompleteFile` for a file still being written, :class:`VolumeReadError`
        for a broken one and FileNotFoundError if it vanished.
        """
        key = os.path.abspath(path)
        if key in self._done:
            return []
        kind = kind or classify(path)
        if kind.kind == "nifti":
            volumes, growing = _read_nifti(path, self._given.get(key, 0), self.name_number_base)
            self._given[key] = self._given.get(key, 0) + len(volumes)
            if growing:
                self._growing.add(key)
            else:
                self._done.add(key)
            return volumes
        if kind.kind == "parrec":
            volumes = read_parrec(path)
            self._done.add(key)
            return volumes
        if kind.kind == "dicom":
            result = read_dicom(path)
            self._done.add(key)
            if isinstance(result, DicomSlice):
                return self.assembler.add(result)
            return result
        raise VolumeReadError(path, f"not an image: {kind.reason}")

    def growing(self) -> frozenset[str]:
        """Absolute paths of 4-D NIfTI files that may still receive volumes (look again)."""
        return frozenset(self._growing)

    def skip(self, path: str) -> None:
        """Treat what the file holds now as already handed out (files present at start).

        A growing 4-D NIfTI keeps being watched: only volumes written after this call come out.
        """
        key = os.path.abspath(path)
        if classify(path).kind == "nifti" and not path.lower().endswith(".gz"):
            import nibabel as nib

            try:
                img = nib.load(path, mmap=False)
                shape = img.shape
                if len(shape) == 4 and shape[3] > 1:
                    volume_bytes = int(np.prod(shape[:3])) * img.get_data_dtype().itemsize
                    held = (os.path.getsize(path) - int(img.dataobj.offset)) // volume_bytes
                    self._given[key] = int(min(shape[3], max(0, held)))
                    self._growing.add(key)
                    return
            except Exception:  # unreadable now: it will be judged if it changes
                return
        self._done.add(key)

    def forget(self, paths: Iterable[str]) -> None:
        """Forget files that were deleted, so a new file that reuses the name is read."""
        for path in paths:
            self._given.pop(os.path.abspath(path), None)
            self._done.discard(os.path.abspath(path))
            self._growing.discard(os.path.abspath(path))
