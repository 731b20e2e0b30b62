"""The shipped default checkpoint: loads from the package, is small, and beats chance on the
held-out synthetic participant P15 (never seen in training or validation)."""

from __future__ import annotations

import numpy as np
import pytest

from emorecog_stream.commands.evaluate import evaluate_sessions
from emorecog_stream.model import load_model
from emorecog_stream.model.checkpoint import DEFAULT_CHECKPOINT
from emorecog_stream.model.data import session_data
from emorecog_stream.recordings.synth import generate_session


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def p15():
    return session_data(generate_session(15))


def test_default_checkpoint_is_package_data_and_small(model):
    assert DEFAULT_CHECKPOINT.is_file()
    assert DEFAULT_CHECKPOINT.stat().st_size < 5 * 1024 * 1024
    assert model.model_id.startswith("emorecog-net-stream:")
    training = model.metadata["training"]
    assert training["seed"] == 2024 and training["data"] == ["synth"]
    assert training["split"]["test"] == ["P15", "P16"]
    assert (DEFAULT_CHECKPOINT.parent / "MODEL_CARD.md").is_file()


@pytest.mark.slow
def test_default_checkpoint_beats_chance_on_a_held_out_participant(model, p15):
    figures = evaluate_sessions(model, [p15])
    assert figures["per_tr"]["n"] == 30 * 25
    assert figures["per_trial"]["accuracy"] > 0.45  # chance: 1/3 (10 videos per category)
    assert figures["per_tr"]["accuracy"] > 0.45
    assert figures["per_trial"]["intensity_pearson_r"] > 0.3
    assert (
        figures["per_trial"]["intensity_mae"] < figures["per_trial"]["intensity_mae_predicting_0"]
    )


def test_default_checkpoint_steps_as_it_predicts(model, p15):
    n = 120
    hr = p15.heart_rate[:n].copy()
    hr[40:70] = np.nan  # a PPG dropout, on top of whatever the aligner left missing
    rr = p15.respiration_rate[:n]
    seq = model.predict_sequence(p15.roi[:n], hr, rr)
    stepper = model.stepper()
    outs = [stepper.step(p15.roi[i], hr[i], rr[i]) for i in range(n)]
    np.testing.assert_allclose(
        np.array([o.probabilities for o in outs]), seq.probabilities, atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(np.array([o.intensity for o in outs]), seq.intensity, atol=1e-5)


def test_training_data_of_the_default_checkpoint_is_still_what_we_generate(model, p15):
    """A tripwire: when the generator or the aligner changes what P15 looks like to the model,
    `emorecog-stream train` no longer reproduces default.pt and its model card; retrain it
    (MODEL_CARD.md says how) and update the card's figures."""
    recorded = {s["participant"]: s["data_digest"] for s in model.metadata["training"]["sessions"]}
    assert len(recorded) == 16
    assert p15.digest() == recorded["P15"], "P15 changed since default.pt was trained"
