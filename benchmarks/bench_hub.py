"""The hub (``run --sessions``) serving N live sessions: end-to-end latency, CPU and memory per N.

What is measured (issue 10): can one hub process serve a lab's scanners on a 2-core machine,
and how far does N go? Three kinds of process, as in a lab:

- a *pusher* (this script in ``--push`` mode) owns N sessions' LSL outlets, named by
  ``stream_identity(role, "<runtag>-s<k>")``: fMRI (246 ROI float32 channels, one volume per
  TR = 1 s, random normal values), PPG (400 Hz, a ~70 bpm pulse wave with a little noise) and
  respiration (50 Hz, a ~15 breaths/min sine), physiology in 20 ms chunks on ``local_clock``;
- the *hub*, ``python -m emorecog_stream run --sessions FILE --mqtt ... --no-dashboard``
  (only its command line is used), publishing to a Mosquitto broker;
- a *subscriber* (paho-mqtt, in this process) that notes ``pylsl.local_clock()`` when each
  ``emorecog/<session>/prediction`` arrives.

Independent scanners do not start in step: session k's volumes come at phase k/N of the TR and
its physiology chunk boundaries at phase k/N of the 20 ms chunk, so the hub sees the volumes
spread evenly over each TR (not N of them at once).

Latency of a step is bench_e2e's: receipt by the subscriber - the moment the last sample the
step needs was pushed (the volume itself, or the chunk holding the first PPG / respiration
sample at or after the volume's timestamp, whichever went last). The engine's own figure
(``latency_ms`` in the payload: step ready -> publish hand-off) is reported beside it.

Each case: the pusher opens the outlets, the hub starts and connects (the pusher waits until
every outlet has a consumer, bounded), a warm-up (``--warmup`` s: the aligner needs physiology
history, the first predictions come after a few volumes) is pushed and left out of the
statistics, then the measured window of ``--volumes`` volumes per session. CPU shares (CPU
seconds / wall seconds in the window, 1.0 = one core) come from /proc/<pid>/stat for the hub,
the pusher, the broker and this process; the hub's RSS is its peak (VmHWM) and its RSS at the
end of the window (VmRSS). A case keeps up when every expected prediction of the window came
and p99 < one TR; N stops growing after the first case that does not.

The pusher stands in for N acquisition computers (a scanner and its physiology devices per
session); in a lab they are not on the hub's cores. Here it shares the two cores with the hub
and takes ~0.7 of one at N = 64 (192 outlets, ~6,400 pushes a second), so by default it runs
at niceness 10 (``--pusher-nice``): it still gets every cycle the hub leaves, but does not
preempt the hub. Its own lateness is reported (``pusher_lag_ms``) and does not count as
latency: latency counts from the moment each sample was actually pushed. ``--pusher-nice 0``
measures the two as equals; both figures are in docs/hub.md.

Bars (issue 10, 2-core machine): 64 sessions with p99 <= 50 ms and RSS <= 1.5 GB; and how far
N goes before p99 passes one TR (``max_sessions_under_one_tr``).

Usage: ``python benchmarks/bench_hub.py [--sessions 1,8,32,64,128] [--volumes 40]
[--warmup 10] [--pusher-nice 10] [--keep DIR]`` (``--keep``: keep the hub's JSONL logs, its
output and the pusher's in DIR). One line per N, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
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
import pylsl

ROOT = Path(__file__).resolve().parents[1]
TR_S = 1.0
PPG_HZ = 400.0
RESP_HZ = 50.0
CHUNK_S = 0.020
SLOT_S = 0.001  # the pusher wakes at most once a millisecond
N_ROIS = 246
LEAD_S = 1.0  # physiology pushed before a session's first volume
TAIL_S = 1.0  # and after its last one (that step needs the samples after it)
STRAGGLER_S = 10.0  # how long to wait for late predictions after the last push
BAR_SESSIONS, BAR_P99_MS, BAR_RSS_MB = 64, 50.0, 1536.0
FMRI, PPG, RESP = 0, 1, 2
KINDS = ("fmri", "ppg", "resp")


# -- the pusher (its own process: ``bench_hub.py --push ...``) -------------------------------


def make_outlets(tag: str, n: int) -> list[list[pylsl.StreamOutlet]]:
    """[fMRI, PPG, RESP] outlets of sessions 0..n-1, described as a replay describes them."""
    from emorecog_stream.adapters.lsl_info import (
        OutletDescription,
        default_labels,
        default_units,
        stream_identity,
    )
    from emorecog_stream.core.streams import ATLAS, Role

    outlets = []
    for k in range(n):
        row = []
        for role, channels, rate in (
            (Role.FMRI, N_ROIS, 1.0 / TR_S),
            (Role.PPG, 1, PPG_HZ),
            (Role.RESP, 1, RESP_HZ),
        ):
            name, type_, source_id = stream_identity(role, f"{tag}-s{k}")
            description = OutletDescription(
                role=role,
                name=name,
                type=type_,
                source_id=source_id,
                channel_count=channels,
                nominal_srate=rate,
                channel_labels=default_labels(role, channels),
                units=default_units(role, channels),
                participant=f"{tag}s{k}",
                tr=TR_S,
                atlas=ATLAS if role is Role.FMRI else "",
                extra={"source": "bench_hub"},
            )
            row.append(pylsl.StreamOutlet(description.stream_info(), 0, 60))
        outlets.append(row)
    return outlets


def physiology(n_samples: int, rate: float, kind: int, rng: np.random.Generator) -> np.ndarray:
    """(n_samples, 1) float32: a pulse wave near 70 bpm (PPG) or a sine near 15/min (RESP)."""
    t = np.arange(n_samples) / rate
    if kind == PPG:
        phase = (t * rng.uniform(66.0, 74.0) / 60.0) % 1.0
        wave = np.exp(-(((phase - 0.15) / 0.06) ** 2))  # systolic peak
        wave += 0.35 * np.exp(-(((phase - 0.45) / 0.08) ** 2))  # dicrotic wave
    else:
        wave = np.sin(2 * np.pi * rng.uniform(14.0, 16.0) / 60.0 * t + rng.uniform(0, 2 * np.pi))
    wave += 0.02 * rng.standard_normal(n_samples)
    return wave.astype(np.float32)[:, None]


class Plan:
    """Every push of every session, in time order, relative to the start ``t0``.

    Session k: volume j has timestamp t0 + LEAD_S + (j + k/n) * TR; physiology sample i has
    t0 + (k/n) * CHUNK_S + i / rate and goes out in the chunk of CHUNK_S that it ends.
    """

    def __init__(self, n: int, n_volumes: int, seed: int = 10) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.n_volumes = n, n_volumes
        span = LEAD_S + n_volumes * TR_S + TAIL_S
        self.per_chunk = {PPG: round(PPG_HZ * CHUNK_S), RESP: round(RESP_HZ * CHUNK_S)}
        self.n_chunks = math.ceil(span / CHUNK_S)
        phase = np.arange(n) / n
        self.vts = LEAD_S + (np.arange(n_volumes)[None, :] + phase[:, None]) * TR_S  # (n, J)
        self.stamps, self.data, self.first_chunk = {}, {}, {}
        for kind, rate in ((PPG, PPG_HZ), (RESP, RESP_HZ)):
            n_samples = self.n_chunks * self.per_chunk[kind]
            stamps = phase[:, None] * CHUNK_S + np.arange(n_samples)[None, :] / rate
            self.stamps[kind] = stamps
            self.data[kind] = [physiology(n_samples, rate, kind, rng) for _ in range(n)]
            first = [np.searchsorted(stamps[k], self.vts[k], side="left") for k in range(n)]
            self.first_chunk[kind] = np.array(first) // self.per_chunk[kind]  # (n, J)
        self.volumes = rng.standard_normal((n, n_volumes, N_ROIS)).astype(np.float32)
        # events: (due, session, kind, index); per session: J volumes, then PPG, then RESP chunks
        self.per_session = n_volumes + 2 * self.n_chunks
        due = np.empty((n, self.per_session))
        due[:, :n_volumes] = self.vts
        for kind, col in ((PPG, n_volumes), (RESP, n_volumes + self.n_chunks)):
            m = self.per_chunk[kind]  # a chunk is due when its last sample is
            due[:, col : col + self.n_chunks] = self.stamps[kind][:, m - 1 :: m]
        self.due = due.ravel()
        self.order = np.argsort(self.due, kind="stable")

    def event(self, e: int) -> tuple[int, int, int]:
        """(session, kind, index) of event ``e`` (a position in the unsorted layout)."""
        k, r = divmod(e, self.per_session)
        if r < self.n_volumes:
            return k, FMRI, r
        r -= self.n_volumes
        return (k, PPG, r) if r < self.n_chunks else (k, RESP, r - self.n_chunks)


def wait_for_consumers(outlets: list[list[pylsl.StreamOutlet]], timeout: float) -> int:
    """Wait until every outlet has a consumer (the hub's inlets) or ``timeout``; how many have."""
    pending = [o for row in outlets for o in row]
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [o for o in pending if not o.have_consumers()]
        time.sleep(0.1)
    return sum(len(row) for row in outlets) - len(pending)


def push(plan: Plan, outlets: list[list[pylsl.StreamOutlet]], t0: float) -> np.ndarray:
    """Push every event at its due time; return each event's push moment.

    No busy wait, and one wake-up per SLOT_S at most: the events due within a slot go out
    together at its end (never early; the lag is reported, and latency counts from the push).
    """
    clock, sleep = pylsl.local_clock, time.sleep
    wake = t0 + np.ceil(plan.due / SLOT_S) * SLOT_S
    pushed = np.zeros(plan.due.size)
    for e in plan.order.tolist():
        left = wake[e] - clock()
        if left > 0:
            sleep(left)
        k, kind, i = plan.event(e)
        stamp = t0 + plan.due[e]
        if kind == FMRI:
            outlets[k][FMRI].push_chunk(plan.volumes[k, i : i + 1], stamp)
        else:
            m = plan.per_chunk[kind]
            outlets[k][kind].push_chunk(plan.data[kind][k][i * m : (i + 1) * m], stamp)
        pushed[e] = clock()
    return pushed


def push_records(plan: Plan, pushed: np.ndarray, t0: float) -> dict[str, np.ndarray]:
    """Per session and volume: its timestamp and when the volume and the chunks holding the first
    PPG / respiration sample at or after it were pushed."""
    p = pushed.reshape(plan.n, plan.per_session)
    rows = np.arange(plan.n)[:, None]
    j = plan.n_volumes
    return {
        "vts": t0 + plan.vts,
        "fmri": p[:, :j],
        "ppg": p[rows, j + plan.first_chunk[PPG]],
        "resp": p[rows, j + plan.n_chunks + plan.first_chunk[RESP]],
    }


def pusher_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_hub.py --push")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--volumes", type=int, required=True, help="warm-up + measured")
    parser.add_argument("--connect-timeout", type=float, required=True)
    parser.add_argument("--records", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = Plan(args.n, args.volumes)
    outlets = make_outlets(args.tag, args.n)
    print("OPEN", flush=True)
    began = time.monotonic()
    connected = wait_for_consumers(outlets, args.connect_timeout)
    connect_s = time.monotonic() - began
    time.sleep(0.5)
    t0 = pylsl.local_clock() + 0.5
    start = {"t0": t0, "connected": connected, "outlets": 3 * args.n, "connect_s": connect_s}
    print("START " + json.dumps(start), flush=True)
    pushed = push(plan, outlets, t0)
    np.savez(args.records, **push_records(plan, pushed, t0))
    lag_ms = (pushed - t0 - plan.due) * 1000.0
    lag = {"p50": float(np.percentile(lag_ms, 50)), "p99": float(np.percentile(lag_ms, 99))}
    lag["max"] = float(lag_ms.max())
    print("DONE " + json.dumps({"lag_ms": lag, "events": int(pushed.size)}), flush=True)


# -- processes: broker, hub, pusher, /proc figures ---------------------------------------------


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


def memory_mb(pid: int, key: str) -> float | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of a process, in MiB (None once it has exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return None


class LineReader:
    """A child's stdout lines on a queue (so that waits can time out)."""

    def __init__(self, proc: subprocess.Popen, copy_to: Path) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.copy = copy_to.open("w")
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.copy.write(line)
            self.copy.flush()
            self.lines.put(line)
        self.lines.put("")  # end of output

    def expect(self, word: str, timeout: float, hub: subprocess.Popen | None = None) -> str:
        """The rest of the next line starting with ``word``; RuntimeError on EOF, on timeout or
        when ``hub`` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                if hub is not None and hub.poll() is not None:
                    raise RuntimeError(f"the hub exited with code {hub.returncode}") from None
                continue
            if line == "":
                raise RuntimeError(f"pusher ended before {word} (see {self.copy.name})")
            if line.startswith(word):
                return line[len(word) :].strip()
        raise RuntimeError(f"no {word} from the pusher within {timeout:.0f} s")


def start_pusher(tag: str, n: int, volumes: int, records: Path, workdir: Path, nice: int = 0):
    connect_timeout = 60.0 + 0.5 * n  # the hub loads its model, then resolves 3N streams
    cmd = [sys.executable, str(Path(__file__).resolve()), "--push", "--tag", tag, "--n", str(n),
           "--volumes", str(volumes), "--connect-timeout", str(connect_timeout),
           "--records", str(records)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)  # fmt: skip
    return proc, LineReader(proc, workdir / f"pusher-{n}.log"), connect_timeout


def start_hub(sessions_file: Path, port: int, n: int, workdir: Path, keep: bool):
    cmd = [sys.executable, "-m", "emorecog_stream", "run", "--sessions", str(sessions_file),
           "--mqtt", f"mqtt://127.0.0.1:{port}", "--no-dashboard"]  # fmt: skip
    if keep:
        cmd += ["--log", str(workdir / f"logs-{n}")]
    out = (workdir / f"hub-{n}.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop_hub(hub: subprocess.Popen) -> dict:
    """SIGTERM, up to 60 s to exit, else SIGKILL."""
    began = time.monotonic()
    if hub.poll() is not None:
        return {"returncode": hub.returncode, "seconds": 0.0, "killed": False, "early": True}
    hub.send_signal(signal.SIGTERM)
    try:
        hub.wait(timeout=60)
        killed = False
    except subprocess.TimeoutExpired:
        hub.kill()
        hub.wait()
        killed = True
    seconds = round(time.monotonic() - began, 2)
    return {"returncode": hub.returncode, "seconds": seconds, "killed": killed, "early": False}


def sleep_until(t: float) -> None:
    while (left := t - pylsl.local_clock()) > 0:
        time.sleep(min(left, 0.5))


# -- the subscriber and the statistics ---------------------------------------------------------


class Subscriber:
    """Every prediction of this run's sessions: (receipt local_clock, session, sequence, volume
    timestamp, engine latency_ms), QoS-1 duplicates included."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.rows: list[tuple[float, str, int, float, float]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{prefix}", protocol=mqtt.MQTTv311
        )
        self.client.on_connect = lambda c, *a: c.subscribe("emorecog/+/prediction", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the subscriber could not subscribe")

    def on_message(self, client, userdata, msg) -> None:
        t = pylsl.local_clock()
        p = json.loads(msg.payload)
        if p["session"].startswith(self.prefix):
            row = (t, p["session"], int(p["sequence"]), p["volume_timestamp"], p["latency_ms"])
            with self.lock:
                self.rows.append(row)

    def snapshot(self) -> list[tuple[float, str, int, float, float]]:
        with self.lock:
            return list(self.rows)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def match(rows, records, tag: str) -> tuple[dict, dict[int, list[int]], int]:
    """(session, volume) -> (receipt, engine ms) for the first receipt of each prediction; each
    session's sequences in receipt order; how many duplicates were dropped."""
    seen: set[tuple[str, int]] = set()
    found: dict[tuple[int, int], tuple[float, float]] = {}
    sequences: dict[int, list[int]] = {}
    duplicates = 0
    vts = records["vts"]
    for t, session, seq, stamp, engine_ms in rows:
        if (session, seq) in seen:
            duplicates += 1
            continue
        seen.add((session, seq))
        k = int(session.removeprefix(f"{tag}s"))
        sequences.setdefault(k, []).append(seq)
        j = int(np.argmin(np.abs(vts[k] - stamp)))  # the stamp went through clock correction
        if abs(vts[k, j] - stamp) < 0.25 * TR_S:
            found.setdefault((k, j), (t, engine_ms))
    return found, sequences, duplicates


def percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values.size else None


def latency_stats(found: dict, records, window: range) -> dict:
    ready = np.maximum.reduce([records["fmri"], records["ppg"], records["resp"]])
    last = np.argmax(np.stack([records[k] for k in KINDS]), axis=0)
    keys = [key for key in found if key[1] in window]
    e2e = np.array([(found[key][0] - ready[key]) * 1000.0 for key in keys])
    engine = np.array([found[key][1] for key in keys], dtype=float)
    pushed_last = {name: sum(int(last[key] == i) for key in keys) for i, name in enumerate(KINDS)}
    return {
        "received": len(keys),
        "latency_p50_ms": percentile(e2e, 50),
        "latency_p99_ms": percentile(e2e, 99),
        "latency_max_ms": percentile(e2e, 100),
        "engine_p50_ms": percentile(engine, 50),
        "engine_p99_ms": percentile(engine, 99),
        "pushed_last": pushed_last,
    }


# -- one case ----------------------------------------------------------------------------------


def write_sessions_file(path: Path, tag: str, n: int) -> None:
    path.write_text(
        "".join(f'[[session]]\nid = "{tag}s{k}"\ntag = "{tag}-s{k}"\n\n' for k in range(n))
    )


def wait_for_stragglers(sub: Subscriber, records, tag: str, window: range, expected: int) -> None:
    deadline = time.monotonic() + STRAGGLER_S
    while time.monotonic() < deadline:
        found, _, _ = match(sub.snapshot(), records, tag)
        if sum(key[1] in window for key in found) >= expected:
            return
        time.sleep(0.25)


def run_case(n: int, args: argparse.Namespace, port: int, broker_pid: int, workdir: Path) -> dict:
    tag = "h" + uuid.uuid4().hex[:6]
    warmup = round(args.warmup / TR_S)
    window = range(warmup, warmup + args.volumes)
    expected = n * args.volumes
    sessions_file = workdir / f"sessions-{n}.toml"
    write_sessions_file(sessions_file, tag, n)
    records_path = workdir / f"push-{n}.npz"
    load = os.getloadavg()[0]
    sub = Subscriber(port, tag)
    pusher, lines, connect_timeout = start_pusher(
        tag, n, warmup + args.volumes, records_path, workdir, args.pusher_nice
    )
    hub = None
    try:
        lines.expect("OPEN", 120)
        hub = start_hub(sessions_file, port, n, workdir, bool(args.keep))
        start = json.loads(lines.expect("START", connect_timeout + 30, hub))
        w0 = start["t0"] + LEAD_S + window.start * TR_S
        w1 = start["t0"] + LEAD_S + window.stop * TR_S
        pids = {"hub": hub.pid, "pusher": pusher.pid, "broker": broker_pid, "bench": os.getpid()}
        sleep_until(w0)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        sleep_until(w1)
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) / (w1 - w0) for name, pid in pids.items()}
        rss_now = memory_mb(hub.pid, "VmRSS")
        done = json.loads(lines.expect("DONE", 120 + args.volumes, hub))
        records = dict(np.load(records_path))
        wait_for_stragglers(sub, records, tag, window, expected)
        rss_peak = memory_mb(hub.pid, "VmHWM")
    finally:
        hub_exit = stop_hub(hub) if hub is not None else None
        if pusher.poll() is None:
            pusher.kill()
        pusher.wait()
        sub.close()
    found, sequences, duplicates = match(sub.snapshot(), records, tag)
    stats = latency_stats(found, records, window)
    p99 = stats["latency_p99_ms"]
    return {
        "sessions": n,
        "expected": expected,
        **stats,
        "sessions_with_predictions": len(sequences),
        "sequences_contiguous": all(np.all(np.diff(s) == 1) for s in sequences.values()),
        "duplicates": duplicates,
        "hub_cpu_share": round(cpu["hub"], 3),
        "hub_rss_peak_mb": rss_peak,
        "hub_rss_end_of_window_mb": rss_now,
        "pusher_cpu_share": round(cpu["pusher"], 3),
        "broker_cpu_share": round(cpu["broker"], 3),
        "bench_cpu_share": round(cpu["bench"], 3),
        "pusher_lag_ms": {key: round(value, 2) for key, value in done["lag_ms"].items()},
        "outlets_connected": f"{start['connected']}/{start['outlets']}",
        "connect_s": round(start["connect_s"], 1),
        "hub_exit": hub_exit,
        "load_average_at_start": round(load, 2),
        "keeps_up": bool(stats["received"] == expected and p99 is not None and p99 < 1000 * TR_S),
    }


def describe(row: dict) -> str:
    return (
        f"N={row['sessions']:4d}: {row['received']}/{row['expected']} predictions"
        f" ({row['sessions_with_predictions']} sessions), e2e p50 {row['latency_p50_ms']} ms"
        f" p99 {row['latency_p99_ms']} ms max {row['latency_max_ms']} ms, engine p99"
        f" {row['engine_p99_ms']} ms; hub CPU {row['hub_cpu_share']}, RSS peak"
        f" {row['hub_rss_peak_mb']} MB; pusher CPU {row['pusher_cpu_share']}"
        f" (lag p99 {row['pusher_lag_ms']['p99']} ms); hub exit {row['hub_exit']['seconds']} s"
        f"{' KILLED' if row['hub_exit']['killed'] else ''}"
    )


def not_keeping_up(row: dict) -> str:
    if "error" in row:
        return row["error"]
    if row["received"] < row["expected"]:
        return f"{row['expected'] - row['received']} of {row['expected']} predictions missing"
    return f"p99 {row['latency_p99_ms']} ms >= one TR"


def summary(rows: list[dict], args: argparse.Namespace, load: tuple, stopped: str | None) -> dict:
    at_bar = next((r for r in rows if r["sessions"] == BAR_SESSIONS), None)
    p99_met = rss_met = None
    if at_bar is not None:
        p99, rss = at_bar.get("latency_p99_ms"), at_bar.get("hub_rss_peak_mb")
        p99_met = bool(at_bar["keeps_up"] and p99 is not None and p99 <= BAR_P99_MS)
        rss_met = bool(rss is not None and rss <= BAR_RSS_MB)
    good = [r["sessions"] for r in rows if r["keeps_up"]]
    bad = [r["sessions"] for r in rows if not r["keeps_up"]]
    return {
        "benchmark": "hub",
        "tr_s": TR_S,
        "ppg_hz": PPG_HZ,
        "resp_hz": RESP_HZ,
        "chunk_ms": CHUNK_S * 1000,
        "volumes_measured": args.volumes,
        "warmup_s": args.warmup,
        "phases": "session k of N: volumes at k/N of the TR, physiology chunks at k/N of 20 ms",
        "latency": "subscriber receipt - push of the last sample the step needs (bench_e2e)",
        "pusher_nice": args.pusher_nice,
        "cases": rows,
        "stopped": stopped,
        "bar": {
            "sessions": BAR_SESSIONS,
            "p99_ms": BAR_P99_MS,
            "rss_mb": BAR_RSS_MB,
            "p99_met": p99_met,
            "rss_met": rss_met,
            "met": None if at_bar is None else bool(p99_met and rss_met),
        },
        "max_sessions_under_one_tr": max(good) if good else None,
        "first_sessions_over_one_tr": min(bad) if bad else None,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load],
            "python": platform.python_version(),
        },
    }


def main() -> None:
    if sys.argv[1:2] == ["--push"]:
        pusher_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,8,32,64,128", help="comma-separated N")
    parser.add_argument("--volumes", type=int, default=40, help="measured volumes per session")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds pushed before them")
    parser.add_argument("--keep", type=Path, help="keep logs (hub JSONL, outputs) in this folder")
    parser.add_argument(
        "--pusher-nice", type=int, default=10,
        help="niceness of the pusher process (default 10; 0: compete with the hub as equals)",
    )  # fmt: skip
    args = parser.parse_args()
    counts = [int(x) for x in args.sessions.split(",")]
    load = os.getloadavg()
    rows: list[dict] = []
    stopped = None
    with tempfile.TemporaryDirectory(prefix="bench_hub_") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        broker, port = start_mosquitto(workdir)
        try:
            for n in counts:
                try:
                    row = run_case(n, args, port, broker.pid, workdir)
                except (RuntimeError, OSError) as exc:  # the case could not be measured
                    row = {"sessions": n, "error": str(exc), "keeps_up": False}
                    print(f"N={n:4d}: failed: {exc} (--keep DIR keeps the logs)", flush=True)
                else:
                    print(describe(row), flush=True)
                rows.append(row)
                if not row["keeps_up"]:
                    what = "could not be measured" if "error" in row else "did not keep up"
                    stopped = f"N={n} {what} ({not_keeping_up(row)}); larger N not run"
                    print("stopped: " + stopped, flush=True)
                    break
        finally:
            broker.terminate()
            broker.wait()
    print(json.dumps(summary(rows, args, load, stopped)))


if __name__ == "__main__":
    main()
