"""Aligner throughput: aligned steps per second, PPG 500 Hz + respiration 50 Hz in random chunks.

A synthetic session (TR 1 s) is cut into random chunks per stream, the chunks are ordered by a
simulated arrival time (last sample's timestamp + up to 50 ms latency, each stream in order, as
LSL delivers it), and each chunk is pushed followed by a poll, as the engine does. Only
push/poll is timed (chunking happens before).
Runs on one core: BLAS/OpenMP threads are pinned to 1 before numpy is imported.

Several mean chunk durations run side by side (default 0.5, 0.1 and 0.05 s); the first is the
one the target is checked against. Smaller chunks mean more push/poll calls per step: at 0.05 s
there are about 37 per 1 s volume, and their fixed cost, not the per-step work, sets the rate.

Usage: ``python benchmarks/bench_aligner.py [--volumes N] [--repeats R] [--chunk-s S [S ...]]``.
The last line of output is one JSON object.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from emorecog_stream.core.aligner import Aligner, session_config  # noqa: E402
from emorecog_stream.core.streams import Role  # noqa: E402
from emorecog_stream.recordings.synth import SynthConfig, generate_session  # noqa: E402

TARGET = 20_000.0


def make_feed(volumes: int, chunk_s: float, seed: int) -> tuple[list, object]:
    """(arrival, role, data, timestamps) chunks in arrival order, and the session."""
    n_trials = max(3, int(np.ceil((volumes - 10) / 35.0)))
    cfg = SynthConfig(n_participants=1, n_trials=n_trials, ppg_rate=500.0, resp_rate=50.0, tr=1.0)
    session = generate_session(1, cfg)
    rng = np.random.default_rng(seed)
    chunks = []
    for role, stream in (
        (Role.FMRI, session.fmri),
        (Role.PPG, session.ppg),
        (Role.RESP, session.resp),
    ):
        n = len(stream)
        per_s = stream.nominal_srate
        hi = max(2, round(2 * chunk_s * per_s))  # sizes uniform on 1..2*mean
        i = 0
        arrival = -np.inf
        while i < n:
            k = int(rng.integers(1, hi + 1)) if role is not Role.FMRI else 1
            j = min(n, i + k)
            ts = stream.timestamps[i:j]
            # latency up to 50 ms, but never before the stream's previous chunk: LSL delivers
            # each stream in order (chunks of different streams interleave freely)
            arrival = max(arrival, float(ts[-1]) + float(rng.uniform(0.0, 0.05)))
            chunks.append((arrival, role, stream.data[i:j], ts))
            i = j
    chunks.sort(key=lambda c: c[0])
    return chunks, session


def run_once(chunks: list, config) -> tuple[int, float, float]:
    """(steps, CPU seconds of this process, wall seconds) for one pass over the feed."""
    aligner = Aligner(config)
    steps = 0
    push, poll = aligner.push, aligner.poll
    c0, t0 = time.process_time(), time.perf_counter()
    for arrival, role, data, ts in chunks:
        push(role, data, ts)
        steps += len(poll(arrival))
    steps += len(aligner.flush())
    return steps, time.process_time() - c0, time.perf_counter() - t0


def measure(volumes: int, chunk_s: float, repeats: int, seed: int) -> dict:
    """Median steps per CPU second (and per wall second) over ``repeats`` passes."""
    chunks, session = make_feed(volumes, chunk_s, seed)
    config = session_config(session)
    run_once(chunks, config)  # warm-up
    cpu_rates, wall_rates, n_steps = [], [], 0
    for _ in range(repeats):
        n_steps, cpu_s, wall_s = run_once(chunks, config)
        cpu_rates.append(n_steps / cpu_s)
        wall_rates.append(n_steps / wall_s)
    n_chunks = sum(1 for c in chunks if c[1] in (Role.PPG, Role.RESP))
    return {
        "mean_chunk_s": chunk_s,
        "steps": n_steps,
        "steps_per_s": statistics.median(cpu_rates),
        "min": min(cpu_rates),
        "max": max(cpu_rates),
        "wall_steps_per_s": statistics.median(wall_rates),
        "chunks_per_step": n_chunks / max(n_steps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--chunk-s",
        type=float,
        nargs="+",
        default=[0.5, 0.1, 0.05],
        help="mean chunk durations (s); the target is checked on the first",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs = [measure(args.volumes, c, args.repeats, args.seed) for c in args.chunk_s]
    print(
        f"aligner: {runs[0]['steps']} steps (TR 1 s, PPG 500 Hz, respiration 50 Hz, random"
        f" chunks), {args.repeats} repeats each, one thread, median per CPU second"
    )
    for r in runs:
        print(
            f"  mean chunk {r['mean_chunk_s']:g} s ({r['chunks_per_step']:.1f} physiology chunks"
            f" per step): {r['steps_per_s']:,.0f} steps/s (min {r['min']:,.0f},"
            f" max {r['max']:,.0f}; wall clock {r['wall_steps_per_s']:,.0f}),"
            f" {1e6 / r['steps_per_s']:.1f} us per step"
        )
    head = runs[0]
    median = head["steps_per_s"]
    print(
        f"target {TARGET:,.0f} steps/s at mean chunk {head['mean_chunk_s']:g} s:"
        f" {'met' if median >= TARGET else 'NOT met'} (ratio {median / TARGET:.2f})"
    )
    result = {
        "benchmark": "aligner_throughput",
        "steps_per_s": round(median, 1),
        "clock": "process CPU time (one thread)",
        "wall_steps_per_s": round(head["wall_steps_per_s"], 1),
        "target": TARGET,
        "ratio": round(median / TARGET, 3),
        "mean_chunk_s": head["mean_chunk_s"],
        "by_mean_chunk_s": {f"{r['mean_chunk_s']:g}": round(r["steps_per_s"], 1) for r in runs},
        "steps": head["steps"],
        "repeats": args.repeats,
        "ppg_hz": 500.0,
        "resp_hz": 50.0,
        "tr_s": 1.0,
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
