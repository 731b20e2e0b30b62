"""The atlas checks, the trigger clock and the per-segment pipeline of the scanner bridge."""

from __future__ import annotations

import numpy as np
import pytest

from emorecog_stream.scanner import rigid
from emorecog_stream.scanner.atlas import AtlasError, load_atlas, read_label_table
from emorecog_stream.scanner.pipeline import ProcessedVolume, Skipped, VolumePipeline
from emorecog_stream.scanner.timing import TriggerClock

nib = pytest.importorskip("nibabel")

SHAPE = (24, 24, 16)
AFFINE = np.array(
    [[3.0, 0, 0, -36.0], [0, 3.0, 0, -36.0], [0, 0, 3.0, -24.0], [0, 0, 0, 1.0]]
)


def head(shape=SHAPE) -> np.ndarray:
    """A smooth ellipsoid 'head' with internal structure, enough to register."""
    ijk = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2.0
    r = sum(((ijk[a] - c[a]) / (0.4 * shape[a])) ** 2 for a in range(3))
    inner = sum(((ijk[a] - c[a] - (2 if a == 0 else 0)) / (0.15 * shape[a])) ** 2 for a in range(3))
    data = 1000.0 * (r < 1) + 400.0 * (inner < 1) + 50.0 * np.sin(ijk[0] / 2.0) * (r < 1)
    from scipy import ndimage

    return ndimage.gaussian_filter(data, 1.0).astype(np.float32)


def labels_for(data: np.ndarray, n: int) -> np.ndarray:
    """n parcels: bright voxels split into n slabs along x (every slab non-empty)."""
    mask = data > 200
    ranks = np.zeros(data.shape, dtype=np.int32)
    order = np.argsort(np.flatnonzero(mask), kind="stable")
    flat = np.zeros(mask.sum(), dtype=np.int32)
    flat[order] = np.arange(mask.sum()) * n // mask.sum() + 1
    ranks[mask] = flat
    return ranks


def save(path, data, affine=AFFINE, dtype=np.int16):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return str(path)


# ------------------------------------------------------------------ atlas


def test_atlas_loads_with_names_from_the_label_table(tmp_path):
    labels = labels_for(head(), 5)
    table = tmp_path / "labels.txt"
    table.write_text("# Brainnetome-like\n1 A8m_L\n2 A8m_R 255 0 0\n\n3 C\n4 D\n5 E\n")
    atlas = load_atlas(save(tmp_path / "atlas.nii.gz", labels), table, n_labels=5)
    assert atlas.names == ("A8m_L", "A8m_R", "C", "D", "E")
    assert atlas.shape == SHAPE
    assert (atlas.voxel_counts() > 0).all()
    default = load_atlas(save(tmp_path / "atlas2.nii", labels), n_labels=5)
    assert default.names == ("BN001", "BN002", "BN003", "BN004", "BN005")


def test_an_empty_label_is_an_error_at_start(tmp_path):
    labels = labels_for(head(), 5)
    labels[labels == 3] = 0
    with pytest.raises(AtlasError, match=r"labels 3 have none"):
        load_atlas(save(tmp_path / "atlas.nii.gz", labels), n_labels=5)


def test_wrong_values_are_named(tmp_path):
    labels = labels_for(head(), 5)
    labels[0, 0, 0] = 300
    with pytest.raises(AtlasError, match=r"expected labels 0..5, found values from 0 to 300"):
        load_atlas(save(tmp_path / "a.nii.gz", labels), n_labels=5)
    floats = labels.astype(np.float32) + 0.5
    with pytest.raises(AtlasError, match="non-integer"):
        load_atlas(save(tmp_path / "b.nii.gz", floats, dtype=np.float32), n_labels=5)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(AtlasError, match="not a readable label image"):
        load_atlas(broken, n_labels=5)


def test_grid_mismatch_names_both_shapes_and_affines(tmp_path):
    atlas = load_atlas(save(tmp_path / "atlas.nii.gz", labels_for(head(), 5)), n_labels=5)
    other = AFFINE.copy()
    other[0, 3] += 1.5
    with pytest.raises(AtlasError) as info:
        atlas.check_grid((64, 64, 36), other, "volume 3 of series S")
    text = str(info.value)
    assert "expected shape (24, 24, 16)" in text and "found shape (64, 64, 36)" in text
    assert "-36" in text and "-34.5" in text  # both affines' x offsets
    atlas.check_grid(SHAPE, AFFINE + 1e-6, "the same grid with header noise")


def test_label_table_errors_name_the_line(tmp_path):
    table = tmp_path / "t.txt"
    table.write_text("1 A\n2\n")
    with pytest.raises(AtlasError, match=r"line 2: expected 'index name'"):
        read_label_table(table, 2)
    table.write_text("1 A\n1 B\n")
    with pytest.raises(AtlasError, match="index 1 appears twice"):
        read_label_table(table, 2)
    table.write_text("1 A\n")
    with pytest.raises(AtlasError, match="missing 2"):
        read_label_table(table, 2)


# ------------------------------------------------------------------ trigger clock


def test_trigger_pulse_n_is_volume_n_of_its_run():
    clock = TriggerClock(tr=2.0, recon_delay=0.3)
    clock.add_pulses([100.0 + 2 * i for i in range(10)])  # run 1: pulses at 100, 102, ...
    clock.add_pulses([200.0 + 2 * i for i in range(5)])  # run 2, after a long pause
    # files numbered from 1; the bridge starts at volume 3, whose file lands TR + 0.3 s after
    # pulse 2 (at 104): the segment's offset is fixed from that
    first = clock.volume_time(segment=1, index=3, arrived=104.0 + 2.0 + 0.3)
    assert (first.timestamp, first.source) == (104.0, "trigger")
    # later volumes take the pulse their number says, even when their file comes late
    assert clock.volume_time(segment=1, index=10, arrived=205.0).timestamp == 118.0
    second = clock.volume_time(segment=2, index=0, arrived=202.35)  # numbered from 0
    assert (second.timestamp, second.source) == (200.0, "trigger")
    assert clock.volume_time(segment=2, index=4, arrived=210.3).timestamp == 208.0
    missing = clock.volume_time(segment=2, index=7, arrived=216.5)
    assert missing.source == "arrival" and missing.timestamp == pytest.approx(216.2)
    assert "no trigger pulse for volume 7" in missing.note
    # a reconstruction slower than the TR still finds the right pulse when it is declared
    slow = TriggerClock(tr=0.8, recon_delay=1.1)
    slow.add_pulses([10.0 + 0.8 * i for i in range(20)])
    assert slow.volume_time(segment=1, index=0, arrived=10.0 + 0.8 + 1.1).timestamp == 10.0


def test_without_pulses_the_arrival_minus_delay_is_used():
    clock = TriggerClock(tr=1.0, recon_delay=0.4)
    when = clock.volume_time(segment=1, index=0, arrived=50.0)
    assert when.source == "arrival" and when.timestamp == pytest.approx(49.6)
    clock.add_pulses([10.0, 9.0, 10.0, 11.0])  # late and repeated pulses are ignored
    assert clock.pulses == 2


# ------------------------------------------------------------------ pipeline


@pytest.fixture()
def atlas(tmp_path):
    return load_atlas(save(tmp_path / "atlas.nii.gz", labels_for(head(), 8)), n_labels=8)


def test_dummies_are_dropped_and_each_series_is_its_own_segment(atlas):
    data = head()
    pipeline = VolumePipeline(atlas, skip=2, fd_threshold=0.5)
    bright = data * 1.5
    out = [pipeline.process(bright, AFFINE, "S1", i) for i in range(2)]
    assert all(isinstance(o, Skipped) for o in out) and "dummy volume 1 of 2" in out[0].reason
    moved = rigid.move_volume(data, AFFINE, [1.0, 0, 0, 0, 0, 0])
    first = pipeline.process(data, AFFINE, "S1", 2)
    jump = pipeline.process(moved, AFFINE, "S1", 3)
    assert isinstance(first, ProcessedVolume) and isinstance(jump, ProcessedVolume)
    assert first.framewise_displacement == 0.0 and not first.fd_exceeded
    assert jump.motion[0] == pytest.approx(1.0, abs=0.1)
    assert jump.fd_exceeded and jump.framewise_displacement == pytest.approx(1.0, abs=0.15)
    assert jump.roi.dtype == np.float32 and jump.roi.shape == (8,)
    # a new series: dummies again, a new reference (the moved volume), FD starts again
    skipped = [pipeline.process(moved, AFFINE, "S2", i) for i in range(2)]
    assert all(isinstance(s, Skipped) for s in skipped)
    again = pipeline.process(moved, AFFINE, "S2", 2)
    assert again.segment == 2 and np.abs(again.motion[:6]).max() < 0.01
    assert again.framewise_displacement == 0.0


def test_a_volume_on_another_grid_is_refused(atlas):
    pipeline = VolumePipeline(atlas)
    with pytest.raises(Exception, match="is not on the grid of volume 0 of series S"):
        pipeline.process(np.zeros((10, 10, 10), np.float32), np.eye(4), "S", 0)


def test_a_given_reference_serves_every_run(atlas):
    data = head()
    pipeline = VolumePipeline(atlas, reference=data)
    moved = rigid.move_volume(data, AFFINE, [0, 1.5, 0, 0, 0, 0])
    first = pipeline.process(moved, AFFINE, "S1", 0)
    assert first.motion[1] == pytest.approx(1.5, abs=0.1)
    assert first.framewise_displacement == 0.0  # the run's first volume
    other_run = pipeline.process(moved, AFFINE, "S2", 0)
    assert other_run.motion[1] == pytest.approx(1.5, abs=0.1)
