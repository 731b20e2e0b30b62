"""Step cost of the streaming EmoRecog-Net on one CPU core, against recomputing a window.

Measures, with one thread (torch, NumPy's BLAS):

* step latency at batch 1 (``stepper().step``): p50 and p99 over many volumes;
* per-session cost of a step at batch 64 (``batch_stepper(64).step_batch`` / 64);
* the cost of one TR if, instead of stepping, the last 25 volumes (one ICBHI trial at TR 1 s)
  were recomputed from scratch: ``predict_sequence`` on the window (the whole-sequence path), and
  25 steps of a fresh stepper; the cheaper of the two is the honest alternative, and the ratio
  is taken against it.

Usage: ``python benchmarks/bench_model.py [--checkpoint PATH] [--steps N]``. A human summary,
then one JSON object as the last line. Targets (issue 3): step p99 <= 1 ms at batch 1,
window recompute / step >= 20.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from emorecog_stream.core.streams import N_ROIS  # noqa: E402
from emorecog_stream.model import load_model  # noqa: E402

WINDOW = 25


def _inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    roi = (rng.uniform(80, 120, N_ROIS) + rng.normal(0, 1, (n, N_ROIS))).astype(np.float32)
    hr = rng.normal(70, 5, n).astype(np.float32)
    rr = rng.normal(15, 2, n).astype(np.float32)
    hr[rng.random(n) < 0.05] = np.nan
    return roi, hr, rr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--steps", type=int, default=5000, help="timed single steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.checkpoint)
    n = args.steps
    roi, hr, rr = _inputs(n + 500)

    stepper = model.stepper()
    for i in range(500):  # warm-up
        stepper.step(roi[i], hr[i], rr[i])
    times = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        stepper.step(roi[i], hr[i], rr[i])
        times[i] = clock() - t0
    p50, p99 = np.percentile(times, [50, 99]) * 1e3

    b = 64
    batch = model.batch_stepper(b)
    broi = np.stack([roi[:200] + k for k in range(b)], axis=1)  # (200, 64, R)
    bhr, brr = np.tile(hr[:200, None], (1, b)), np.tile(rr[:200, None], (1, b))
    for i in range(50):
        batch.step_batch(broi[i], bhr[i], brr[i])
    btimes = []
    for i in range(200):
        t0 = clock()
        batch.step_batch(broi[i], bhr[i], brr[i])
        btimes.append(clock() - t0)
    batch_per_session = float(np.median(btimes)) / b * 1e3

    reps = 300
    wtimes = []
    for i in range(reps):
        s = i % (n - WINDOW)
        t0 = clock()
        model.predict_sequence(roi[s : s + WINDOW], hr[s : s + WINDOW], rr[s : s + WINDOW])
        wtimes.append(clock() - t0)
    window_sequence = float(np.median(wtimes)) * 1e3
    stimes = []
    for i in range(reps // 3):
        s = i % (n - WINDOW)
        t0 = clock()
        fresh = model.stepper()
        for j in range(s, s + WINDOW):
            fresh.step(roi[j], hr[j], rr[j])
        stimes.append(clock() - t0)
    window_steps = float(np.median(stimes)) * 1e3
    window = min(window_sequence, window_steps)
    ratio = window / float(p50)

    print(f"model {model.model_id} on {platform.processor() or platform.machine()}, 1 thread")
    print(f"step at batch 1: p50 {p50 * 1e3:.1f} us, p99 {p99 * 1e3:.1f} us (target p99 <= 1 ms)")
    print(f"step at batch 64: {batch_per_session * 1e3:.1f} us per session")
    print(
        f"recompute the last {WINDOW} volumes per TR: predict_sequence {window_sequence:.3f} ms,"
        f" {WINDOW} fresh steps {window_steps:.3f} ms"
    )
    print(f"window recompute / step (p50): {ratio:.1f} (target >= 20)")
    print(
        json.dumps(
            {
                "benchmark": "model_step",
                "model_id": model.model_id,
                "threads": 1,
                "step_p50_ms": round(float(p50), 4),
                "step_p99_ms": round(float(p99), 4),
                "batch64_per_session_ms": round(batch_per_session, 4),
                "window25_predict_sequence_ms": round(window_sequence, 4),
                "window25_fresh_steps_ms": round(window_steps, 4),
                "window25_recompute_ms": round(window, 4),
                "recompute_over_step": round(ratio, 2),
                "target_step_p99_ms": 1.0,
                "target_ratio": 20.0,
                "meets_targets": bool(p99 <= 1.0 and ratio >= 20.0),
            }
        )
    )


if __name__ == "__main__":
    main()
