"""A whole scanner session on one machine: ``scanner-sim`` -> bridge -> (the engine).

``demo --scanner`` uses it. The simulator writes a synthetic session's fMRI as volume files into
a temporary export folder at TR pace; the real bridge (events, registration, ROI means) turns
them into the ``fMRI`` and ``Motion`` streams; the same session's PPG, respiration and trial
markers are replayed on LSL alongside, on the same clock, so the engine sees what it would see
in a lab: a scanner's volumes with the lab's physiology beside them.

Clocks: session time ``first_volume_timestamp`` (where volume 0's acquisition starts) is put at
the same LSL time for the simulator and the physiology replay; the bridge stamps each volume
with its file's arrival minus one TR and the simulated reconstruction delay, which is its
acquisition start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pylsl

from emorecog_stream.core.streams import Role
from emorecog_stream.scanner import sim
from emorecog_stream.scanner.bridge import BridgeSettings, ScannerBridge

#: Seconds between the engine being ready and the first volume's acquisition.
LEAD_S = 1.0


class ScannerRehearsal:
    """Simulated scanner + bridge + physiology replay for one session."""

    def __init__(
        self,
        session: Any,
        *,
        tag: str,
        speed: float = 1.0,
        fmt: str = "dicom",
        say: Callable[[str], None] = print,
        workdir: str | Path | None = None,
    ) -> None:
        from emorecog_stream.adapters.replay import Replayer

        self.session = session
        self.speed = float(speed)
        self.say = say
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="emorecog-scanner-")) if workdir is None \
            else Path(workdir)
        self.export = self.workdir / "export"
        self.export.mkdir(parents=True, exist_ok=True)
        self.rehearsal = sim.prepare(session, sim.SimSettings(fmt=fmt))
        self.rehearsal.write_truth(self.workdir)
        self.writer = sim.ScannerSim(
            self.export, self.rehearsal, speed=self.speed, clock=pylsl.local_clock
        )
        tr = self.rehearsal.tr
        self.bridge = ScannerBridge(
            BridgeSettings(
                watch_dir=str(self.export),
                atlas=str(self.workdir / "atlas.nii.gz"),
                label_table=str(self.workdir / "atlas_labels.txt"),
                tr=tr,
                tag=tag,
                speed=self.speed,
                recon_delay=(tr + self.writer.delay_s) / self.speed,
            ),
            say=self._bridge_line,
        )
        roles = [Role.PPG, Role.RESP, Role.MARKERS]
        self.replayer = Replayer(
            session, speed=self.speed, tag=tag, roles=roles, require_fmri=False
        )
        self._task: asyncio.Task | None = None

    def _bridge_line(self, line: str) -> None:
        # one line per volume would bury the dashboard: only what the user should hear
        if not line.startswith("   volume"):
            self.say(f"scanner: {line}")

    async def start_bridge(self) -> None:
        """Watch the export folder and open the bridge's outlets (before the engine looks)."""
        self.replayer.open()
        self._task = asyncio.create_task(self.bridge.run())
        ready = asyncio.ensure_future(self.bridge.ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()  # the bridge could not start: raise its error
        self.say(
            f"scanner: simulated {self.rehearsal.settings.fmt} export in {self.export}"
            f" ({'x'.join(map(str, self.rehearsal.shape))}, TR {self.rehearsal.tr:g} s)"
        )

    def start_acquisition(self, consumers_timeout: float = 10.0) -> None:
        """Start the scan (blocking; call from a worker thread once the engine is running)."""
        self.replayer.wait_for_consumers([Role.PPG, Role.RESP], timeout=consumers_timeout)
        # the replay's time origin: its earliest sample or marker, fMRI included
        starts = [float(s.timestamps[0]) for s in self.session.streams if len(s)]
        t0 = min(starts + [m.timestamp for m in self.session.markers])
        first_volume = float(self.session.fmri.timestamps[0])
        lead_in = max(0.0, (first_volume - t0) / self.speed)
        origin = pylsl.local_clock() + LEAD_S + lead_in  # session volume 0 starts here
        dummies = self.rehearsal.settings.dummies * self.rehearsal.tr / self.speed
        self.writer.start(start_at=origin - dummies)
        self.replayer.start(delay=origin - lead_in - pylsl.local_clock())

    def join(self, timeout: float | None = None) -> None:
        """Wait for the simulated run to end (blocking)."""
        self.writer.join(timeout)

    @property
    def done(self) -> bool:
        return self.writer.origin is not None and not self.writer.running

    async def aclose(self) -> None:
        await asyncio.to_thread(self.writer.stop, 5.0)
        await asyncio.to_thread(self.replayer.stop)
        self.bridge.stop()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10.0)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
