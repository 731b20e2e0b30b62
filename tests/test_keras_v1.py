"""The Keras v1.0 port against Keras's own outputs (fixtures made by real TensorFlow, see
tests/fixtures/keras_v1/README.md), the loader's role assignment and errors, and the Keras
semantics the port must copy (padding split, leaky slope, GRU gate order)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from emorecog_stream.model.keras_v1 import (
    KerasV1Error,
    load_keras_v1,
    normalise_window,
)
from emorecog_stream.model.keras_v1_h5 import read_keras_v1_file
from emorecog_stream.model.keras_v1_net import (
    UPSTREAM_SIZES,
    KerasV1Net,
    activation,
    keras_same_padding,
)

FIXTURES = Path(__file__).parent / "fixtures" / "keras_v1"
K2_FILES = ["k2_full.h5", "k2_weights.h5", "k2.weights.h5"]
K3_FILES = ["k3_full.h5", "k3.weights.h5", "k3.keras"]
TOL = 1e-4


def reference(tag: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{tag}_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", K2_FILES + K3_FILES)
def test_outputs_equal_keras(name: str) -> None:
    ref = reference(name[:2])
    model = load_keras_v1(FIXTURES / name)
    class_p, level_p = model.predict(ref["mri"], ref["rates"])
    assert class_p.shape == ref["class_probs"].shape == (6, 3)
    assert level_p.shape == ref["level_probs"].shape == (6, 9)
    np.testing.assert_allclose(class_p, ref["class_probs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(level_p, ref["level_probs"], atol=TOL, rtol=0)
    # The references are not degenerate: a port that ignores an input would not pass by luck.
    assert np.ptp(ref["class_probs"], axis=0).max() > 0.05
    assert np.ptp(ref["level_probs"], axis=0).max() > 0.02


def test_single_window_and_batch_agree() -> None:
    ref = reference("k2")
    model = load_keras_v1(FIXTURES / "k2_full.h5")
    c, lv = model.predict(ref["mri"][2], ref["rates"][2])
    np.testing.assert_allclose(c[0], ref["class_probs"][2], atol=TOL, rtol=0)
    np.testing.assert_allclose(lv[0], ref["level_probs"][2], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", K2_FILES + K3_FILES)
def test_sizes_read_from_file(name: str) -> None:
    s = load_keras_v1(FIXTURES / name).sizes
    assert (s.rois, s.window, s.n_class, s.n_level) == (246, 25, 3, 9)
    for stream, units in ((s.stream_c, 8), (s.stream_l, 12)):
        assert (stream.conv1_filters, stream.conv1_kernel) == (12, 10)
        assert (stream.conv2_filters, stream.conv2_kernel) == (16, 3)
        assert (stream.gru_units, stream.dense1, stream.dense2) == (units, 20, 10)
        assert stream.pool1 == stream.pool2 == (2, 2)
    assert (s.phys1, s.phys2) == (12, 6)
    assert s.hidden_activation == "leaky_relu"
    assert s.concat_order == ("c", "l", "p")
    assert s.parameter_count == 63250  # Keras's own count_params() for the fixture model


def test_roles_follow_the_graph_not_names_or_order() -> None:
    k2 = read_keras_v1_file(FIXTURES / "k2_full.h5")
    assert k2.layout == "full-model" and k2.keras_version == "2.15.0"
    assert k2.layer_names["c.conv1"] == "conv1d" and k2.layer_names["l.conv1"] == "conv1d_3"
    assert k2.layer_names["l.conv2"] == "conv1d_4" and k2.layer_names["l.gru"] == "gru_1"
    assert k2.layer_names["p.dense1"] == "dense_4" and k2.layer_names["class"] == "class"
    # Keras 3 fixture: every automatic name is shifted by layers built before the model.
    k3 = read_keras_v1_file(FIXTURES / "k3_full.h5")
    assert k3.keras_version.startswith("3.")
    assert k3.layer_names["c.conv1"] == "conv1d_1" and k3.layer_names["l.conv1"] == "conv1d_4"
    assert k3.layer_names["c.gru"] == "gru_1" and k3.layer_names["p.dense2"] == "dense_6"


@pytest.mark.parametrize(
    ("tag", "names"), [("k2", K2_FILES), ("k3", K3_FILES)], ids=["keras2", "keras3"]
)
def test_weights_only_files_get_the_same_roles_as_the_graph(tag: str, names: list[str]) -> None:
    """Same weights saved three ways: the shape-based role assignment must reproduce the graph's
    (including physiology Dense vs stream l Dense, which share an input width here)."""
    full = load_keras_v1(FIXTURES / names[0]).net.state_dict()
    for name in names[1:]:
        other = load_keras_v1(FIXTURES / name).net.state_dict()
        assert other.keys() == full.keys()
        for key in full:
            assert torch.equal(full[key], other[key]), f"{name}: {key} differs"


def test_layouts_are_told_apart() -> None:
    assert read_keras_v1_file(FIXTURES / "k2_weights.h5").layout == "legacy-weights"
    assert read_keras_v1_file(FIXTURES / "k2.weights.h5").layout == "weights.h5"
    assert read_keras_v1_file(FIXTURES / "k3.weights.h5").layout == "weights.h5"
    assert read_keras_v1_file(FIXTURES / "k3_full.h5").layout == "full-model"
    assert read_keras_v1_file(FIXTURES / "k3.keras").layout == "keras-archive"


# --- errors ------------------------------------------------------------------------------------


def test_not_hdf5(tmp_path: Path) -> None:
    bad = tmp_path / "bestmodel.h5"
    bad.write_text("not a model")
    with pytest.raises(KerasV1Error, match=r"bestmodel\.h5: not an HDF5 file"):
        load_keras_v1(bad)
    with pytest.raises(KerasV1Error, match="no such file"):
        load_keras_v1(tmp_path / "missing.h5")


def test_hdf5_that_is_not_keras(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", data=np.zeros(3))
    with pytest.raises(KerasV1Error, match=r"other\.h5: HDF5 but not a Keras model file.*'data'"):
        load_keras_v1(path)


def copy_fixture(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copy(FIXTURES / name, path)
    return path


def test_missing_layer_is_named(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path, "k2_full.h5")
    with h5py.File(path, "r+") as h5:
        del h5["model_weights/conv1d_4"]
    with pytest.raises(KerasV1Error) as info:
        load_keras_v1(path)
    message = str(info.value)
    assert str(path) in message and "'conv1d_4'" in message and "stream l second Conv1D" in message


def test_shape_mismatch_names_layer_expected_and_found(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path, "k2_full.h5")
    with h5py.File(path, "r+") as h5:
        del h5["model_weights/gru_1/gru_1/gru_cell/recurrent_kernel:0"]
        h5["model_weights/gru_1/gru_1/gru_cell"].create_dataset(
            "recurrent_kernel:0", data=np.zeros((12, 30), np.float32)
        )
    with pytest.raises(KerasV1Error) as info:
        load_keras_v1(path)
    message = str(info.value)
    assert str(path) in message and "'gru_1'" in message
    assert "(12, 30)" in message and "expected (12, 36)" in message


def test_graph_and_weights_disagree(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path, "k2_full.h5")
    with h5py.File(path, "r+") as h5:
        for ds in ("kernel:0", "bias:0"):
            del h5[f"model_weights/level/level/{ds}"]
        h5["model_weights/level/level"].create_dataset("kernel:0", data=np.zeros((26, 7), "f4"))
        h5["model_weights/level/level"].create_dataset("bias:0", data=np.zeros(7, "f4"))
    with pytest.raises(KerasV1Error, match=r"'level'.*units=9, the weights have 7"):
        load_keras_v1(path)


def test_weights_only_missing_layer(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path, "k2.weights.h5")
    with h5py.File(path, "r+") as h5:
        del h5["layers/dense_5"]
    with pytest.raises(
        KerasV1Error, match=r"expected 4 Conv1D, 2 GRU and 8 Dense.*found 4, 2 and 7"
    ):
        load_keras_v1(path)


def test_weights_only_shapes_that_fit_no_role(tmp_path: Path) -> None:
    path = copy_fixture(tmp_path, "k2_weights.h5")
    with h5py.File(path, "r+") as h5:
        del h5["dense_1/dense_1/kernel:0"]
        h5["dense_1/dense_1"].create_dataset("kernel:0", data=np.zeros((21, 10), "f4"))
    with pytest.raises(KerasV1Error, match=r"no assignment of the layers to the v1\.0 roles"):
        load_keras_v1(path)


def test_wrong_input_shapes_are_explained() -> None:
    model = load_keras_v1(FIXTURES / "k2_full.h5")
    with pytest.raises(ValueError, match=r"expected shape \(batch, 25, 246\).*got \(2, 246, 25\)"):
        model.predict(np.zeros((2, 246, 25), np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="cannot take a missing"):
        model.predict(np.zeros((1, 25, 246), np.float32), np.array([[np.nan, 15.0]]))


# --- Keras semantics, checked without TensorFlow ------------------------------------------------


def test_keras_same_padding_and_leaky_slope() -> None:
    assert keras_same_padding(10) == (4, 5)
    assert keras_same_padding(3) == (1, 1)
    assert keras_same_padding(1) == (0, 0)
    x = torch.tensor([-1.0, 2.0])
    assert activation("leaky_relu", x).tolist() == pytest.approx([-0.2, 2.0])


def keras_gru_numpy(x: np.ndarray, kernel: np.ndarray, rec: np.ndarray, bias: np.ndarray):
    """The TensorFlow 2 GRU (reset_after=True) written from its formula, gates z, r, h."""
    u = rec.shape[0]
    h = np.zeros((x.shape[0], u))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for t in range(x.shape[1]):
        xw = x[:, t] @ kernel + bias[0]
        hu = h @ rec + bias[1]
        z = sig(xw[:, :u] + hu[:, :u])
        r = sig(xw[:, u : 2 * u] + hu[:, u : 2 * u])
        cand = np.tanh(xw[:, 2 * u :] + r * hu[:, 2 * u :])
        h = z * h + (1 - z) * cand
    return h


def test_gru_gate_mapping_matches_keras_formula() -> None:
    f = read_keras_v1_file(FIXTURES / "k2_full.h5")
    model = load_keras_v1(FIXTURES / "k2_full.h5")
    g = f.weights["l.gru"]
    x = np.random.default_rng(0).normal(size=(3, 6, 16))
    expected = keras_gru_numpy(x, g["kernel"], g["recurrent_kernel"], g["bias"])
    with torch.no_grad():
        _, h = model.net.stream_l.gru(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(h[0].numpy(), expected, atol=1e-5)


def test_normalise_window_as_upstream() -> None:
    ref = reference("k2")
    # raw is (B, rois, T) like a .mat trial; upstream normalises each ROI then transposes.
    ours = np.stack([normalise_window(trial.T) for trial in ref["raw"]])
    np.testing.assert_allclose(ours, ref["mri"], atol=1e-6)
    flat = normalise_window(np.ones((25, 3)))
    assert np.array_equal(flat, np.zeros((25, 3), np.float32))  # upstream would divide by 0


def test_upstream_size() -> None:
    assert UPSTREAM_SIZES.parameter_count == 86_811_604


@pytest.mark.slow
def test_full_size_network_builds_with_the_published_parameter_count() -> None:
    net = KerasV1Net(UPSTREAM_SIZES)
    assert sum(p.numel() for p in net.parameters()) == 86_811_604


def test_tf210_weight_paths_and_bytes_attributes(tmp_path: Path) -> None:
    """TensorFlow 2.10 names the second GRU's weights ``gru_1/gru_cell_1/...`` and older h5py
    writers store the name lists as fixed-length bytes: neither may matter."""
    path = copy_fixture(tmp_path, "k2_full.h5")
    with h5py.File(path, "r+") as h5:
        mw = h5["model_weights"]
        mw["gru_1/gru_1"].move("gru_cell", "gru_cell_1")
        names = [n.replace("gru_cell", "gru_cell_1") for n in mw["gru_1"].attrs["weight_names"]]
        mw["gru_1"].attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
        layer_names = [str(n) for n in mw.attrs["layer_names"]]
        mw.attrs["layer_names"] = np.array([n.encode() for n in layer_names], dtype="S")
        h5.attrs["model_config"] = np.bytes_(h5.attrs["model_config"].encode())
    ref = reference("k2")
    class_p, level_p = load_keras_v1(path).predict(ref["mri"], ref["rates"])
    np.testing.assert_allclose(class_p, ref["class_probs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(level_p, ref["level_probs"], atol=TOL, rtol=0)


def test_keras_archive_without_recorded_names(tmp_path: Path) -> None:
    """A .keras archive whose weights file records no layer names: the keys are derived from the
    graph's layer order as Keras derives them (``layers/conv1d_1`` is the graph's ``conv1d_4``)."""
    import zipfile

    with zipfile.ZipFile(FIXTURES / "k3.keras") as src:
        members = {n: src.read(n) for n in src.namelist()}
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as h5:
        stripped = 0

        def strip(_name: str, obj: object) -> None:
            nonlocal stripped
            if "name" in obj.attrs:  # type: ignore[attr-defined]
                del obj.attrs["name"]  # type: ignore[attr-defined]
                stripped += 1

        h5.visititems(strip)
    assert stripped > 10
    members["model.weights.h5"] = weights.read_bytes()
    archive = tmp_path / "renamed.keras"
    with zipfile.ZipFile(archive, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    ref = reference("k3")
    class_p, level_p = load_keras_v1(archive).predict(ref["mri"], ref["rates"])
    np.testing.assert_allclose(class_p, ref["class_probs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(level_p, ref["level_probs"], atol=TOL, rtol=0)


def test_zip_that_is_not_a_keras_archive(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(KerasV1Error, match=r"model\.keras: \.keras archive without config\.json"):
        load_keras_v1(path)
