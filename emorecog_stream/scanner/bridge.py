"""The scanner bridge at work: export folder -> registration and ROI means -> LSL outlets.

Per volume, in this order: the watcher hands over the volume as soon as its file is whole; the
pipeline registers it to the run's reference and takes the 246 ROI means (in a worker thread:
the compiled loops release the GIL, so trigger pulses keep arriving); the volume gets its
timestamp (its trigger pulse, else arrival minus the reconstruction delay); the ``Motion``
sample is pushed, then the ``fMRI`` sample, with the same timestamp, so the engine always has a
volume's motion when the volume itself arrives.

Nothing a scanner folder can hold stops the bridge: broken, foreign and half-written files are
reported by the watcher and skipped; a volume on a grid other than the atlas's is reported and
dropped. Only a problem with the user's own inputs (the atlas, the reference) is fatal, and it
is fatal before the first volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emorecog_stream.core.streams import ATLAS, Role
from emorecog_stream.scanner.atlas import Atlas, AtlasError, load_atlas
from emorecog_stream.scanner.pipeline import ProcessedVolume, Skipped, VolumePipeline
from emorecog_stream.scanner.timing import TriggerClock

log = logging.getLogger(__name__)

#: Seconds the first volume waits for a reader when the streams open only at that volume.
CONSUMER_WAIT_S = 3.0

#: TRs that differ by more than this (seconds) between header and ``--tr`` are reported.
TR_TOLERANCE_S = 1e-3


class BridgeError(Exception):
    """The bridge cannot start: atlas, reference or trigger stream unusable (user's inputs)."""


class _NoTR(Exception):
    """A volume arrived before any TR is known (no ``--tr``, none in its header)."""


@dataclass(frozen=True)
class BridgeSettings:
    """Everything ``emorecog-stream scanner`` takes (see its ``--help``)."""

    watch_dir: str
    atlas: str
    label_table: str | None = None
    reference: str | None = None
    tr: float | None = None  # seconds; None: from the first volume's header
    poll: float | None = None  # seconds between folder scans (network shares); None: events
    from_start: bool = False  # process the files already in the folder
    skip: int = 0  # dummy volumes dropped at the start of each run
    fd_threshold: float = 0.5  # mm
    recon_delay: float = 0.0  # seconds from the end of acquisition to the file's arrival
    trigger: str | None = None  # LSL name of the scanner trigger stream
    trigger_timeout: float = 10.0
    slices_per_volume: int | None = None
    tag: str = ""  # appended to stream names and source ids
    speed: float = 1.0  # a rehearsal written X times faster than real time (scanner-sim --speed)
    settle: float = 0.25
    incomplete_timeout: float = 10.0


@dataclass(frozen=True)
class VolumeRecord:
    """What happened to one published volume, for the console line and the benchmarks."""

    processed: ProcessedVolume
    timestamp: float
    timestamp_source: str
    arrived: float  # LSL clock: file read complete
    pushed: float  # LSL clock: both samples pushed
    path: str


@dataclass
class BridgeCounters:
    published: int = 0
    skipped: int = 0  # dummies
    foreign_grid: int = 0  # volumes not on the atlas's grid, dropped
    failed: int = 0  # registration errors (volume not overlapping the reference, ...)
    above_threshold: int = 0
    records: list[VolumeRecord] = field(default_factory=list)


def read_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The user's reference volume (the first volume of a file holding several)."""
    from emorecog_stream.scanner.files import VolumeReader, VolumeReadError

    try:
        volumes = VolumeReader().read(path)
    except VolumeReadError as exc:
        raise BridgeError(f"reference volume: {exc}") from exc
    except OSError as exc:
        raise BridgeError(f"reference volume {path}: cannot read it ({exc})") from exc
    if not volumes:
        raise BridgeError(f"reference volume {path}: expected one image volume, found none")
    return volumes[0].data, volumes[0].affine


def outlet_descriptions(
    atlas: Atlas, tr: float, tag: str, speed: float = 1.0
) -> dict[Role, object]:
    """The two outlets the engine reads: ``fMRI`` (ROI means) and ``Motion`` (7 channels).

    ``speed`` > 1 is a sped-up rehearsal: the nominal rate is ``speed / tr``, as ``replay
    --speed`` announces its streams, so ``run --replay-speed`` stretches the clock back.
    """
    from emorecog_stream.adapters.lsl_info import (
        OutletDescription,
        default_labels,
        default_units,
        stream_identity,
    )

    host = socket.gethostname()
    out: dict[Role, object] = {}
    for role, n, labels in (
        (Role.MOTION, 7, default_labels(Role.MOTION, 7)),
        (Role.FMRI, atlas.n_labels, atlas.names),
    ):
        name, type_, source_id = stream_identity(role, tag)
        out[role] = OutletDescription(
            role=role,
            name=name,
            type=type_,
            source_id=source_id,  # the engine's defaults: `run` finds it with no configuration
            channel_count=n,
            nominal_srate=speed / tr,
            channel_labels=tuple(labels),
            units=default_units(role, n),
            tr=tr / speed,
            atlas=ATLAS if role is Role.FMRI and atlas.n_labels == 246 else "",
            extra={
                "source": "emorecog-stream scanner",
                "hostname": host,
                "atlas_file": Path(atlas.source).name,
            },
        )
    return out


class ScannerBridge:
    """Watches one export folder and publishes every volume's ROI means and motion on LSL."""

    def __init__(self, settings: BridgeSettings, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.say = say
        try:
            self.atlas = load_atlas(settings.atlas, settings.label_table)
        except AtlasError as exc:
            raise BridgeError(str(exc)) from exc
        reference = None
        if settings.reference is not None:
            data, affine = read_reference(settings.reference)
            try:
                self.atlas.check_grid(data.shape, affine, f"the reference {settings.reference}")
            except AtlasError as exc:
                raise BridgeError(str(exc)) from exc
            reference = data
        self.pipeline = VolumePipeline(
            self.atlas, reference=reference, skip=settings.skip,
            fd_threshold=settings.fd_threshold,
        )
        self._own_files = {
            Path(p).resolve()
            for p in (settings.atlas, settings.label_table, settings.reference)
            if p is not None
        }
        self.counters = BridgeCounters()
        self.tr: float | None = settings.tr
        self.clock: TriggerClock | None = None
        self._outlets: dict[Role, object] = {}
        self._segment_tr_checked: set[str] = set()
        self._stop = asyncio.Event()
        self._watcher = None
        self._trigger_task: asyncio.Task | None = None
        self._early_pulses: list[float] = []  # pulses before the TR (and the clock) is known
        self._await_consumers = False
        self.ready = asyncio.Event()  # set once the folder is being watched

    # -- outlets ---------------------------------------------------------------------------

    def _open_outlets(self, tr: float) -> None:
        import pylsl

        descriptions = outlet_descriptions(self.atlas, tr, self.settings.tag, self.settings.speed)
        for role, description in descriptions.items():
            self._outlets[role] = pylsl.StreamOutlet(description.stream_info())  # type: ignore[attr-defined]
        self.say(
            f"LSL: streams {self._outlets[Role.FMRI].get_info().name()} (fMRI,"  # type: ignore[attr-defined]
            f" {self.atlas.n_labels} ROI means) and"
            f" {self._outlets[Role.MOTION].get_info().name()} (Motion, 7 channels) at"  # type: ignore[attr-defined]
            f" 1/{tr:g} s"
        )

    async def _watch_readers(self) -> None:
        """Say when a stream gains its first reader and when it loses its last one: the
        experimenter sees at a glance whether the engine is listening before the scan starts."""
        had: dict[Role, bool] = {}
        while not self._stop.is_set():
            for role, outlet in list(self._outlets.items()):
                has = bool(outlet.have_consumers())  # type: ignore[attr-defined]
                if has != had.get(role, False):
                    name = outlet.get_info().name()  # type: ignore[attr-defined]
                    self.say(f"[lsl] {name}: {'read by' if has else 'no longer read by'} an inlet")
                    had[role] = has
            await asyncio.sleep(0.2)

    # -- triggers --------------------------------------------------------------------------

    async def _open_trigger(self) -> None:
        import pylsl

        name = self.settings.trigger
        assert name is not None
        self.say(f"trigger: waiting up to {self.settings.trigger_timeout:g} s for stream {name!r}")
        found = await asyncio.to_thread(
            pylsl.resolve_byprop, "name", name, 1, self.settings.trigger_timeout
        )
        if not found:
            raise BridgeError(
                f"trigger stream: expected an LSL stream named {name!r}, found none within"
                f" {self.settings.trigger_timeout:g} s (is the stimulus PC streaming triggers?)"
            )
        inlet = pylsl.StreamInlet(found[0], processing_flags=pylsl.proc_clocksync)
        await asyncio.to_thread(inlet.open_stream, 5.0)
        # the first clock-offset estimate takes a few round trips; made now, not at the first
        # pulse (which would then reach the bridge half a second late)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(inlet.time_correction, 5.0)
        self._trigger_task = asyncio.create_task(self._pull_triggers(inlet))

    async def _pull_triggers(self, inlet: object) -> None:
        while not self._stop.is_set():
            _, stamps = await asyncio.to_thread(inlet.pull_chunk, 0.05)  # type: ignore[attr-defined]
            if stamps and self.clock is not None:
                self.clock.add_pulses(list(stamps))
            elif stamps:
                self._early_pulses.extend(stamps)

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.close()

    async def run(self, max_volumes: int | None = None) -> BridgeCounters:
        """Watch until :meth:`stop` (or ``max_volumes`` published); returns the counters."""
        from emorecog_stream.scanner.motion import warm_up
        from emorecog_stream.scanner.watch import VolumeWatcher

        s = self.settings
        await asyncio.to_thread(warm_up)
        if s.trigger:
            await self._open_trigger()
        if self.tr is not None:
            self._open_outlets(self.tr)
        watcher = VolumeWatcher(
            s.watch_dir, poll=s.poll, from_start=s.from_start,
            slices_per_volume=s.slices_per_volume, settle=s.settle,
            incomplete_timeout=s.incomplete_timeout,
            exclude=[str(p) for p in self._own_files],
            on_event=lambda e: self.say(f"[{e.kind}] {e.message}"),
        )
        self._watcher = watcher
        mode = f"polling every {s.poll:g} s" if s.poll else "file-system events"
        self.say(f"watching {watcher.folder} ({mode}); Ctrl-C to stop")
        readers = asyncio.create_task(self._watch_readers())
        try:
            await watcher.start()
            self.ready.set()
            async for arrived in watcher.volumes():
                await self._handle(arrived)
                if max_volumes is not None and self.counters.published >= max_volumes:
                    break
                if self._stop.is_set():
                    break
        finally:
            self._stop.set()
            readers.cancel()
            await watcher.aclose()
            if self._trigger_task is not None:
                self._trigger_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._trigger_task
        return self.counters

    def _check_tr(self, header_tr: float | None, series: str) -> None:
        if series in self._segment_tr_checked:
            return
        self._segment_tr_checked.add(series)
        if self.tr is None:
            if header_tr is None:
                self._segment_tr_checked.discard(series)
                raise _NoTR(
                    f"the files of series {series} carry no repetition time; give it with"
                    " --tr SECONDS"
                )
            self.tr = header_tr
            self._open_outlets(header_tr)
            self._await_consumers = True
        elif header_tr is not None and abs(header_tr - self.tr) > TR_TOLERANCE_S:
            self.say(
                f"[tr] series {series}: the header says TR {header_tr:g} s, using"
                f" {self.tr:g} s ({'--tr' if self.settings.tr else 'the first series'})"
            )
        if self.clock is None:
            self.clock = TriggerClock(
                self.tr / self.settings.speed, recon_delay=self.settings.recon_delay
            )
            self.clock.add_pulses(self._early_pulses)

    async def _handle(self, arrived: object) -> None:
        import pylsl

        volume = arrived.volume  # type: ignore[attr-defined]
        if Path(arrived.path).resolve() in self._own_files:  # type: ignore[attr-defined]
            return  # the atlas or reference kept in the export folder is no volume of a run
        try:
            self._check_tr(volume.tr, volume.series)
        except _NoTR as exc:
            self.counters.failed += 1
            self.say(f"[tr] {volume.source}: dropped; {exc}")
            return
        if self._await_consumers:
            # The streams appeared only now (the TR came from this volume's header): an LSL
            # inlet sees only samples pushed after it connects, so give a waiting engine a
            # moment to find them rather than lose the run's first volume. --tr avoids this.
            self._await_consumers = False
            deadline = time.monotonic() + CONSUMER_WAIT_S
            for outlet in self._outlets.values():
                left = max(0.0, deadline - time.monotonic())
                if not await asyncio.to_thread(outlet.wait_for_consumers, left):  # type: ignore[attr-defined]
                    self.say(
                        f"[lsl] no one reads {outlet.get_info().name()} yet"  # type: ignore[attr-defined]
                        " (is `emorecog-stream run` started?); publishing anyway"
                    )
        new = self.pipeline.is_new_series(volume.series)
        stamps: dict[tuple[int, int], object] = {}

        def push_motion(segment: int, index: int, motion: np.ndarray) -> None:
            # called from the worker thread between registration and ROI means: the Motion
            # sample leaves first, so the engine has it when the volume arrives
            assert self.clock is not None
            when = self.clock.volume_time(segment, index, arrived.arrived)  # type: ignore[attr-defined]
            stamps[(segment, index)] = when
            self._outlets[Role.MOTION].push_sample(motion.tolist(), when.timestamp)  # type: ignore[attr-defined]

        try:
            result = await asyncio.to_thread(
                self.pipeline.process, volume.data, volume.affine, volume.series, volume.index,
                push_motion,
            )
        except AtlasError as exc:
            self.counters.foreign_grid += 1
            self.say(f"[grid] {volume.source}: dropped; {exc}")
            return
        except ValueError as exc:
            self.counters.failed += 1
            self.say(f"[registration] {volume.source}: dropped; {exc}")
            return
        if new:
            self.say(
                f"== segment {self.pipeline.segment}: series {volume.series}"
                f" ({'x'.join(map(str, volume.data.shape))}); new reference, FD restarts"
            )
        if isinstance(result, Skipped):
            self.counters.skipped += 1
            self.say(f"   volume {result.index}: {result.reason}")
            return
        when = stamps[(result.segment, result.index)]
        if self.settings.trigger and when.source != "trigger":  # type: ignore[attr-defined]
            self.say(f"[trigger] volume {result.index}: {when.note}; using the arrival time")  # type: ignore[attr-defined]
        self._outlets[Role.FMRI].push_sample(result.roi.tolist(), when.timestamp)  # type: ignore[attr-defined]
        pushed = pylsl.local_clock()
        self.counters.published += 1
        if result.fd_exceeded:
            self.counters.above_threshold += 1
        record = VolumeRecord(
            result, when.timestamp, when.source, arrived.arrived, pushed, arrived.path  # type: ignore[attr-defined]
        )
        self.counters.records.append(record)
        if len(self.counters.records) > 10_000:
            del self.counters.records[:5_000]
        flag = "  MOTION" if result.fd_exceeded else ""
        self.say(
            f"   volume {result.index:4d}  FD {result.framewise_displacement:5.2f} mm"
            f"  reg {result.registration_ms:5.1f} ms  roi {result.roi_ms:4.1f} ms"
            f"  +{(pushed - arrived.arrived) * 1e3:5.1f} ms{flag}"  # type: ignore[attr-defined]
        )
