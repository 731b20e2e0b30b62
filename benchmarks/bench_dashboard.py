"""Cost of the telemetry outputs per TR: snapshot, dashboard frame, log line, JSONL line.

Why: the dashboard renders in rich's refresh thread and the JSONL log writes on the engine's
event loop; both must stay far below the 20 ms latency budget of a step. Prints one JSON object
(medians and p99 in microseconds) on its last line.

    python benchmarks/bench_dashboard.py [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console

from emorecog_stream.core.messages import Prediction
from emorecog_stream.engine.telemetry import MqttStats, TelemetryRecorder
from emorecog_stream.sinks.dashboard import format_log_line, render
from emorecog_stream.sinks.jsonl import JsonlLog


def _prediction(i: int) -> Prediction:
    return Prediction(
        session="bench",
        sequence=i,
        tr_index=i,
        volume_timestamp=1000.0 + i,
        utc="2026-11-25T10:00:00.000Z",
        probabilities=(0.2, 0.3, 0.5),
        category="positive",
        intensity=float(np.sin(i / 5) * 4),
        heart_rate=70.0,
        heart_rate_valid=True,
        respiration_rate=15.0,
        respiration_rate_valid=True,
        model_id="bench-model",
        latency_ms=3.0,
    )


def _time(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    fn()  # warm up
    samples = np.empty(repeats)
    for k in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples[k] = time.perf_counter() - t0
    us = samples * 1e6
    return {"p50_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()

    rec = TelemetryRecorder(session_id="bench", model_id="bench-model", started_at=0.0)
    for role, name, rate, dur in (
        ("fmri", "EmoRecog-fMRI", 1.0, 60.0),
        ("ppg", "EmoRecog-PPG", 500.0, 60.0),
        ("resp", "EmoRecog-Resp", 50.0, 60.0),
    ):
        mon = rec.add_stream(role, name, rate)
        ts = np.arange(0.0, dur, 1.0 / rate)
        for chunk in np.array_split(ts, max(1, int(dur * 10))):  # 100 ms chunks
            mon.add(chunk)
    for i in range(200):
        rec.record_prediction(_prediction(i), heart_rate_quality=0.9)
    mqtt = MqttStats(state="connected", sent=200)
    snap = rec.snapshot(60.0, mqtt=mqtt)
    console = Console(file=io.StringIO(), width=120, force_terminal=True)

    results = {
        "snapshot": _time(lambda: rec.snapshot(60.0, mqtt=mqtt), args.repeats),
        "render_frame": _time(lambda: console.print(render(snap)), args.repeats),
        "log_line": _time(lambda: format_log_line(snap), args.repeats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        log = JsonlLog(Path(tmp) / "bench.jsonl", session="bench")
        pred = _prediction(1)
        results["jsonl_line"] = _time(lambda: log.write_prediction(pred), args.repeats)
        log.close()
    results["repeats"] = args.repeats  # type: ignore[assignment]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
