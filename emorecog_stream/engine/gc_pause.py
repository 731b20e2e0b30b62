"""Keep Python's cyclic garbage collector out of the latency path.

Why: a full (generation 2) collection walks every tracked object of the process. With torch,
numpy and the engine loaded that is ~150,000 objects and ~90 ms on the 2-core development
machine, paid at a moment nobody chooses - in the middle of a step. In a 64-session hub run,
full collections of 120-330 ms (wall, on a loaded machine) were logged while p99 stood at
150-230 ms. What the
process holds once it serves (modules, the model's weights, each session's engine and
buffers) lives until the end anyway, so it is moved out of the collector's sight
(:func:`gc.freeze`): collections then only walk what was made since, and take well under a
millisecond. Garbage cycles made later are still collected; what was frozen and ends
later (a hub's finished session) is freed by :func:`collect_released`.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect the young generations, then exempt every object alive now from later
    collections. Call it once the process is set up, and again after it has built
    long-lived state (a hub starting sessions); each call costs about a young collection."""
    gc.collect(1)
    gc.freeze()


def collect_released() -> None:
    """Free what ended since the last freeze (a hub's finished session: its engine and
    buffers hold reference cycles, which frozen objects never give back), then freeze again.

    This is the one full collection the process still makes, at a moment it chooses: when a
    session ends, not in the middle of the other sessions' steps at random. A hub that serves
    sessions for weeks would otherwise keep every ended session's memory."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


__all__ = ["collect_released", "freeze_long_lived"]
