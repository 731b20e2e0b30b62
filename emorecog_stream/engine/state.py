"""The engine's bookkeeping between the aligner and the model (pure, no I/O).

Two small state machines live here so they can be tested without sockets or an event loop:

* :class:`SessionTracker` numbers the aligned steps (a ``tr_index`` that restarts with each
  session) and decides when the model's
  recurrent state must be reset: a gap between volumes longer than ``reset_gap_trs`` TRs means
  the scan stopped and started again, and carrying a GRU state across it would mix two runs.
* :class:`StatusTracker` turns the arrival times of each stream into the engine status that
  subscribers see (``starting``, ``online``, ``degraded``, ``paused``) with a reason in words, and
  says when that status could next change, so the engine can sleep until then instead of ticking.

Times are seconds on the engine's clock (the LSL clock, scaled by the replay speed when the
engine is told its input is a sped-up replay).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from emorecog_stream.core.streams import Role

#: What each physiology role feeds; a stalled role makes these rates missing.
ROLE_RATES: dict[Role, tuple[str, ...]] = {
    Role.PPG: ("heart_rate",),
    Role.RESP: ("respiration_rate",),
    Role.RATES: ("heart_rate", "respiration_rate"),
}

ROLE_LABEL: dict[Role, str] = {
    Role.FMRI: "fMRI",
    Role.PPG: "PPG",
    Role.RESP: "respiration",
    Role.RATES: "physiology rates",
    Role.MARKERS: "markers",
    Role.MOTION: "motion",
}


@dataclass(frozen=True)
class Admission:
    """How one aligned step enters the model: its TR index and whether the state resets first."""

    tr_index: int
    reset: bool  # reset the model state before this step (a new session segment starts)
    gap_s: float | None  # the gap that caused the reset, seconds


class SessionTracker:
    """Sequence numbers, TR indices and GRU resets for a stream of aligned volumes.

    ``tr`` is the configured TR (seconds) or None; then the fMRI stream's nominal rate is used
    (:meth:`set_nominal_tr`), and failing that the median of recent volume intervals.
    """

    def __init__(self, reset_gap_trs: float, tr: float | None = None) -> None:
        if not reset_gap_trs > 0:
            raise ValueError(f"reset_gap_trs must be > 0, got {reset_gap_trs}")
        self.reset_gap_trs = float(reset_gap_trs)
        self._configured_tr = tr
        self._nominal_tr: float | None = None
        self._intervals: deque[float] = deque(maxlen=9)
        self._last_timestamp: float | None = None
        self._tr_index = -1
        self.resets = 0
        self.sessions = 0

    def set_nominal_tr(self, tr: float | None) -> None:
        self._nominal_tr = tr if tr is not None and tr > 0 and math.isfinite(tr) else None

    @property
    def tr(self) -> float | None:
        """The TR in use: configured, else nominal, else measured; None before it is known."""
        if self._configured_tr is not None:
            return self._configured_tr
        if self._nominal_tr is not None:
            return self._nominal_tr
        if self._intervals:
            return statistics.median(self._intervals)
        return None

    @property
    def last_timestamp(self) -> float | None:
        return self._last_timestamp

    def admit(self, timestamp: float) -> Admission:
        """Number the volume at ``timestamp`` (volumes come in time order from the aligner)."""
        reset = False
        gap: float | None = None
        if self._last_timestamp is None:
            self.sessions += 1
            self._tr_index = 0
        else:
            interval = timestamp - self._last_timestamp
            tr = self.tr
            if tr is not None and interval > self.reset_gap_trs * tr:
                reset, gap = True, interval
                self.resets += 1
                self.sessions += 1
                self._tr_index = 0
            else:
                if interval > 0:
                    self._intervals.append(interval)
                self._tr_index += 1
        self._last_timestamp = timestamp
        return Admission(self._tr_index, reset, gap)


@dataclass(frozen=True)
class EngineStatus:
    """What the status topic says: a state from ``sinks.payload.STATUS_STATES`` and why."""

    state: str
    reason: str = ""
    missing: tuple[str, ...] = ()  # rates made missing by stalled/absent streams
    stalled: tuple[Role, ...] = ()  # the physiology streams that are not delivering


class StatusTracker:
    """Derives the engine status from when each stream last delivered a sample.

    * no fMRI volume yet: ``starting``;
    * fMRI silent for more than ``fmri_stall_trs`` TRs: ``paused`` (no volume, no prediction);
    * an expected physiology stream silent for more than ``stall_timeout`` s, or never found:
      ``degraded``, with the rates it feeds reported missing;
    * otherwise ``online``.
    """

    def __init__(
        self,
        physio_roles: list[Role],
        *,
        stall_timeout: float,
        fmri_stall_trs: float,
        started_at: float,
    ) -> None:
        self.physio_roles = [r for r in physio_roles if r in ROLE_RATES]
        self.stall_timeout = float(stall_timeout)
        self.fmri_stall_trs = float(fmri_stall_trs)
        self.started_at = float(started_at)
        self.last_arrival: dict[Role, float] = {}
        self.absent: dict[Role, str] = {}  # roles known to be unavailable, with the reason
        self.first_fmri: float | None = None

    def arrived(self, role: Role, now: float, tr: float | None = None) -> bool:
        """Note that ``role`` delivered at ``now``; returns whether that can change
        :meth:`status` (the role's first sample, a return from absence, or a silence long
        enough to have counted as a stall). The usual arrival - a stream that keeps
        delivering - cannot, so the engine skips recomputing the status for it: that was
        a tenth of a busy hub's time. Changes that come with time alone (a stream falling
        silent) are the engine timer's, armed at :meth:`next_change`."""
        previous = self.last_arrival.get(role)
        if role is Role.FMRI:
            if self.first_fmri is None:
                self.first_fmri = now
            limit = self.fmri_stall_trs * tr if tr is not None else 0.0
        else:
            limit = self.stall_timeout
        self.last_arrival[role] = now
        was_absent = self.absent.pop(role, None) is not None
        return previous is None or was_absent or now - previous > limit

    def mark_absent(self, role: Role, reason: str) -> None:
        self.absent[role] = reason

    def stalled_roles(self, now: float) -> dict[Role, str]:
        """Physiology roles that are not delivering, each with the reason in words."""
        out: dict[Role, str] = {}
        since = self._since()
        for role in self.physio_roles:
            label = ROLE_LABEL[role]
            if role in self.absent:
                out[role] = self.absent[role]
                continue
            last = self.last_arrival.get(role)
            if last is None:
                if now - since > self.stall_timeout:
                    out[role] = f"no {label} sample since the session started"
            elif now - last > self.stall_timeout:
                out[role] = (
                    f"{label} stream stalled: no sample for more than {self.stall_timeout:g} s"
                )
        return out

    def _since(self) -> float:
        """When a physiology stream that never delivered starts to count as missing: from the
        first volume (the session start), or from the engine start while no volume came."""
        return self.first_fmri if self.first_fmri is not None else self.started_at

    def status(self, now: float, tr: float | None) -> EngineStatus:
        last_fmri = self.last_arrival.get(Role.FMRI)
        if last_fmri is None:
            reason = self.absent.get(Role.FMRI, "waiting for the fMRI stream")
            return EngineStatus("starting", reason)
        stalled = self.stalled_roles(now)
        missing = self._missing_rates(stalled)
        silent = now - last_fmri
        if tr is not None and silent > self.fmri_stall_trs * tr:
            reason = (
                f"fMRI stream stalled: no volume for more than {self.fmri_stall_trs:g} TRs"
                f" ({self.fmri_stall_trs * tr:.3g} s): predictions paused"
            )
            if stalled:
                reason += "; " + "; ".join(stalled.values())
            return EngineStatus("paused", reason, missing, tuple(stalled))
        if stalled:
            names = " and ".join(m.replace("_", " ") for m in missing)
            reason = "; ".join(stalled.values())
            reason += f": {names} missing" if missing else " (rates still come from elsewhere)"
            return EngineStatus("degraded", reason, missing, tuple(stalled))
        return EngineStatus("online", "")

    def _missing_rates(self, stalled: dict[Role, str]) -> tuple[str, ...]:
        """Rates whose every feeding stream is stalled (PPG down but a rates stream up: the
        heart rate still comes from the rates stream)."""
        missing = []
        for rate in ("heart_rate", "respiration_rate"):
            feeders = [r for r in self.physio_roles if rate in ROLE_RATES[r]]
            if feeders and all(r in stalled for r in feeders):
                missing.append(rate)
        return tuple(missing)

    def next_change(self, now: float, tr: float | None) -> float | None:
        """The earliest time at which :meth:`status` could change without new data arriving."""
        times: list[float] = []
        last_fmri = self.last_arrival.get(Role.FMRI)
        if last_fmri is not None and tr is not None:
            times.append(last_fmri + self.fmri_stall_trs * tr)
        for role in self.physio_roles:
            if role in self.absent:
                continue
            last = self.last_arrival.get(role)
            times.append((last if last is not None else self._since()) + self.stall_timeout)
        future = [t for t in times if t > now]
        return min(future) if future else None
