"""The whole chain with real parts: simulated scanner -> export folder -> `emorecog-stream
scanner` -> LSL -> `emorecog-stream run` -> a real Mosquitto -> a real subscriber.

The rehearsal simulator writes a run with a known head-motion trajectory as NIfTI files at ten
times TR pace; the bridge and the engine run as the commands a lab starts. Checked: one
prediction per volume, in order; the ``motion`` flag exactly on the volumes whose true framewise
displacement is above 0.5 mm; the ROI series on the fMRI stream (what the engine reads) equals
the simulated truth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pylsl
import pytest

nib = pytest.importorskip("nibabel")

from emorecog_stream.scanner import sim  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SPEED = 2.5  # a TR of 0.4 s: a stall of 3 TRs (the engine's reset gap) is 1.2 s
VOLUMES = 60


def _write_config(path: Path, tag: str, broker_url: str, session: str) -> None:
    path.write_text(
        f"""
[session]
id = "{session}"

[mqtt]
url = "{broker_url}"

[streams.fmri]
name = "EmoRecog-fMRI-{tag}"
source_id = ""

[streams.motion]
name = "EmoRecog-Motion-{tag}"
source_id = ""

[streams.ppg]
enabled = false

[streams.resp]
enabled = false

[streams.markers]
enabled = false
"""
    )


def _collect_roi(tag: str, n: int, out: list[np.ndarray], ready: threading.Event) -> None:
    """An independent LSL inlet on the bridge's fMRI stream: the series the engine sees."""
    found = pylsl.resolve_byprop("name", f"EmoRecog-fMRI-{tag}", 1, 60.0)
    if not found:
        ready.set()
        return
    inlet = pylsl.StreamInlet(found[0], max_buflen=360)
    inlet.open_stream(10.0)
    ready.set()
    deadline = time.monotonic() + 120
    while len(out) < n and time.monotonic() < deadline:
        sample, _ = inlet.pull_sample(timeout=1.0)
        if sample is not None:
            out.append(np.asarray(sample, dtype=np.float64))


def test_scanner_to_subscriber(tmp_path, mosquitto_broker, mqtt_collector):
    tag = uuid.uuid4().hex[:8]
    session = f"chain-{tag}"
    export = tmp_path / "export"
    export.mkdir()
    truth_dir = tmp_path / "truth"
    settings = sim.SimSettings(fmt="nifti", volumes=VOLUMES, motion="strong", tr=1.0, seed=3)
    rehearsal = sim.prepare(settings=settings)
    truth_dir.mkdir()
    rehearsal.write_truth(truth_dir)
    atlas = truth_dir / "atlas.nii.gz"
    labels = truth_dir / "atlas_labels.txt"
    assert atlas.exists() and labels.exists()
    fd_truth = np.array([info.fd for info in rehearsal.plan()])
    expected_flags = fd_truth > 0.5
    # the test means something only if the trajectory crosses the threshold, clearly
    assert expected_flags.any() and not expected_flags.all()
    assert np.min(np.abs(fd_truth - 0.5)) > 0.1

    config = tmp_path / "lab.toml"
    _write_config(config, tag, mosquitto_broker.url, session)
    log = tmp_path / "session.jsonl"
    collector = mqtt_collector(mosquitto_broker, [f"emorecog/{session}/#"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    exe = [sys.executable, "-m", "emorecog_stream"]
    bridge = subprocess.Popen(
        [*exe, "scanner", str(export), "--atlas", str(atlas), "--labels", str(labels),
         "--tag", tag, "--recon-delay", str((1.0 + 0.2) / SPEED), "--speed", str(SPEED),
         "--tr", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    engine = subprocess.Popen(
        [*exe, "run", "--config", str(config), "--no-dashboard", "--log", str(log),
         "--replay-speed", str(SPEED)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    roi_seen: list[np.ndarray] = []
    ready = threading.Event()
    try:
        # The volumes are made before the clock starts and written at TR pace by rename, as
        # a scanner does; making them on the fly (``ScannerSim``) costs up to 0.1 s a volume on
        # a loaded 2-core machine, more than a sped-up TR.
        files = [
            sim.encode_volume(rehearsal, info, rehearsal.volume(info.series, info.index))[0]
            for info in rehearsal.plan()
        ]

        def write_at_tr_pace() -> None:
            start = time.monotonic()
            for n, (name, payload) in enumerate(files):
                time.sleep(max(0.0, start + (n + 1) / SPEED - time.monotonic()))
                sim.write_atomic(export / name, payload)

        writer = threading.Thread(target=write_at_tr_pace, daemon=True)
        collector_thread = threading.Thread(
            target=_collect_roi, args=(tag, VOLUMES, roi_seen, ready), daemon=True
        )
        collector_thread.start()
        # the scan starts once the engine reads both streams, as an experimenter would check
        _wait_for_line(bridge, f"EmoRecog-fMRI-{tag}: read by")
        _wait_for_line(bridge, f"EmoRecog-Motion-{tag}: read by")
        # an inlet is "reading" once its stream is open; the engine learns of the motion
        # stream a moment later, after the first clock-offset estimate
        time.sleep(1.0)
        writer.start()
        assert collector.wait_for(
            lambda msgs: len(
                {m.json()["sequence"] for m in msgs if m.topic.endswith("/prediction")}
            )
            >= VOLUMES,
            timeout=120,
        ), _outputs(bridge, engine)
        writer.join(timeout=60)
        collector_thread.join(timeout=30)
    finally:
        for proc in (engine, bridge):
            proc.terminate()
        outputs = [p.communicate(timeout=30)[0] for p in (engine, bridge)]
    predictions = collector.unique_by_sequence("prediction")
    assert len(predictions) == VOLUMES, outputs[1][-3000:]
    assert [p["tr_index"] for p in predictions] == list(range(VOLUMES))
    sequences = [p["sequence"] for p in predictions]
    assert sequences == sorted(sequences) and len(set(sequences)) == VOLUMES
    flagged = np.array(["motion" in p["flags"] for p in predictions])
    assert np.array_equal(flagged, expected_flags), (
        np.flatnonzero(flagged), np.flatnonzero(expected_flags), outputs[1][-2000:]
    )
    fd = np.array([p["framewise_displacement"] for p in predictions], dtype=float)
    assert not np.isnan(fd).any(), ([p["flags"] for p in predictions[:3]], outputs[0][:3000])
    np.testing.assert_allclose(fd, fd_truth, atol=0.1)
    # the ROI series the engine read equals the simulated truth
    assert len(roi_seen) == VOLUMES
    seen = np.vstack(roi_seen)
    truth = np.load(truth_dir / "truth" / "roi.npy")[:VOLUMES] if (
        truth_dir / "truth" / "roi.npy").exists() else np.load(truth_dir / "roi.npy")[:VOLUMES]
    per_roi = [np.corrcoef(seen[:, k], truth[:, k])[0, 1] for k in range(truth.shape[1])]
    overall = np.corrcoef(seen.ravel(), truth.ravel())[0, 1]
    assert overall >= 0.99 and np.median(per_roi) >= 0.99, (overall, np.median(per_roi))
    assert log.exists() and log.stat().st_size > 0


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 60.0) -> None:
    """Read ``proc``'s output until a line holds ``text`` (the rest is read later)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return
    raise AssertionError(f"no line with {text!r} from the bridge: {''.join(lines)}")


def _outputs(*procs: subprocess.Popen) -> str:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    return "\n----\n".join((p.communicate(timeout=30)[0] or "")[-3000:] for p in procs)
