"""Walk an HDF5 file's metadata in a child process with a time limit, before reading it here.

WHY: libhdf5 can spin in C on a corrupt file (fuzzing found a Keras ``.h5`` whose damaged
global heap makes every variable-length string attribute read loop for minutes), and neither
Python nor h5py can interrupt a C call. So a fresh interpreter, which imports only h5py, first
reads everything a reader's metadata pass touches (every group's links, every attribute, every
dataset's shape, dtype and stored size); when it does not finish within
:func:`metadata_limit_s` it is killed and the file is reported as damaged. When it finishes, the
calling process reads the same metadata itself (libhdf5 is deterministic) and the weights or
data by name. A child that dies from a signal (a crash inside libhdf5) is reported the same
way, so the crash stays in the child. Python exceptions in the child are not reported: the
caller's own read raises them again, with the caller's own message.

The child is started with ``subprocess`` (fork + exec at once, so no fork-after-threads
deadlock) running this file as a script, so it imports neither torch nor this package:
about 0.15 s on an idle machine. Verdicts are kept per file content (SHA-256), so reading the
same file again (``convert`` then ``run``, several sessions of one hub) pays once.

This file runs as ``python -P hdf5_probe.py FILE [ZIP_MEMBER]`` in the child: standard library
and h5py only at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

BASE_LIMIT_S = 2.0
"""Metadata time for any file. A real Keras file needs a few milliseconds; the 5 s bar of
``docs/reliability.md`` is for the whole read, child start included, and some callers read a
file twice (``load_keras_v1_model`` after ``read_keras_v1_file`` on a cache miss)."""

PER_MB_S = 0.1
"""Extra metadata time per MB of file: bigger files hold more groups and datasets."""

START_LIMIT_S = 30.0
"""Time for the child to start and import h5py (machine load, not the file, decides this)."""

_MAX_OBJECTS = 100_000
_MAX_DEPTH = 64
_CACHE_SIZE = 32
_verdicts: dict[tuple[str, str | None], str | None] = {}


class Hdf5ProbeError(Exception):
    """The metadata pass hung or crashed; the message says which (without the file's name)."""


def metadata_limit_s(size_bytes: int) -> float:
    """Seconds the child may spend on the metadata of a file of ``size_bytes``."""
    return BASE_LIMIT_S + PER_MB_S * size_bytes / 1e6


def _content_key(path: Path, member: str | None) -> tuple[str, str | None]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), member


def check_hdf5_metadata(path: str | Path, member: str | None = None) -> None:
    """Raise :class:`Hdf5ProbeError` when reading ``path``'s HDF5 metadata hangs or crashes.

    ``member`` names an HDF5 file inside the zip archive ``path`` (Keras 3's
    ``model.weights.h5``). Returns quietly otherwise, also when the child met a Python error.
    """
    path = Path(path)
    key = _content_key(path, member)
    if key in _verdicts:
        verdict = _verdicts[key]
    else:
        verdict = _run_child(path, member, metadata_limit_s(path.stat().st_size))
        if len(_verdicts) >= _CACHE_SIZE:
            _verdicts.pop(next(iter(_verdicts)))
        _verdicts[key] = verdict
    if verdict is not None:
        raise Hdf5ProbeError(verdict)


def _run_child(path: Path, member: str | None, limit_s: float) -> str | None:
    """None when the child finished; otherwise why the file is taken as damaged."""
    flags = ["-P"] if sys.version_info >= (3, 11) else []  # no cwd on the child's sys.path
    args = [sys.executable, *flags, str(Path(__file__).resolve()), str(path)]
    if member is not None:
        args.append(member)
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    lines: queue.Queue[bytes | None] = queue.Queue()
    # a thread reads the child's lines: a portable wait with a timeout (select() on a pipe
    # is POSIX-only, and labs run Windows)
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        if _next_line(lines, START_LIMIT_S) != b"ready":
            code = proc.poll()
            if code is None:
                return f"the HDF5 metadata check did not start within {START_LIMIT_S:g} s"
            return f"the HDF5 metadata check failed to start (exit {code})"
        if _next_line(lines, limit_s) == b"done":
            return None
        code = proc.poll()
        if code is None:
            return (
                f"took more than {limit_s:.1f} s to read its HDF5 metadata: "
                "the file is probably damaged"
            )
        if code < 0:
            name = signal.Signals(-code).name
            return f"libhdf5 crashed ({name}) reading its HDF5 metadata: the file is damaged"
        return None  # a Python error in the child: the caller's own read reports it
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its handle
        proc.wait()
        proc.stdout.close()


def _read_lines(stream: object, lines: queue.Queue[bytes | None]) -> None:
    try:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line.strip())
    except (OSError, ValueError):  # closed under us after a kill
        pass
    lines.put(None)  # the child exited


def _next_line(lines: queue.Queue[bytes | None], timeout_s: float) -> bytes | None:
    """The child's next line, or None when it exited or said nothing within ``timeout_s``."""
    try:
        return lines.get(timeout=max(0.0, timeout_s))
    except queue.Empty:
        return None


# ---------------------------------------------------------------------------------------------
# the child


def _touch_attributes(obj: object) -> None:
    try:
        attrs = obj.attrs  # type: ignore[attr-defined]
        names = list(attrs.keys())
    except Exception:
        return
    for name in names:
        with contextlib.suppress(Exception):
            attrs[name]


def _walk(h5py: object, group: object, depth: int, seen: list[int]) -> None:
    """Every link, attribute and dataset header below ``group``; errors skip one object."""
    _touch_attributes(group)
    if depth > _MAX_DEPTH:
        return
    try:
        keys = list(group.keys())  # type: ignore[attr-defined]
    except Exception:
        return
    for key in keys:
        seen[0] += 1
        if seen[0] > _MAX_OBJECTS:
            return
        try:
            obj = group.get(key)  # type: ignore[attr-defined]
        except Exception:
            continue
        if isinstance(obj, h5py.Group):  # type: ignore[attr-defined]
            _walk(h5py, obj, depth + 1, seen)
        elif isinstance(obj, h5py.Dataset):  # type: ignore[attr-defined]
            _touch_attributes(obj)
            with contextlib.suppress(Exception):
                obj.shape, obj.dtype, obj.id.get_storage_size()


def _child_main(argv: list[str]) -> int:
    import io
    import zipfile

    import h5py

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    source: object = argv[0]
    if len(argv) > 1:
        with zipfile.ZipFile(argv[0]) as archive:
            source = io.BytesIO(archive.read(argv[1]))
    with h5py.File(source, "r") as h5:
        _walk(h5py, h5, 0, [0])
    out.write(b"done\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
