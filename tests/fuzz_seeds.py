"""Seed inputs for the fuzz targets in :mod:`tests.fuzzing`: real files where the project has
them (the XDF example recordings, a cut of the shipped replay data, the Keras fixtures, the
default checkpoint, the example config), otherwise files made with the library the real files
come from (scipy/h5py for MATLAB, numpy for ``.npz``, liblsl for stream descriptions).

Seeds are kept small so that one mutated input is read in milliseconds.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fuzzing import FIXTURES, FUZZ_FIXTURES, REPO, gzip_bytes

P15_CUT = FUZZ_FIXTURES / "p15_first8s.xdf"
"""The first 8 s of ``replay_data/P15.xdf`` (every stream), written by our XDF writer."""


def make_p15_cut(seconds: float = 8.0) -> bytes:
    """Cut the shipped replay file down to its first seconds (how ``P15_CUT`` was made)."""
    import numpy as np

    from emorecog_stream.recordings.session import Session, SignalStream
    from emorecog_stream.recordings.xdf import read_xdf_session, xdf_bytes

    session = read_xdf_session(REPO / "replay_data" / "P15.xdf")
    t0 = float(session.fmri.timestamps[0])

    def cut(stream: SignalStream | None) -> SignalStream | None:
        if stream is None:
            return None
        keep = stream.timestamps < t0 + seconds
        return SignalStream(
            stream.role,
            stream.name,
            stream.type,
            stream.data[keep],
            stream.timestamps[keep],
            stream.nominal_srate,
            stream.channel_labels,
            stream.units,
            stream.source_id,
        )

    markers = [m for m in session.markers if m.timestamp < t0 + seconds + 30]
    short = Session(
        session.participant,
        session.tr,
        cut(session.fmri),  # type: ignore[arg-type]
        cut(session.ppg),
        cut(session.resp),
        cut(session.rates),
        markers,
        session.atlas,
        {"source": "replay_data/P15.xdf, first seconds", "seconds": seconds},
    )
    assert len(short.fmri) == int(np.ceil(seconds / session.tr))
    return xdf_bytes(short)


@functools.cache
def xdf_seeds() -> list[tuple[str, bytes]]:
    cut = P15_CUT.read_bytes()
    return [
        ("p15_first8s.xdf", cut),
        ("minimal.xdf", (FIXTURES / "xdf" / "minimal.xdf").read_bytes()),
        ("empty_streams.xdf", (FIXTURES / "xdf" / "empty_streams.xdf").read_bytes()),
        ("p15_first8s.xdfz", gzip_bytes(cut)),
    ]


def _trial(n_time: int = 5) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(1)
    return {
        "mri_d": rng.normal(100, 1, size=(246, n_time)),
        "pnr_rate": np.array([[72.0, 15.0]]),
        "lab_d": np.array([[1.0, 3.0]]),
    }


def _mat_v73(arrays: dict[str, Any]) -> bytes:
    """A MATLAB v7.3 file: HDF5 after a 512-byte user block, arrays stored transposed."""
    import h5py
    import numpy as np

    raw = io.BytesIO()
    with h5py.File(raw, "w", userblock_size=512, track_order=False) as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=np.asarray(value).T, track_times=False)
    data = bytearray(raw.getvalue())
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: fuzz seed HDF5 schema 1.00 ."
    data[: len(header)] = header
    return bytes(data)


@functools.cache
def mat_seeds() -> list[tuple[str, bytes]]:
    import scipy.io

    out = []
    for compress in (False, True):
        raw = io.BytesIO()
        scipy.io.savemat(raw, _trial(), do_compression=compress)
        out.append((f"v5{'_compressed' if compress else ''}.mat", raw.getvalue()))
    out.append(("v73.mat", _mat_v73(_trial())))
    return out


@functools.cache
def npz_seeds() -> list[tuple[str, bytes]]:
    import numpy as np

    rng = np.random.default_rng(2)
    fmri = rng.normal(size=(3, 246, 5)).astype(np.float32)
    labels = np.array([[-1, -2], [0, 0], [1, 3]], dtype=np.int64)
    out = []
    for name, array in (("fmri", fmri), ("labels", labels)):
        for save in (np.savez, np.savez_compressed):
            raw = io.BytesIO()
            save(raw, data=array)
            out.append((f"{name}_{save.__name__}.npz", raw.getvalue()))
    return out


KERAS_SEEDS = ("k2_full.h5", "k2_weights.h5", "k2.weights.h5", "k3_full.h5", "k3.weights.h5")


@functools.cache
def keras_seeds() -> list[tuple[str, bytes]]:
    folder = FIXTURES / "keras_v1"
    return [(name, (folder / name).read_bytes()) for name in (*KERAS_SEEDS, "k3.keras")]


@functools.cache
def checkpoint_seeds() -> list[tuple[str, bytes]]:
    import torch

    from emorecog_stream.model.checkpoint import DEFAULT_CHECKPOINT
    from emorecog_stream.model.keras_v1 import convert_keras_v1

    raw = io.BytesIO()
    torch.save(convert_keras_v1(FIXTURES / "keras_v1" / "k3_full.h5"), raw)
    return [
        ("converted_k3.pt", raw.getvalue()),
        ("default.pt", DEFAULT_CHECKPOINT.read_bytes()),
    ]


@functools.cache
def config_seeds() -> list[tuple[str, bytes]]:
    from emorecog_stream.config import load_config, to_toml

    full = (
        "[session]\nid = \"S01_run-2\"\nduration = 600.5\n"
        "[streams.ppg]\nname = \"Pleth\"\ntype = \"PPG\"\nrate = 400.0\nrate_tolerance = 0.1\n"
        "[streams.markers]\nenabled = true\n"
        "[engine]\ntr = 1.0\nmodel_thread = \"always\"\n"
        "[mqtt]\nurl = \"mqtt://lab@127.0.0.1:1884\"\nusername = \"lab\"\n"
        "queue_size = 5\nmessage_expiry = 10\n"
        "[output]\nlog = \"session.jsonl\"\ndashboard = false\n"
    )
    return [
        ("example.toml", (REPO / "examples" / "config.toml").read_bytes()),
        ("defaults.toml", to_toml(load_config(None)).encode()),
        ("full.toml", full.encode()),
    ]


URLS = (
    "mqtt://127.0.0.1:1883",
    "mqtts://broker.lab.example:8883",
    "mqtt://lab@[::1]:1884/",
    "mqtt://user%40x@host",
    "mqtts://h",
)


def url_seeds() -> list[tuple[str, bytes]]:
    return [(url, url.encode()) for url in URLS]


def password_seeds() -> list[tuple[str, bytes]]:
    return [("plain", b"secret\n"), ("crlf", "pässwörd\r\n".encode()), ("bare", b"x")]


@functools.cache
def lsl_xml_seeds() -> list[tuple[str, bytes]]:
    from emorecog_stream.adapters.lsl_info import (
        OutletDescription,
        default_labels,
        default_units,
        stream_identity,
    )
    from emorecog_stream.core.streams import Role

    out = []
    shapes = ((Role.FMRI, 246, 1.0), (Role.PPG, 1, 400.0), (Role.MARKERS, 1, 0.0))
    for role, channels, rate in shapes:
        name, type_, source_id = stream_identity(role)
        desc = OutletDescription(
            role,
            name,
            type_,
            source_id,
            channels,
            rate,
            default_labels(role, channels),
            default_units(role, channels),
            participant="P15",
            tr=1.0,
            atlas="Brainnetome246",
        )
        out.append((role.value, desc.stream_info().as_xml().encode()))
    return out


def marker_seeds() -> list[tuple[str, bytes]]:
    from emorecog_stream.recordings.session import make_marker

    texts = [
        make_marker("trial_start", 0, -1, -3),
        make_marker("trial_end", 0, -1, -3),
        make_marker("trial_start", 1, None, None),
        "not json",
        make_marker("trial_end", 1, None, None),
    ]
    return [("session", "\x1e".join(texts).encode())]


def scanner_target(call: Callable[..., Any]) -> tuple[tuple[Any, ...], Callable[[], Any]] | None:
    """The scanner bridge's NIfTI/DICOM readers, where they exist: calls and seeds."""
    path = REPO / "emorecog_stream" / "scanner" / "files.py"
    if not path.is_file():
        return None
    errors = ("emorecog_stream.scanner.files.VolumeReadError",)
    return (call("read_nifti/read_dicom", errors, _scanner_read),), scanner_seeds


def _scanner_name(data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "in.dcm"
    return "in.nii.gz" if data[:2] == b"\x1f\x8b" else "in.nii"


def _scanner_read(work: Path, data: bytes) -> Any:
    from emorecog_stream.scanner.files import read_dicom, read_nifti

    path = work / _scanner_name(data)
    path.write_bytes(data)
    if path.suffix == ".dcm":
        return read_dicom(str(path))
    return read_nifti(str(path))


@functools.cache
def scanner_seeds() -> list[tuple[str, bytes]]:
    """nibabel's functional.nii (4-D) and a 3-D gzip volume cut from it; pydicom's MR_small.dcm."""
    import nibabel
    from pydicom.data import get_testdata_file

    functional = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    raw = functional.read_bytes()
    image = nibabel.Nifti1Image.from_bytes(raw)
    first = nibabel.Nifti1Image(image.get_fdata()[..., 0].astype("float32"), image.affine)
    return [
        ("functional.nii", raw),
        ("functional_vol0.nii.gz", gzip_bytes(first.to_bytes())),
        ("MR_small.dcm", Path(get_testdata_file("MR_small.dcm")).read_bytes()),
    ]


def write_p15_cut(path: Path = P15_CUT) -> None:  # pragma: no cover - run once by hand
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_p15_cut())


if __name__ == "__main__":  # python -m tests.fuzz_seeds: regenerate tests/fixtures/fuzz seeds
    write_p15_cut()
