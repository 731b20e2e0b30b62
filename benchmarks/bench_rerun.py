"""``rerun`` throughput: TRs per second through the live engine, on one core and on two.

Sessions: synthetic (``recordings.synth``), TR 1 s, waveform physiology (PPG 400 Hz,
respiration 50 Hz), markers; the default model. Each case re-runs N sessions (1 and 16):

* one core: in this process, one session after another (``rerun_many(jobs=1)``'s path);
* two cores: two spawned worker processes, each with its model loaded and warmed on a short
  session before the clock starts (start-up is reported separately, not in the rate).

The rate is TRs (volumes) re-run / wall seconds of the case, JSONL logs written to a temporary
folder as ``rerun --out`` does. First bar: >= 2,000 TR/s on one core for 16 sessions.

Usage: ``python benchmarks/bench_rerun.py [--trials N] [--chunk-ms MS] [--repeats R]``.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from emorecog_stream.engine.rerun import (
    DEFAULT_CHUNK_S,
    RerunJob,
    load_worker_model,
    rerun_session,
    run_job,
    session_ids,
)
from emorecog_stream.model import load_model
from emorecog_stream.recordings.synth import SynthConfig, generate_session


def make_sessions(n: int, trials: int) -> list:
    config = SynthConfig(n_participants=max(n, 1), n_trials=trials, rest_s=5.0, lead_in_s=5.0)
    return [generate_session(i + 1, config) for i in range(n)]


def one_core(sessions: list, model, out: Path, chunk_s: float) -> float:
    async def serial() -> None:
        for sid, s in zip(session_ids(sessions), sessions, strict=True):
            await rerun_session(
                s, model, session_id=sid, log_path=out / f"{sid}.jsonl", chunk_seconds=chunk_s
            )

    t0 = time.perf_counter()
    asyncio.run(serial())
    return time.perf_counter() - t0


def jobs_for(sessions: list, out: Path, chunk_s: float) -> list[RerunJob]:
    return [
        RerunJob(sid, s, str(out / f"{sid}.jsonl"), None, chunk_s)
        for sid, s in zip(session_ids(sessions), sessions, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per session (30 s each)")
    parser.add_argument("--chunk-ms", type=float, default=DEFAULT_CHUNK_S * 1000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median taken)")
    args = parser.parse_args()
    chunk_s = args.chunk_ms / 1000.0
    sessions = make_sessions(16, args.trials)
    volumes = sessions[0].n_volumes
    model = load_model()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one_core(sessions[:1], model, out / "warm", chunk_s)  # compile/caches before timing
        t_start = time.perf_counter()
        pool = ProcessPoolExecutor(
            max_workers=2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=load_worker_model,
            initargs=(None,),
        )
        warm = make_sessions(1, 3)
        list(pool.map(run_job, jobs_for(warm * 2, out / "warm2", chunk_s)))
        pool_start_s = time.perf_counter() - t_start
        for n in (1, 16):
            group = sessions[:n]
            trs = sum(s.n_volumes for s in group)
            walls1, walls2 = [], []
            for r in range(args.repeats):
                walls1.append(one_core(group, model, out / f"c1-{n}-{r}", chunk_s))
                t0 = time.perf_counter()
                list(pool.map(run_job, jobs_for(group, out / f"c2-{n}-{r}", chunk_s)))
                walls2.append(time.perf_counter() - t0)
            rate1 = trs / statistics.median(walls1)
            rate2 = trs / statistics.median(walls2)
            results[f"sessions_{n}"] = {
                "trs": trs,
                "one_core_tr_per_s": round(rate1, 1),
                "two_cores_tr_per_s": round(rate2, 1),
                "two_over_one": round(rate2 / rate1, 2),
            }
            print(
                f"{n:3d} session(s), {trs} TRs: one core {rate1:8.0f} TR/s,"
                f" two cores {rate2:8.0f} TR/s (x{rate2 / rate1:.2f})",
                flush=True,
            )
        pool.shutdown()
    bar = results["sessions_16"]["one_core_tr_per_s"] >= 2000
    summary = {
        "benchmark": "rerun",
        "volumes_per_session": volumes,
        "ppg_hz": sessions[0].ppg.nominal_srate,
        "resp_hz": sessions[0].resp.nominal_srate,
        "chunk_ms": args.chunk_ms,
        "repeats": args.repeats,
        "worker_pool_start_s": round(pool_start_s, 2),
        **results,
        "bar_16_sessions_one_core_2000_tr_per_s": bar,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
