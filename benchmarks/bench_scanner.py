"""Scanner bridge latency: a volume file's last byte written -> its ROI sample pushed on LSL.

The rehearsal simulator's head phantom (246-label atlas, head motion with jerks) is written as
one NIfTI file per volume into a watched folder, by rename as scanners and dcm2niix do, one
volume every ``--interval`` seconds (faster than any TR, slow enough that volumes never queue).
The real bridge (file-system events, registration, ROI means, LSL outlets) runs in the same
process; each volume's time from the rename to both LSL samples pushed is measured on the LSL
clock, and broken out into reading the file, registration, ROI means and the rest (queueing,
threads, pushing). Both benchmark grids run in one call: 64x64x36 at 3 mm and 104x104x72 at
2 mm (multiband). Last line: one JSON object.

    python benchmarks/bench_scanner.py [--volumes 120] [--interval 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pylsl

from emorecog_stream.scanner import sim
from emorecog_stream.scanner.bridge import BridgeSettings, ScannerBridge

BARS_P99_MS = {"3mm": 100.0, "2mm": 400.0}


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def run_grid(grid: str, volumes: int, interval: float) -> dict[str, object]:
    shape, voxel = sim.GRIDS[grid]
    settings = sim.SimSettings(fmt="nifti", shape=shape, voxel_mm=voxel, volumes=volumes,
                               motion="strong", tr=1.0)
    rehearsal = sim.prepare(settings=settings)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export = root / "export"
        export.mkdir()
        atlas_path = root / "atlas.nii.gz"
        nib.save(nib.Nifti1Image(rehearsal.atlas.astype(np.int16), rehearsal.affine), atlas_path)
        # the files are made before the clock starts: only writing them is in the measurement
        payloads = []
        for info in rehearsal.plan():
            data = rehearsal.volume(info.series, info.index)
            payloads.append(sim.encode_volume(rehearsal, info, data)[0])
        written: dict[str, float] = {}
        bridge = ScannerBridge(
            BridgeSettings(watch_dir=str(export), atlas=str(atlas_path), tr=1.0,
                           tag=f"bench{grid}"),
            say=lambda line: None,
        )

        def write_all() -> None:
            for name, payload in payloads:
                time.sleep(interval)
                tmp_path = export / f".{name}.part"
                tmp_path.write_bytes(payload)
                target = export / name
                tmp_path.replace(target)
                written[str(target)] = pylsl.local_clock()

        async def main() -> None:
            task = asyncio.create_task(bridge.run(max_volumes=len(payloads)))
            await bridge.ready.wait()
            writer = threading.Thread(target=write_all, daemon=True)
            writer.start()
            await asyncio.wait_for(task, timeout=len(payloads) * (interval + 2.0) + 30)
            writer.join()

        asyncio.run(main())
    records = bridge.counters.records
    skip = 3  # the first volumes build the reference and warm caches
    rows = records[skip:]
    total = [(r.pushed - written[r.path]) * 1e3 for r in rows]
    read = [(r.arrived - written[r.path]) * 1e3 for r in rows]
    reg = [r.processed.registration_ms for r in rows]
    roi = [r.processed.roi_ms for r in rows]
    rest = [t - a - b - c for t, a, b, c in zip(total, read, reg, roi, strict=True)]
    result: dict[str, object] = {
        "grid": f"{'x'.join(map(str, shape))} at {voxel:g} mm",
        "volumes": len(rows),
        "total_ms": {"p50": pct(total, 50), "p99": pct(total, 99), "max": round(max(total), 2)},
        "read_ms": {"p50": pct(read, 50), "p99": pct(read, 99)},
        "registration_ms": {"p50": pct(reg, 50), "p99": pct(reg, 99)},
        "roi_means_ms": {"p50": pct(roi, 50), "p99": pct(roi, 99)},
        "other_ms": {"p50": pct(rest, 50), "p99": pct(rest, 99)},
        "bar_p99_ms": BARS_P99_MS[grid],
        "ratio_bar_over_p99": round(BARS_P99_MS[grid] / pct(total, 99), 2),
        "flagged_fd": sum(r.processed.fd_exceeded for r in records),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=120, help="volumes per grid")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between files")
    args = parser.parse_args(argv)
    from emorecog_stream.adapters.lsl_log import quiet_liblsl

    quiet_liblsl()
    out = {}
    for grid in ("3mm", "2mm"):
        out[grid] = run_grid(grid, args.volumes, args.interval)
        r = out[grid]
        print(
            f"{r['grid']}: file written -> ROI pushed p50 {r['total_ms']['p50']} ms,"  # type: ignore[index]
            f" p99 {r['total_ms']['p99']} ms (bar {r['bar_p99_ms']} ms);"  # type: ignore[index]
            f" read p50 {r['read_ms']['p50']}, registration p50 {r['registration_ms']['p50']},"  # type: ignore[index]
            f" ROI means p50 {r['roi_means_ms']['p50']} ms",  # type: ignore[index]
            file=sys.stderr,
        )
    print(json.dumps({"benchmark": "scanner_bridge", "results": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
