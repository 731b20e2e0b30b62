"""Batched model steps across sessions (model/pool.py, engine/batch.py) equal stepping alone.

The hub hands every ready step of every session to one :class:`StepBatch`; what each session
gets back must be exactly what its own stepper would have given, whatever the other sessions
do (reset, missing rates, NaN volumes, a malformed volume, steps at other times).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from emorecog_stream.config import apply_overrides, load_config
from emorecog_stream.core.streams import Role
from emorecog_stream.engine.batch import StepBatch
from emorecog_stream.engine.session import Chunk, Engine
from emorecog_stream.model import load_model
from emorecog_stream.model.pool import StepperPool, StepRequest
from emorecog_stream.recordings.synth import SynthConfig, generate_session
from tests.test_engine import Clock, Collector, chunk_events, same_predictions

SHORT = SynthConfig(n_participants=3, n_trials=3, rest_s=5.0, lead_in_s=5.0)


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_pool_steps_any_subset_exactly_as_each_session_alone(model) -> None:
    """12 sessions stepping at random moments (a random subset per pass), with missing rates,
    a NaN ROI value and a reset in one of them: every output equals a lone stepper's, bit for
    bit, and passes of several sessions were really taken as batches."""
    rng = np.random.default_rng(7)
    sessions, volumes = 12, 60
    roi = rng.normal(size=(sessions, volumes, 246)).astype(np.float32)
    hr = rng.uniform(55, 90, size=(sessions, volumes))
    rr = rng.uniform(10, 20, size=(sessions, volumes))
    hr[3, 5:9] = np.nan
    rr[5, 20] = np.nan
    roi[4, 7, 5] = np.nan
    pool = StepperPool(model)
    slots = [pool.slot() for _ in range(sessions)]
    alone = [model.stepper() for _ in range(sessions)]
    done = [0] * sessions
    compared = 0
    while min(done) < volumes:
        ready = [s for s in range(sessions) if done[s] < volumes and rng.random() < 0.6]
        requests = [
            StepRequest(slots[s], roi[s, done[s]], hr[s, done[s]], rr[s, done[s]],
                        reset=(s == 2 and done[s] == 30))
            for s in ready
        ]  # fmt: skip
        for s, out in zip(ready, pool.step_many(requests), strict=True):
            t = done[s]
            if s == 2 and t == 30:
                alone[s].reset()
            expected = alone[s].step(roi[s, t], hr[s, t], rr[s, t])
            assert not isinstance(out, BaseException)
            np.testing.assert_array_equal(out.probabilities, expected.probabilities)
            assert out.intensity == expected.intensity
            done[s] += 1
            compared += 1
    assert compared == sessions * volumes
    assert pool.batches > 0 and pool.batched_steps > pool.batches


def test_a_malformed_volume_fails_alone_and_leaves_the_others_state(model) -> None:
    pool = StepperPool(model)
    good, bad = pool.slot(), pool.slot()
    alone = model.stepper()
    roi = np.ones(246, np.float32)
    outs = pool.step_many(
        [StepRequest(good, roi, 70.0, 15.0), StepRequest(bad, np.ones(100, np.float32), 70, 15)]
    )
    assert isinstance(outs[1], ValueError) and "246" in str(outs[1]) and "100" in str(outs[1])
    expected = alone.step(roi, 70.0, 15.0)
    np.testing.assert_array_equal(outs[0].probabilities, expected.probabilities)
    assert bad.steps == 0 and good.steps == 1
    twice = pool.step_many([StepRequest(good, roi, 70.0, 15.0), StepRequest(good, roi, 70, 15)])
    assert isinstance(twice[1], ValueError) and good.steps == 2


def test_a_model_that_cannot_batch_steps_each_slot_alone() -> None:
    """The Keras v1 port has no batch path: the pool gives each slot its own stepper and the
    answers equal lone steppers'."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "keras_v1" / "k2_full.h5"
    keras = load_model(f"keras-v1:{fixture}")
    pool = StepperPool(keras)
    assert not pool.batching
    slots = [pool.slot(), pool.slot()]
    alone = [keras.stepper(), keras.stepper()]
    rng = np.random.default_rng(1)
    for _ in range(12):
        roi = rng.normal(size=(2, 246)).astype(np.float32)
        outs = pool.step_many([StepRequest(s, roi[i], 70.0, 15.0) for i, s in enumerate(slots)])
        for i, out in enumerate(outs):
            expected = alone[i].step(roi[i], 70.0, 15.0)
            assert out.ready == expected.ready
            np.testing.assert_array_equal(out.probabilities, expected.probabilities)


def make_engine(model, clock, sid, batch=None):
    overrides = {"session.id": sid, "streams.ppg.rate": 400.0, "streams.resp.rate": 50.0}
    config = apply_overrides(load_config(None), overrides)
    out = Collector()
    engine = Engine(config, model, [out], clock=clock, step_batch=batch)
    engine.register_stream(Role.FMRI, "fmri", 1.0)
    return engine, out


async def test_engines_sharing_a_step_batch_publish_what_each_publishes_alone(model) -> None:
    """Three sessions' chunks interleaved through three engines on one StepBatch (volumes of
    all three ready in the same turn of the loop, so their steps go through the model together)
    give exactly the predictions of three engines stepping alone."""
    recordings = [generate_session(i + 1, SHORT) for i in range(3)]
    events = [chunk_events(r) for r in recordings]

    async def run(batch: StepBatch | None) -> list[list]:
        clock = Clock()
        pairs = [make_engine(model, clock, f"s{i}", batch) for i in range(3)]

        async def source(i: int):
            for role, data, ts in events[i]:
                clock.t = max(clock.t, float(ts[-1]) + 0.001)
                yield Chunk(role, data, ts, clock.t)
                await asyncio.sleep(0)

        await asyncio.gather(*(e.run(source(i)) for i, (e, _) in enumerate(pairs)))
        return [out.predictions for _, out in pairs]

    batch = StepBatch(model)
    together = await run(batch)
    alone = await run(None)
    for a, b in zip(together, alone, strict=True):
        assert len(a) > 50
        same_predictions(a, b)
    assert batch.largest >= 2 and batch.steps == sum(len(a) for a in together)
    assert batch.pending == 0
