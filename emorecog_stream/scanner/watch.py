"""Watch the scanner's export folder and hand out each volume once, as soon as its file is whole.

Why watchdog (compared with watchfiles and asyncinotify):

* It runs where labs run: inotify on Linux, FSEvents on macOS, ReadDirectoryChangesW on
  Windows, with one API.
* On Linux it reports close-after-write (``FileClosedEvent``) and pairs renames into one
  ``FileMovedEvent`` without delay, the two moments a file is known to be complete, so a volume
  is read the instant its last byte lands rather than after a quiet period.
* watchfiles (Rust ``notify``) is async-native but reports only added/modified/deleted, batched
  by a debounce (50 ms steps by default), so a finished file cannot be told from one still being
  written without waiting; it is also not in this project's environment. asyncinotify is
  Linux-only.

Polling (``poll=`` seconds, for SMB/NFS shares, which deliver no events for files the scanner
console writes) is a small loop here rather than watchdog's ``PollingObserver``: that one stats
every file of the folder each period (thousands on a per-slice export) and emits the new files
one event at a time in set order, so files landing within one period came out of acquisition
order. This loop lists the folder once per period (in a thread: a share can stall), stats only
the files still in play (being written, growing 4-D, broken), hands each period's new files to
the reader at once, oldest first, and rides out a share's outage with one ``watch_error`` event.

watchdog calls back on its own threads; each callback only hops onto the event loop
(``call_soon_threadsafe``). One task then reads candidate files in order with
:class:`~emorecog_stream.scanner.files.VolumeReader` (in a worker thread, so the loop keeps
serving LSL), retries files that are still being written with a short back-off, and reports
what it skips as :class:`WatchEvent` s: a broken image never stops the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from .files import FileKind, IncompleteFile, Volume, VolumeReader, VolumeReadError, classify

__all__ = ["EVENT_KINDS", "ArrivedVolume", "VolumeWatcher", "WatchCounters", "WatchEvent"]

log = logging.getLogger(__name__)

EVENT_KINDS: tuple[str, ...] = (
    "new_series",  # a volume of a series not seen before: a new segment starts
    "stale_series",  # a volume of an earlier series after a newer one began: dropped
    "gap",  # index jumped within a series: names the missing volumes
    "out_of_order",  # index at or below one already handed out in the series
    "broken",  # a file that never became a readable image: skipped
    "ignored",  # a file that is not an image (once per file)
    "retrying",  # a file still being written (once per file)
    "tr_units",  # header problems the readers worked around (see files.ReadWarning kinds)
    "watch_error",  # the folder could not be watched or listed
)


@dataclass(frozen=True)
class ArrivedVolume:
    """A volume and when its last piece was read complete."""

    volume: Volume
    path: str
    """The file that completed the volume (the last slice of a per-slice volume)."""
    arrived: float
    """``pylsl.local_clock()`` right after the read; the bridge subtracts a recon delay."""
    segment: int
    """0 for the first series seen, +1 at each ``new_series`` event: one run per segment."""


@dataclass(frozen=True)
class WatchEvent:
    """Something the watcher noticed that the user should hear about."""

    kind: str
    """One of :data:`EVENT_KINDS`."""
    message: str
    """One clear human line naming the file(s)."""
    path: str | None = None


@dataclass
class WatchCounters:
    """Running totals, for the bridge's status line."""

    volumes: int = 0
    ignored: int = 0
    """Files that are not images (side files: logs, notes, sidecars), once each."""
    temporary: int = 0
    """Hidden and temporary names (an exporter's file in progress, renamed when done)."""
    broken: int = 0
    retries: int = 0
    gaps: int = 0
    missing: int = 0
    """Volumes named in gap events."""
    out_of_order: int = 0
    series: int = 0


@dataclass
class _FileState:
    """What the watcher knows of one file it has not finished with."""

    stat: tuple[int, int]
    changed_at: float
    """Monotonic time its size/mtime last changed (or it was first seen)."""
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None
    last_try: float = 0.0


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _natural_key(path: str) -> tuple:
    """Sort ``vol_2`` before ``vol_10``: numbers in names compare as numbers."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _spans(numbers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


class VolumeWatcher:
    """Volumes from an export folder, in order of arrival, one segment per series.

    * ``poll``: seconds between directory scans, for network shares (SMB/NFS give no events);
      None uses the operating system's events.
    * ``from_start``: read the files already in the folder (oldest first) instead of skipping
      them (a growing 4-D NIfTI then gives only the volumes written after the start).
    * ``slices_per_volume``: for per-slice DICOM exports whose headers do not say.
    * ``name_number_base``: the number in the first volume's name, for one-NIfTI-per-volume
      exports (1: ``vol_00001.nii`` is the first, as scanners count; 0: ``vol0000.nii``).
    * ``recursive``: also watch sub-folders (GE writes one folder per series).
    * ``settle``: how long a file must stay unchanged before a read error on it counts as a
      broken file rather than a half-written one.
    * ``incomplete_timeout``: how long a truncated-looking file may stay unchanged before it is
      reported broken (a writer that died).
    * ``retry_interval``: the first retry's delay; it doubles up to 0.5 s.
    * ``read_in_thread``: read files in a worker thread, so the event loop keeps serving other
      work meanwhile (a 104x104x72 NIfTI takes ~1.3 ms, a Siemens mosaic more); False reads on
      the loop and saves one thread hand-over per file (~0.2-1 ms on this 2-core machine).
    * ``exclude``: files never read, e.g. the atlas or reference kept in the export folder
      (otherwise each would count as a series of its own and split the run it lands in).
    * ``on_event``: called with each :class:`WatchEvent` (they are also kept in ``events`` and
      logged). Messages count volumes from 1, as the scanner console does.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        poll: float | None = None,
        from_start: bool = False,
        slices_per_volume: int | None = None,
        name_number_base: int = 1,
        recursive: bool = False,
        settle: float = 0.25,
        incomplete_timeout: float = 10.0,
        retry_interval: float = 0.02,
        read_in_thread: bool = True,
        exclude: Iterable[str | os.PathLike[str]] = (),
        on_event: Callable[[WatchEvent], None] | None = None,
    ) -> None:
        folder = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"watch folder: expected an existing folder, got {folder!r}")
        if poll is not None and poll <= 0:
            raise ValueError(f"poll: expected seconds > 0, got {poll}")
        self.folder = folder
        self.poll = poll
        self.from_start = from_start
        self.recursive = recursive
        self.settle = settle
        self.incomplete_timeout = incomplete_timeout
        self.retry_interval = retry_interval
        self.read_in_thread = read_in_thread
        self.exclude = frozenset(os.path.realpath(os.fspath(p)) for p in exclude)
        self.on_event = on_event
        self.reader = VolumeReader(slices_per_volume, name_number_base)
        self.counters = WatchCounters()
        self.events: deque[WatchEvent] = deque(maxlen=1000)
        """The latest events, oldest first."""

        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer = None
        self._task: asyncio.Task | None = None
        self._poll_task: asyncio.Task | None = None
        self._known: set[str] = set()
        """Poll mode: the names listed last period."""
        self._poll_stats: dict[str, tuple[int, int] | None] = {}
        self._wake: asyncio.Queue[str] | None = None
        self._out: asyncio.Queue[ArrivedVolume | None] | None = None
        self._files: dict[str, _FileState] = {}
        self._ignored: dict[str, tuple[tuple[int, int] | None, FileKind]] = {}
        self._broken: dict[str, tuple[int, int] | None] = {}
        self._skipped: dict[str, tuple[int, int] | None] = {}
        self._series: list[str] = []
        self._last_index: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        # Linux (inotify) says when a writer closes a file; elsewhere a modification is the
        # only sign, so it triggers a read attempt at once.
        self._close_events = poll is None and sys.platform.startswith("linux")
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> VolumeWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start watching (``volumes()`` does this on first use)."""
        if self._task is not None:
            return
        if self._closed:
            raise RuntimeError("this VolumeWatcher was closed; make a new one")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Queue()
        self._out = asyncio.Queue()
        if self.poll is None:
            from watchdog.observers import Observer

            observer = Observer()
            observer.schedule(
                _Handler(self),
                self.folder,
                recursive=self.recursive,
                # Not opened / closed-without-write: our own reads would wake us up again.
                event_filter=[
                    FileCreatedEvent,
                    FileModifiedEvent,
                    FileClosedEvent,
                    FileMovedEvent,
                    FileDeletedEvent,
                ],
            )
            observer.daemon = True
            observer.start()
            self._observer = observer
        # Listed after the observer started, so no file falls between the two.
        existing = self._list_folder()
        self._known = set(existing)
        if self.from_start:
            for path in _arrival_order(existing):
                self._wake.put_nowait(path)
        else:
            for path in existing:
                self._skip_existing(path)
        self._task = asyncio.create_task(self._run(), name=f"watch {self.folder}")
        if self.poll is not None:
            self._poll_task = asyncio.create_task(self._poll(), name=f"poll {self.folder}")

    def close(self) -> None:
        """Stop watching; ``volumes()`` ends after the volumes already read."""
        if self._closed:
            return
        self._closed = True
        if self._observer is not None:
            self._observer.stop()
        for state in self._files.values():
            if state.timer is not None:
                state.timer.cancel()
        for task in (self._task, self._poll_task):
            if task is not None:
                task.cancel()
        if self._out is not None:
            self._out.put_nowait(None)

    async def aclose(self) -> None:
        """:meth:`close`, then wait (off the loop) for watchdog's threads to end."""
        self.close()
        observer = self._observer
        if observer is not None and observer.is_alive():
            with contextlib.suppress(RuntimeError):
                await asyncio.to_thread(observer.join, 5.0)

    async def volumes(self) -> AsyncIterator[ArrivedVolume]:
        """Each volume once, in order of arrival, until :meth:`close`."""
        await self.start()
        assert self._out is not None
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    # ------------------------------------------------------------------ file-system events

    def _list_files(self) -> list[str]:
        """The folder's files (raises OSError when the folder cannot be read)."""
        if not self.recursive:
            with os.scandir(self.folder) as entries:
                return [e.path for e in entries if e.is_file()]
        paths: list[str] = []

        def fail(exc: OSError) -> None:
            raise exc

        for root, _dirs, names in os.walk(self.folder, onerror=fail):
            paths.extend(os.path.join(root, n) for n in names)
        return paths

    def _list_folder(self) -> list[str]:
        try:
            return self._list_files()
        except OSError as exc:
            self._emit("watch_error", f"cannot list {self.folder}: {exc}", self.folder)
            return []

    async def _poll(self) -> None:
        """Poll mode: one listing per period; new and changed files go to the reader at once."""
        assert self.poll is not None and self._wake is not None
        failing = False
        while True:
            await asyncio.sleep(self.poll)
            try:
                listing = await asyncio.to_thread(self._list_files)
            except OSError as exc:
                if not failing:
                    self._emit(
                        "watch_error",
                        f"cannot list {self.folder} ({exc}); trying again every {self.poll:g} s",
                        self.folder,
                    )
                failing = True
                continue
            if failing:
                self._emit("watch_error", f"{self.folder} can be listed again", self.folder)
                failing = False
            current = set(listing)
            for gone in self._known - current:
                self._on_fs_event(gone, "deleted")
            wake = [p for p in listing if p not in self._known]
            self._known = current
            for path in self._poll_targets():
                stat = _stat_key(path)
                # Unknown before (no stat kept): look, a harmless extra read at worst.
                if stat != self._poll_stats.get(path) and path not in wake:
                    wake.append(path)
                self._poll_stats[path] = stat
            for path in _arrival_order(wake):
                self._wake.put_nowait(path)

    def _poll_targets(self) -> set[str]:
        """Files whose size/mtime matter: being written, growing 4-D, broken, too short."""
        targets = set(self._files) | set(self._broken)
        targets.update(self.reader.growing())
        targets.update(p for p, (_, kind) in self._ignored.items() if _may_grow(kind))
        for gone in set(self._poll_stats) - targets:
            del self._poll_stats[gone]
        return targets

    def _skip_existing(self, path: str) -> None:
        self._skipped[path] = _stat_key(path)
        self.reader.skip(path)

    def _notify(self, path: str, how: str) -> None:
        """From watchdog's thread: ``how`` is created, modified, closed, moved or deleted."""
        loop = self._loop
        if loop is None or self._closed:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._on_fs_event, path, how)

    def _on_fs_event(self, path: str, how: str) -> None:
        if self._closed or self._wake is None:
            return
        if how == "deleted":
            state = self._files.pop(path, None)
            if state is not None and state.timer is not None:
                state.timer.cancel()
            for table in (self._ignored, self._broken, self._skipped, self._poll_stats):
                table.pop(path, None)
            self.reader.forget([path])
            return
        if how == "modified" and self._close_events:
            # The close event follows; keep a late check in case it never comes (mmap writers).
            self._schedule(path, self.settle)
            return
        self._wake.put_nowait(path)

    def _schedule(self, path: str, delay: float) -> None:
        state = self._files.get(path)
        if state is None:
            stat = _stat_key(path)
            if stat is None:
                return
            state = self._files[path] = _FileState(stat=stat, changed_at=time.monotonic())
        if state.timer is not None:
            state.timer.cancel()
        assert self._loop is not None and self._wake is not None
        state.timer = self._loop.call_later(delay, self._wake.put_nowait, path)

    # ------------------------------------------------------------------ reading

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            batch = [await self._wake.get()]
            while not self._wake.empty():
                batch.append(self._wake.get_nowait())
            # Several files at once (a poll, the folder at start): oldest, then by number.
            for path in _arrival_order(batch):
                try:
                    await self._attempt(path)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never let one file stop the watch
                    log.exception("unexpected error on %s", path)
                    self._report_broken(path, f"unexpected {type(exc).__name__}: {exc}")
                # Let the consumer take a finished volume now, not after the whole batch
                # (reads on the loop have no other await point).
                await asyncio.sleep(0)

    def _wants(self, path: str) -> tuple[FileKind, tuple[int, int]] | None:
        """An image worth reading now: its kind and size/mtime; None (counted) if not."""
        if self.exclude and os.path.realpath(path) in self.exclude:
            return None
        stat = _stat_key(path)
        if stat is None:  # gone (renamed away, deleted): nothing to read
            return None
        if path in self._skipped:
            if self._skipped[path] == stat:
                return None
            del self._skipped[path]  # changed since start: a new or growing file
        if path in self._broken:
            if self._broken[path] == stat:
                return None
            del self._broken[path]
        if path in self._ignored:
            old_stat, old_kind = self._ignored[path]
            if old_stat == stat or not _may_grow(old_kind):
                return None
            # A name that did not say, seen while short: it grew, so look again.
            del self._ignored[path]
            self.counters.ignored -= 1
        kind = classify(path)
        if not kind.is_image:
            self._ignored[path] = (stat, kind)
            if kind.reason.startswith(("hidden", "temporary")):
                # Every exporter's normal work in progress: counted apart, no event each.
                self.counters.temporary += 1
                return None
            self.counters.ignored += 1
            self._emit("ignored", f"{os.path.basename(path)}: ignored ({kind.reason})", path)
            return None
        return kind, stat

    def _forget_state(self, path: str) -> None:
        state = self._files.pop(path, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    async def _attempt(self, path: str) -> None:
        wanted = self._wants(path)
        if wanted is None:
            self._forget_state(path)
            return
        kind, stat = wanted
        now = time.monotonic()
        state = self._files.get(path)
        if state is None:
            state = self._files[path] = _FileState(stat=stat, changed_at=now)
        elif state.stat != stat:
            state.stat, state.changed_at = stat, now
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        state.attempts += 1
        state.last_try = now
        try:
            if self.read_in_thread:
                volumes = await asyncio.to_thread(self.reader.read, path, kind)
            else:
                volumes = self.reader.read(path, kind)
        except FileNotFoundError:
            self._files.pop(path, None)
            return
        except VolumeReadError as exc:
            self._after_failure(path, state, exc)
            return
        arrived = _local_clock()
        self._files.pop(path, None)
        self._poll_stats[path] = stat  # what was read; a later change means new volumes
        for volume in volumes:
            self._deliver(volume, path, arrived)

    def _after_failure(self, path: str, state: _FileState, exc: VolumeReadError) -> None:
        now = time.monotonic()
        quiet = now - state.changed_at
        name = os.path.basename(path)
        limit = self.incomplete_timeout if isinstance(exc, IncompleteFile) else self.settle
        if quiet >= limit and state.attempts > 1:
            self._files.pop(path, None)
            waited = f" after {quiet:.1f} s unchanged" if isinstance(exc, IncompleteFile) else ""
            self._report_broken(path, f"{exc.reason}{waited}", stat=state.stat)
            return
        if state.attempts == 1:
            self._emit("retrying", f"{name}: not readable yet, retrying ({exc.reason})", path)
        self.counters.retries += 1
        backoff = min(self.retry_interval * 2 ** (state.attempts - 1), 0.5)
        # Never later than the moment the file would count as broken.
        self._schedule(path, max(self.retry_interval, min(backoff, limit - quiet + 1e-3)))

    def _report_broken(self, path: str, reason: str, stat: tuple[int, int] | None = None) -> None:
        self._broken[path] = stat if stat is not None else _stat_key(path)
        self.counters.broken += 1
        self._emit("broken", f"{os.path.basename(path)}: skipped, broken image ({reason})", path)

    def _deliver(self, volume: Volume, path: str, arrived: float) -> None:
        assert self._out is not None
        series = volume.series
        if not self._series or self._series[-1] != series:
            if series in self._series:
                self._emit(
                    "stale_series",
                    f"{volume.source}: dropped, belongs to earlier series {series} "
                    f"(now at {self._series[-1]})",
                    path,
                )
                return
            self._series.append(series)
            self.counters.series += 1
            tr = f", TR {volume.tr:g} s" if volume.tr else ""
            self._emit(
                "new_series",
                f"{volume.source}: new series {series} ({'x'.join(map(str, volume.data.shape))}"
                f"{tr}), segment {len(self._series) - 1}",
                path,
            )
        for warning in volume.warnings:
            if (series, warning.kind) not in self._warned:
                self._warned.add((series, warning.kind))
                self._emit(warning.kind, warning.message, path)
        self._check_order(volume, path)
        self.counters.volumes += 1
        self._out.put_nowait(ArrivedVolume(volume, path, arrived, len(self._series) - 1))

    def _check_order(self, volume: Volume, path: str) -> None:
        if volume.index is None:
            return
        last = self._last_index.get(volume.series)
        if last is not None and volume.index > last + 1:
            missing = list(range(last + 1, volume.index))
            self.counters.gaps += 1
            self.counters.missing += len(missing)
            self._emit(
                "gap",
                f"{volume.source}: volume {volume.index + 1} follows volume {last + 1}; "
                f"missing volume{'s' if len(missing) > 1 else ''} "
                f"{_spans([m + 1 for m in missing])} (counting from 1)",
                path,
            )
        elif last is not None and volume.index <= last:
            self.counters.out_of_order += 1
            self._emit(
                "out_of_order",
                f"{volume.source}: volume {volume.index + 1} arrived after volume {last + 1}"
                " (counting from 1)",
                path,
            )
        if last is None or volume.index > last:
            self._last_index[volume.series] = volume.index

    def _emit(self, kind: str, message: str, path: str | None) -> None:
        event = WatchEvent(kind, message, path)
        self.events.append(event)
        level = logging.INFO if kind in ("new_series", "retrying", "ignored") else logging.WARNING
        log.log(level, "%s: %s", kind, message)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("on_event callback failed for %s", event)


def _may_grow(kind: FileKind) -> bool:
    """An unknown name that was too short to sniff may still become a DICOM file."""
    return kind.reason.startswith("too short")


def _arrival_order(paths: list[str]) -> list[str]:
    """Each path once, oldest first, then by the numbers in their names (same-tick mtimes)."""
    return sorted(set(paths), key=lambda p: (_mtime_ns(p), _natural_key(p)))


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 1 << 62


def _local_clock() -> float:
    import pylsl

    return pylsl.local_clock()


class _Handler(FileSystemEventHandler):
    """watchdog handler: forwards file events (not directories) to the watcher's loop."""

    def __init__(self, watcher: VolumeWatcher) -> None:
        super().__init__()
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        src = os.fsdecode(event.src_path)
        if kind == "moved":
            self.watcher._notify(src, "deleted")
            dest = os.fsdecode(event.dest_path)
            if _inside(dest, self.watcher.folder):
                self.watcher._notify(dest, "moved")
        elif kind in ("created", "modified", "closed", "deleted"):
            self.watcher._notify(src, kind)


def _inside(path: str, folder: str) -> bool:
    return os.path.abspath(path).startswith(folder + os.sep)
