"""The live pipeline: chunks in -> aligner -> model stepper -> outputs, all on one event loop.

Why it is shaped like this:

* **Reacting, not ticking.** Work happens in :meth:`Engine.process_chunk`, called for every chunk
  an inlet delivers, and in one timer armed for the earliest moment something can happen
  without new data (the aligner's next deadline, a stream going stale, the end of
  ``--duration``). A polling tick would add up to one tick of latency to every prediction.
* **One clock.** Sample timestamps, deadlines and stall timeouts are on the LSL clock. When the
  input is a replay sped up ``time_scale`` times (``demo``, tests), the engine stretches the
  clock back by that factor on the way in, so windows, heart rates, deadlines and stall timeouts
  mean what they mean in a real scan; published volume timestamps are the original LSL ones.
* **Missing is explicit.** A physiology stream that stops makes its rates missing (NaN into
  the model, ``null`` with a false valid flag in the payload, a flag in ``flags``) and the status
  ``degraded`` with the reason; a stalled fMRI stream pauses predictions (``paused``). A chunk
  that does not fit (wrong channel count, wrong shape) is rejected and reported, never a crash;
  non-finite ROI values are replaced by the aligner and flagged.
* **Head motion beside, not in, the model.** A ``Motion`` stream (the scanner bridge's) is
  matched to each volume by timestamp (:mod:`emorecog_stream.core.motion`); its framewise
  displacement rides on the prediction, and a volume above ``fd_threshold`` is flagged
  ``motion``. A prediction whose volume's motion sample has not arrived yet is held back (its
  model step is not) for at most :data:`MOTION_WAIT_S`, in order: a volume above the threshold
  must not go out unflagged because two inlets raced.
* **Slow models off the loop.** The shipped NumPy stepper (~0.04 ms) steps inline; any other
  model (Keras v1: ~55 ms a step) steps in one worker thread, in order, and its predictions are
  numbered and published in that order when they come back (``[engine] model_thread``).
* **Outputs never block.** Every :class:`Output` takes a prediction synchronously and queues
  the slow part (network, terminal) itself; latency is measured from the moment the step became
  ready (the chunk that completed it arrived, or its deadline fell) to the hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from emorecog_stream.config import Config
from emorecog_stream.core.aligner import Aligner, AlignerConfig
from emorecog_stream.core.messages import AlignedStep, Prediction
from emorecog_stream.core.motion import MotionSample, MotionTrack
from emorecog_stream.core.streams import CATEGORY_LABELS, MOTION_CHANNELS, N_ROIS, Role
from emorecog_stream.engine.state import (
    ROLE_LABEL,
    ROLE_RATES,
    EngineStatus,
    SessionTracker,
    StatusTracker,
)
from emorecog_stream.engine.telemetry import EngineSnapshot, StreamState, TelemetryRecorder
from emorecog_stream.model.api import StepOutput, StreamingModel
from emorecog_stream.sinks.payload import utc_now

if TYPE_CHECKING:
    from emorecog_stream.engine.batch import StepBatch

log = logging.getLogger(__name__)

_EXPECTED_CHANNELS: dict[Role, int] = {
    Role.FMRI: N_ROIS,
    Role.PPG: 1,
    Role.RESP: 1,
    Role.RATES: 2,
    Role.MOTION: len(MOTION_CHANNELS),
}


class Output(Protocol):
    """Where predictions go. Methods other than ``aclose`` must return quickly (queue work)."""

    def on_prediction(self, prediction: Prediction, step: AlignedStep) -> None: ...

    def on_status(self, status: EngineStatus) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Chunk:
    """What the engine consumes: samples of one role with their LSL timestamps.

    ``received`` is the LSL-clock time the chunk reached this process (for latency); markers
    carry strings in ``data``. The LSL inlets' own chunk type has the same attributes.
    """

    role: Role
    data: Any
    timestamps: np.ndarray
    received: float


@dataclass
class EngineCounters:
    """What happened during a run (also shown in the final summary of ``run``/``demo``)."""

    chunks: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    rejected_chunks: int = 0
    steps: int = 0
    predictions: int = 0
    warming_up: int = 0  # steps a windowed model answered with ready=False
    resets: int = 0
    model_errors: int = 0
    deadline_steps: int = 0
    markers: int = 0
    rejected_volumes: int = 0  # fMRI volumes not after the previous one (repeated, clock back)
    motion_flagged: int = 0  # predictions flagged "motion" (FD above the threshold)
    motion_missing: int = 0  # steps ready before their motion sample (FD unknown)


#: Seconds (LSL clock) a sample may be stamped ahead of its arrival before it is refused.
FUTURE_TOLERANCE_S = 5.0

#: Engine seconds a finished step waits for its volume's motion sample before it is published
#: with ``motion_missing``. The bridge pushes motion first, so the wait is normally zero; it
#: covers the two inlets' reader threads racing (measured: benchmarks/bench_motion_order.py).
MOTION_WAIT_S = 0.25

#: Model steps slower than this (seconds, three in a row) move to the model thread under "auto".
SLOW_STEP_S = 0.002


def is_light_stepper(stepper: Any) -> bool:
    """The shipped EmoRecog-Net's NumPy stepper (~0.04 ms a step): stepping it inline costs
    less than a hop to a thread and back. Any other stepper is assumed heavy."""
    from emorecog_stream.model.stepper import NetStepper

    return isinstance(stepper, NetStepper)


@dataclass(frozen=True)
class _PendingStep:
    """An aligned step on its way through the model, with what the engine decided for it."""

    step: AlignedStep
    tr_index: int
    reset: bool
    flags: tuple[str, ...]
    ready_at: float  # LSL clock
    motion: MotionSample | None = None
    motion_due: float = -math.inf  # engine time until which publication waits for motion


class InputError(ValueError):
    """A chunk that cannot be used; the message names the stream, what was expected and found."""


class Engine:
    """Runs one engine session; see the module docstring for the design.

    ``clock`` is the LSL clock (``pylsl.local_clock``) unless a test supplies another.
    ``time_scale`` is the replay speed of the input (1 for live streams).
    """

    def __init__(
        self,
        config: Config,
        model: StreamingModel,
        outputs: Sequence[Output] = (),
        *,
        time_scale: float = 1.0,
        clock: Callable[[], float] | None = None,
        broker_url: str | None = None,
        step_batch: StepBatch | None = None,
    ) -> None:
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale must be a positive number, got {time_scale}")
        if clock is None:
            from emorecog_stream.adapters.lsl_clock import local_clock

            clock = local_clock
        self.config = config
        self.model = model
        self.model_id = str(model.model_id)
        # a hub's engines step together (engine/batch.py); a lone engine steps inline
        self.step_batch = step_batch
        self.slot = step_batch.slot() if step_batch is not None else None
        self.stepper = self.slot.stepper if self.slot is not None else model.stepper()
        self.outputs = list(outputs)
        self.time_scale = float(time_scale)
        self.clock = clock
        self._origin = clock()
        self.session_id = config.session.id
        self.physio_roles = [r for r in config.streams.enabled_roles() if r in ROLE_RATES]
        self.aligner = make_aligner(config)
        self.session = SessionTracker(config.engine.reset_gap_trs, config.engine.tr)
        now = self.now()
        self.status_tracker = StatusTracker(
            self.physio_roles,
            stall_timeout=config.engine.stall_timeout,
            fmri_stall_trs=config.engine.fmri_stall_trs,
            started_at=now,
        )
        self.telemetry = TelemetryRecorder(
            session_id=self.session_id,
            model_id=self.model_id,
            broker_url=broker_url,
            started_at=self.clock(),  # telemetry works on the LSL clock, unscaled
        )
        self.counters = EngineCounters()
        self.status = EngineStatus("starting", "waiting for the fMRI stream")
        self._input_errors: dict[Role, str] = {}
        self._output_problems: dict[str, str] = {}  # e.g. the session log cannot be written
        self._last_volume = -math.inf  # LSL timestamp of the last fMRI volume taken
        self.start_note = ""  # said in the `starting` status, e.g. a restart after a crash
        self._sequence = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stop_at: float | None = None  # engine time
        self._closed = False
        self.last_step: AlignedStep | None = None
        self._thread_mode = config.engine.model_thread
        self._offload = self._thread_mode == "always" or (
            self._thread_mode == "auto" and not is_light_stepper(self.stepper)
        )
        self._slow_steps = 0
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[_PendingStep, asyncio.Future[Any]]] = deque()
        self.motion = MotionTrack()
        self.fd_threshold = config.engine.fd_threshold
        self._motion_stream = False  # a Motion stream was found: a volume without FD is flagged
        # finished steps not yet published: the head waits for its motion sample (in order)
        self._held: deque[tuple[_PendingStep, StepOutput | BaseException]] = deque()

    # -- time -----------------------------------------------------------------------------

    def to_engine(self, t: float) -> float:
        """LSL time -> engine time (identity for live input)."""
        if self.time_scale == 1.0:
            return t
        return self._origin + (t - self._origin) * self.time_scale

    def to_lsl(self, t: float) -> float:
        """Engine time -> LSL time."""
        if self.time_scale == 1.0:
            return t
        return self._origin + (t - self._origin) / self.time_scale

    def now(self) -> float:
        """The current engine time."""
        return self.to_engine(self.clock())

    # -- registration -----------------------------------------------------------------------

    def register_stream(self, role: Role, name: str, nominal_rate: float) -> None:
        """Tell the engine about a resolved stream (nominal rate as declared by the outlet).

        A replay sped up ``time_scale`` times declares its rates scaled by that factor, so the
        TR on the engine's clock is ``time_scale / nominal_rate``.
        """
        self.telemetry.add_stream(role.value, name, max(0.0, float(nominal_rate)))
        if role is Role.MOTION:
            self._motion_stream = True
            self.telemetry.fd_threshold = self.fd_threshold
        if role is Role.FMRI and nominal_rate > 0:
            self.session.set_nominal_tr(self.time_scale / nominal_rate)
        if role in (Role.PPG, Role.RESP) and nominal_rate > 0:
            try:
                self.aligner.set_srate(role, nominal_rate / self.time_scale)
            except ValueError as exc:
                # a stream that reconnects declaring another rate: its samples already in
                # the buffer were taken at the first one, which stays in use
                log.warning("%s: %s", label_of(role), exc)
            self._set_waiting()

    def continue_from(self, sequence: int, note: str = "") -> None:
        """Number the next prediction ``sequence`` (a restart on an earlier run's log: a
        subscriber de-duplicating on ``sequence`` must never see a number reused for another
        volume); ``note`` goes into the ``starting`` status (e.g. "restarted after an unclean
        stop"). Call before :meth:`run`."""
        if sequence < 0:
            raise ValueError(f"sequence must be >= 0, got {sequence}")
        self._sequence = int(sequence)
        self.start_note = note
        if self.status.state == "starting" and note:
            self.status = replace(self.status, reason=f"{note}; {self.status.reason}")

    def set_output_problem(self, name: str, reason: str | None) -> None:
        """An output that cannot do its job (the session log cannot be written): the status
        says so (``degraded``, ``reason`` appended) until it is cleared with ``None``.
        Predictions go on: the problem is in the record, not in the data."""
        if reason:
            self._output_problems[name] = reason
        else:
            self._output_problems.pop(name, None)
        self._update_status()

    def stream_absent(self, role: Role, reason: str) -> None:
        """A configured stream is not available (not found at start, or lost for good).

        A motion stream that breaks its spec (e.g. the wrong channel count) is reported like a
        rejected chunk: status ``degraded`` with the reason, until good motion samples come.
        """
        if role is Role.MOTION:
            self._input_errors[role] = f"{reason}: framewise displacement unknown"
            log.warning("%s", self._input_errors[role])
        else:
            self.status_tracker.mark_absent(role, reason)
        self._update_status()

    # -- the hot path -------------------------------------------------------------------------

    def process_chunk(
        self, role: Role, data: Any, timestamps: Any, received: float | None = None
    ) -> list[Prediction]:
        """Take one chunk, emit every step it completes; returns the predictions made."""
        received = self.clock() if received is None else float(received)
        self.counters.chunks += 1
        if role is Role.MARKERS:
            self._markers(data, timestamps)
            return []
        note = ""  # part of the chunk was left out: said in the status with the rest kept
        try:
            values, stamps = self._check_chunk(role, data, timestamps)
            self._check_clock(role, stamps, received)
            if role is Role.FMRI and stamps.size:
                values, stamps, note = self._new_volumes(values, stamps)
            elif role in (Role.PPG, Role.RESP):
                self._check_physio_rate(role, stamps)
        except InputError as exc:
            self.counters.rejected_chunks += 1
            self._input_errors[role] = str(exc)
            log.warning("%s", exc)
            self._update_status()
            self._reschedule()
            return []
        if stamps.size == 0:
            return []
        cleared = self._input_errors.pop(role, None) is not None
        if note:
            self._input_errors[role] = note
        self.counters.samples[role.value] = self.counters.samples.get(role.value, 0) + len(stamps)
        monitor = self.telemetry.monitors.get(role.value)
        if monitor is not None:
            monitor.add(stamps)
        if role is Role.MOTION:
            # not model input: kept on the LSL clock until its volume's step looks it up
            self.motion.push(values, stamps)
            self.status_tracker.arrived(role, self.to_engine(received))
            self._update_status()  # a good sample clears an earlier motion error
            made = self._release_held()
            self._reschedule()
            return made
        engine_stamps = stamps if self.time_scale == 1.0 else self.to_engine(stamps)
        try:
            self.aligner.push(role, values, engine_stamps)
        except ValueError as exc:  # e.g. a physiology stream that declares no sampling rate
            self.counters.rejected_chunks += 1
            self._input_errors[role] = f"{label_of(role)} chunk rejected: {exc}"
            log.warning("%s", self._input_errors[role])
            self._update_status()
            self._reschedule()
            return []
        fresh = self.status_tracker.arrived(role, self.to_engine(received), self.session.tr)
        if fresh or cleared or note:
            self._update_status()  # first: a stream coming back is waited for again
        predictions = self._poll(ready_at=received)
        self._reschedule()
        return predictions

    def _check_clock(self, role: Role, stamps: np.ndarray, received: float) -> None:
        """Samples stamped ahead of this machine's clock cannot be real (LSL corrects each
        sender's clock offset): a sender whose clock jumped forward. Without this check its
        volumes would wait an hour for their deadline, with the status still `online`."""
        if stamps.size and float(stamps.max()) > received + FUTURE_TOLERANCE_S:
            ahead = float(stamps.max()) - received
            raise InputError(
                f"{label_of(role)} chunk rejected: timestamps {ahead:.0f} s ahead of this"
                " machine's clock (the sender's clock jumped?)"
            )

    def _new_volumes(
        self, values: np.ndarray, stamps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Only volumes stamped after the last one taken: a volume sent twice (a duplicated or
        overlapping chunk) or a sender clock that went back (LSL's monotonize then repeats the
        last timestamp) would otherwise be predicted twice or silently dropped."""
        last = self._last_volume
        keep = np.empty(stamps.size, dtype=bool)
        for i, t in enumerate(stamps.tolist()):
            keep[i] = t > last
            last = max(last, t)
        note = ""
        if not keep.all():
            first_bad = float(stamps[~keep][0])
            note = (
                f"fMRI volume at {first_bad:.3f} s not after the previous one"
                f" ({self._last_volume if keep[0] else first_bad:.3f} s): a repeated volume or"
                " the sender's clock went back; not predicted again"
            )
            self.counters.rejected_volumes += int((~keep).sum())
            if not keep.any():
                raise InputError(note)
            log.warning("%s", note)
        self._last_volume = last
        return values[keep], stamps[keep], note

    def _check_physio_rate(self, role: Role, stamps: np.ndarray) -> None:
        """Samples spaced for another rate than the one their rate tracker uses are refused.

        Why: liblsl reconnects a sender that restarts with another sampling rate (same source_id)
        without a word, and it dejitters the timestamps of a chunk sent twice or overlapping the
        previous one into a faster stream. Either way the samples no longer fit the band-pass and
        windows of the tracker: the rate they would give could be wrong while looking valid. So
        a chunk (8 samples or more) whose timestamp spacing is more than 10 % off is rejected,
        counted and named in the status (the rate is then missing), never used."""
        if stamps.size < 8 or not srate_known(self.aligner, role):
            return
        fs = self.aligner.config.ppg_srate if role is Role.PPG else self.aligner.config.resp_srate
        if fs is None:
            return
        gaps = stamps[1:] - stamps[:-1]
        # this runs for every physiology chunk: the usual case is settled by counting. When no
        # more than (n - 1) // 2 spacings lie outside a band 1 % inside the accepted one, the
        # middle ones lie in it: the chunk is accepted without computing the median
        if fs > 0:
            lo = 1.0 / (1.09 * fs * self.time_scale)
            hi = 1.0 / (0.91 * fs * self.time_scale)
            inside = int(np.count_nonzero((gaps >= lo) & (gaps <= hi)))
            if inside >= gaps.size - (gaps.size - 1) // 2:
                return
        # the median spacing, as np.median(np.diff(stamps)) gives it (the same middle values,
        # averaged the same way)
        k = gaps.size // 2
        if gaps.size % 2:
            gaps.partition(k)
            middle = float(gaps[k])
        else:
            gaps.partition((k - 1, k))
            middle = float((gaps[k - 1] + gaps[k]) / 2.0)
        spacing = middle * self.time_scale  # engine seconds
        if not spacing > 0:
            return
        seen = 1.0 / spacing
        if abs(seen - fs) > 0.1 * fs:
            rates = " and ".join(r.replace("_", " ") for r in ROLE_RATES[role])
            raise InputError(
                f"{label_of(role)} chunk rejected: samples spaced for {seen:.4g} Hz, not the"
                f" {fs:g} Hz in use (the sender restarted with another rate, or duplicated or"
                f" overlapping chunks): {rates} not computed from them"
            )

    def _markers(self, data: Any, timestamps: Any) -> None:
        """Trial markers are not model input; outputs with ``on_marker`` (the audit log) get
        each one with its LSL timestamp, so predictions can be lined up with the stimuli."""
        stamps = np.atleast_1d(np.asarray(timestamps, dtype=np.float64))
        texts = [row[0] if isinstance(row, (list, tuple)) else row for row in list(data)]
        self.counters.markers += len(stamps)
        for output in self.outputs:
            hook = getattr(output, "on_marker", None)
            if hook is None:
                continue
            for t, text in zip(stamps.tolist(), texts, strict=False):
                try:
                    hook(float(t), str(text))
                except Exception:
                    log.exception("output %r failed on a marker", output)

    def _check_chunk(self, role: Role, data: Any, timestamps: Any) -> tuple[np.ndarray, np.ndarray]:
        label = label_of(role)
        try:
            values = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{label} chunk: expected numbers, found {exc}") from None
        stamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        want = _EXPECTED_CHANNELS[role]
        if values.ndim == 1 and want == 1:
            values = values[:, None]
        elif values.ndim == 1 and values.size == want and stamps.size == 1:
            values = values[None, :]
        if values.ndim != 2 or values.shape[1] != want:
            raise InputError(
                f"{label} chunk rejected: expected (samples, {want}) values,"
                f" found shape {values.shape}"
            )
        if values.shape[0] != stamps.size:
            raise InputError(
                f"{label} chunk rejected: {values.shape[0]} samples but {stamps.size} timestamps"
            )
        if not np.all(np.isfinite(stamps)):
            raise InputError(f"{label} chunk rejected: non-finite timestamps")
        return values, stamps

    def _poll(self, ready_at: float) -> list[Prediction]:
        """Emit every step the aligner has ready; returns the predictions made inline (steps
        handed to the model thread are published when they come back, see :meth:`_drain`)."""
        steps = self.aligner.poll(self.now())
        made: list[Prediction] = []
        for step in steps:
            pending = self._prepare(step, ready_at)
            if self.step_batch is not None and not self._closed:
                self.step_batch.submit(self, pending)  # answered in _finish_batched
                continue
            if self._use_thread():
                self._submit(pending)
                continue
            t0 = time.perf_counter()
            out = self._run_model(pending)
            self._note_step_time(time.perf_counter() - t0)
            made.extend(self._finish(pending, out))
        return made

    def _prepare(self, step: AlignedStep, ready_at: float) -> _PendingStep:
        """Everything about a step that depends on the engine's state at the time it is
        emitted (TR index, reset, flags, stalled rates): done on the loop, in order."""
        self.counters.steps += 1
        self.last_step = step
        if step.deadline_expired:
            self.counters.deadline_steps += 1
            # the step became ready when its deadline fell, not when we happened to look
            ready_at = min(ready_at, self.to_lsl(step.timestamp + self.config.aligner.deadline))
        admission = self.session.admit(step.timestamp)
        flags: list[str] = []
        if admission.reset:
            self.counters.resets += 1
            flags.append("state_reset")
        step = self._apply_stalls(step)
        if not step.heart_rate_valid:
            flags.append("heart_rate_missing")
        if not step.respiration_rate_valid:
            flags.append("respiration_rate_missing")
        if step.deadline_expired:
            flags.append("deadline_expired")
        if step.roi_nonfinite:
            flags.append("roi_nonfinite")
        if not step.roi_valid:
            flags.append("roi_invalid")
        motion = self.motion.match(self.to_lsl(step.timestamp))
        return _PendingStep(
            step,
            admission.tr_index,
            admission.reset,
            tuple(flags),
            ready_at,
            motion,
            motion_due=self.now() + MOTION_WAIT_S,
        )

    def _with_motion(self, pending: _PendingStep) -> _PendingStep:
        """The motion flags of a step about to be published: ``motion`` above the threshold,
        ``motion_missing`` (with a note) when a motion stream exists but the sample never came."""
        motion = pending.motion
        fd = None if motion is None else motion.framewise_displacement
        if fd is not None and fd > self.fd_threshold:
            self.counters.motion_flagged += 1
            return replace(pending, flags=(*pending.flags, "motion"))
        if motion is None and self._motion_stream:
            self.counters.motion_missing += 1
            note = (
                "framewise displacement unknown: the volume's motion sample had not arrived"
                f" {MOTION_WAIT_S:g} s after the step was ready"
            )
            return replace(
                pending,
                flags=(*pending.flags, "motion_missing"),
                step=replace(pending.step, notes=(*pending.step.notes, note)),
            )
        return pending

    def _release_held(self, force: bool = False) -> list[Prediction]:
        """Publish held steps from the head while their motion sample is there, or their wait
        is over (``force``: now, whatever is missing). Order is never changed."""
        made: list[Prediction] = []
        now = self.now()
        while self._held:
            pending, out = self._held[0]
            if pending.motion is None and self._motion_stream:
                motion = self.motion.match(self.to_lsl(pending.step.timestamp))
                if motion is not None:
                    pending = replace(pending, motion=motion)
                elif not force and now < pending.motion_due:
                    break
            self._held.popleft()
            prediction = self._publish(self._with_motion(pending), out)
            if prediction is not None:
                made.append(prediction)
        return made

    def _run_model(self, pending: _PendingStep) -> StepOutput | BaseException:
        """Reset (when due) and step the model; runs inline or in the model thread, never both
        at once (the thread has one worker and the engine picks one path per step, in order).
        A model that raises gives its exception back instead of taking the engine down."""
        step = pending.step
        hr = step.heart_rate if step.heart_rate_valid else math.nan
        rr = step.respiration_rate if step.respiration_rate_valid else math.nan
        try:
            if pending.reset:
                self.stepper.reset()
            return self.stepper.step(step.roi, hr, rr)
        except Exception as exc:
            return exc

    def _finish(
        self, pending: _PendingStep, out: StepOutput | BaseException
    ) -> list[Prediction]:
        """A model answer is ready: publish it, and every held one before it, unless it must
        wait for its motion sample (see :meth:`_release_held`); returns what was published."""
        self._held.append((pending, out))
        return self._release_held()

    def _finish_batched(self, pending: _PendingStep, out: StepOutput | BaseException) -> None:
        """The step batch's answer for one of this engine's steps (in submission order)."""
        self._finish(pending, out)
        self._reschedule()  # a held step may now wait for its motion sample

    def _publish(self, pending: _PendingStep, out: StepOutput | BaseException) -> Prediction | None:
        """Number the model's answer and hand it to telemetry and the outputs (on the loop)."""
        step = pending.step
        if isinstance(out, BaseException):
            self.counters.model_errors += 1
            log.error("model failed at volume %s: %s", step.index, out)
            return None
        if not out.ready:
            self.counters.warming_up += 1
            return None
        probs = tuple(float(p) for p in np.asarray(out.probabilities).reshape(-1))
        intensity = float(out.intensity)
        if len(probs) != 3 or not all(math.isfinite(v) for v in (*probs, intensity)):
            self.counters.model_errors += 1
            log.error("model gave a non-finite or malformed output at volume %s", step.index)
            return None
        prediction = Prediction(
            session=self.session_id,
            sequence=self._sequence,
            tr_index=pending.tr_index,
            volume_timestamp=self.to_lsl(step.timestamp),
            utc=utc_now(),
            probabilities=probs,  # type: ignore[arg-type]
            category=CATEGORY_LABELS[int(np.argmax(probs))],
            intensity=intensity,
            heart_rate=float(step.heart_rate) if step.heart_rate_valid else None,
            heart_rate_valid=bool(step.heart_rate_valid),
            respiration_rate=float(step.respiration_rate) if step.respiration_rate_valid else None,
            respiration_rate_valid=bool(step.respiration_rate_valid),
            model_id=self.model_id,
            latency_ms=max(0.0, (self.clock() - pending.ready_at) * 1000.0),
            level=out.level,
            flags=pending.flags,
            framewise_displacement=(
                None if pending.motion is None else pending.motion.framewise_displacement
            ),
            motion_params=(
                pending.motion.params
                if pending.motion is not None and pending.motion.params_finite
                else None
            ),
        )
        self._sequence += 1
        self.counters.predictions += 1
        # telemetry first: an output that takes a snapshot (the dashboard) shows this TR
        self.telemetry.record_prediction(
            prediction,
            heart_rate_quality=step.heart_rate_quality,
            respiration_rate_quality=step.respiration_rate_quality,
        )
        for output in self.outputs:
            try:
                output.on_prediction(prediction, step)
            except Exception:  # an output must not take the engine down
                log.exception("output %r failed on a prediction", output)
        return prediction

    # -- the model thread ---------------------------------------------------------------------

    def _use_thread(self) -> bool:
        """Step in the model thread? Only under :meth:`run` (a loop to come back to)."""
        return self._offload and self._loop is not None and not self._closed

    def _note_step_time(self, seconds: float) -> None:
        """``model_thread = "auto"``: a model stepped inline whose steps keep taking longer
        than :data:`SLOW_STEP_S` moves to the model thread (for the rest of the run)."""
        if self._thread_mode != "auto":
            return
        self._slow_steps = self._slow_steps + 1 if seconds > SLOW_STEP_S else 0
        if self._slow_steps >= 3 and not self._offload:
            self._offload = True
            log.info(
                "model steps take over %.0f ms: stepping in a worker thread from now on",
                SLOW_STEP_S * 1000,
            )

    def _submit(self, pending: _PendingStep) -> None:
        assert self._loop is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emorecog-model")
        future = self._loop.run_in_executor(self._executor, self._run_model, pending)
        self._inflight.append((pending, future))
        future.add_done_callback(self._drain)

    def _drain(self, _future: Any = None) -> None:
        """Publish, in submission order, every finished step at the head of the queue. The
        single worker finishes them in order anyway; the queue makes the order not depend on
        the order in which done callbacks run."""
        while self._inflight and self._inflight[0][1].done():
            pending, future = self._inflight.popleft()
            if future.cancelled():
                out: StepOutput | BaseException = asyncio.CancelledError()
            else:
                out = future.result()
            self._finish(pending, out)

    async def _wait_model(self) -> None:
        """Wait for every step still in the model thread and publish it."""
        while self._inflight:
            await asyncio.wait([f for _, f in self._inflight])
            self._drain()

    def _apply_stalls(self, step: AlignedStep) -> AlignedStep:
        """Rates fed by a stalled stream are missing, whatever was left in the buffers."""
        missing = set(self.status.missing)
        if not missing:
            return step
        notes = list(step.notes)
        changes: dict[str, Any] = {}
        for rate in ("heart_rate", "respiration_rate"):
            if rate in missing and getattr(step, f"{rate}_valid"):
                changes[rate] = math.nan
                changes[f"{rate}_valid"] = False
                notes.append(f"{rate.replace('_', ' ')} missing: {self.status.reason}")
        return replace(step, notes=tuple(notes), **changes) if changes else step

    # -- status and timer ---------------------------------------------------------------------

    def _update_status(self) -> None:
        now = self.now()
        status = self.status_tracker.status(now, self.session.tr)
        problems = [*self._input_errors.values(), *self._output_problems.values()]
        if problems and status.state in ("online", "degraded"):
            errors = "; ".join(problems)
            reason = f"{status.reason}; {errors}" if status.reason else errors
            status = EngineStatus("degraded", reason, status.missing, status.stalled)
        elif problems and status.state == "paused":  # e.g. every volume refused: say why
            status = replace(status, reason=f"{status.reason}; {'; '.join(problems)}")
        elif status.state == "starting" and self.start_note:
            status = replace(status, reason=f"{self.start_note}; {status.reason}")
        if status != self.status:
            if status.stalled != self.status.stalled:
                # do not wait for streams that are not delivering
                self.status = status
                self._set_waiting()
            self.status = status
            self.telemetry.set_status(status.state, status.reason)
            if status.state != "online" or status.reason:
                log.info("status %s: %s", status.state, status.reason)
            for output in self.outputs:
                try:
                    output.on_status(status)
                except Exception:
                    log.exception("output %r failed on a status change", output)

    def _set_waiting(self) -> None:
        """The aligner waits for every physiology stream whose rate is known and that is not
        stalled; the others' rates are simply missing (never a reason to hold a step back)."""
        waiting = [
            r
            for r in self.physio_roles
            if r not in self.status.stalled and srate_known(self.aligner, r)
        ]
        self.aligner.set_expected(waiting)

    def _reschedule(self) -> None:
        if self._loop is None or self._closed:
            return
        now = self.now()
        candidates = [
            t
            for t in (
                self.aligner.next_deadline(),
                self.status_tracker.next_change(now, self.session.tr),
                self._stop_at,
                self._held[0][0].motion_due if self._held else None,
            )
            if t is not None
        ]
        when = min(candidates) if candidates else None
        if self._timer is not None and self._timer_at is not None and (
            when is None or when >= self._timer_at
        ):
            # the armed timer fires no later than needed: keep it (firing early is harmless,
            # :meth:`_on_timer` re-arms for what is then due). Re-arming on every chunk, as
            # each arrival moves the stall deadline, cost a cancelled timer per chunk.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            # engine seconds -> real seconds; a hair late so the deadline has surely passed
            delay = max(0.0, (when - now) / self.time_scale) + 1e-4
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.now()
        if self._stop_at is not None and now >= self._stop_at:
            self._stop.set()
            return
        self._update_status()  # first: a stalled stream is no longer waited for
        self._poll(ready_at=self.clock())
        self._release_held()
        self._reschedule()

    # -- running ------------------------------------------------------------------------------

    def snapshot(self, mqtt: Any = None) -> EngineSnapshot:
        """The dashboard's view now (``mqtt``: the publisher's stats to include).

        Stream figures come from the telemetry monitors (rates, lag, gaps on the LSL clock),
        the aligner's ring buffers (fill, samples overwritten before use) and the engine's own
        verdict on each stream (:meth:`stream_states`), with the reason as a note.
        """
        states, notes = self.stream_states()
        return self.telemetry.snapshot(
            self.clock(),
            mqtt=mqtt,
            buffers=self.aligner.stats().streams,
            states=states,
            notes=notes,
        )

    def stream_states(self) -> tuple[dict[str, StreamState], dict[str, str]]:
        """Each registered stream's state as the engine judges it, and why when not connected.

        The same judgement as the status topic (stall timeout for physiology, ``fmri_stall_trs``
        TRs for fMRI, on the engine's clock), so the dashboard and the status never disagree;
        an inlet that reported an error is ``lost``; a rejected chunk is noted. Markers are
        irregular: silence is normal, so they count as connected once resolved. Motion comes
        once per volume, so it is judged like fMRI.
        """
        now = self.now()
        tracker = self.status_tracker
        stalled = tracker.stalled_roles(now)
        tr = self.session.tr
        states: dict[str, StreamState] = {}
        notes: dict[str, str] = {}
        for key in self.telemetry.monitors:
            role = Role(key)
            seen = role in tracker.last_arrival
            note = ""
            if role is Role.MARKERS:
                state = StreamState.CONNECTED
            elif role in tracker.absent:
                state = StreamState.LOST if seen else StreamState.ABSENT
                note = tracker.absent[role]
            elif not seen:
                state = StreamState.ABSENT
                note = stalled.get(role, "")
            elif role in (Role.FMRI, Role.MOTION):
                silent = now - tracker.last_arrival[role]
                if tr is not None and silent > tracker.fmri_stall_trs * tr:
                    state = StreamState.STALLED
                    what = "volume" if role is Role.FMRI else "motion sample"
                    note = f"no {what} for more than {tracker.fmri_stall_trs:g} TRs"
                else:
                    state = StreamState.CONNECTED
            elif role in stalled:
                state = StreamState.STALLED
                note = stalled[role]
            else:
                state = StreamState.CONNECTED
            error = self._input_errors.get(role)
            if error:
                note = f"{note}; {error}" if note else error
            states[key] = state
            if note:
                notes[key] = note
        return states, notes

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from signal handlers on the loop)."""
        self._stop.set()

    async def run(
        self, source: AsyncIterator[Any] | None = None, *, duration: float | None = None
    ) -> EngineCounters:
        """Consume ``source`` (chunks) until stopped, ``duration`` seconds passed, or it ends.

        On the way out every output is closed (MQTT status offline and queue flushed, log
        closed), whatever stopped the run.
        """
        self._loop = asyncio.get_running_loop()
        if duration is None and self.config.session.duration > 0:
            duration = self.config.session.duration
        if duration is not None:
            self._stop_at = self.now() + duration * self.time_scale
        for output in self.outputs:
            output.on_status(self.status)
        self._update_status()
        self._reschedule()
        consumer: asyncio.Task[None] | None = None
        if source is not None:
            consumer = asyncio.create_task(self._consume(source))
        stop_waiter = asyncio.create_task(self._stop.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {stop_waiter}
            if consumer is not None:
                waiting.add(consumer)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if consumer is not None and consumer in done:
                consumer.result()  # re-raise what broke the source
        finally:
            for task in (consumer, stop_waiter):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self.aclose()
        return self.counters

    async def _consume(self, source: AsyncIterator[Any]) -> None:
        async for chunk in source:
            self.process_chunk(chunk.role, chunk.data, chunk.timestamps, chunk.received)

    async def aclose(self) -> None:
        """Stop the timer, set the status offline and close every output (once)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            if self.step_batch is not None:
                self.step_batch.flush(self)  # steps handed to the batch are taken first
            await self._wait_model()  # steps already taken are published before offline
            self._release_held(force=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
        self.status = EngineStatus("offline", "engine stopped")
        self.telemetry.set_status("offline", "engine stopped")
        for output in self.outputs:
            try:
                output.on_status(self.status)
            except Exception:
                log.exception("output %r failed on the final status", output)
        for output in self.outputs:
            try:
                await output.aclose()
            except Exception:
                log.exception("output %r failed to close", output)
        if self.slot is not None:
            self.slot.close()


def make_aligner(config: Config) -> Aligner:
    """The core aligner configured from the ``[aligner]`` section and the enabled streams.

    Sampling rates of PPG and respiration come from ``[streams.*] rate`` when given, else from
    the streams' declared rates once they are resolved (:meth:`Engine.register_stream` calls
    the aligner's public ``set_srate``); which streams a step waits for changes with
    ``set_expected`` as streams stall and return (:meth:`Engine._set_waiting`).
    """
    ppg_srate = config.streams.ppg.rate or None
    resp_srate = config.streams.resp.rate or None
    known = {Role.PPG: ppg_srate is not None, Role.RESP: resp_srate is not None, Role.RATES: True}
    roles = tuple(r for r in config.streams.enabled_roles() if known.get(r, False))
    aligner_config = AlignerConfig(
        hr_window_s=config.aligner.hr_window,
        rr_window_s=config.aligner.rr_window,
        deadline_s=config.aligner.deadline,
        expected=roles,
        ppg_srate=ppg_srate,
        resp_srate=resp_srate,
    )
    return Aligner(aligner_config)


def srate_known(aligner: Aligner, role: Role) -> bool:
    """Whether the aligner can wait for ``role``: its sampling rate is known (rates and fMRI
    need none). ``Aligner.set_expected`` refuses a physiology role whose rate is not."""
    if role is Role.PPG:
        return aligner.config.ppg_srate is not None
    if role is Role.RESP:
        return aligner.config.resp_srate is not None
    return True


def label_of(role: Role) -> str:
    """How a role is named in messages (``PPG``, ``respiration``, ...)."""
    return ROLE_LABEL.get(role, role.value)
