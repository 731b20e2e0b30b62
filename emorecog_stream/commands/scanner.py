"""`emorecog-stream scanner WATCH_DIR --atlas LABELS`: the scanner's export folder -> LSL.

Watches the folder the scanner (or dcm2niix, AFNI Dimon, a vendor tool) writes volumes into,
registers each volume to the run's reference, takes the mean of each atlas label and publishes
it as one sample of the ``fMRI`` stream the engine reads, with a ``Motion`` stream beside it
(six rigid parameters and framewise displacement). See docs/scanner.md.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("watch_dir", metavar="WATCH_DIR", help="the scanner's export folder")
    parser.add_argument(
        "--atlas",
        required=True,
        metavar="LABELS",
        help="label image (NIfTI; 1..246, 0 background) in the run's functional space",
    )
    parser.add_argument(
        "--labels", metavar="TABLE", help="label table ('index name' per line) for channel names"
    )
    parser.add_argument(
        "--reference",
        metavar="VOL",
        help="reference volume for motion correction (default: first volume of each run)",
    )
    parser.add_argument(
        "--tr", type=float, metavar="S", help="repetition time in seconds (default: from headers)"
    )
    parser.add_argument(
        "--poll",
        type=float,
        metavar="S",
        help="scan the folder every S seconds instead of using file-system events (needed on"
        " SMB/NFS shares, which deliver no events)",
    )
    parser.add_argument(
        "--from-start",
        action="store_true",
        help="process the files already in the folder (default: skip them, wait for new ones)",
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="dummy volumes to drop at the start of each run (not published; default 0)",
    )
    parser.add_argument(
        "--fd-threshold",
        type=float,
        default=0.5,
        metavar="MM",
        help="framewise displacement above which a volume is flagged (default 0.5 mm)",
    )
    parser.add_argument(
        "--trigger",
        metavar="NAME",
        help="LSL stream of the scanner's trigger pulses: pulse n timestamps volume n of a run",
    )
    parser.add_argument(
        "--recon-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="without --trigger: seconds from the end of a volume's acquisition to its file"
        " (timestamp = arrival - delay; default 0)",
    )
    parser.add_argument(
        "--slices",
        type=int,
        metavar="N",
        help="slices per volume for per-slice DICOM exports whose headers do not say",
    )
    parser.add_argument(
        "--tag", default="", help="append -TAG to the stream names and source ids"
    )
    parser.add_argument(
        "--volumes", type=int, metavar="N", help="stop after N published volumes"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="rehearsal only: the files come X times faster than real time (scanner-sim"
        " --speed X); announced in the stream's rate so that `run --replay-speed X` follows",
    )
    parser.add_argument("--quiet", action="store_true", help="no line per volume")


def settings_from(args: argparse.Namespace) -> object:
    from emorecog_stream.cli import UsageError
    from emorecog_stream.scanner.bridge import BridgeSettings

    for name in ("tr", "poll", "fd_threshold", "speed"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    if args.skip < 0:
        raise UsageError(f"--skip: expected 0 or more volumes, got {args.skip}")
    if args.recon_delay < 0:
        raise UsageError(f"--recon-delay: expected 0 or more seconds, got {args.recon_delay}")
    return BridgeSettings(
        watch_dir=args.watch_dir,
        atlas=args.atlas,
        label_table=args.labels,
        reference=args.reference,
        tr=args.tr,
        poll=args.poll,
        from_start=args.from_start,
        skip=args.skip,
        fd_threshold=args.fd_threshold,
        recon_delay=args.recon_delay,
        trigger=args.trigger,
        slices_per_volume=args.slices,
        tag=args.tag,
        speed=args.speed,
    )


def main(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import os
    import signal

    from emorecog_stream.adapters.lsl_log import quiet_liblsl
    from emorecog_stream.cli import UsageError
    from emorecog_stream.scanner.bridge import BridgeError, ScannerBridge

    if not os.path.isdir(args.watch_dir):
        raise UsageError(f"WATCH_DIR: expected an existing folder, got {args.watch_dir!r}")
    settings = settings_from(args)
    quiet_liblsl()

    def say(line: str) -> None:
        if args.quiet and line.startswith("   volume"):
            return
        print(line, flush=True)

    async def serve() -> int:
        bridge = ScannerBridge(settings, say=say)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Windows has no add_signal_handler: Ctrl-C raises KeyboardInterrupt there instead
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, bridge.stop)
        counters = await bridge.run(max_volumes=args.volumes)
        say(
            f"scanner: {counters.published} volumes published, {counters.above_threshold} above"
            f" {settings.fd_threshold:g} mm FD, {counters.skipped} dummies dropped,"  # type: ignore[attr-defined]
            f" {counters.foreign_grid} on another grid, {counters.failed} failed"
        )
        return 0

    try:
        return asyncio.run(serve())
    except BridgeError as exc:
        raise UsageError(str(exc)) from exc
