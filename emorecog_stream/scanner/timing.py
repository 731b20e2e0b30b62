"""When a volume was acquired, on the LSL clock.

The scanner's trigger pulse (one per volume, streamed on LSL by the stimulus PC) is the best
reference: pulse *n* of a run is volume *n* of that run. Without triggers the only clue is when
the file arrived, which is the end of the acquisition plus the reconstruction and transfer time
(a few hundred milliseconds, steady for a given protocol): the lab measures it once and gives
it as ``recon_delay``.

Runs of pulses are told apart by silence: a pause longer than ``run_gap_trs`` TRs ends a run.
The first volume a segment shows is matched by time: its file arrives one TR (the acquisition)
plus the reconstruction delay after its pulse, so its pulse is the last one before
``arrival - recon_delay - TR / 2``. That fixes the segment's offset between file numbers and
pulse numbers (exports count from 0 or 1, and the bridge may start in the middle of a run);
every later volume of the segment takes the pulse its number says, however late its file.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class VolumeTime:
    """A volume's LSL timestamp and where it came from."""

    timestamp: float
    source: str  # "trigger" or "arrival"
    note: str = ""  # why the trigger could not be used, when it could not


class TriggerClock:
    """Pulse timestamps of the scanner's trigger stream, grouped into runs."""

    def __init__(self, tr: float, run_gap_trs: float = 3.0, recon_delay: float = 0.0) -> None:
        if not tr > 0:
            raise ValueError(f"tr: expected a positive number of seconds, got {tr}")
        self.tr = float(tr)
        self.run_gap = run_gap_trs * self.tr
        self.recon_delay = float(recon_delay)
        self._pulses: list[float] = []
        self._run_starts: list[int] = []  # index into _pulses where each run begins
        # bridge segment -> (pulse index minus volume number, run number)
        self._segment_anchor: dict[int, tuple[int, int]] = {}

    @property
    def pulses(self) -> int:
        return len(self._pulses)

    def add_pulses(self, timestamps: list[float]) -> None:
        """Record pulses in time order (late or repeated ones are ignored)."""
        for t in timestamps:
            if self._pulses and t <= self._pulses[-1]:
                continue
            if not self._pulses or t - self._pulses[-1] > self.run_gap:
                self._run_starts.append(len(self._pulses))
            self._pulses.append(float(t))

    def volume_time(self, segment: int, index: int, arrived: float) -> VolumeTime:
        """The timestamp of the volume numbered ``index`` in bridge segment ``segment``."""
        fallback = arrived - self.recon_delay
        anchor = self._segment_anchor.get(segment)
        if anchor is None:
            at = bisect.bisect_right(self._pulses, arrived - self.recon_delay - self.tr / 2) - 1
            if at < 0:
                return VolumeTime(fallback, "arrival", "no trigger pulse before this volume")
            anchor = (at - index, self._run_of(at))
            self._segment_anchor[segment] = anchor
        offset, run = anchor
        pulse = index + offset
        end = (
            self._run_starts[run + 1] if run + 1 < len(self._run_starts) else len(self._pulses)
        )
        if not self._run_starts[run] <= pulse < end:
            return VolumeTime(
                fallback,
                "arrival",
                f"no trigger pulse for volume {index} in this run (it has"
                f" {end - self._run_starts[run]} pulses so far)",
            )
        return VolumeTime(self._pulses[pulse], "trigger")

    def _run_of(self, pulse: int) -> int:
        return bisect.bisect_right(self._run_starts, pulse) - 1
