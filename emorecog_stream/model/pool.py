"""Steppers of many sessions, stepped together: what the hub and ``rerun`` give the model.

Why: one hub serves tens of sessions with one copy of the weights. Stepping each session
alone costs the model's fixed per-call overhead (a few dozen small NumPy operations) once per
session and TR; sessions whose volumes are ready at the same moment can instead go through
the network as one batch, whose cost grows far slower than the batch. :class:`StepperPool`
hands each session a :class:`PoolSlot` (its own GRU state, baselines and convolution carry)
and :meth:`StepperPool.step_many` advances any set of slots, one volume each, in one pass.

Models that cannot batch (the Keras v1.0 port) get one ordinary stepper per slot, stepped one
after another: the same interface, no batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emorecog_stream.model.api import StepOutput


@dataclass(frozen=True)
class StepRequest:
    """One volume for one session: ``reset`` starts the session afresh before this step."""

    slot: PoolSlot
    roi: np.ndarray
    heart_rate: float
    respiration_rate: float
    reset: bool = False


class PoolSlot:
    """One session's place in a :class:`StepperPool`; also a plain ``Stepper`` (step/reset),
    so code that steps one session at a time can use it unchanged."""

    def __init__(self, pool: StepperPool, stepper: Any, batchable: bool) -> None:
        self.pool = pool
        self.stepper = stepper  # this session's own stepper (its state lives here)
        self.batchable = batchable  # the pool can step it together with others
        self.closed = False

    def step(self, roi: np.ndarray, heart_rate: float, respiration_rate: float) -> StepOutput:
        out = self.pool.step_many([StepRequest(self, roi, heart_rate, respiration_rate)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def reset(self) -> None:
        self.stepper.reset()

    @property
    def steps(self) -> int:
        return int(getattr(self.stepper, "steps", 0))

    def close(self) -> None:
        """The session ended: its slot can no longer be stepped."""
        self.closed = True


class StepperPool:
    """Slots for many sessions of one model; :meth:`step_many` steps a set of them at once."""

    def __init__(self, model: Any) -> None:
        self.model = model
        make = getattr(model, "stepper_pool", None)
        self._net = make() if make is not None else None
        self._n_rois = int(model.config.n_rois) if self._net is not None else None
        self.batches = 0  # step_many calls that stepped more than one session together
        self.batched_steps = 0  # steps taken in those calls

    @property
    def batching(self) -> bool:
        """True when the model steps a set of sessions as one batch."""
        return self._net is not None

    def slot(self) -> PoolSlot:
        if self._net is None:
            return PoolSlot(self, self.model.stepper(), batchable=False)
        return PoolSlot(self, self._net.stepper(), batchable=True)

    def step_many(self, requests: Sequence[StepRequest]) -> list[StepOutput | BaseException]:
        """One volume for each request's session (each session at most once), in one batch
        where the model allows. A request that cannot be stepped (a malformed volume, a
        closed slot) gets its exception in its place; the others are stepped all the same."""
        out: list[StepOutput | BaseException | None] = [None] * len(requests)
        batch: list[int] = []
        seen: set[int] = set()
        for i, req in enumerate(requests):
            problem = self._check(req, seen)
            if problem is not None:
                out[i] = problem
            elif req.slot.batchable:
                batch.append(i)
            else:
                out[i] = _step_alone(req)
        if len(batch) == 1:  # alone, the single-session path is the cheapest
            out[batch[0]] = _step_alone(requests[batch[0]])
        elif batch:
            self._step_batch(requests, batch, out)
        return [o if o is not None else RuntimeError("not stepped") for o in out]

    def _check(self, req: StepRequest, seen: set[int]) -> BaseException | None:
        if req.slot.pool is not self or req.slot.closed:
            return ValueError("step_many: the slot is closed or belongs to another pool")
        key = id(req.slot)
        if key in seen:
            return ValueError("step_many: a session may step once per call")
        seen.add(key)
        if req.slot.batchable:
            shape = np.shape(req.roi)
            if shape != (self._n_rois,):
                return ValueError(
                    f"step: expected roi of shape ({self._n_rois},) (one volume), got {shape}"
                )
        return None

    def _step_batch(
        self,
        requests: Sequence[StepRequest],
        batch: list[int],
        out: list[StepOutput | BaseException | None],
    ) -> None:
        net = self._net
        assert net is not None
        for i in batch:
            if requests[i].reset:
                requests[i].slot.stepper.reset()
        steppers = [requests[i].slot.stepper for i in batch]
        roi = np.stack([np.asarray(requests[i].roi, dtype=np.float32) for i in batch])
        hr = np.array([requests[i].heart_rate for i in batch], dtype=np.float64)
        rr = np.array([requests[i].respiration_rate for i in batch], dtype=np.float64)
        try:
            probs, intensity = net.step_together(steppers, roi, hr, rr)
        except Exception as exc:  # nothing was written back: every session keeps its state
            for i in batch:
                out[i] = exc
            return
        if len(batch) > 1:
            self.batches += 1
            self.batched_steps += len(batch)
        for j, i in enumerate(batch):
            out[i] = StepOutput(probabilities=probs[j], intensity=float(intensity[j]))


def _step_alone(req: StepRequest) -> StepOutput | BaseException:
    try:
        if req.reset:
            req.slot.stepper.reset()
        return req.slot.stepper.step(req.roi, req.heart_rate, req.respiration_rate)
    except Exception as exc:
        return exc


__all__ = ["PoolSlot", "StepRequest", "StepperPool"]
