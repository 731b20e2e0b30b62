"""How often a volume reaches the engine before its motion sample, by the bridge's push gap.

The scanner bridge pushes a volume's ``Motion`` sample just before the volume's fMRI sample,
with the same timestamp. The engine reads the two streams with two inlets (one reader thread
each), so a motion sample can reach the event loop after its volume; when no physiology holds
the step back, that volume's framewise displacement is then unknown (``motion_missing``): the
engine never waits for it. This measures that fraction through the engine's own input layer
(``InletGroup``, real outlets on loopback) for several gaps between the two pushes, side by
side in one run, so the bridge can choose how early to push motion.

    python benchmarks/bench_motion_order.py [--volumes 300] [--gaps-ms 0,1,5] [--period-ms 20]

Last line: one JSON object {"volumes": N, "late_fraction": {"0": f, "1": f, ...}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid

import numpy as np
import pylsl

from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.adapters.lsl_inlet import Chunk, InletGroup, InletSpec
from emorecog_stream.core.streams import MOTION_CHANNELS, N_ROIS, Role

MATCH = 0.01  # the engine's motion.MATCH_TOLERANCE_S


async def measure(volumes: int, gap_s: float, period_s: float) -> int:
    """Volumes whose motion sample had not reached the loop when the volume did."""
    tag = "order" + uuid.uuid4().hex[:6]
    outlets = {}
    for role, channels in ((Role.FMRI, N_ROIS), (Role.MOTION, len(MOTION_CHANNELS))):
        name, type_, source_id = stream_identity(role, tag)
        info = pylsl.StreamInfo(name, type_, channels, 1 / period_s, pylsl.cf_float32, source_id)
        outlets[role] = pylsl.StreamOutlet(info)
    specs = [InletSpec.for_role(Role.FMRI, tag), InletSpec.for_role(Role.MOTION, tag)]
    group = InletGroup(specs)
    await group.open(10.0)

    def push() -> None:
        for outlet in outlets.values():
            outlet.wait_for_consumers(10.0)
        time.sleep(0.5)
        roi = np.zeros(N_ROIS, dtype=np.float32)
        for k in range(volumes):
            t = pylsl.local_clock()
            outlets[Role.MOTION].push_sample([0.0] * 6 + [float(k)], t)
            if gap_s:
                time.sleep(gap_s)
            outlets[Role.FMRI].push_sample(roi, t)
            time.sleep(period_s)

    threading.Thread(target=push, daemon=True).start()
    motion: list[float] = []
    late = seen = 0
    async for item in group:
        if not isinstance(item, Chunk):
            continue
        if item.role is Role.MOTION:
            motion.extend(float(t) for t in item.timestamps)
            continue
        for t in item.timestamps:
            seen += 1
            if not any(abs(m - float(t)) <= MATCH for m in motion[-50:]):
                late += 1
        if seen >= volumes:
            break
    await group.close()
    return late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300)
    parser.add_argument("--gaps-ms", default="0,1,5")
    parser.add_argument("--period-ms", type=float, default=20.0)
    args = parser.parse_args()
    gaps = [float(g) for g in args.gaps_ms.split(",")]
    late = {}
    for gap in gaps:
        n = asyncio.run(measure(args.volumes, gap / 1000.0, args.period_ms / 1000.0))
        late[f"{gap:g}"] = round(n / args.volumes, 4)
        print(f"gap {gap:g} ms: {n} of {args.volumes} volumes before their motion sample")
    print(
        json.dumps(
            {
                "volumes": args.volumes,
                "late_fraction": late,
                "period_ms": args.period_ms,
                "load_average": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
