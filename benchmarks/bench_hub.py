"""The hub (``run --sessions``) serving N live sessions replayed from another process.

Three kinds of process, as in a lab: ``replay --copies N`` plays N copies of a short synthetic
session in real time (TR 1 s, PPG 400 Hz, respiration 50 Hz, 20 ms chunks) as N sets of LSL
streams; the hub (``run --sessions FILE``, one model) serves them and publishes to Mosquitto;
this process subscribes to every session's predictions.

Per N it prints: predictions received (of N x volumes), the engine's latency per prediction
(``latency_ms`` in the payload: step ready -> hand-off to the publisher; *not* bench_e2e's
push-to-subscriber figure) p50/p99, the hub's CPU share (its CPU seconds / wall seconds of the
replay, 1.0 = one core) and peak RSS (VmHWM). Bars (issue 10): 64 sessions p99 <= 50 ms,
RSS <= 1.5 GB.

Usage: ``python benchmarks/bench_hub.py [--sessions 1,8,32,64,128] [--trials 3]``.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from emorecog_stream.recordings.synth import SynthConfig, generate_session
from emorecog_stream.recordings.xdf import write_xdf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {os.environ.get('USER', 'root')}\nlog_dest none\nmax_queued_messages 100000\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Subscriber:
    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.latencies: list[float] = []
        self.sequences: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{prefix}")
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("emorecog/+/prediction", qos=1)
        self.client.loop_start()

    def on_message(self, client, userdata, msg) -> None:
        p = json.loads(msg.payload)
        if not p["session"].startswith(self.prefix):
            return
        with self.lock:
            self.latencies.append(float(p["latency_ms"]))
            self.sequences.setdefault(p["session"], []).append(int(p["sequence"]))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_case(n: int, xdf: Path, port: int, volumes: int, workdir: Path) -> dict:
    tag = "b" + uuid.uuid4().hex[:5]
    ids = ["BENCH"] + [f"BENCH-{k}" for k in range(2, n + 1)]  # replay's ids for the copies
    sessions_file = workdir / f"sessions-{n}.toml"
    sessions_file.write_text(
        "".join(f'[[session]]\nid = "{tag}{sid}"\ntag = "{tag}-{sid}"\n\n' for sid in ids)
    )
    sub = Subscriber(port, tag)
    hub = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "run", "--sessions", str(sessions_file),
         "--mqtt", f"mqtt://127.0.0.1:{port}", "--no-dashboard"],
        stdout=(workdir / f"hub-{n}.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    replay = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "replay", str(xdf), "--parallel",
         "--copies", str(n), "--tag", tag, "--no-progress", "--wait-for-consumer", "--linger", "3"],
        stdout=(workdir / f"replay-{n}.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # the replay starts once the hub's inlets are connected; measure from then
        while replay.poll() is None and not sub.latencies:
            time.sleep(0.05)
        t0, c0 = time.monotonic(), cpu_seconds(hub.pid)
        behind = replay.poll() is not None  # no prediction before the replay ended
        replay.wait(timeout=volumes * 3 + 120)
        wall, cpu = time.monotonic() - t0, cpu_seconds(hub.pid) - c0
        if behind:
            wall = 0.0  # the window measured nothing: no CPU share reported
        rss = peak_rss_mb(hub.pid)
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(timeout=60)
        except subprocess.TimeoutExpired:
            hub.kill()
        if replay.poll() is None:
            replay.kill()
        time.sleep(0.5)
        sub.close()
    lat = np.array(sub.latencies)
    contiguous = all(s == list(range(len(s))) for s in sub.sequences.values())
    return {
        "sessions": n,
        "predictions": int(lat.size),
        "expected": n * volumes,
        "sessions_with_predictions": len(sub.sequences),
        "sequences_contiguous": contiguous,
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "hub_cpu_share": round(cpu / wall, 3) if wall > 0 else None,
        "keeps_up": bool(lat.size and np.percentile(lat, 99) < 1000.0),  # p99 under one TR
        "hub_peak_rss_mb": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,8,32,64,128", help="comma-separated N")
    parser.add_argument("--trials", type=int, default=3, help="trials of the replayed session")
    args = parser.parse_args()
    counts = [int(x) for x in args.sessions.split(",")]
    config = SynthConfig(n_participants=1, n_trials=args.trials, video_s=5.0, rest_s=2.0,
                         lead_in_s=3.0)  # fmt: skip
    session = generate_session(1, config)
    session.participant = "BENCH"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(os.environ.get("BENCH_HUB_DIR") or tmp)
        xdf = write_xdf(session, workdir / "BENCH.xdf")
        broker, port = start_mosquitto(workdir)
        try:
            for n in counts:
                row = run_case(n, xdf, port, session.n_volumes, workdir)
                rows.append(row)
                print(
                    f"N={n:4d}: {row['predictions']}/{row['expected']} predictions,"
                    f" latency p50 {row['latency_p50_ms']} ms p99 {row['latency_p99_ms']} ms,"
                    f" hub CPU {row['hub_cpu_share']}, peak RSS {row['hub_peak_rss_mb']} MB",
                    flush=True,
                )
        finally:
            broker.terminate()
            broker.wait()
    at64 = next((r for r in rows if r["sessions"] == 64), None)
    summary = {
        "benchmark": "hub",
        "volumes_per_session": session.n_volumes,
        "ppg_hz": session.ppg.nominal_srate,
        "resp_hz": session.resp.nominal_srate,
        "cases": rows,
        "bar_64_sessions": None
        if at64 is None
        else bool(
            at64["latency_p99_ms"] is not None
            and at64["latency_p99_ms"] <= 50
            and at64["hub_peak_rss_mb"] <= 1536
        ),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
