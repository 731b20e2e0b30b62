"""Soak: hours of session time through the real processes, watching for slow leaks and drift.

Four processes, as in a lab: a real Mosquitto; ``emorecog-stream replay`` looping
``replay_data/P15.xdf`` (about 18 minutes a pass) sped up ``--speed`` times; the engine,
``emorecog-stream run --replay-speed X`` (so windows, deadlines and stall timeouts stay in session
seconds) with a JSONL log; and an independent paho subscriber process (persistent session,
QoS 1) that writes every prediction it receives, with ``pylsl.local_clock()`` at receipt, to a
file. This script samples the engine's ``/proc/<pid>`` (RSS, open file descriptors, threads,
CPU time) every ``--sample-s`` wall seconds, and the queue depth seen from outside: the last
sequence number in the JSONL log minus the last one the subscriber holds.

Why these figures: a session cannot be repeated, and a study day is 8+ hours of engine time.
A leak of a few kB per TR, a list that grows per prediction, or a queue that never quite drains
show up only after hours, as RSS growth, creeping latency or a growing backlog.

Reported: RSS after warm-up (``--warmup-h`` of session time) and at the end; fds and threads at
both points; latency p50/p99 of the first hour after the warm-up and of the last hour of session
time, both as the engine measures it (``latency_ms`` in the payload: step ready -> publish
hand-off) and end to end (receipt by the subscriber - the volume's LSL timestamp, which includes
waiting for the physiology chunk after the volume); the queue depth (max and p99); and whether
the log and the subscriber each hold every sequence number exactly once (after de-duplication
for the subscriber: QoS 1 may deliver twice).

Bars (for runs of at least 8 hours): RSS growth after warm-up <= 5 MB per 8 hours; the last
hour's engine p99 within 20 % of the first's; nothing lost. The end-to-end p99 ratio is printed
beside it (it also carries the machine's load from other jobs and the replay's chunking).

Usage: ``python benchmarks/bench_soak.py [--hours 8.5] [--speed 30] [--warmup-h 0.5]``.
The last line of output is one JSON object; exit status 1 when a bar is missed (runs shorter
than 8 hours check only that nothing was lost or repeated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REPLAY_FILE = ROOT / "replay_data" / "P15.xdf"
RSS_BAR_MB_PER_8H = 5.0
P99_BAR_RATIO = 1.2

SUBSCRIBER = textwrap.dedent(
    """
    import json, sys, threading
    import paho.mqtt.client as mqtt
    import pylsl
    host, port, session, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    out = open(path, "a", buffering=1)
    lock = threading.Lock()
    def on_connect(client, userdata, flags, rc, props=None):
        client.subscribe([(f"emorecog/{session}/prediction", 1), (f"emorecog/{session}/status", 1)])
    def on_subscribe(*args):
        print("READY", flush=True)
    def on_message(client, userdata, msg):
        t = pylsl.local_clock()
        p = json.loads(msg.payload)
        with lock:
            if msg.topic.endswith("/status"):
                out.write(json.dumps(["status", t, p["state"], p.get("reason", "")]) + "\\n")
            else:
                row = ["p", t, p["sequence"], p["volume_timestamp"], p["latency_ms"]]
                out.write(json.dumps(row) + "\\n")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-" + session,
                    clean_session=False, protocol=mqtt.MQTTv311)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port, keepalive=30)
    c.loop_forever()
    """
)


def free_port() -> int:
    from emorecog_stream.sinks.broker import free_port as port

    return port()


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(mosquitto, os.X_OK):
        raise SystemExit("bench_soak needs Mosquitto (apt install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {os.environ.get('USER', 'root')}\nlog_dest none\nmax_queued_messages 1000000\n"
    )
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL)
    import socket

    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto did not listen on port {port}")


def output_file(path: Path) -> int:
    """A file descriptor for a child's output (closed here once the child has it)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def proc_figures(pid: int) -> dict[str, float] | None:
    """RSS (MB), open fds, threads and CPU seconds of a process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
    threads_line = re.search(r"^Threads:\s+(\d+)", status, re.M)
    if rss is None or threads_line is None:
        return None  # exited between poll() and this read: a zombie has no memory figures
    rss_kb, threads = int(rss.group(1)), int(threads_line.group(1))
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_mb": rss_kb / 1024.0, "fds": fds, "threads": threads, "cpu_s": cpu}


def last_sequence_in_log(path: Path) -> int | None:
    """The sequence of the last complete prediction line of the JSONL log (tail read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            tail = f.read()
    except FileNotFoundError:
        return None
    for line in reversed(tail.split(b"\n")[1:-1] if size > 16384 else tail.split(b"\n")[:-1]):
        if b'"kind":"prediction"' in line:
            with contextlib.suppress(ValueError):
                return int(json.loads(line)["sequence"])
    return None


class SubscriberFile:
    """Incremental reader of the subscriber's output file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rows: list[list[Any]] = []
        self.statuses: list[list[Any]] = []
        self.last_sequence: int | None = None

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        for line in data[:cut].splitlines():
            row = json.loads(line)
            if row[0] == "p":
                self.rows.append(row[1:])
                seq = int(row[2])
                self.last_sequence = (
                    seq if self.last_sequence is None else max(self.last_sequence, seq)
                )
            else:
                self.statuses.append(row[1:])


def percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=8.5, help="session hours (default 8.5)")
    parser.add_argument("--speed", type=float, default=30.0, help="replay speed (default 30)")
    parser.add_argument(
        "--warmup-h", type=float, default=None, help="warm-up, session hours (default hours/17)"
    )
    parser.add_argument("--sample-s", type=float, default=2.0, help="wall seconds between samples")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (log, outputs)")
    args = parser.parse_args()
    warmup_h = args.warmup_h if args.warmup_h is not None else args.hours / 17.0
    if not 0 <= warmup_h < args.hours:
        raise SystemExit("--warmup-h must be >= 0 and below --hours")
    window_h = min(1.0, (args.hours - warmup_h) / 3.0)  # "first hour" / "last hour"
    session_s = args.hours * 3600.0
    wall_s = session_s / args.speed

    from emorecog_stream.adapters.lsl_info import stream_identity
    from emorecog_stream.core.streams import Role

    tag = "soak" + uuid.uuid4().hex[:8]
    session_id = f"soak-{tag}"
    work = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    log_path = work / "session.jsonl"
    sub_path = work / "subscriber.jsonl"
    procs: list[subprocess.Popen[Any]] = []
    samples: list[dict[str, float]] = []
    load_start = os.getloadavg()
    print(
        f"soak: {args.hours:g} h of session time at x{args.speed:g} (~{wall_s / 60:.1f} min wall),"
        f" warm-up {warmup_h:g} h, windows {window_h:g} h; work folder {work};"
        f" load average {load_start[0]:.2f}",
        flush=True,
    )
    engine_rc = None
    try:
        broker, port = start_mosquitto(work)
        procs.append(broker)
        sub = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, "127.0.0.1", str(port), session_id, str(sub_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(sub)
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "READY":
            raise SystemExit("subscriber did not start")
        config = work / "engine.toml"
        lines = [f'[session]\nid = "{session_id}"\n']
        for role in (Role.FMRI, Role.PPG, Role.RESP, Role.MARKERS):
            name, _type, source_id = stream_identity(role, tag)
            enabled = "\nenabled = true" if role is Role.MARKERS else ""
            lines.append(
                f'[streams.{role.value}]\nname = "{name}"\nsource_id = "{source_id}"{enabled}\n'
            )
        config.write_text("\n".join(lines))
        replay = subprocess.Popen(
            [
                sys.executable, "-m", "emorecog_stream", "replay", str(REPLAY_FILE),
                "--loop", "--speed", str(args.speed), "--tag", tag, "--no-progress",
                "--wait-for-consumer",
            ],
            stdout=(out := output_file(work / "replay.out")),
            stderr=subprocess.STDOUT,
            cwd=work,  # not ROOT: PYTHONPATH may point at a snapshot of the package
        )  # fmt: skip
        os.close(out)  # the child has its own copy
        procs.append(replay)
        engine = subprocess.Popen(
            [
                sys.executable, "-m", "emorecog_stream", "run", "--config", str(config),
                "--mqtt", f"mqtt://127.0.0.1:{port}", "--log", str(log_path), "--no-dashboard",
                "--replay-speed", str(args.speed), "--duration", str(wall_s),
            ],
            stdout=(out := output_file(work / "engine.out")),
            stderr=subprocess.STDOUT,
            cwd=work,  # not ROOT: PYTHONPATH may point at a snapshot of the package
        )  # fmt: skip
        os.close(out)
        procs.append(engine)
        subscriber = SubscriberFile(sub_path)
        started = time.monotonic()
        deadline = started + wall_s + 120.0
        first_prediction_at: float | None = None
        while engine.poll() is None:
            if time.monotonic() > deadline:
                engine.send_signal(signal.SIGINT)
                engine.wait(timeout=30)
                break
            if replay.poll() is not None:
                engine.send_signal(signal.SIGINT)
                engine.wait(timeout=30)
                raise SystemExit(f"replay ended early:\n{(work / 'replay.out').read_text()}")
            figures = proc_figures(engine.pid)
            subscriber.poll()
            logged = last_sequence_in_log(log_path)
            now = time.monotonic()
            if logged is not None and first_prediction_at is None:
                first_prediction_at = now
            if figures is not None and first_prediction_at is not None:
                figures["session_h"] = (now - first_prediction_at) * args.speed / 3600.0
                got = subscriber.last_sequence
                figures["queue"] = (
                    float(logged - got) if logged is not None and got is not None else 0.0
                )
                figures["wall"] = now
                figures["load"] = os.getloadavg()[0]
                samples.append(figures)
            time.sleep(args.sample_s)
        engine_rc = engine.wait()
        # everything in the log must reach the subscriber; give the broker a moment
        logged = last_sequence_in_log(log_path)
        end = time.monotonic() + 30.0
        while time.monotonic() < end:
            subscriber.poll()
            if logged is None or (subscriber.last_sequence or -1) >= logged:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        subscriber.poll()
        engine_out = (work / "engine.out").read_text()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                # the replay and the engine stop cleanly on Ctrl-C; the others on SIGTERM
                proc.send_signal(
                    signal.SIGINT if proc is not broker and proc is not sub else signal.SIGTERM
                )
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    load_end = os.getloadavg()

    from emorecog_stream.sinks.jsonl import read_log

    records = read_log(log_path)
    logged_seq = [int(r["sequence"]) for r in records if r["kind"] == "prediction"]
    ends = [r for r in records if r["kind"] == "session_end"]
    n_logged = len(logged_seq)
    log_once = logged_seq == list(range(n_logged))
    rows = subscriber.rows
    received = [int(r[1]) for r in rows]
    unique = set(received)
    duplicates = len(received) - len(unique)
    missing = sorted(set(logged_seq) - unique)
    extra = sorted(unique - set(logged_seq))
    first: dict[int, list[Any]] = {}
    for r in rows:
        first.setdefault(int(r[1]), r)
    ordered = [first[s] for s in sorted(first)]
    t_recv = np.array([r[0] for r in ordered])
    vts = np.array([r[2] for r in ordered])
    engine_ms = np.array([r[3] for r in ordered])
    e2e_ms = (t_recv - vts) * 1000.0
    session_h = (vts - vts[0]) * args.speed / 3600.0 if vts.size else vts
    total_h = float(session_h[-1]) if session_h.size else 0.0
    first_win = (session_h >= warmup_h) & (session_h < warmup_h + window_h)
    last_win = session_h >= total_h - window_h

    # the end figures are those of the running engine, not of one tearing down its streams
    # after the last prediction (inlets closed, threads joined)
    samples = [s for s in samples if s["session_h"] <= total_h - 0.02] or samples
    if args.keep:
        (work / "samples.json").write_text(json.dumps(samples))

    def window_samples(lo: float, hi: float) -> list[dict[str, float]]:
        return [s for s in samples if lo <= s["session_h"] <= hi]

    def lat(mask: np.ndarray) -> dict[str, Any]:
        """Latency in a window, the machine's load meanwhile, and the engine's CPU time per
        prediction (its own work: unlike wall-clock latency, not inflated by other jobs)."""
        h = session_h[mask]
        inside = window_samples(float(h.min()), float(h.max())) if h.size else []
        cpu_ms = None
        if len(inside) >= 2:
            done = np.count_nonzero(
                (session_h >= inside[0]["session_h"]) & (session_h <= inside[-1]["session_h"])
            )
            if done:
                cpu_ms = (inside[-1]["cpu_s"] - inside[0]["cpu_s"]) * 1000.0 / done
        return {
            "n": int(mask.sum()),
            "load_avg": float(np.mean([s["load"] for s in inside])) if inside else None,
            "engine_cpu_ms_per_prediction": cpu_ms,
            "engine_p50_ms": percentile(engine_ms[mask], 50),
            "engine_p99_ms": percentile(engine_ms[mask], 99),
            "e2e_p50_ms": percentile(e2e_ms[mask], 50),
            "e2e_p99_ms": percentile(e2e_ms[mask], 99),
        }

    first_lat, last_lat = lat(first_win), lat(last_win)
    warm = next((s for s in samples if s["session_h"] >= warmup_h), None)
    last = samples[-1] if samples else None
    hours_after = (last["session_h"] - warm["session_h"]) if warm and last else 0.0
    growth = (last["rss_mb"] - warm["rss_mb"]) if warm and last else None
    growth_8h = growth * 8.0 / hours_after if growth is not None and hours_after > 0 else None
    queue = np.array([s["queue"] for s in samples])
    wall = (samples[-1]["session_h"] * 3600.0 / args.speed) if samples else 0.0
    cpu_share = (last["cpu_s"] - samples[0]["cpu_s"]) / wall if last and wall > 0 else None

    def ratio(key: str) -> float | None:
        a, b = first_lat[key], last_lat[key]
        return b / a if a and b is not None else None

    nothing_lost = bool(log_once and not missing and not extra and n_logged > 0)
    full = args.hours - warmup_h >= 8.0
    rss_ok = growth_8h is not None and growth_8h <= RSS_BAR_MB_PER_8H
    p99_ok = (ratio("engine_p99_ms") or 99.0) <= P99_BAR_RATIO
    passed = nothing_lost and (not full or (rss_ok and p99_ok))

    summary = [line for line in engine_out.splitlines() if line.startswith("stopped:")]
    print(f"engine exit status {engine_rc}; {summary[-1] if summary else 'no summary line'}")
    print(
        f"session time {total_h:.2f} h, {n_logged} predictions logged (0..N-1 once: {log_once}),"
        f" session_end line: {bool(ends)}; subscriber: {len(unique)} unique, {duplicates}"
        f" duplicates, {len(missing)} missing, {len(extra)} not in the log"
    )
    if warm and last:
        print(
            f"RSS {warm['rss_mb']:.1f} MB after warm-up ({warm['session_h']:.2f} h) ->"
            f" {last['rss_mb']:.1f} MB at {last['session_h']:.2f} h:"
            f" {growth:+.2f} MB, {growth_8h:+.2f} MB per 8 h (bar <= {RSS_BAR_MB_PER_8H} MB);"
            f" fds {warm['fds']:.0f} -> {last['fds']:.0f}; threads {warm['threads']:.0f} ->"
            f" {last['threads']:.0f}; engine CPU {100 * (cpu_share or 0):.0f} % of a core"
        )
    for name, figs in (("first", first_lat), ("last", last_lat)):
        cpu = figs["engine_cpu_ms_per_prediction"]
        print(
            f"{name} {window_h:g} h ({figs['n']} predictions): engine p50/p99"
            f" {figs['engine_p50_ms']:.2f}/{figs['engine_p99_ms']:.2f} ms;"
            f" end to end p50/p99 {figs['e2e_p50_ms']:.2f}/{figs['e2e_p99_ms']:.2f} ms;"
            f" engine CPU {cpu if cpu is not None else float('nan'):.2f} ms per prediction;"
            f" load average {figs['load_avg'] or float('nan'):.1f}"
        )
    print(
        f"queue depth (log - subscriber): max {queue.max() if queue.size else 0:.0f},"
        f" p99 {percentile(queue, 99) or 0:.0f}; load average {load_start[0]:.2f} at start,"
        f" {load_end[0]:.2f} at the end; {'PASS' if passed else 'FAIL'}"
        + ("" if full else " (short run: only nothing-lost is checked)")
    )
    result = {
        "benchmark": "soak",
        "session_hours": round(total_h, 3),
        "speed": args.speed,
        "warmup_h": warmup_h,
        "window_h": window_h,
        "predictions_logged": n_logged,
        "log_every_sequence_once": log_once,
        "log_session_end": bool(ends),
        "subscriber_unique": len(unique),
        "subscriber_duplicates": duplicates,
        "subscriber_missing": len(missing),
        "subscriber_not_in_log": len(extra),
        "rss_mb_after_warmup": warm["rss_mb"] if warm else None,
        "rss_mb_end": last["rss_mb"] if last else None,
        "rss_growth_mb_per_8h": growth_8h,
        "fds_after_warmup": warm["fds"] if warm else None,
        "fds_end": last["fds"] if last else None,
        "threads_after_warmup": warm["threads"] if warm else None,
        "threads_end": last["threads"] if last else None,
        "engine_cpu_share": cpu_share,
        "latency_first": first_lat,
        "latency_last": last_lat,
        "engine_p99_ratio": ratio("engine_p99_ms"),
        "engine_cpu_per_prediction_ratio": ratio("engine_cpu_ms_per_prediction"),
        "e2e_p99_ratio": ratio("e2e_p99_ms"),
        "queue_max": float(queue.max()) if queue.size else None,
        "queue_p99": percentile(queue, 99),
        "engine_exit": engine_rc,
        "load_start": load_start[0],
        "load_end": load_end[0],
        "samples": len(samples),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "full_run": full,
        "pass": passed,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
