"""LSL push -> delivery latency: the async inlet vs a raw blocking ``pull_sample`` baseline.

A separate sender process feeds real outlets on loopback the way a lab does: PPG at 500 Hz in
20 ms chunks (10 samples), respiration at 50 Hz (one sample per 20 ms) and fMRI volumes of 246
ROIs at 1 Hz. Each chunk's last sample is stamped with ``local_clock()`` at the moment of the
push (the same steady clock in every process of the machine) and marked by the value 1. Two
consumers in this process are connected to the same outlets at the same time, so both see the
same pushes under the same load:

- ``async``: :class:`~emorecog_stream.adapters.lsl_inlet.AsyncInlet` (reader thread ->
  ``call_soon_threadsafe`` -> asyncio queue); latency ends when the coroutine holds the chunk
  (``async_reader_thread``: when the reader thread had it);
- ``raw``: one thread per stream in a blocking ``pull_sample()`` with no post-processing, the
  floor LSL itself sets.

Latency = delivery time - push time of the marked sample (the async inlet's timestamps are
clock-corrected; the measured offset, ~0.03 ms here, is removed again).

First, the hand-off alone is measured (one inlet, reader thread -> coroutine, 1000 chunks).

Usage: ``python benchmarks/bench_lsl.py [--duration 60] [--hop-only]``. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

os.environ.setdefault(
    "LSLAPICFG",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "lsl_api.cfg"),
)

import pylsl

from emorecog_stream.adapters.lsl_inlet import AsyncInlet, Chunk, InletSpec
from emorecog_stream.core.streams import N_ROIS, Role

STREAMS = {
    # role: (rate Hz, samples per push, channels)
    Role.PPG: (500.0, 10, 1),
    Role.RESP: (50.0, 1, 1),
    Role.FMRI: (1.0, 1, N_ROIS),
}


def stream_name(role: Role, tag: str) -> str:
    return f"bench-{role.value}-{tag}"


def sender(tag: str, duration: float) -> None:
    """The sender process: waits for two consumers per stream, pushes, prints its counts."""
    outlets = {
        role: pylsl.StreamOutlet(
            pylsl.StreamInfo(
                stream_name(role, tag), f"bench-{role.value}", ch, rate, pylsl.cf_float32,
                stream_name(role, tag),
            )
        )
        for role, (rate, _, ch) in STREAMS.items()
    }  # fmt: skip
    for outlet in outlets.values():
        while not outlet.wait_for_consumers(60.0):
            pass
    time.sleep(2.0)  # the second consumer of each stream connects (checked by the counts)
    period = {role: n / rate for role, (rate, n, _) in STREAMS.items()}
    start = pylsl.local_clock() + 0.5
    next_due = dict.fromkeys(STREAMS, start)
    counts = dict.fromkeys(STREAMS, 0)
    end = start + duration
    while True:
        role = min(next_due, key=next_due.__getitem__)
        due = next_due[role]
        if due > end:
            break
        wait = due - pylsl.local_clock()
        if wait > 0:
            time.sleep(wait)
        rate, n, ch = STREAMS[role]
        block = np.zeros((n, ch), dtype=np.float32)
        block[-1] = 1.0
        now = pylsl.local_clock()
        outlets[role].push_chunk(block, (now - (n - 1 - np.arange(n)) / rate).tolist())
        counts[role] += 1
        next_due[role] = due + period[role]
    print(json.dumps({role.value: c for role, c in counts.items()}), flush=True)
    time.sleep(1.5)  # keep the outlets up until the consumers have everything


def raw_reader(inlet: pylsl.StreamInlet, lat: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        sample, ts = inlet.pull_sample(timeout=0.2)
        if ts is not None and sample[0] == 1.0:
            lat.append(pylsl.local_clock() - ts)


def summarize(lat: list[float], pushed: int) -> dict[str, float]:
    ms = np.asarray(lat) * 1000.0
    if ms.size == 0:
        return {"n": 0, "lost": pushed}
    return {
        "n": int(ms.size),
        "lost": pushed - int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "max_ms": round(float(ms.max()), 4),
    }


async def measure(duration: float) -> dict[str, dict[str, dict[str, float]]]:
    tag = uuid.uuid4().hex[:8]
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--sender", tag, "--duration", str(duration)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        inlets = {
            role: AsyncInlet(InletSpec(role, name=stream_name(role, tag))) for role in STREAMS
        }
        await asyncio.gather(*(i.open(30.0) for i in inlets.values()))
        stop = threading.Event()
        raw_lat: dict[Role, list[float]] = {role: [] for role in STREAMS}
        threads = []
        for role in STREAMS:
            info = pylsl.resolve_bypred(f"name='{stream_name(role, tag)}'", 1, 30.0)[0]
            raw = pylsl.StreamInlet(info, processing_flags=0)
            raw.open_stream(10.0)
            thread = threading.Thread(target=raw_reader, args=(raw, raw_lat[role], stop))
            thread.start()
            threads.append((thread, raw))
        loop_lat: dict[Role, list[float]] = {role: [] for role in STREAMS}
        thread_lat: dict[Role, list[float]] = {role: [] for role in STREAMS}

        async def consume(inlet: AsyncInlet) -> None:
            offset, refresh = 0.0, 0.0
            async for item in inlet:
                now = pylsl.local_clock()
                if not isinstance(item, Chunk):
                    continue
                if now > refresh:  # the offset is stable; reading it per chunk would add delay
                    offset, refresh = inlet.status().clock_offset or 0.0, now + 1.0
                assert isinstance(item.data, np.ndarray)
                pushed_at = item.timestamps[item.data[:, 0] == 1.0] - offset
                loop_lat[item.role].extend((now - pushed_at).tolist())
                thread_lat[item.role].extend((item.receipt_time - pushed_at).tolist())

        consumers = [asyncio.create_task(consume(i)) for i in inlets.values()]
        out, _ = await asyncio.to_thread(proc.communicate, timeout=duration + 120)
        counts = json.loads(out.strip().splitlines()[-1])
        stop.set()
        for inlet in inlets.values():
            await inlet.close()
        await asyncio.gather(*consumers)
        for thread, _ in threads:
            thread.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    return {
        role.value: {
            "async": summarize(loop_lat[role], counts[role.value]),
            "async_reader_thread": summarize(thread_lat[role], counts[role.value]),
            "raw_pull_sample": summarize(raw_lat[role], counts[role.value]),
        }
        for role in STREAMS
    }


async def measure_hop(n: int = 1000) -> dict[str, float]:
    """Reader thread -> coroutine hand-off alone: one inlet, pushed from a thread here."""
    name = f"bench-hop-{uuid.uuid4().hex[:8]}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "PPG", 1, 500.0, pylsl.cf_float32, name))
    inlet = AsyncInlet(InletSpec(Role.PPG, name=name))
    await inlet.open(30.0)

    def push() -> None:
        for _ in range(n):
            time.sleep(0.005)
            outlet.push_chunk(np.zeros((10, 1), np.float32), pylsl.local_clock())

    thread = threading.Thread(target=push)
    thread.start()
    hops: list[float] = []
    async for item in inlet:
        if isinstance(item, Chunk):
            hops.append(pylsl.local_clock() - item.receipt_time)
            if len(hops) >= n:
                break
    thread.join()
    await inlet.close()
    return summarize(hops, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of pushing")
    parser.add_argument("--sender", metavar="TAG", help=argparse.SUPPRESS)
    parser.add_argument(
        "--hop-only", action="store_true", help="only the reader-thread -> coroutine hand-off"
    )
    args = parser.parse_args()
    if args.sender:
        sender(args.sender, args.duration)
        return
    hop = asyncio.run(measure_hop())
    print(f"hop   reader->coroutine     {hop}")
    if args.hop_only:
        print(json.dumps({"benchmark": "lsl_reader_to_coroutine_hop", "hop": hop}))
        return
    result = asyncio.run(measure(args.duration))
    for role, paths in result.items():
        for path, s in paths.items():
            print(f"{role:5s} {path:20s} {s}")
    ppg, fmri = result["ppg"], result["fmri"]
    print(
        json.dumps(
            {
                "benchmark": "lsl_push_to_delivery",
                "duration_s": args.duration,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "liblsl": pylsl.library_version(),
                "ppg_500hz_chunks_of_10": ppg,
                "resp_50hz": result["resp"],
                "fmri_1hz_246ch": fmri,
                "async_p50_ms_ppg": ppg["async"].get("p50_ms"),
                "async_p99_ms_ppg": ppg["async"].get("p99_ms"),
                "raw_p50_ms_ppg": ppg["raw_pull_sample"].get("p50_ms"),
                "raw_p99_ms_ppg": ppg["raw_pull_sample"].get("p99_ms"),
                "async_p99_ms_fmri": fmri["async"].get("p99_ms"),
                "raw_p99_ms_fmri": fmri["raw_pull_sample"].get("p99_ms"),
                "reference_raw_p99_ms": 0.3,
                "hop_reader_to_coroutine": hop,
            }
        )
    )


if __name__ == "__main__":
    main()
