"""What the child-process HDF5 metadata check costs the Keras reader, and how soon it gives up.

For each Keras fixture, side by side in one run: ``read_keras_v1_file`` with the check skipped,
with it on a file not seen before (the child starts, imports h5py and walks the metadata), and
with it on a file already checked (the verdict is kept per SHA-256 of the content). Then the
corrupt ``tests/fixtures/fuzz/keras_hdf5_spin.h5`` on which libhdf5 spins: the time until the
reader's ``KerasV1Error``. Medians; the last line is one JSON object.

    nice -n 10 python benchmarks/bench_hdf5_probe.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emorecog_stream.model import (  # noqa: E402
    hdf5_probe,
    keras_v1_h5,
)

KERAS = ROOT / "tests" / "fixtures" / "keras_v1"
SPIN = ROOT / "tests" / "fixtures" / "fuzz" / "keras_hdf5_spin.h5"


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    files = sorted([*KERAS.glob("*.h5"), *KERAS.glob("*.keras")])
    rows = {}
    for path in files:
        skipped, cold, warm = [], [], []
        for _ in range(args.repeats):
            with mock.patch.object(keras_v1_h5, "_check_metadata", lambda *a, **k: None):
                skipped.append(_seconds(keras_v1_h5.read_keras_v1_file, path))
            hdf5_probe._verdicts.clear()
            cold.append(_seconds(keras_v1_h5.read_keras_v1_file, path))
            warm.append(_seconds(keras_v1_h5.read_keras_v1_file, path))
        row = {
            "kb": round(path.stat().st_size / 1024),
            "no_check_s": round(statistics.median(skipped), 4),
            "check_new_file_s": round(statistics.median(cold), 4),
            "check_seen_file_s": round(statistics.median(warm), 4),
        }
        row["overhead_new_file_s"] = round(row["check_new_file_s"] - row["no_check_s"], 4)
        rows[path.name] = row
        print(f"{path.name:16} {json.dumps(row)}")

    def spin() -> None:
        hdf5_probe._verdicts.clear()
        try:
            keras_v1_h5.read_keras_v1_file(SPIN)
        except keras_v1_h5.KerasV1Error:
            return
        raise SystemExit("the corrupt fixture was read without an error")

    spin_s = [_seconds(spin) for _ in range(3)]
    limit = hdf5_probe.metadata_limit_s(SPIN.stat().st_size)
    print(f"keras_hdf5_spin.h5: KerasV1Error after {statistics.median(spin_s):.2f} s (limit "
          f"{limit:.2f} s of metadata time after the child starts)")
    overheads = [r["overhead_new_file_s"] for r in rows.values()]
    print(json.dumps({
        "bench": "hdf5_probe",
        "python": platform.python_version(),
        "repeats": args.repeats,
        "files": rows,
        "median_overhead_new_file_s": round(statistics.median(overheads), 4),
        "spin_fixture_error_after_s": round(statistics.median(spin_s), 3),
        "spin_limit_s": round(limit, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
