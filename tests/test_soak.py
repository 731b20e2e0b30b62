"""A short run of the soak benchmark (``benchmarks/bench_soak.py``), as CI can afford it.

The full run is 8+ hours of session time; this one is 0.1 h (6 minutes of session time, about
12 s of wall time at x30) through the same processes: ``replay --loop``, ``run``, a real
Mosquitto and a subscriber process. It checks what a short run can: every sequence number in
the log once, all of them at the subscriber, the log closed, the figures reported. The RSS and
latency bars need the long run (docs/reliability.md has its figures).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.mqtt_broker import find_mosquitto

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(find_mosquitto() is None, reason="the soak benchmark needs Mosquitto")
def test_short_soak_run_loses_nothing_and_reports_its_figures() -> None:
    options = ["--hours", "0.1", "--speed", "30", "--warmup-h", "0.02", "--sample-s", "1"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_soak.py"), *options],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "soak" and result["engine_exit"] == 0
    assert result["session_hours"] >= 0.08
    assert result["predictions_logged"] >= 250  # TR 1 s
    assert result["log_every_sequence_once"] and result["log_session_end"]
    assert result["subscriber_unique"] == result["predictions_logged"]
    assert result["subscriber_missing"] == 0 and result["subscriber_not_in_log"] == 0
    for key in ("rss_mb_after_warmup", "rss_mb_end", "fds_end", "threads_end", "queue_max"):
        assert result[key] is not None, key
    for window in ("latency_first", "latency_last"):
        assert result[window]["n"] > 0 and result[window]["engine_p99_ms"] is not None
