"""Model steps of many engines, gathered and taken as one batch (the hub, ``rerun``).

Why: a session's step costs the model's fixed per-call overhead; sessions whose volumes are
ready at the same moment (replays started together, scanners on one trigger, a hub catching up
after a pause) can share one pass through the network instead (:class:`~emorecog_stream.model.
pool.StepperPool`). An engine built with a :class:`StepBatch` hands each ready step to it
instead of stepping inline; the batch takes every step handed in during one turn of the event
loop at the start of the next turn (``rerun``, which has no loop, calls :meth:`StepBatch.flush`
itself) and gives each engine its answers back, in the order it handed the steps in. One
engine's steps are never in the same pass (a session steps once per pass), so a session that
catches up on two volumes takes two passes.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from emorecog_stream.model.pool import PoolSlot, StepperPool, StepRequest

if TYPE_CHECKING:
    from emorecog_stream.engine.session import Engine, _PendingStep


class StepBatch:
    """Collects ready steps of several engines and steps them together (see the module)."""

    def __init__(self, model: Any) -> None:
        self.pool = StepperPool(model)
        self._queue: list[tuple[Engine, _PendingStep]] = []
        self._scheduled = False
        self.flushes = 0  # passes through the model
        self.steps = 0  # steps taken
        self.largest = 0  # the largest pass

    def slot(self) -> PoolSlot:
        """A new session's own stepper state in the shared pool."""
        return self.pool.slot()

    def submit(self, engine: Engine, pending: _PendingStep) -> None:
        """Take ``pending`` with the next pass (at the next turn of the running loop)."""
        self._queue.append((engine, pending))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (rerun): the caller flushes
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self, engine: Engine | None = None) -> None:
        """Step everything handed in so far (``engine``: only its steps, e.g. as it closes)."""
        if engine is None:
            self._scheduled = False
            queue, self._queue = self._queue, []
        else:
            queue = [item for item in self._queue if item[0] is engine]
            self._queue = [item for item in self._queue if item[0] is not engine]
        while queue:
            taken: list[tuple[Engine, _PendingStep]] = []
            later: list[tuple[Engine, _PendingStep]] = []
            stepping: set[int] = set()
            for item in queue:  # one step per engine per pass, each engine's in order
                (later if id(item[0]) in stepping else taken).append(item)
                stepping.add(id(item[0]))
            outs = self.pool.step_many([_request(e, p) for e, p in taken])
            self.flushes += 1
            self.steps += len(taken)
            self.largest = max(self.largest, len(taken))
            for (e, p), out in zip(taken, outs, strict=True):
                e._finish_batched(p, out)
            queue = later

    @property
    def pending(self) -> int:
        return len(self._queue)


def _request(engine: Engine, pending: _PendingStep) -> StepRequest:
    step = pending.step
    return StepRequest(
        engine.slot,  # type: ignore[arg-type]
        step.roi,
        step.heart_rate if step.heart_rate_valid else math.nan,
        step.respiration_rate if step.respiration_rate_valid else math.nan,
        reset=pending.reset,
    )


__all__ = ["StepBatch"]
