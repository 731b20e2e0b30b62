"""NumPy's BLAS held to one thread while the model steps many sessions as one batch.

Used by the hub and by ``rerun`` (engine/hub.py, engine/rerun.py): both step batches of small
matrices, where OpenBLAS's own threads cost more than they save.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import product


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """NumPy's BLAS on one thread while inside (restored after).

    Why: a batched model step multiplies (sessions x inputs) matrices, large enough for
    OpenBLAS to split each product over threads. At this size the hand-off costs more than it
    saves, and beside other busy processes (the other workers, a broker) its threads spin
    for a core: measured, 16 sessions batched took twice the CPU of 16 stepped alone, and a
    third less with one thread. Uses OpenBLAS's own call (found among the loaded libraries,
    Linux; microseconds once found), else threadpoolctl where installed (a few ms a call);
    neither: nothing changes.
    """
    calls = _openblas_thread_calls()
    if calls:
        before = [int(get()) for get, _ in calls]
        for _, put in calls:
            put(1)
        try:
            yield
        finally:
            for (_, put), n in zip(calls, before, strict=True):
                put(n)
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@functools.cache
def _openblas_thread_calls() -> tuple[tuple[Callable[[], int], Callable[[int], None]], ...]:
    """Get/set the number of threads of every OpenBLAS loaded in this process (NumPy's, SciPy's
    own copy, ...); looked up once, empty where none is found (not Linux, another BLAS)."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = sorted(
                {
                    line.split()[-1]
                    for line in f
                    if "openblas" in line.lower() and line.split()[-1].startswith("/")
                }
            )
    except OSError:
        return ()
    calls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in product(("scipy_openblas", "openblas"), ("64_", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                calls.append((get, put))
                break
    return tuple(calls)


__all__ = ["one_blas_thread"]
