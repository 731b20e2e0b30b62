"""Files that hold participant data, created readable by their owner only.

Why: session logs carry a participant's physiology and predictions, reports and checkpoints are
derived from it; on a shared lab machine the usual umask (022) would make each of them readable
by every account. So every such file is *created* with mode 0600. The mode goes to ``open(2)``,
where the kernel clears the umask's bits from it, so a stricter umask (077, 277) still wins.

A file that already exists keeps its mode: appending to a log the user shared on purpose must
not take the group's access away. Files replaced as a whole (checkpoints) are written to a new
private file beside the target and renamed over it, so an old group-readable file gives its
mode to nothing, and a crash mid-write never leaves half a checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["PRIVATE_MODE", "open_private", "replace_private"]

PRIVATE_MODE = 0o600
"""Read and write for the owner, nothing for group and others (before the umask)."""

_FLAGS = {
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


def open_private(path: str | os.PathLike[str], mode: str = "ab", buffering: int = -1) -> BinaryIO:
    """Open ``path`` for binary writing; a new file is created owner-only (0600 minus umask).

    ``mode`` is ``"ab"`` (append), ``"wb"`` (truncate) or ``"xb"`` (must not exist yet).
    ``buffering=0`` gives an unbuffered raw file, as :func:`open` does. Raises ``OSError``.
    """
    try:
        flags = _FLAGS[mode]
    except KeyError:
        choices = sorted(_FLAGS)
        raise ValueError(f"open_private mode must be one of {choices}, got {mode!r}") from None
    flags |= getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        return os.fdopen(fd, mode, buffering=buffering)  # type: ignore[return-value]
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def replace_private(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write a whole new file at ``path``: owner-only, synced, renamed into place on success.

    Yields a binary file in the same folder (``tempfile.mkstemp`` creates it 0600 minus the
    umask); when the block ends without an exception it is flushed, synced and renamed over
    ``path``. On an exception the partial file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
