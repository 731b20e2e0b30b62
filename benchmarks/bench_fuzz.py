"""Fuzz every reader of outside data for longer than CI does, and report what breaks.

For each reader (see ``tests/fuzzing.py`` for the list and the bar) this runs mutated real
files for ``--seconds`` seconds in a worker process with an address-space limit and a 5 s
per-input timer: byte-level mutations of the seeds (bit flips, interesting integers, truncation,
deleted, duplicated and spliced ranges, XDF length and sample-count fields claiming far more
than the file holds). ``--engine atheris`` uses atheris's coverage-guided mutator instead (where
atheris is installed), still through the same worker.

Printed per reader: inputs tried, outcomes (read / rejected with a documented error / failed)
and each kind of failure with its count. Each failing input is shrunk (delta debugging, same
failure kind) and saved under ``--save`` so that it can become a regression fixture. The last
line is one JSON object with the same figures.

    nice -n 10 python benchmarks/bench_fuzz.py --seconds 20
    nice -n 10 python benchmarks/bench_fuzz.py --seconds 60 --targets xdf,keras --save /tmp/fz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import HANG_S, Outcome, Worker, get_target, mutate, target_names


def shrink(worker: Worker, data: bytes, label: str, budget: int = 150) -> bytes:
    """Delta debugging: drop ever smaller ranges while the same failure kind remains."""
    tries = 0
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and tries < budget:
        i = 0
        changed = False
        while i < len(data) and tries < budget:
            candidate = data[:i] + data[i + chunk :]
            tries += 1
            outcome = worker.run(candidate)
            if outcome.failed and outcome.label() == label:
                data = candidate
                changed = True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return data


def fuzz_target_atheris(
    name: str, seconds: float, save: Path | None, hang_s: float
) -> dict[str, object]:
    """Coverage-guided: atheris in a child process (``tests/fuzzing.py atheris``), restarted
    after each failure it stops on, until ``seconds`` are used."""
    import re
    import subprocess
    import tempfile

    from tests.fuzzing import REPO

    target = get_target(name)
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    runs = 0
    with tempfile.TemporaryDirectory(prefix=f"atheris-corpus-{name}-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, (_, data) in enumerate(target.seeds()):
            (corpus / f"seed{i}").write_bytes(data)
        artifacts = (save / name) if save is not None else Path(tmp) / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 5:
            proc = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "tests" / "fuzzing.py"),
                    "atheris",
                    name,
                    str(corpus),
                    f"-max_total_time={int(left)}",
                    f"-timeout={int(hang_s)}",
                    "-rss_limit_mb=4096",
                    f"-artifact_prefix={artifacts}/",
                    "-print_final_stats=1",
                ],
                cwd=REPO,
                env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                capture_output=True,
                text=True,
                timeout=left + 120,
            )
            out = proc.stdout + proc.stderr
            done = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
            runs += int(done[-1]) if done else len(re.findall(r"^#\d+", out, re.M))
            if proc.returncode == 0:
                break
            label = re.search(r"FuzzFailure: (.+)", out)
            kind = label.group(1) if label else ("hang" if "timeout" in out else "crash")
            failures[kind] += 1
            examples.setdefault(kind, (re.findall(r"Test unit written to (\S+)", out) or ["?"])[-1])
    return {
        "inputs": runs,
        "ok": None,
        "rejected": None,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "examples": examples,
        "slowest_s": None,
        "worker_restarts": None,
        "seeds": len(target.seeds()),
    }


def fuzz_target(
    name: str, seconds: float, seed: int, save: Path | None, hang_s: float
) -> dict[str, object]:
    target = get_target(name)
    seeds = [data for _, data in target.seeds()]
    rng = random.Random(f"{seed}:{name}")
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    slowest, slowest_input = 0.0, b""
    corpus = list(seeds)
    with Worker(name, hang_s=hang_s) as worker:
        for data in seeds:  # the seeds themselves must read or be rejected cleanly
            outcome = worker.run(data)
            statuses[outcome.status] += 1
            if outcome.failed:
                failures[outcome.label()] += 1
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data = mutate(rng.choice(corpus), rng, seeds)
            outcome: Outcome = worker.run(data)
            statuses[outcome.status] += 1
            if outcome.seconds > slowest:
                slowest, slowest_input = outcome.seconds, data
            if outcome.status == "rejected" and len(corpus) < 64 and rng.random() < 0.02:
                corpus.append(data)  # keep some inputs that got past the first checks
            if not outcome.failed:
                continue
            label = outcome.label()
            if label == "hang":  # confirm on a fresh worker before calling it a hang
                worker.close()
                again = worker.run(data)
                if not again.failed:
                    statuses["failure"] -= 1
                    statuses[again.status] += 1
                    continue
            failures[label] += 1
            if label not in examples:
                small = shrink(worker, data, label) if save is not None else data
                digest = hashlib.sha256(small).hexdigest()[:12]
                examples[label] = f"{len(small)} bytes, sha256 {digest}"
                if save is not None:
                    folder = save / name
                    folder.mkdir(parents=True, exist_ok=True)
                    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
                    (folder / f"{safe}-{digest}.bin").write_bytes(small)
                    (folder / f"{safe}-{digest}.txt").write_text(outcome.detail)
        restarts = worker.restarts
    if save is not None and slowest_input:
        (save / name).mkdir(parents=True, exist_ok=True)
        (save / name / f"slowest-{slowest:.3f}s.bin").write_bytes(slowest_input)
    tried = sum(statuses.values())
    return {
        "inputs": tried,
        "ok": statuses["ok"],
        "rejected": statuses["rejected"],
        "failed": statuses["failure"],
        "failures": dict(failures),
        "examples": examples,
        "slowest_s": round(slowest, 3),
        "worker_restarts": restarts,
        "seeds": len(seeds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per reader")
    parser.add_argument("--targets", default="", help="comma-separated (default: all)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    parser.add_argument("--save", type=Path, default=None, help="folder for shrunk failures")
    parser.add_argument("--hang-s", type=float, default=HANG_S)
    args = parser.parse_args(argv)
    names = [n for n in args.targets.split(",") if n] or target_names()
    results: dict[str, dict[str, object]] = {}
    for name in names:
        started = time.monotonic()
        if args.engine == "atheris":
            r = fuzz_target_atheris(name, args.seconds, args.save, args.hang_s)
        else:
            r = fuzz_target(name, args.seconds, args.seed, args.save, args.hang_s)
        results[name] = r
        took = time.monotonic() - started
        detail = (
            f"  read {r['ok']:6d}  rejected {r['rejected']:6d}"
            if r["ok"] is not None
            else "  (atheris: coverage-guided)"
        )
        slowest = f"  slowest {r['slowest_s']:.3f} s" if r["slowest_s"] is not None else ""
        print(
            f"{name:20s} inputs {r['inputs']:6d}{detail}  failed {r['failed']:5d}{slowest}"
            f"  ({took:.0f} s)",
            flush=True,
        )
        for label, count in sorted(r["failures"].items()):  # type: ignore[union-attr]
            print(f"    {count:5d} x {label}   e.g. {r['examples'].get(label, '')}", flush=True)  # type: ignore[union-attr]
    total = {
        "inputs": sum(int(r["inputs"]) for r in results.values()),
        "failed": sum(int(r["failed"]) for r in results.values()),
    }
    print(
        json.dumps(
            {
                "benchmark": "fuzz",
                "engine": args.engine,
                "seconds_per_reader": args.seconds,
                "seed": args.seed,
                "hang_s": args.hang_s,
                "python": platform.python_version(),
                "total": total,
                "readers": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
