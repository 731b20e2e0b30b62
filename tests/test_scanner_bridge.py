"""The scanner bridge in-process, with real files in a real folder and real LSL inlets.

What the engine can rely on: one ``Motion`` and one ``fMRI`` sample per published volume with
the same timestamp, channel labels from the label table, the nominal rate from the TR; trigger
pulses as timestamps; what the bridge drops (dummies, foreign grids, its own atlas) and what it
reports (a TR that disagrees with ``--tr``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import pylsl
import pytest

from emorecog_stream.scanner import rigid, sim
from emorecog_stream.scanner.bridge import BridgeError, BridgeSettings, ScannerBridge

nib = pytest.importorskip("nibabel")

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def rehearsal():
    settings = sim.SimSettings(fmt="nifti", volumes=8, motion="strong", tr=2.0, seed=5)
    return sim.prepare(settings=settings)


def write_volumes(rehearsal, folder, names=None, pace=0.15):
    files = [
        sim.encode_volume(rehearsal, info, rehearsal.volume(info.series, info.index))[0]
        for info in rehearsal.plan()
    ]
    for name, payload in files:
        time.sleep(pace)
        sim.write_atomic(folder / (names(name) if names else name), payload)
    return files


def inlet_for(name: str) -> pylsl.StreamInlet:
    found = pylsl.resolve_byprop("name", name, 1, 10.0)
    assert found, f"no LSL stream {name}"
    inlet = pylsl.StreamInlet(found[0], max_buflen=60)
    inlet.open_stream(5.0)
    return inlet


def run_bridge(settings: BridgeSettings, volumes: int, during) -> tuple[ScannerBridge, list[str]]:
    lines: list[str] = []
    bridge = ScannerBridge(settings, say=lines.append)

    async def main() -> None:
        task = asyncio.create_task(bridge.run(max_volumes=volumes))
        await bridge.ready.wait()
        worker = threading.Thread(target=during, daemon=True)
        worker.start()
        await asyncio.wait_for(task, 60)
        worker.join(10)

    asyncio.run(main())
    return bridge, lines


def test_each_volume_gives_a_motion_and_an_fmri_sample_with_one_timestamp(tmp_path, rehearsal):
    tag = uuid.uuid4().hex[:8]
    export = tmp_path / "export"
    export.mkdir()
    rehearsal.write_truth(tmp_path)
    # the atlas kept in the export folder is no volume
    atlas = export / "atlas.nii.gz"
    (tmp_path / "atlas.nii.gz").replace(atlas)
    samples: dict[str, list] = {"fmri": [], "motion": []}
    infos = {}

    def during() -> None:
        fmri = inlet_for(f"EmoRecog-fMRI-{tag}")
        motion = inlet_for(f"EmoRecog-Motion-{tag}")
        infos["fmri"], infos["motion"] = fmri.info(5.0), motion.info(5.0)
        writer = threading.Thread(target=write_volumes, args=(rehearsal, export), daemon=True)
        writer.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(map(len, samples.values())) < 8:
            for key, inlet in (("motion", motion), ("fmri", fmri)):
                s, t = inlet.pull_sample(timeout=0.05)
                if s is not None:
                    samples[key].append((t, s))

    settings = BridgeSettings(
        watch_dir=str(export), atlas=str(atlas), label_table=str(tmp_path / "atlas_labels.txt"),
        tr=2.0, tag=tag, fd_threshold=0.5,
    )
    bridge, lines = run_bridge(settings, 8, during)
    assert bridge.counters.published == 8, lines
    assert not any("atlas.nii.gz" in line for line in lines if "series" in line), lines
    fmri_t = [t for t, _ in samples["fmri"]]
    motion_t = [t for t, _ in samples["motion"][: len(fmri_t)]]
    assert len(fmri_t) == 8
    np.testing.assert_allclose(fmri_t, motion_t, atol=1e-6)
    # metadata the engine and LabRecorder read
    info = infos["fmri"]
    assert info.type() == "fMRI" and info.channel_count() == 246
    assert info.nominal_srate() == pytest.approx(0.5)
    ch = info.desc().child("channels").child("channel")
    assert ch.child_value("label") == "BN001"
    minfo = infos["motion"]
    assert minfo.type() == "Motion" and minfo.channel_count() == 7
    labels = []
    ch = minfo.desc().child("channels").child("channel")
    while not ch.empty():
        labels.append(ch.child_value("label"))
        ch = ch.next_sibling()
    assert labels == [*rigid.PARAMETER_NAMES, "framewise_displacement"]
    # FD per volume as the truth says, flagged above the threshold
    truth_fd = np.array([info.fd for info in rehearsal.plan()])
    got_fd = np.array([s[6] for _, s in samples["motion"][:8]])
    np.testing.assert_allclose(got_fd, truth_fd, atol=0.1)
    assert bridge.counters.above_threshold == int((truth_fd > 0.5).sum())


def test_trigger_pulses_are_the_timestamps(tmp_path, rehearsal):
    tag = uuid.uuid4().hex[:8]
    export = tmp_path / "export"
    export.mkdir()
    rehearsal.write_truth(tmp_path)
    trigger_name = f"ScannerTrigger-{tag}"
    outlet = pylsl.StreamOutlet(
        pylsl.StreamInfo(trigger_name, "Markers", 1, 0, pylsl.cf_string, f"trig-{tag}")
    )
    pulses: list[float] = []
    got: list[float] = []

    def during() -> None:
        fmri = inlet_for(f"EmoRecog-fMRI-{tag}")
        pace = 0.3

        def scan() -> None:
            files = [
                sim.encode_volume(rehearsal, info, rehearsal.volume(info.series, info.index))[0]
                for info in rehearsal.plan()
            ]
            time.sleep(1.0)  # the bridge's trigger inlet is connected
            for name, payload in files:
                t = pylsl.local_clock()
                outlet.push_sample(["5"], t)  # the pulse at the start of the acquisition
                pulses.append(t)
                time.sleep(pace)  # acquisition, then the file lands
                sim.write_atomic(export / name, payload)

        threading.Thread(target=scan, daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(got) < 8:
            s, t = fmri.pull_sample(timeout=0.1)
            if s is not None:
                got.append(t)

    settings = BridgeSettings(
        watch_dir=str(export), atlas=str(tmp_path / "atlas.nii.gz"), tr=2.0, tag=tag,
        trigger=trigger_name, speed=2.0 / 0.3,
    )
    _, lines = run_bridge(settings, 8, during)
    assert len(got) == 8, lines
    # each volume carries its own pulse's time, not its file's arrival
    np.testing.assert_allclose(got, pulses[:8], atol=2e-3, err_msg="\n".join(lines))
    assert not any(line.startswith("[trigger]") for line in lines), lines


def test_dummies_are_dropped_a_tr_disagreement_and_a_foreign_grid_are_reported(tmp_path):
    tag = uuid.uuid4().hex[:8]
    export = tmp_path / "export"
    export.mkdir()
    settings = sim.SimSettings(fmt="nifti", volumes=6, dummies=2, motion="none", tr=1.5, seed=1)
    rehearsal = sim.prepare(settings=settings)
    rehearsal.write_truth(tmp_path)

    def during() -> None:
        inlet_for(f"EmoRecog-fMRI-{tag}")
        write_volumes(rehearsal, export)
        # a localiser on another grid exported into the same folder
        other = nib.Nifti1Image(np.ones((16, 16, 8), np.float32), np.diag([4.0, 4, 4, 1]))
        nib.save(other, export / "localizer_00001.nii")

    bridge_settings = BridgeSettings(
        watch_dir=str(export), atlas=str(tmp_path / "atlas.nii.gz"), tr=2.0, tag=tag, skip=2,
    )
    lines: list[str] = []
    bridge = ScannerBridge(bridge_settings, say=lines.append)

    async def main() -> None:
        task = asyncio.create_task(bridge.run())
        await bridge.ready.wait()
        worker = threading.Thread(target=during, daemon=True)
        worker.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and bridge.counters.foreign_grid == 0:
            await asyncio.sleep(0.1)
        bridge.stop()
        await asyncio.wait_for(task, 20)

    asyncio.run(main())
    text = "\n".join(lines)
    assert bridge.counters.skipped == 2 and bridge.counters.published == 4, text
    assert "dummy volume 1 of 2, dropped" in text
    assert "the header says TR 1.5 s, using 2 s" in text
    assert bridge.counters.foreign_grid == 1
    assert "localizer_00001.nii: dropped" in text and "found shape (16, 16, 8)" in text


def test_unusable_inputs_stop_the_bridge_before_the_first_volume(tmp_path, rehearsal):
    rehearsal.write_truth(tmp_path)
    with pytest.raises(BridgeError, match="no such file"):
        ScannerBridge(BridgeSettings(watch_dir=str(tmp_path), atlas=str(tmp_path / "nope.nii")))
    wrong = tmp_path / "ref.nii"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), wrong)
    with pytest.raises(BridgeError, match=r"not on the grid of the reference .*found shape"):
        ScannerBridge(
            BridgeSettings(
                watch_dir=str(tmp_path), atlas=str(tmp_path / "atlas.nii.gz"),
                reference=str(wrong),
            )
        )
