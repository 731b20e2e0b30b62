"""`emorecog-stream rerun RECORDING... [--out DIR] [--mqtt URL] [--jobs N]`: recordings through
the live pipeline at full speed.

What a live ``run`` would have published for each recorded session, without LSL and without
the wall clock (:mod:`emorecog_stream.engine.rerun`): one JSONL log per session in ``--out``
(``<session id>.jsonl``, the participant id, ``-2``... when it repeats) and, with ``--mqtt``,
the same messages on the broker. The sessions are shared out over ``--jobs`` worker processes;
each worker re-runs its share together, their model steps batched (the same predictions as
re-running each alone).
"""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RECORDING",
        help="recording(s): .xdf/.xdfz file, folder of them, ICBHI .mat folder or official layout",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the session logs, <session>.jsonl (default: no logs)",
    )
    parser.add_argument("--mqtt", default=None, metavar="URL", help="also publish to this broker")
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="engine configuration (as for run)"
    )
    parser.add_argument("--model", default=None, metavar="PATH", help="model checkpoint")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: one per CPU core, at most one per session)",
    )
    parser.add_argument(
        "--chunk-ms",
        type=float,
        default=None,
        metavar="MS",
        help="chunk length of the physiology streams (default 1000; output does not depend on it"
        " below the aligner deadline)",
    )
    parser.add_argument(
        "--tr", type=float, default=None, metavar="S", help="TR for recordings without one"
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="ROLE=SELECTOR",
        help="XDF files: which stream plays which role (as for replay)",
    )


def main(args: argparse.Namespace) -> int:
    from emorecog_stream.cli import UsageError
    from emorecog_stream.config import ConfigError, apply_overrides, load_config
    from emorecog_stream.engine.rerun import DEFAULT_CHUNK_S, RerunError, rerun_many
    from emorecog_stream.recordings import load_sessions

    try:
        config = load_config(args.config)
        config = apply_overrides(config, {"output.dashboard": False, "model.path": args.model})
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    chunk_s = DEFAULT_CHUNK_S if args.chunk_ms is None else args.chunk_ms / 1000.0
    if not 0 <= chunk_s < config.aligner.deadline:
        raise UsageError(
            f"--chunk-ms: expected 0 <= MS < the aligner deadline"
            f" ({config.aligner.deadline * 1000:g} ms), got {args.chunk_ms:g}"
        )
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs: expected a number >= 1, got {args.jobs}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: expected a folder, found a file: {args.out}")
    sessions = []
    for path in args.paths:
        try:
            options = {} if args.tr is None else {"tr": args.tr}
            loaded = load_sessions(path, args.map or None, **options)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot re-run {path}: {exc}") from None
        if not loaded:
            raise UsageError(f"cannot re-run {path}: no session found in it")
        sessions.extend(loaded)
    if args.mqtt:
        from emorecog_stream.engine.runner import RunError, mqtt_settings_for

        try:
            mqtt_settings_for(config, args.mqtt)  # bad URLs and settings fail before any work
        except RunError as exc:
            raise UsageError(str(exc)) from None
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    try:
        results = rerun_many(
            sessions,
            out_dir=args.out,
            mqtt_url=args.mqtt,
            model_path=config.model.path or None,
            jobs=min(jobs, len(sessions)),
            chunk_seconds=chunk_s,
            config=config,
        )
    except RerunError as exc:
        raise UsageError(str(exc)) from None
    volumes = 0
    seconds = 0.0
    for r in results:
        c = r.counters
        where = f" -> {r.log_path}" if r.log_path else ""
        sent = ""
        if r.mqtt_sent is not None:
            sent = f"; MQTT sent {r.mqtt_sent}, dropped {r.mqtt_dropped}"
        print(
            f"{r.session_id}: {c.predictions} predictions from {r.volumes} volumes"
            f" ({c.resets} state resets, {c.deadline_steps} on deadline,"
            f" {c.rejected_chunks} chunks rejected){sent}{where}"
        )
        volumes += r.volumes
        seconds += r.seconds
    rate = volumes / seconds if seconds > 0 else float("inf")
    batches = {r.batch.group: r.batch for r in results if r.batch is not None}
    passes = sum(b.passes for b in batches.values())
    steps = sum(b.steps for b in batches.values())
    batched = f", {steps / passes:.1f} sessions per model pass" if passes else ""
    print(
        f"re-ran {len(results)} session(s), {volumes} volumes"
        f" ({rate:.0f} TR/s per worker, {len(batches) or 1} worker(s){batched})"
    )
    return 0
