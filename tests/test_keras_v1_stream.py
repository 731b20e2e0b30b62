"""The v1.0 model in the engine: rolling-window stepper, missing physiology, predict_sequence,
converted checkpoints and the ``convert`` command."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emorecog_stream.cli import main as cli_main
from emorecog_stream.model.api import StepOutput
from emorecog_stream.model.keras_v1 import (
    DEFAULT_HEART_RATE,
    DEFAULT_RESPIRATION_RATE,
    KerasV1Error,
    KerasV1StreamingModel,
    convert_keras_v1,
    load_converted,
    load_keras_v1,
    load_keras_v1_model,
    normalise_window,
)

FIXTURES = Path(__file__).parent / "fixtures" / "keras_v1"
TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> KerasV1StreamingModel:
    return load_keras_v1_model(FIXTURES / "k2_full.h5")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "k2_reference.npz") as z:
        return {k: z[k] for k in z.files}


def session(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.normal(size=(n, 246)), axis=0) + 100).astype(np.float32)


def test_waits_for_25_volumes_then_equals_keras(model, ref) -> None:
    """A trial's raw volumes stepped in: the 25th output is Keras's prediction for the trial."""
    stepper = model.stepper()
    trial = ref["raw"][3].T  # (25, 246): volume t is column t of the .mat layout
    hr, rr = (float(v) for v in ref["rates"][3])
    outs = [stepper.step(vol, hr, rr) for vol in trial]
    for out in outs[:24]:
        assert isinstance(out, StepOutput) and not out.ready and out.level is None
        assert np.isnan(out.probabilities).all() and math.isnan(out.intensity)
    last = outs[24]
    assert last.ready
    np.testing.assert_allclose(last.probabilities, ref["class_probs"][3], atol=TOL, rtol=0)
    level = ref["level_probs"][3]
    assert last.level == int(np.argmax(level)) - 4
    assert last.intensity == pytest.approx(float(np.dot(level, np.arange(-4, 5))), abs=1e-3)
    assert last.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_window_rolls(model) -> None:
    """At volume t the prediction is the model on volumes t-24..t, normalised over them."""
    vols = session(40)
    stepper = model.stepper()
    outs = [stepper.step(v, 72.0, 14.0) for v in vols]
    direct, _ = model.model.predict(normalise_window(vols[10:35]), np.array([72.0, 14.0]))
    np.testing.assert_allclose(outs[34].probabilities, direct[0], atol=1e-6)
    assert stepper.filled == 25


def test_missing_rates_use_default_then_last_valid(model) -> None:
    vols = session(30, seed=2)
    hr = np.full(30, np.nan)
    rr = np.full(30, np.nan)
    hr[26], rr[27] = 88.0, 21.0
    stepper = model.stepper()
    outs = []
    for t in range(30):
        outs.append(stepper.step(vols[t], hr[t], rr[t]))
        if t == 24:
            assert stepper.last_rates == (DEFAULT_HEART_RATE, DEFAULT_RESPIRATION_RATE)
            assert stepper.last_substituted == (True, True)
        if t == 26:
            assert stepper.last_rates == (88.0, DEFAULT_RESPIRATION_RATE)
            assert stepper.last_substituted == (False, True)
        if t == 29:
            assert stepper.last_rates == (88.0, 21.0)  # both held from their last valid value
            assert stepper.last_substituted == (True, True)
    expected, _ = model.model.predict(normalise_window(vols[5:30]), np.array([88.0, 21.0]))
    np.testing.assert_allclose(outs[29].probabilities, expected[0], atol=1e-6)
    with_default, _ = model.model.predict(
        normalise_window(vols[0:25]), np.array([DEFAULT_HEART_RATE, DEFAULT_RESPIRATION_RATE])
    )
    np.testing.assert_allclose(outs[24].probabilities, with_default[0], atol=1e-6)


def test_predict_sequence_equals_stepping(model) -> None:
    vols = session(45, seed=3)
    rng = np.random.default_rng(4)
    hr = rng.uniform(55, 100, 45)
    rr = rng.uniform(9, 20, 45)
    hr[rng.random(45) < 0.3] = np.nan
    rr[rng.random(45) < 0.3] = np.nan
    stepper = model.stepper()
    steps = [stepper.step(vols[t], hr[t], rr[t]) for t in range(45)]
    seq = model.predict_sequence(vols, hr, rr)
    assert seq.probabilities.shape == (45, 3) and seq.intensity.shape == (45,)
    assert np.isnan(seq.probabilities[:24]).all() and np.isnan(seq.intensity[:24]).all()
    stepped = np.array([s.probabilities for s in steps[24:]])
    assert np.array_equal(seq.probabilities[24:], stepped)
    assert np.array_equal(seq.intensity[24:], np.array([s.intensity for s in steps[24:]]))
    batched = model.predict_sequence(vols, hr, rr, batch_size=8)
    np.testing.assert_allclose(batched.probabilities[24:], stepped, atol=1e-6)


def test_reset_equals_fresh_stepper(model) -> None:
    vols = session(30, seed=5)
    used = model.stepper()
    for v in vols[:20]:
        used.step(v, 60.0, 12.0)
    used.reset()
    fresh = model.stepper()
    a = [used.step(v, np.nan, 13.0) for v in vols]
    b = [fresh.step(v, np.nan, 13.0) for v in vols]
    assert not a[23].ready
    for x, y in zip(a, b, strict=True):
        assert x.ready == y.ready and x.level == y.level
        np.testing.assert_array_equal(x.probabilities, y.probabilities)


def test_step_rejects_bad_volumes(model) -> None:
    stepper = model.stepper()
    with pytest.raises(ValueError, match=r"expected 246 values.*\(245,\)"):
        stepper.step(np.zeros(245), 70.0, 15.0)
    with pytest.raises(ValueError, match="non-finite"):
        stepper.step(np.full(246, np.nan), 70.0, 15.0)


# --- converted checkpoints ---------------------------------------------------------------------


def test_converted_checkpoint_round_trip(tmp_path: Path, ref) -> None:
    out = tmp_path / "v1.pt"
    assert cli_main(["convert", str(FIXTURES / "k2_full.h5"), "-o", str(out)]) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "keras-v1" and ckpt["source"]["file"] == "k2_full.h5"
    assert len(ckpt["source"]["sha256"]) == 64 and ckpt["parameters"] == 63250
    from_pt = load_keras_v1_model(out)
    from_h5 = load_keras_v1_model(FIXTURES / "k2_full.h5")
    assert from_pt.model_id == from_h5.model_id
    assert from_pt.model_id.startswith("keras-v1:k2_full:")
    c, lv = from_pt.model.predict(ref["mri"], ref["rates"])
    np.testing.assert_allclose(c, ref["class_probs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(lv, ref["level_probs"], atol=TOL, rtol=0)
    direct = load_converted(ckpt, out)
    assert direct.model_id == from_h5.model_id


def test_convert_refuses_to_overwrite_and_reports_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "v1.pt"
    out.write_bytes(b"x")
    assert cli_main(["convert", str(FIXTURES / "k3_full.h5"), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["convert", str(FIXTURES / "k3_full.h5"), "-o", str(out), "--force"]) == 0
    bad = tmp_path / "model.h5"
    bad.write_text("nope")
    assert cli_main(["convert", str(bad), "-o", str(tmp_path / "b.pt")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err


def test_checkpoint_with_wrong_tensor_is_rejected(tmp_path: Path) -> None:
    ckpt = convert_keras_v1(FIXTURES / "k2_full.h5")
    ckpt["state_dict"]["stream_l.dense1.weight"] = torch.zeros(5, 5)
    with pytest.raises(
        KerasV1Error, match=r"stream_l\.dense1\.weight.*\(5, 5\), expected \(20, 12\)"
    ):
        load_converted(ckpt, tmp_path / "x.pt")
    with pytest.raises(KerasV1Error, match="not a converted Keras v1 checkpoint"):
        load_converted({"format": "emorecog-net"}, tmp_path / "x.pt")


def test_model_ids_differ_per_file() -> None:
    ids = {load_keras_v1(FIXTURES / n).model_id for n in ("k2_full.h5", "k3_full.h5")}
    assert len(ids) == 2


def test_load_model_delegates_to_keras_v1(tmp_path: Path) -> None:
    """``load_model`` (the model package's entry point) accepts both spellings."""
    mod = pytest.importorskip("emorecog_stream.model")
    if not hasattr(mod, "load_model"):
        pytest.skip("emorecog_stream.model.load_model is not there yet")
    out = tmp_path / "v1.pt"
    torch.save(convert_keras_v1(FIXTURES / "k2_full.h5"), out)
    expected = load_keras_v1_model(FIXTURES / "k2_full.h5").model_id
    assert mod.load_model(f"keras-v1:{FIXTURES / 'k2_full.h5'}").model_id == expected
    assert mod.load_model(str(out)).model_id == expected


def test_model_id_keeps_dotted_stems(tmp_path: Path) -> None:
    path = tmp_path / "bestmodel.v2.h5"
    path.write_bytes((FIXTURES / "k3_full.h5").read_bytes())
    model_id = load_keras_v1_model(path).model_id
    assert model_id.startswith("keras-v1:bestmodel.v2:") and len(model_id.split(":")[2]) == 8
    assert load_keras_v1(FIXTURES / "k3.weights.h5").model_id.startswith("keras-v1:k3:")


def test_load_errors_are_short_and_name_the_file(tmp_path: Path) -> None:
    text_h5 = tmp_path / "bestmodel_02815.h5"
    text_h5.write_text("not a model")
    with pytest.raises(KerasV1Error, match=r"bestmodel_02815\.h5: not an HDF5 file"):
        load_keras_v1_model(text_h5)
    junk_pt = tmp_path / "v1.pt"
    junk_pt.write_bytes(b"\x00\x01junk")
    with pytest.raises(
        KerasV1Error, match=r"v1\.pt: neither a Keras HDF5 file nor a converted"
    ) as e:
        load_keras_v1_model(junk_pt)
    assert "\n" not in str(e.value)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**16),
    missing=st.floats(min_value=0.0, max_value=1.0),
)
def test_stepping_equals_predict_sequence_property(
    model, n: int, seed: int, missing: float
) -> None:
    rng = np.random.default_rng(seed)
    vols = session(n, seed=seed)
    hr = rng.uniform(50, 110, n)
    rr = rng.uniform(8, 24, n)
    hr[rng.random(n) < missing] = np.nan
    rr[rng.random(n) < missing] = np.nan
    stepper = model.stepper()
    steps = [stepper.step(vols[t], hr[t], rr[t]) for t in range(n)]
    seq = model.predict_sequence(vols, hr, rr)
    for t, out in enumerate(steps):
        assert out.ready == (t >= 24)
        if out.ready:
            assert np.array_equal(seq.probabilities[t], out.probabilities)
            assert seq.intensity[t] == out.intensity
        else:
            assert np.isnan(seq.probabilities[t]).all()
