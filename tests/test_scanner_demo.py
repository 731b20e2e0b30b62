"""`emorecog-stream demo --scanner` as a user runs it: simulated scanner files -> bridge ->
engine, with the session's physiology replayed beside them, predictions on a real broker."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_demo_scanner_runs_the_whole_chain(mosquitto_broker, mqtt_collector, fmt):
    collector = mqtt_collector(mosquitto_broker, ["emorecog/demo/#"])
    proc = subprocess.run(
        [sys.executable, "-m", "emorecog_stream", "demo", "--scanner", "--scanner-format", fmt,
         "--speed", "2", "--duration", "16", "--no-dashboard", "--no-web",
         "--mqtt", mosquitto_broker.url],
        capture_output=True, text=True, timeout=150,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "new series" in out and "segment 1" in out
    tr_lines = re.findall(r"^\d\d:\d\d:\d\d\.\d+\s+TR\s+(\d+)\s", out, re.M)
    assert len(tr_lines) >= 10, out[-3000:]
    assert [int(t) for t in tr_lines] == list(range(len(tr_lines)))
    # physiology replayed beside the scanner reaches the engine: heart rates appear
    assert re.search(r"HR\s+\d+\.\d bpm", out), out[-3000:]
    assert "FD " in out  # the bridge's motion reached the engine
    predictions = collector.unique_by_sequence("prediction")
    assert len(predictions) >= 10
    assert any(p.get("framewise_displacement") is not None for p in predictions)
