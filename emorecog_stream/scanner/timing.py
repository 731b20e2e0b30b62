"""When a volume was acquired, on the LSL clock.

The scanner's trigger pulse (one per volume, streamed on LSL by the stimulus PC) is the best
reference: pulse *n* of a run is volume *n* of that run. Without triggers the only clue is when
the file arrived, which is the end of the acquisition plus the reconstruction and transfer time
(a few hundred milliseconds, steady for a given protocol): the lab measures it once and gives
it as ``recon_delay``.

Runs of pulses are told apart by silence: a pause longer than ``run_gap_trs`` TRs ends a run.
A volume is matched with the most recent run of pulses that began before its file arrived.
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
        self._segment_run: dict[int, int] = {}  # bridge segment -> run number

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
        """The timestamp of volume ``index`` (0-based) of bridge segment ``segment``."""
        fallback = arrived - self.recon_delay
        run = self._segment_run.get(segment)
        if run is None:
            # the latest run that began before this segment's first file arrived
            starts = [self._pulses[i] for i in self._run_starts]
            run = bisect.bisect_right(starts, arrived) - 1
            if run < 0:
                return VolumeTime(fallback, "arrival", "no trigger pulse before this run")
            self._segment_run[segment] = run
        begin = self._run_starts[run]
        end = self._run_starts[run + 1] if run + 1 < len(self._run_starts) else len(self._pulses)
        if index < 0 or begin + index >= end:
            return VolumeTime(
                fallback,
                "arrival",
                f"no trigger pulse {index + 1} in this run (it has {end - begin} so far)",
            )
        return VolumeTime(self._pulses[begin + index], "trigger")
