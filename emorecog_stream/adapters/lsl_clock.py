"""The LSL clock, read without a call into liblsl where that gives the same number.

Why: ``pylsl.local_clock()`` is a ctypes call, and ctypes releases the GIL for it. In a hub with
hundreds of reader threads the event loop, which asks the clock several times per chunk, then
waits behind them to get the GIL back: measured on a 32-session hub, 28 % of the loop's time
was spent in ``local_clock``. liblsl's clock is ``std::chrono::steady_clock``, which on Linux
is ``CLOCK_MONOTONIC``, the clock of :func:`time.monotonic`; that one keeps the GIL. At import
the two are compared, and :func:`local_clock` is :func:`time.monotonic` only when they agree
(same clock, to within 10 µs); elsewhere it is liblsl's own function.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pylsl

#: Largest difference (s) between the two clocks for them to count as one clock.
SAME_CLOCK_TOLERANCE_S = 1e-5


def _same_clock() -> bool:
    differences = []
    for _ in range(21):
        before = time.monotonic()
        lsl = pylsl.local_clock()
        after = time.monotonic()
        differences.append(lsl - (before + after) / 2.0)
    return abs(statistics.median(differences)) < SAME_CLOCK_TOLERANCE_S


#: ``pylsl.local_clock()``'s value, without releasing the GIL where the platform allows.
local_clock: Callable[[], float] = time.monotonic if _same_clock() else pylsl.local_clock

__all__ = ["SAME_CLOCK_TOLERANCE_S", "local_clock"]
