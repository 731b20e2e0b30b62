"""Training, checkpoints, evaluation and the train/evaluate commands, on slivers of data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emorecog_stream.cli import main as cli_main
from emorecog_stream.model import load_model
from emorecog_stream.model.checkpoint import (
    FORMAT,
    CheckpointError,
    net_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from emorecog_stream.model.data import (
    Split,
    label_volumes,
    parse_participants,
    read_split_file,
    session_data,
)
from emorecog_stream.model.metrics import evaluate_arrays, macro_f1, pearson_r
from emorecog_stream.model.net import EmoRecogNet, NetConfig
from emorecog_stream.model.training import TrainConfig, train
from emorecog_stream.recordings.synth import SynthConfig, generate_session

SMALL = SynthConfig(n_participants=4, n_trials=6, rest_s=5.0, lead_in_s=5.0)
TINY_NET = NetConfig(spatial_channels=8, temporal_channels=8, hidden=16, fusion_hidden=8)


@pytest.fixture(scope="module")
def sessions():
    return [generate_session(i, SMALL) for i in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def datas(sessions):
    return [session_data(s) for s in sessions]


def test_volumes_are_labelled_after_the_hemodynamic_delay(sessions):
    s = sessions[0]
    t = s.fmri.timestamps
    trials = s.trials()
    cat, inten, trial = label_volumes(s, t, 5.0)
    first = trials[0]
    inside = (t >= first.onset + 5.0) & (t < first.offset + 5.0)
    assert (trial[inside] == first.index).all()
    assert (cat[inside] == first.category + 1).all()
    assert (inten[inside] == first.intensity).all()
    assert (cat[t < first.onset + 5.0] == -1).all()  # lead-in and the delay: unlabelled
    cat0, _, _ = label_volumes(s, t, 0.0)
    assert (cat0 >= 0).sum() == (cat >= 0).sum() == len(trials) * 25


def test_session_data_uses_the_aligner_rates(sessions, datas):
    from emorecog_stream.core.aligner import align_session

    steps = align_session(sessions[0])
    d = datas[0]
    assert d.roi.shape == (d.n_volumes, 246) == (len(steps), 246) and d.roi.dtype == np.float32
    hr = np.array([s.heart_rate if s.heart_rate_valid else np.nan for s in steps], np.float32)
    np.testing.assert_array_equal(d.heart_rate, hr)
    assert np.isfinite(d.heart_rate).mean() > 0.9
    assert np.nanmean(d.heart_rate) == pytest.approx(70, abs=15)
    assert d.label_delay == 5.0


def test_split_masks_and_split_files(datas, tmp_path):
    split = Split.from_lists(["P01"], ["P02"], ["P03"])
    assert split.mask(datas[0], "train").sum() == (datas[0].category >= 0).sum()
    assert not split.mask(datas[0], "val").any()
    with pytest.raises(ValueError, match="both"):
        Split.from_lists(["P01"], ["P01"], [])
    rows = tmp_path / "split.csv"
    rows.write_text("path,split\nN1\\P01_0_N1.npz,train\nP1\\P01_1_P1.npz,test\nP02,val\n")
    s = read_split_file(rows)
    assert s.trials == {("P01", 0): "train", ("P01", 1): "test"}
    assert s.participants == {"P02": "val"}
    m = s.mask(datas[0], "test")
    assert m.any() and set(datas[0].trial[m].tolist()) == {1}
    cols = tmp_path / "cols.csv"
    cols.write_text("train,valid,test\n.../P01_3.npz,.../P02_0.npz,.../P03_4.npz\n")
    assert read_split_file(cols).trials[("P02", 0)] == "val"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nP01_1,maybe\n")
    with pytest.raises(ValueError, match="line 2: no split name"):
        read_split_file(bad)
    assert parse_participants("P01-P03,7") == ["P01", "P02", "P03", "P07"]


def test_metrics_are_right_on_known_cases():
    assert macro_f1(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2])) == 1.0
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    assert pearson_r(np.arange(5), 2 * np.arange(5) + 1) == pytest.approx(1.0)
    assert np.isnan(pearson_r(np.ones(4), np.arange(4)))
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    inten = np.array([-3.0, 0.0, 2.0, 1.0])
    cat = np.array([0, 1, 2, 2])
    target = np.array([-4.0, 0.0, 2.0, 3.0])
    trial = np.array([0, 0, 1, 1])
    figs = evaluate_arrays([(probs, inten, cat, target, trial, np.ones(4, bool))])
    assert figs["per_tr"]["accuracy"] == 0.75
    assert figs["per_tr"]["intensity_mae"] == pytest.approx(0.75)
    # per trial: the last volume of each trial (rows 1 and 3)
    assert figs["per_trial"]["n"] == 2 and figs["per_trial"]["accuracy"] == 0.5
    assert "not published" in figs["finalscore"]


@pytest.mark.slow
def test_training_runs_deterministically_and_round_trips(datas, tmp_path):
    split = Split.from_lists(["P01", "P02"], ["P03"], [])
    config = TrainConfig(epochs=2, batch_size=4, crop_volumes=64, burn_in=8, net=TINY_NET)
    a = train(datas, split, config)
    b = train(datas, split, config)
    assert len(a.history) == 2 and "val_loss" in a.history[0]
    pairs = zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True)
    for (ka, va), (kb, vb) in pairs:
        assert ka == kb and torch.equal(va, vb), ka
    path = tmp_path / "m.pt"
    model_id = save_checkpoint(a.net, path, training={"seed": 2024}, metrics={"x": 1})
    model = load_model(path)
    assert model.model_id == model_id and model_id.startswith(FORMAT + ":")
    d = datas[2]
    out = model.predict_sequence(d.roi, d.heart_rate, d.respiration_rate)
    with torch.inference_mode():
        a.net.eval()
        from emorecog_stream.model.stepper import sequence_inputs

        inputs = sequence_inputs(d.roi, d.heart_rate, d.respiration_rate, a.net.config, np.float32)
        logits, _ = a.net(*(torch.from_numpy(x)[None] for x in inputs))
    np.testing.assert_allclose(out.probabilities, torch.softmax(logits[0], -1).numpy(), atol=1e-6)
    # the normalisation statistics travel in the checkpoint
    assert not torch.equal(model.net.roi_std, torch.ones(246))
    assert model.metadata["training"] == {"seed": 2024}


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"expected a PyTorch checkpoint .* found a text"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="expected a dict with a 'format' key"):
        load_model(other)
    good = tmp_path / "good.pt"
    save_checkpoint(EmoRecogNet(TINY_NET), good)
    data = read_checkpoint(good)
    data["config"]["hidden"] = 32
    with pytest.raises(CheckpointError, match="size mismatch"):
        net_from_checkpoint(data, good)
    data = read_checkpoint(good)
    data["format_version"] = 99
    with pytest.raises(CheckpointError, match="format_version"):
        net_from_checkpoint(data, good)


KERAS_FIXTURE = Path(__file__).parent / "fixtures" / "keras_v1" / "k2_full.h5"


@pytest.mark.skipif(not KERAS_FIXTURE.is_file(), reason="Keras v1 fixtures not present")
def test_load_model_hands_keras_v1_files_to_the_port(tmp_path):
    from emorecog_stream.model import keras_v1

    direct = load_model(f"keras-v1:{KERAS_FIXTURE}")
    assert direct.model_id.startswith("keras-v1:")
    converted = tmp_path / "v1.pt"
    keras_v1.save_converted(KERAS_FIXTURE, converted)
    assert read_checkpoint(converted)["format"] == "keras-v1"
    via_pt = load_model(converted)
    assert type(via_pt) is type(direct) and via_pt.model_id == direct.model_id


@pytest.mark.slow
def test_train_and_evaluate_commands_on_xdf_files(sessions, tmp_path, capsys):
    from emorecog_stream.recordings.xdf import write_xdf

    folder = tmp_path / "data"
    folder.mkdir()
    for s in sessions:
        write_xdf(s, folder / f"{s.participant}.xdf")
    out = tmp_path / "m.pt"
    rc = cli_main(
        ["train", str(folder), "-o", str(out), "--train", "P01,P02", "--val", "P03",
         "--test", "P04", "--epochs", "2", "--crop", "64", "--batch-size", "4", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.with_suffix(".metrics.json").read_text())
    assert report["epochs_run"] == 2 and report["split"]["train"] == ["P01", "P02"]
    assert set(report["metrics"]["test"]["per_trial"]) >= {"accuracy", "macro_f1", "intensity_mae"}
    figures = tmp_path / "eval.json"
    rc = cli_main(
        ["evaluate", str(out), str(folder), "--participants", "P04", "--json", str(figures)]
    )
    assert rc == 0
    got = json.loads(figures.read_text())
    want = report["metrics"]["test"]
    # evaluate (predict_sequence) reproduces the figures training wrote
    for view in ("per_trial", "per_tr"):
        assert got[view]["n"] == want[view]["n"]
        assert got[view]["accuracy"] == pytest.approx(want[view]["accuracy"])
        assert got[view]["intensity_mae"] == pytest.approx(want[view]["intensity_mae"], abs=1e-4)
    assert "per trial" in capsys.readouterr().out


def test_commands_reject_bad_input(tmp_path, capsys):
    assert cli_main(["evaluate", str(tmp_path / "none.pt"), "synth"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "nothing"), "--epochs", "1"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli_main(["train", "--epochs", "0"]) == 2
    assert "--epochs: expected >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_train_on_a_folder_of_icbhi_mat_trials(tmp_path):
    """The seed's per-trial files: one HR/RR pair per trial, labels without delay."""
    import scipy.io

    rng = np.random.default_rng(0)
    folder = tmp_path / "mat"
    folder.mkdir()
    for p in (1, 2, 3):
        for trial in range(6):
            category = trial % 3 - 1
            mri = rng.normal(size=(246, 25)) + category * 0.5
            scipy.io.savemat(
                folder / f"P{p:02d}_{trial}.mat",
                {
                    "mri_d": mri,
                    "pnr_rate": np.array([[70.0 + 3 * category, 15.0]]),
                    "lab_d": np.array([[category, 2 * category]]),
                },
            )
    out = tmp_path / "mat.pt"
    rc = cli_main(
        ["train", str(folder), "-o", str(out), "--train", "P01,P02", "--val", "P03",
         "--test", "", "--epochs", "1", "--crop", "64", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.with_suffix(".metrics.json").read_text())
    assert report["label_delay_s"] == [0.0]
    assert report["metrics"]["val"]["per_trial"]["n"] == 6  # every trial of P03 scored
    assert [s["volumes"] for s in report["sessions"]] == [150, 150, 150]
