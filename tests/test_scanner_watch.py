"""The export-folder watcher on a real folder: files arrive by rename and by slow writes, with
gaps, corrupt files, side files and two runs, in polling mode (network shares) and event mode."""

from __future__ import annotations

import asyncio
import gzip
import os
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from emorecog_stream.scanner.watch import ArrivedVolume, VolumeWatcher, WatchEvent
from tests.test_scanner_files import expected_slice_volume, make_slices

FUNCTIONAL = Path(data_path) / "functional.nii"
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
POLL = 0.05


def volume_bytes(i: int) -> bytes:
    """Volume ``i`` of nibabel's real functional run, as one uncompressed 3-D NIfTI file."""
    img = nib.load(FUNCTIONAL)
    one = nib.Nifti1Image(np.asarray(img.dataobj)[..., i], img.affine)
    one.header.set_xyzt_units("mm", "sec")
    one.header["pixdim"][4] = 2.0
    return one.to_bytes()


def name(i: int) -> str:
    """The file of volume index ``i``, numbered as scanners count (the first is 1)."""
    return f"vol_{i + 1:05d}.nii"


def expected_volume(i: int) -> np.ndarray:
    return np.asarray(nib.load(FUNCTIONAL).dataobj, dtype=np.float32)[..., i]


def put_by_rename(folder: Path, file_name: str, payload: bytes) -> Path:
    """How most exporters deliver: write under a hidden name, then rename (atomic)."""
    tmp = folder / f".{file_name}.part"
    tmp.write_bytes(payload)
    os.replace(tmp, folder / file_name)
    return folder / file_name


def put_slowly(
    path: Path, payload: bytes, pieces: int = 4, pause: float = 0.15
) -> threading.Thread:
    """A writer that needs a while: the file is visible, and partial, between pieces."""

    def write() -> None:
        step = -(-len(payload) // pieces)
        with open(path, "wb") as f:
            for start in range(0, len(payload), step):
                f.write(payload[start : start + step])
                f.flush()
                os.fsync(f.fileno())
                time.sleep(pause)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


async def take(stream, n: int, timeout: float = 10.0) -> list[ArrivedVolume]:
    return [await asyncio.wait_for(anext(stream), timeout) for _ in range(n)]


async def event_of(events: list[WatchEvent], kind: str, timeout: float = 10.0) -> WatchEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events:
            if event.kind == kind:
                return event
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {kind!r} event within {timeout} s; got {events}")


@pytest.mark.parametrize("poll", [POLL, None], ids=["poll", "events"])
async def test_rename_and_slow_write_each_read_once_when_whole(tmp_path, poll):
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, poll=poll, on_event=events.append) as watcher:
        stream = watcher.volumes()
        put_by_rename(tmp_path, name(0), volume_bytes(0))
        (first,) = await take(stream, 1)
        writer = put_slowly(tmp_path / name(1), volume_bytes(1))
        (second,) = await take(stream, 1)
        writer.join()
        put_by_rename(tmp_path, name(2), volume_bytes(2))
        (third,) = await take(stream, 1)
        await asyncio.sleep(3 * POLL)  # nothing more may come
        assert watcher.counters.volumes == 3
    got = [first, second, third]
    assert [a.volume.index for a in got] == [0, 1, 2]
    for i, arrived in enumerate(got):
        np.testing.assert_array_equal(arrived.volume.data, expected_volume(i))
        assert arrived.path == str(tmp_path / name(i))
        assert arrived.segment == 0
        assert arrived.volume.tr == pytest.approx(2.0)
    assert first.arrived < second.arrived < third.arrived
    # The slow file was not read before its last piece landed.
    assert second.arrived >= first.arrived + 3 * 0.15 - 0.05
    assert watcher.counters.broken == 0 and not [e for e in events if e.kind == "broken"]
    assert watcher.counters.ignored == 0  # the exporter's hidden .part files are not side files
    if poll is not None:
        # Polling saw the slow file half-written and came back for it.
        retry = await event_of(events, "retrying")
        assert name(1) in retry.message
        assert watcher.counters.retries >= 1


async def test_gap_corrupt_file_and_side_file_are_reported_and_the_stream_goes_on(tmp_path):
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, poll=POLL, on_event=events.append) as watcher:
        stream = watcher.volumes()
        for i in (0, 1):
            put_by_rename(tmp_path, name(i), volume_bytes(i))
            await take(stream, 1)
        (tmp_path / name(3)).write_bytes(b"scanner console crashed here " * 50)
        (tmp_path / "scan_notes.txt").write_text("subject moved at volume 3\n")
        await asyncio.sleep(3 * POLL)
        put_by_rename(tmp_path, name(4), volume_bytes(4))
        (after,) = await take(stream, 1)
        put_by_rename(tmp_path, name(5), volume_bytes(5))
        (last,) = await take(stream, 1)
        broken = await event_of(events, "broken")
    assert (after.volume.index, last.volume.index) == (4, 5)
    np.testing.assert_array_equal(after.volume.data, expected_volume(4))
    gap = next(e for e in events if e.kind == "gap")
    assert "missing volumes 3-4" in gap.message and name(4) in gap.message
    assert broken.path == str(tmp_path / name(3)) and name(3) in broken.message
    ignored = next(e for e in events if e.kind == "ignored")
    assert "scan_notes.txt" in ignored.message
    c = watcher.counters
    assert (c.volumes, c.broken, c.ignored, c.gaps, c.missing, c.series) == (4, 1, 1, 1, 2, 1)


@pytest.mark.parametrize("from_start", [True, False])
async def test_files_present_at_start_are_read_or_skipped(tmp_path, from_start):
    for i in (0, 1, 2):
        put_by_rename(tmp_path, name(i), volume_bytes(i))
    (tmp_path / "old.log").write_text("previous session")
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 64)
    events: list[WatchEvent] = []
    watcher = VolumeWatcher(tmp_path, poll=POLL, from_start=from_start, on_event=events.append)
    async with watcher:
        stream = watcher.volumes()
        await asyncio.sleep(3 * POLL)
        put_by_rename(tmp_path, name(3), volume_bytes(3))
        got = await take(stream, 4 if from_start else 1)
        await asyncio.sleep(3 * POLL)
        assert watcher.counters.volumes == len(got)
    assert [a.volume.index for a in got] == ([0, 1, 2, 3] if from_start else [3])
    assert watcher.counters.ignored == (1 if from_start else 0)
    assert watcher.counters.temporary == (1 if from_start else 0)
    # The side file is named in an event; the hidden file is only counted.
    assert [e.message for e in events if e.kind == "ignored"] == (
        ["old.log: ignored (not an image file name)"] if from_start else []
    )


async def test_two_series_in_one_folder_are_two_segments(tmp_path):
    """A NIfTI run, then a Siemens mosaic run (real files) in the same folder."""
    mosaic = [gzip.decompress((NICOM_DATA / f"siemens_dwi_{b}.dcm.gz").read_bytes())
              for b in (0, 1000)]
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, poll=POLL, on_event=events.append) as watcher:
        stream = watcher.volumes()
        got = []
        for i in (0, 1):
            put_by_rename(tmp_path, f"func_{i + 1:04d}.nii", volume_bytes(i))
            got += await take(stream, 1)
        for i, payload in enumerate(mosaic):
            put_by_rename(tmp_path, f"001_000012_{i + 1:06d}.dcm", payload)
            got += await take(stream, 1)
    assert [a.segment for a in got] == [0, 0, 1, 1]
    assert [a.volume.index for a in got] == [0, 1, 0, 1]
    assert got[2].volume.data.shape == (128, 128, 48)
    assert got[2].volume.series == got[3].volume.series != got[0].volume.series
    series_events = [e for e in events if e.kind == "new_series"]
    assert len(series_events) == 2 and watcher.counters.series == 2
    assert "func_0001.nii" in series_events[0].message
    assert "001_000012_000001.dcm" in series_events[1].message
    assert not [e for e in events if e.kind in ("gap", "broken", "out_of_order")]


async def test_per_slice_dicom_arriving_out_of_order(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    watched = tmp_path / "export"
    watched.mkdir()
    paths = make_slices(staging, n_volumes=2, n_slices=4)
    order = [(0, 2), (0, 0), (0, 3), (0, 1), (1, 3), (1, 1), (1, 0), (1, 2)]
    async with VolumeWatcher(watched, poll=POLL) as watcher:
        stream = watcher.volumes()
        for key in order:
            os.replace(paths[key], watched / paths[key].name)
            os.utime(watched / paths[key].name)  # landed now, as a scanner's copy would
            await asyncio.sleep(2 * POLL)  # one slice per poll: the order is seen
        got = await take(stream, 2)
    assert [a.volume.index for a in got] == [0, 1]
    for arrived in got:
        expected = expected_slice_volume(arrived.volume.index, 4)[..., ::-1]
        np.testing.assert_array_equal(arrived.volume.data, expected)
    # The volume is ready when its last slice (in arrival order) was read.
    assert got[0].path.endswith(paths[(0, 1)].name)
    assert got[1].path.endswith(paths[(1, 2)].name)


@pytest.mark.parametrize("poll", [POLL, None], ids=["poll", "events"])
async def test_growing_4d_run(tmp_path, poll):
    raw = FUNCTIONAL.read_bytes()
    img = nib.load(FUNCTIONAL)
    offset = int(img.dataobj.offset)
    per_volume = 17 * 21 * 3 * 2
    target = tmp_path / "run.nii"
    async with VolumeWatcher(tmp_path, poll=poll) as watcher:
        stream = watcher.volumes()
        got = []
        with open(target, "wb") as f:
            f.write(raw[: offset + 2 * per_volume + 100])
        got += await take(stream, 2)
        with open(target, "ab") as f:
            f.write(raw[offset + 2 * per_volume + 100 :])
        got += await take(stream, 18)
        await asyncio.sleep(0.1)
        assert watcher.counters.volumes == 20
    assert [a.volume.index for a in got] == list(range(20))
    expected = np.asarray(img.dataobj, dtype=np.float32)
    np.testing.assert_array_equal(np.stack([a.volume.data for a in got], -1), expected)


async def test_event_mode_reports_a_broken_file_and_carries_on(tmp_path):
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, on_event=events.append) as watcher:
        stream = watcher.volumes()
        (tmp_path / "vol_0000.dcm").write_bytes(os.urandom(3000))
        put_by_rename(tmp_path, name(1), volume_bytes(1))
        (arrived,) = await take(stream, 1)
        broken = await event_of(events, "broken")
    assert arrived.volume.index == 1
    assert "vol_0000.dcm" in broken.message
    assert watcher.counters.broken == 1


async def test_late_volume_is_reported_out_of_order_and_still_delivered(tmp_path):
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, poll=POLL, on_event=events.append) as watcher:
        stream = watcher.volumes()
        got = []
        for i in (0, 2, 1, 3):
            put_by_rename(tmp_path, name(i), volume_bytes(i))
            got += await take(stream, 1)
    assert [a.volume.index for a in got] == [0, 2, 1, 3]
    kinds = [e.kind for e in events]
    assert kinds.count("gap") == 1 and kinds.count("out_of_order") == 1
    late = next(e for e in events if e.kind == "out_of_order")
    assert name(1) in late.message and "after volume 3" in late.message
    assert watcher.counters.out_of_order == 1


async def test_file_that_stays_truncated_is_reported_broken_after_the_timeout(tmp_path):
    events: list[WatchEvent] = []
    watcher = VolumeWatcher(tmp_path, poll=POLL, incomplete_timeout=0.4, on_event=events.append)
    async with watcher:
        stream = watcher.volumes()
        (tmp_path / name(0)).write_bytes(volume_bytes(0)[:1000])  # writer died
        broken = await event_of(events, "broken")
        put_by_rename(tmp_path, name(1), volume_bytes(1))
        (arrived,) = await take(stream, 1)
    assert name(0) in broken.message and "unchanged" in broken.message
    assert [e.kind for e in events][:1] == ["retrying"]
    assert arrived.volume.index == 1
    assert watcher.counters.broken == 1 and watcher.counters.retries >= 2


async def test_a_volume_of_an_earlier_series_is_dropped_not_mixed(tmp_path):
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, poll=POLL, on_event=events.append) as watcher:
        stream = watcher.volumes()
        put_by_rename(tmp_path, "runA_0001.nii", volume_bytes(0))
        put_by_rename(tmp_path, "runA_0002.nii", volume_bytes(1))
        got = await take(stream, 2)
        put_by_rename(tmp_path, "runB_0001.nii", volume_bytes(2))
        got += await take(stream, 1)
        put_by_rename(tmp_path, "runA_0003.nii", volume_bytes(3))  # late file of run A
        stale = await event_of(events, "stale_series")
        put_by_rename(tmp_path, "runB_0002.nii", volume_bytes(4))
        got += await take(stream, 1)
    assert [(a.segment, a.volume.index) for a in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "runA_0003.nii" in stale.message


@pytest.mark.parametrize("poll", [POLL, None], ids=["poll", "events"])
async def test_recursive_finds_series_folders_made_during_the_run(tmp_path, poll):
    """GE-style layout: each series gets its own sub-folder, created while watching."""
    async with VolumeWatcher(tmp_path, poll=poll, recursive=True) as watcher:
        stream = watcher.volumes()
        await asyncio.sleep(2 * POLL)
        got = []
        for run in ("s001", "s002"):
            (tmp_path / run).mkdir()
            for i in (0, 1):
                put_by_rename(tmp_path / run, name(i), volume_bytes(i))
                got += await take(stream, 1)
    assert [(a.segment, a.volume.index) for a in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert Path(got[2].path).parent.name == "s002"


async def test_tr_unit_mistake_is_announced_once_per_series(tmp_path):
    """nibabel's real example4d.nii.gz says TR 2000 "sec": read as 2 s, and said so."""
    events: list[WatchEvent] = []
    async with VolumeWatcher(tmp_path, poll=POLL, on_event=events.append) as watcher:
        stream = watcher.volumes()
        put_by_rename(tmp_path, "example4d.nii.gz", (Path(data_path) / "example4d.nii.gz")
                      .read_bytes())
        got = await take(stream, 2)
    assert [a.volume.tr for a in got] == [pytest.approx(2.0)] * 2
    units = [e for e in events if e.kind == "tr_units"]
    assert len(units) == 1 and "example4d.nii.gz" in units[0].message


async def test_excluded_files_are_never_read(tmp_path):
    """The bridge keeps its atlas in the export folder: it must not become a series."""
    atlas = tmp_path / "atlas.nii"
    events: list[WatchEvent] = []
    watcher = VolumeWatcher(
        tmp_path, poll=POLL, from_start=True, exclude=[atlas], on_event=events.append
    )
    put_by_rename(tmp_path, name(0), volume_bytes(0))
    async with watcher:
        stream = watcher.volumes()
        got = await take(stream, 1)
        atlas.write_bytes(volume_bytes(9))  # rewritten mid-run
        put_by_rename(tmp_path, name(1), volume_bytes(1))
        got += await take(stream, 1)
    assert [a.path for a in got] == [str(tmp_path / name(0)), str(tmp_path / name(1))]
    assert watcher.counters.series == 1
    assert not [e for e in events if e.path == str(atlas)]


def test_bad_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="expected an existing folder"):
        VolumeWatcher(tmp_path / "not_there")
    with pytest.raises(ValueError, match="poll"):
        VolumeWatcher(tmp_path, poll=0)
