"""``rerun`` throughput: TRs per second through the live engine, on one core and on two.

Sessions: synthetic (``recordings.synth``), TR 1 s, waveform physiology (PPG 400 Hz,
respiration 50 Hz), markers; the default model. Each case re-runs N sessions (1 and 16), each
with its JSONL log written to a temporary folder as ``rerun --out`` does:

* one core: in this process, pinned to one CPU (``os.sched_setaffinity``), the sessions re-run
  together with their model steps batched (``rerun_many(jobs=1)``'s path, ``rerun_group``);
  beside it, for comparison, the same sessions re-run one after another, each alone (the
  model stepped inline: the path before batching);
* two cores: two spawned worker processes (not pinned), each re-running its share of the
  sessions together (``rerun_many(jobs=2)``'s path); the workers' model is loaded and warmed
  before the clock starts (start-up is reported separately, not in the rate).

The rate is TRs (volumes) re-run / wall seconds of the whole call (planning the chunks,
opening the logs and, for the workers, sending them the sessions included); each figure is
the median of ``--repeats`` runs, the cases of one repeat run side by side. The batch figures
say how many sessions' steps went through the model in one pass, on average. First bar:
>= 2,000 TR/s on one core for 16 sessions.

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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emorecog_stream.engine.rerun import (
    DEFAULT_CHUNK_S,
    BatchStats,
    RerunJob,
    RerunResult,
    load_worker_model,
    rerun_group,
    rerun_session,
    run_group,
    session_ids,
    split_jobs,
)
from emorecog_stream.model import load_model
from emorecog_stream.recordings.synth import SynthConfig, generate_session

BAR_TR_PER_S = 2000.0


def make_sessions(n: int, trials: int) -> list:
    config = SynthConfig(n_participants=max(n, 1), n_trials=trials, rest_s=5.0, lead_in_s=5.0)
    return [generate_session(i + 1, config) for i in range(n)]


def jobs_for(sessions: list, out: Path, chunk_s: float) -> list[RerunJob]:
    return [
        RerunJob(sid, s, str(out / f"{sid}.jsonl"), None, chunk_s)
        for sid, s in zip(session_ids(sessions), sessions, strict=True)
    ]


@contextmanager
def one_cpu():
    """This process on one CPU (the first it may use) while inside; None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def timed(run: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = run(*args)
    return time.perf_counter() - t0, out


def together_here(sessions: list, model, out: Path, chunk_s: float) -> list[RerunResult]:
    return asyncio.run(rerun_group(jobs_for(sessions, out, chunk_s), model))


def alone_here(sessions: list, model, out: Path, chunk_s: float) -> None:
    async def serial() -> None:
        for job in jobs_for(sessions, out, chunk_s):
            await rerun_session(
                job.session,
                model,
                session_id=job.session_id,
                log_path=job.log_path,
                chunk_seconds=chunk_s,
            )

    asyncio.run(serial())


def on_workers(pool, workers: int, sessions: list, out: Path, chunk_s: float) -> list[BatchStats]:
    """``rerun_many(jobs=workers)``'s path on an already started pool: one share per worker."""
    jobs = jobs_for(sessions, out, chunk_s)
    shares = split_jobs(jobs, workers)
    done = pool.map(run_group, [[jobs[i] for i in share] for share in shares], range(len(shares)))
    return [results[0].batch for results in done if results and results[0].batch is not None]


def batch_figures(stats: list[BatchStats]) -> dict[str, float]:
    passes = sum(s.passes for s in stats)
    steps = sum(s.steps for s in stats)
    return {
        "mean_batch": round(steps / passes, 2) if passes else 0.0,
        "largest_batch": max((s.largest for s in stats), default=0),
    }


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
    load_start = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t_start = time.perf_counter()
        pool = ProcessPoolExecutor(
            max_workers=2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=load_worker_model,
            initargs=(None,),
        )  # started before this process is pinned: the workers may use every CPU
        warm = make_sessions(2, 3)
        on_workers(pool, 2, warm * 2, out / "warm2", chunk_s)
        pool_start_s = time.perf_counter() - t_start
        with one_cpu() as cpu:
            together_here(warm, model, out / "warm1", chunk_s)  # caches before timing
            alone_here(warm[:1], model, out / "warm1a", chunk_s)
        for n in (1, 16):
            group = sessions[:n]
            trs = sum(s.n_volumes for s in group)
            walls1, walls_alone, walls2 = [], [], []
            stats1: list[BatchStats] = []
            stats2: list[BatchStats] = []
            for r in range(args.repeats):
                with one_cpu():
                    wall, res = timed(together_here, group, model, out / f"c1-{n}-{r}", chunk_s)
                    walls1.append(wall)
                    stats1 = [res[0].batch]
                    wall, _ = timed(alone_here, group, model, out / f"a1-{n}-{r}", chunk_s)
                    walls_alone.append(wall)
                wall, stats2 = timed(on_workers, pool, 2, group, out / f"c2-{n}-{r}", chunk_s)
                walls2.append(wall)
            rate1 = trs / statistics.median(walls1)
            rate_alone = trs / statistics.median(walls_alone)
            rate2 = trs / statistics.median(walls2)
            results[f"sessions_{n}"] = {
                "trs": trs,
                "one_core_tr_per_s": round(rate1, 1),
                "one_core_alone_tr_per_s": round(rate_alone, 1),
                "two_cores_tr_per_s": round(rate2, 1),
                "two_over_one": round(rate2 / rate1, 2),
                "one_core_batch": batch_figures(stats1),
                "two_cores_batch": batch_figures(stats2),
            }
            print(
                f"{n:3d} session(s), {trs} TRs: one core {rate1:8.0f} TR/s"
                f" (mean batch {batch_figures(stats1)['mean_batch']:.1f};"
                f" each alone {rate_alone:.0f}),"
                f" two cores {rate2:8.0f} TR/s (x{rate2 / rate1:.2f})",
                flush=True,
            )
        pool.shutdown()
    one_core_16 = results["sessions_16"]["one_core_tr_per_s"]
    summary = {
        "benchmark": "rerun",
        "volumes_per_session": volumes,
        "ppg_hz": sessions[0].ppg.nominal_srate,
        "resp_hz": sessions[0].resp.nominal_srate,
        "chunk_ms": args.chunk_ms,
        "repeats": args.repeats,
        "one_core_pinned_to_cpu": cpu,
        "worker_pool_start_s": round(pool_start_s, 2),
        **results,
        "bar_tr_per_s": BAR_TR_PER_S,
        "bar_16_sessions_one_core_2000_tr_per_s": one_core_16 >= BAR_TR_PER_S,
        "cpu_count": os.cpu_count(),
        "load_average_1min_start": round(load_start, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(
        f"bar: >= {BAR_TR_PER_S:.0f} TR/s on one core for 16 sessions:"
        f" {'met' if summary['bar_16_sessions_one_core_2000_tr_per_s'] else 'NOT met'}"
        f" ({one_core_16:.0f} TR/s)",
        flush=True,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
