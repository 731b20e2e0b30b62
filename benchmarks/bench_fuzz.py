"""Fuzz every reader of outside data for longer than CI does, and report what breaks.

For each reader (see ``tests/fuzzing.py`` for the list and the bar) this runs inputs for
``--seconds`` seconds in a worker process with an address-space limit and a 5 s per-input timer.
``--layer mutate`` (default): byte-level mutations of real files (bit flips, interesting
integers, truncation, deleted, duplicated and spliced ranges, XDF length and sample-count fields
claiming far more than the file holds). ``--layer structured``: the CI tests' hypothesis
generators, drawn at random; ``both``: half and half. ``--engine atheris``: atheris's
coverage-guided mutator (libFuzzer) in a child process, through the same per-input check and
memory budget; its start is slow (the readers are imported under instrumentation).

Printed per reader: inputs tried, outcomes (read / rejected with a documented error / failed)
and each kind of failure with its count. With ``--save`` each first failing input of a kind is
shrunk (delta debugging, same failure kind) and saved with its traceback, so that it can become
a regression fixture, and so is the slowest input. The last line is one JSON object.

    nice -n 10 python benchmarks/bench_fuzz.py --seconds 20
    nice -n 10 python benchmarks/bench_fuzz.py --seconds 60 --targets xdf,keras --save /tmp/fz
    nice -n 10 python benchmarks/bench_fuzz.py --seconds 30 --layer both
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


def structured_strategies(name: str) -> list:
    """The hypothesis strategies of the CI tests for ``name`` (drawn at random here)."""
    from hypothesis import strategies as st

    from tests import (
        test_fuzz_config,
        test_fuzz_icbhi,
        test_fuzz_lsl,
        test_fuzz_markers,
        test_fuzz_model,
        test_fuzz_xdf,
    )

    markers = st.lists(test_fuzz_markers.marker_texts(), min_size=1, max_size=6).map(
        lambda texts: "\x1e".join(texts).encode("utf-8", "surrogatepass")
    )
    return {
        "xdf": [test_fuzz_xdf.xdf_files()],
        "icbhi_mat": [test_fuzz_icbhi.mat_files()],
        "icbhi_npz": [test_fuzz_icbhi.npz_files()],
        "keras": [test_fuzz_model.keras_graph_files(), test_fuzz_model.keras_weight_files()],
        "checkpoint": [test_fuzz_model.checkpoint_files()],
        "config": [test_fuzz_config.toml_documents()],
        "mqtt_url": [test_fuzz_config.urls()],
        "mqtt_password_file": [st.binary(max_size=64)],
        "lsl_xml": [test_fuzz_lsl.stream_xml()],
        "markers": [markers],
    }.get(name, [])


def draw_structured(strategies: list, rng: random.Random) -> bytes | None:
    """One input from one of ``strategies`` (None when hypothesis rejected the draw)."""
    import warnings

    from hypothesis.errors import NonInteractiveExampleWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        try:
            return bytes(rng.choice(strategies).example())
        except Exception:  # an unsatisfiable draw (hypothesis.reject) in the generator
            return None


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
    name: str, seconds: float, seed: int, save: Path | None, hang_s: float, layer: str = "mutate"
) -> dict[str, object]:
    target = get_target(name)
    seeds = [data for _, data in target.seeds()]
    rng = random.Random(f"{seed}:{name}")
    strategies = structured_strategies(name) if layer in ("structured", "both") else []
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
            structured = strategies and (layer == "structured" or rng.random() < 0.5)
            drawn = draw_structured(strategies, rng) if structured else None
            if structured and drawn is None:
                continue
            data = drawn if drawn is not None else mutate(rng.choice(corpus), rng, seeds)
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
    parser.add_argument(
        "--layer",
        choices=("mutate", "structured", "both"),
        default="mutate",
        help="plain mutator: byte mutants of real files, the CI tests' hypothesis generators"
        " (drawn at random, no shrinking), or half and half",
    )
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
            r = fuzz_target(name, args.seconds, args.seed, args.save, args.hang_s, args.layer)
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
                "layer": args.layer,
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
