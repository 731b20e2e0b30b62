"""Recordings: time to generate, write and read one default synthetic session, and file sizes.

One default session (seed 2024, participant P15: 1060 volumes of 246 ROIs, PPG 400 Hz,
respiration 50 Hz). Each operation is repeated and its median reported; files go to a temporary
folder that is removed afterwards. Nothing here is asserted: tests/ holds the behaviour.

Usage: ``python benchmarks/bench_recordings.py [--repeats R]``.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from emorecog_stream.recordings.synth import SynthConfig, generate_corpus, generate_session
from emorecog_stream.recordings.xdf import read_xdf_session, write_xdf


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = SynthConfig()
    session = generate_session(15, config)
    result: dict[str, object] = {
        "benchmark": "recordings",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "volumes": session.n_volumes,
        "ppg_samples": len(session.ppg),
        "resp_samples": len(session.resp),
        "generate_session_s": median_s(lambda: generate_session(15, config), args.repeats),
        "generate_corpus_16_s": median_s(lambda: generate_corpus(config), 1 + args.repeats // 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".xdf", ".xdfz"):
            path = Path(tmp) / f"P15{suffix}"
            key = suffix.lstrip(".")
            result[f"write_{key}_s"] = median_s(lambda p=path: write_xdf(session, p), args.repeats)
            result[f"read_{key}_s"] = median_s(lambda p=path: read_xdf_session(p), args.repeats)
            result[f"{key}_bytes"] = path.stat().st_size
    for key, value in result.items():
        if isinstance(value, float):
            result[key] = round(value, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
