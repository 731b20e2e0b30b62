"""`emorecog-stream scanner-sim OUT_DIR`: a rehearsal scanner writing volume files at TR pace.

It writes what a scanner's real-time export would (NIfTI per volume, a Siemens-style mosaic
DICOM per volume, or GE-style DICOM per slice) for a synthetic session with a known head motion,
plus the atlas and the truth to check the bridge against, so that ``scanner-sim -> scanner ->
run`` rehearses the whole chain on one machine. See :mod:`emorecog_stream.scanner.sim`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emorecog_stream.cli import UsageError

_FORMATS = ("nifti", "nifti-gz", "dicom", "dicom-slices", "dicom-enhanced")
_GRIDS = ("3mm", "2mm")
_MOTIONS = ("none", "default", "strong")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=Path,
        help="the rehearsal folder: volumes go to OUT_DIR/export (the folder to watch), the atlas,"
        " its label table, session.json and truth/ beside it",
    )
    parser.add_argument(
        "--format",
        choices=_FORMATS,
        default="nifti",
        help="nifti (one .nii per volume), nifti-gz, dicom (Siemens-style mosaic, one file per"
        " volume), dicom-slices (GE-style, one file per slice) or dicom-enhanced (enhanced MR"
        " multi-frame, one file per volume) (default: %(default)s)",
    )
    parser.add_argument(
        "--grid",
        choices=_GRIDS,
        default="3mm",
        help="3mm: 64x64x36 single-band EPI; 2mm: 104x104x72 multiband (default: %(default)s)",
    )
    parser.add_argument(
        "--oblique",
        type=float,
        default=0.0,
        metavar="DEG",
        help="tilt the slices about the left-right axis (default: %(default)s)",
    )
    parser.add_argument(
        "--session",
        metavar="PATH",
        help="rehearse this recording's fMRI series (XDF, ICBHI folder, ...; the first session)"
        " instead of the demo's P15",
    )
    parser.add_argument(
        "--tr", type=float, metavar="S", help="seconds per volume (default: the session's TR)"
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, metavar="X", help="run X times faster than real time"
    )
    parser.add_argument("--fast", action="store_true", help="write volumes without waiting")
    parser.add_argument(
        "--volumes",
        type=int,
        metavar="N",
        help="files per series, dummies included (default: the whole session)",
    )
    parser.add_argument(
        "--dummies",
        type=int,
        default=0,
        metavar="K",
        help="bright non-steady-state volumes before the session's first (default: 0)",
    )
    parser.add_argument(
        "--series", type=int, default=1, metavar="N", help="runs written one after another"
    )
    parser.add_argument(
        "--motion", choices=_MOTIONS, default="default", help="head motion (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom, atlas, motion and noise")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.5,
        metavar="SD",
        help="thermal noise sd, in units where tissue is ~100 (default: %(default)s)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.2,
        metavar="S",
        help="reconstruction delay: a file lands this long after its acquisition ends"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--slow-write",
        action="store_true",
        help="write each file in pieces straight to its final name (a reader sees partial"
        " files) instead of writing a temporary file and renaming it",
    )
    parser.add_argument(
        "--force", action="store_true", help="write into a folder that already holds volumes"
    )
    parser.add_argument("--quiet", action="store_true", help="no line per volume")


def main(args: argparse.Namespace) -> int:
    import sys

    from emorecog_stream.scanner import sim

    out_dir: Path = args.out_dir
    export = out_dir / sim.EXPORT_DIR
    for folder in (out_dir, export):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} exists and is not a folder")
    if export.is_dir() and not args.force:
        present = [p.name for p in export.iterdir()]
        if present:
            shown = ", ".join(sorted(present)[:3]) + (" ..." if len(present) > 3 else "")
            raise UsageError(
                f"{export} already holds {len(present)} file(s) ({shown}); a bridge watching it"
                " would mix runs. Give another OUT_DIR or pass --force"
            )
    if not args.speed > 0:
        raise UsageError(f"--speed: expected a number > 0, got {args.speed}")
    if args.delay < 0:
        raise UsageError(f"--delay: expected seconds >= 0, got {args.delay}")
    shape, voxel = sim.GRIDS[args.grid]
    try:
        settings = sim.SimSettings(
            fmt=args.format,
            shape=shape,
            voxel_mm=voxel,
            oblique_deg=args.oblique,
            tr=args.tr,
            volumes=args.volumes,
            dummies=args.dummies,
            series=args.series,
            motion=args.motion,
            seed=args.seed,
            noise_sd=args.noise,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    session, source = _session(args.session)
    try:
        rehearsal = sim.prepare(session, settings, source)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        description = rehearsal.write_truth(out_dir)
    except OSError as exc:
        raise UsageError(f"cannot write into {out_dir}: {exc}") from None
    pace = "as fast as possible" if args.fast else f"one every {rehearsal.tr / args.speed:g} s"
    print(
        f"scanner-sim: {description['series']} series x {description['volumes_per_series']}"
        f" volumes ({args.format}, {'x'.join(map(str, shape))} at {voxel:g} mm, TR"
        f" {rehearsal.tr:g} s) into {out_dir}, {pace}; session {session.participant} from"
        f" {source}; truth in {out_dir / 'truth'}. Bridge it with:\n  emorecog-stream scanner"
        f" {export} --atlas {out_dir / 'atlas.nii.gz'} --labels {out_dir / 'atlas_labels.txt'}"
        " --from-start"
        + (f" --skip {args.dummies}" if args.dummies else "")
        + (f" --speed {args.speed:g}" if args.speed != 1 else ""),
        file=sys.stderr,
        flush=True,
    )

    def report(done: sim.WrittenVolume) -> None:
        info = done.info
        flags = []
        if info.dummy:
            flags.append("dummy")
        if info.fd > sim.FD_THRESHOLD_MM:
            flags.append(f"FD > {sim.FD_THRESHOLD_MM:g} mm")
        late = done.written_at - done.due_at
        if not args.fast and late > 0.5 * rehearsal.tr / args.speed:
            flags.append(f"late by {late:.2f} s")
        names = done.paths[0].name if len(done.paths) == 1 else f"{len(done.paths)} slices"
        print(
            f"series {info.series} volume {info.index:5d}  FD {info.fd:6.3f} mm  {names}"
            + (f"  [{', '.join(flags)}]" if flags else ""),
            flush=True,
        )

    writer = sim.ScannerSim(
        export,
        rehearsal,
        speed=args.speed,
        fast=args.fast,
        delay_s=args.delay,
        slow_write=args.slow_write,
        on_volume=None if args.quiet else report,
    )
    writer.start()
    try:
        while not writer.join(0.5):
            pass
    except KeyboardInterrupt:
        writer.stop()
        print(f"scanner-sim: stopped after {len(writer.written)} volumes", file=sys.stderr)
        return 130
    except OSError as exc:
        raise UsageError(f"cannot write into {out_dir}: {exc}") from None
    crossings = len(description["fd_crossings"])
    print(
        f"scanner-sim: wrote {len(writer.written)} volumes; {crossings} above FD"
        f" {sim.FD_THRESHOLD_MM:g} mm (listed in {out_dir / 'session.json'})",
        file=sys.stderr,
    )
    return 0


def _session(path: str | None):  # -> tuple[Session, str]
    from emorecog_stream.scanner import sim

    if path is None:
        return sim.default_session()
    from emorecog_stream.recordings import load_sessions

    try:
        sessions = load_sessions(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--session {path}: {exc}") from None
    if not sessions:
        raise UsageError(f"--session {path}: no session found")
    return sessions[0], str(path)
