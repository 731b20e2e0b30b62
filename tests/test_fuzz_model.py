"""Fuzzed model files: Keras ``.h5``/``.keras`` (KerasV1Error only) and ``.pt`` checkpoints
(CheckpointError or KerasV1Error only); no hang, no allocation from a size field.

Structured layer: the Keras fixtures with one node of their JSON graph replaced by another JSON
value, or one weight replaced by a dataset of another shape (one declaring terabytes without
storing them included); checkpoint dicts with their parts replaced by other values, saved with
``torch.save``. Byte layer: mutants of the real files. See tests/fuzzing.py for the bar.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import h5py
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from emorecog_stream.model.checkpoint import CheckpointError, load_model
from emorecog_stream.model.keras_v1_h5 import KerasV1Error, read_keras_v1_file
from tests.fuzz_seeds import checkpoint_seeds, keras_seeds
from tests.fuzzing import FIXTURES, FUZZ_FIXTURES, Blob, Worker, failures_of, mutants, report

KERAS = FIXTURES / "keras_v1"
FUZZ = settings(
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def keras_worker():
    with Worker("keras") as w:
        yield w


@pytest.fixture(scope="module")
def ckpt_worker(keras_worker):
    """The Keras worker serves the checkpoint target too (both import torch)."""
    return _Routed(keras_worker, "checkpoint")


class _Routed:
    def __init__(self, worker: Worker, target: str) -> None:
        self.worker, self.target = worker, target

    def run(self, data: bytes):
        return self.worker.run(data, self.target)


def _paths(node, prefix=()):
    """Every path into a JSON tree (dict keys and list indices)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _replace(tree, path, value):
    if not path:
        return value
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


@st.composite
def graph_edits(draw, config_text: str) -> str:
    tree = json.loads(config_text)
    paths = list(_paths(tree))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        tree = _replace(tree, path, draw(JSON))
        paths = list(_paths(tree))
    return json.dumps(tree)


def _full_model_with_config(source: str, config: str) -> bytes:
    raw = io.BytesIO((KERAS / source).read_bytes())
    with h5py.File(raw, "r+") as f:
        f.attrs["model_config"] = config
    return raw.getvalue()


def _archive_with_config(config: str) -> bytes:
    raw = io.BytesIO()
    with zipfile.ZipFile(KERAS / "k3.keras") as src, zipfile.ZipFile(raw, "w") as dst:
        for item in src.infolist():
            data = config.encode() if item.filename == "config.json" else src.read(item)
            dst.writestr(item, data)
    return raw.getvalue()


@st.composite
def keras_graph_files(draw) -> bytes:
    source = draw(st.sampled_from(["k2_full.h5", "k3_full.h5", "k3.keras"]))
    if source == "k3.keras":
        with zipfile.ZipFile(KERAS / source) as z:
            original = z.read("config.json").decode()
        return Blob(_archive_with_config(draw(graph_edits(original))))
    with h5py.File(KERAS / source, "r") as f:
        original = f.attrs["model_config"]
        original = original.decode() if isinstance(original, bytes) else str(original)
    return Blob(_full_model_with_config(source, draw(graph_edits(original))))


@FUZZ
@given(data=keras_graph_files())
def test_keras_files_with_edited_graphs(keras_worker, data: bytes) -> None:
    found = failures_of(keras_worker, [data])
    assert not found, report(found)


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


@st.composite
def keras_weight_files(draw) -> bytes:
    """A fixture with one weight replaced by a dataset of another shape or type; "huge" ones
    declare up to terabytes and store nothing (HDF5 allocates dataset space lazily)."""
    source = draw(st.sampled_from(["k2_full.h5", "k2_weights.h5", "k3.weights.h5"]))
    raw = io.BytesIO((KERAS / source).read_bytes())
    with h5py.File(raw, "r+") as f:
        name = draw(st.sampled_from(sorted(_datasets(f))))
        del f[name]
        shape = tuple(
            draw(
                st.lists(
                    st.one_of(st.integers(0, 40), st.sampled_from([2**20, 2**31])),
                    max_size=4,
                )
            )
        )
        dtype = draw(st.sampled_from(["f4", "f8", "i2", "S4", "c8"]))
        try:
            f.create_dataset(name, shape=shape, dtype=dtype)
        except ValueError:  # HDF5: "size of dataset's storage overflowed"
            reject()
    return Blob(raw.getvalue())


@FUZZ
@given(data=keras_weight_files())
def test_keras_files_with_replaced_weights(keras_worker, data: bytes) -> None:
    found = failures_of(keras_worker, [data])
    assert not found, report(found)


@st.composite
def checkpoint_files(draw) -> bytes:
    """A checkpoint dict of either format with some of its parts replaced by other values."""
    import tests.fuzz_seeds as seeds

    source = draw(st.sampled_from(["converted_k3.pt", "default.pt"]))
    base = torch.load(io.BytesIO(dict(seeds.checkpoint_seeds())[source]), weights_only=True)
    tensors = st.builds(
        lambda shape: torch.zeros(shape),
        st.lists(st.integers(0, 5), max_size=3).map(tuple),
    )
    values = st.one_of(JSON, tensors, st.dictionaries(st.text(max_size=4), tensors, max_size=2))
    for _ in range(draw(st.integers(1, 3))):
        top = draw(st.sampled_from(sorted(base)))
        if isinstance(base[top], dict) and base[top] and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(base[top])))
            base[top][key] = draw(values)
        elif draw(st.booleans()):
            base[top] = draw(values)
        else:
            del base[top]
    raw = io.BytesIO()
    torch.save(base, raw)
    return Blob(raw.getvalue())


@FUZZ
@given(data=checkpoint_files())
def test_checkpoints_with_replaced_parts(ckpt_worker, data: bytes) -> None:
    found = failures_of(ckpt_worker.worker, [data], "checkpoint")
    assert not found, report(found)


# ------------------------------------------------------------------------- mutated real files


def test_mutated_keras_files(keras_worker) -> None:
    seeds = [data for _, data in keras_seeds()]
    assert {keras_worker.run(s).status for s in seeds} == {"ok"}
    found = failures_of(keras_worker, mutants(seeds, 40, seed=2024))
    assert not found, report(found)


def test_mutated_checkpoints(ckpt_worker) -> None:
    seeds = [data for _, data in checkpoint_seeds()]
    assert not any(ckpt_worker.run(s).failed for s in seeds)
    found = failures_of(ckpt_worker.worker, mutants(seeds, 40, seed=2024), "checkpoint")
    assert not found, report(found)


# ------------------------------------------------------------------------- what fuzzing found


def test_a_corrupt_heap_in_a_keras_file_is_a_keras_error(tmp_path) -> None:
    # was: RuntimeError "Unable to synchronously check link existence (bad heap free list)"
    path = tmp_path / "model.h5"
    shutil.copy(FUZZ_FIXTURES / "keras_bad_heap.h5", path)
    with pytest.raises(KerasV1Error, match=r"model\.h5: malformed Keras file \(RuntimeError"):
        read_keras_v1_file(path)


def test_a_zip_with_a_non_utf8_member_name_is_a_checkpoint_error(tmp_path) -> None:
    # was: UnicodeDecodeError while describing the file for the error message
    path = tmp_path / "model.pt"
    shutil.copy(FUZZ_FIXTURES / "checkpoint_bad_member_name.pt", path)
    with pytest.raises(CheckpointError, match=r"model\.pt.*damaged or cut-off zip archive"):
        load_model(path)


def test_a_weight_declaring_8_gib_without_storing_it_allocates_nothing(tmp_path) -> None:
    # was: h5py allocating the declared 8 GiB on read (MemoryError under the fuzz budget)
    path = tmp_path / "weights.h5"
    shutil.copy(FUZZ_FIXTURES / "keras_unstored_weight.h5", path)
    with pytest.raises(KerasV1Error, match=r"weights\.h5: layer 'dense': weight 'dense/kernel:0'"
                       r" declares shape \(65536, 32768\) \(8,589,934,592 bytes\) but the file"
                       r" stores 0 bytes"):
        read_keras_v1_file(path)


@pytest.mark.parametrize(
    ("fixture", "error", "match"),
    [
        # was: EmoRecogNet built from hidden=65536 first (a 64 GiB GRU), then the shapes checked
        ("checkpoint_huge_config.pt", CheckpointError, r"size mismatch for tensor 'physio_fill'"),
        # was: the same for a converted Keras checkpoint's sizes
        ("keras_checkpoint_huge_sizes.pt", KerasV1Error, r"checkpoint lacks tensor"),
        # was: RuntimeError "Boolean value of Tensor with no values is ambiguous"
        ("keras_checkpoint_tensor_version.pt", KerasV1Error, r"format_version tensor\(\[\]\)"),
        # was: TypeError from the model id's JSON hash of the config (found with --layer both)
        ("checkpoint_tensor_in_config.pt", CheckpointError, r"config: expected plain numbers"),
    ],
)
def test_checkpoints_found_by_fuzzing(tmp_path, ckpt_worker, fixture, error, match) -> None:
    path = tmp_path / "model.pt"
    shutil.copy(FUZZ_FIXTURES / fixture, path)
    with pytest.raises(error, match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert not ckpt_worker.run(path.read_bytes()).failed


@pytest.mark.slow
def test_a_corrupt_string_attribute_does_not_hang_the_keras_reader(keras_worker) -> None:
    # was: libhdf5 2.0.0 spinning in C for minutes on this corrupt variable-length string
    # attribute (found by atheris); now the metadata pass runs in a child with a time limit
    data = (FUZZ_FIXTURES / "keras_hdf5_spin.h5").read_bytes()
    outcome = keras_worker.run(data)
    assert not outcome.failed, outcome.label()
    assert outcome.status == "rejected", outcome.label()  # a KerasV1Error naming the file


def test_a_keras_file_whose_metadata_read_spins_is_a_keras_error(tmp_path) -> None:
    path = tmp_path / "model.h5"
    shutil.copy(FUZZ_FIXTURES / "keras_hdf5_spin.h5", path)
    with pytest.raises(KerasV1Error, match=r"model\.h5: took more than 2\.\d s to read its HDF5"
                       r" metadata: the file is probably damaged"):
        read_keras_v1_file(path)
