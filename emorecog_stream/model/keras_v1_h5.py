"""Read the Keras files of EmoRecog-Net v1.0 with h5py alone (no TensorFlow).

Four layouts are read (see ``docs/keras-v1.md``):

* full-model HDF5 (``ModelCheckpoint`` / ``model.save('x.h5')``, Keras 2 and Keras 3): the graph in
  the root attribute ``model_config`` is followed from the two outputs back to the inputs, so
  every layer gets its role (stream c, stream l, physiology, heads) from the wiring, not from its
  automatic name or its position in the file;
* Keras 2 weights-only HDF5 (``save_weights('x.h5')``): the same per-layer groups at the root,
  without a graph;
* the newer weights-only layout (``*.weights.h5``, Keras >= 2.13 and Keras 3):
  ``layers/<key>/vars``;
* Keras 3's ``.keras`` zip archive (``config.json`` graph + ``model.weights.h5``).

Weights-only files carry no graph, so roles are assigned by shapes (each layer's input width
must equal the output width of the layer feeding it) with ties broken by model order (stream c
was built before stream l). The result is a :class:`KerasV1File`: the sizes and every weight in
Keras's own layout, keyed by role.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emorecog_stream.model.keras_v1_net import HIDDEN_ACTIVATIONS, KerasV1Sizes, StreamSizes

DEFAULT_WINDOW = 25
"""Volumes per window when the file has no graph to say so (the upstream input is 25 x 246)."""

STREAM_ROLES = ("conv1", "conv2", "gru", "dense1", "dense2")
ALL_ROLES = (
    *(f"c.{r}" for r in STREAM_ROLES),
    *(f"l.{r}" for r in STREAM_ROLES),
    "p.dense1",
    "p.dense2",
    "class",
    "level",
)
ROLE_TEXT = {
    "conv1": "first Conv1D",
    "conv2": "second Conv1D",
    "gru": "GRU",
    "dense1": "first Dense",
    "dense2": "second Dense",
}


class KerasV1Error(ValueError):
    """The file cannot be read as EmoRecog-Net v1.0: the message names file, layer and shapes."""


def describe_role(role: str) -> str:
    if role in ("class", "level"):
        return f"head '{role}'"
    branch, part = role.split(".")
    if branch == "p":
        return f"physiology {'first' if part == 'dense1' else 'second'} Dense"
    return f"stream {branch} {ROLE_TEXT[part]}"


@dataclass
class KerasV1File:
    """What a file holds: sizes, Keras-layout weights per role, and where they came from."""

    path: Path
    layout: str  # "full-model", "legacy-weights", "weights.h5"
    keras_version: str
    sizes: KerasV1Sizes
    weights: dict[str, dict[str, np.ndarray]]  # role -> {"kernel", "bias", "recurrent_kernel"}
    layer_names: dict[str, str] = field(default_factory=dict)  # role -> the file's layer name


def _text(value: Any) -> str:
    """HDF5 string attributes come back as bytes or str depending on the writer."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _text_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [_text(v) for v in np.asarray(value).ravel().tolist()]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# weights of one layer


def _weight_kind(name: str, index: int, count: int) -> str:
    """'kernel', 'recurrent_kernel' or 'bias' from a weight path such as
    ``gru_1/gru_cell_1/recurrent_kernel:0`` (or ``.../vars/1``: then from its position)."""
    base = name.rsplit("/", 1)[-1].split(":", 1)[0]
    if base in ("kernel", "recurrent_kernel", "bias"):
        return base
    order = ("kernel", "recurrent_kernel", "bias") if count == 3 else ("kernel", "bias")
    if index >= len(order):
        raise KerasV1Error(f"unexpected weight {name!r} (number {index + 1} of {count})")
    return order[index]


_DEFLATE_MAX_RATIO = 1032
"""zlib cannot expand data by more than this (HDF5's gzip filter included)."""


def _weight_array(dataset: Any, name: str) -> np.ndarray:
    """A weight as float32, after checking that the file stores what the dataset declares.

    HDF5 allocates dataset space lazily, so a dataset can declare terabytes while storing
    nothing; h5py would allocate the declared size on read.
    """
    if not hasattr(dataset, "id") or not hasattr(dataset, "dtype"):
        raise KerasV1Error(f"weight {name!r} is a {type(dataset).__name__}, not a dataset")
    declared = int(np.prod(dataset.shape, dtype=object) or 0) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    if declared > max(stored, 64) * _DEFLATE_MAX_RATIO:
        raise KerasV1Error(
            f"weight {name!r} declares shape {dataset.shape} ({declared:,} bytes) but the file"
            f" stores {stored:,} bytes of it"
        )
    return np.asarray(dataset[()], dtype=np.float32)


def _read_legacy_layer(group: Any) -> dict[str, np.ndarray]:
    """Weights of one layer group in the Keras 2 layout, looked up by the names it lists."""
    names = _text_list(group.attrs.get("weight_names"))
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        if name not in group:
            raise KerasV1Error(f"weight {name!r} is listed but missing")
        out[_weight_kind(name, i, len(names))] = _weight_array(group[name], name)
    return out


def _read_new_layer(group: Any) -> dict[str, np.ndarray]:
    """Weights of one layer in the ``.weights.h5`` layout (``vars/0..n``, GRU under ``cell``)."""
    holder = group["cell"] if "cell" in group and "vars" in group["cell"] else group
    if "vars" not in holder:
        return {}
    vars_group = holder["vars"]
    keys = sorted(vars_group.keys(), key=int)
    return {
        _weight_kind(k, i, len(keys)): _weight_array(vars_group[k], k)
        for i, k in enumerate(keys)
    }


def _layer_type(weights: dict[str, np.ndarray]) -> str | None:
    if "recurrent_kernel" in weights:
        return "gru"
    kernel = weights.get("kernel")
    if kernel is None:
        return None
    return {3: "conv", 2: "dense"}.get(kernel.ndim)


# ---------------------------------------------------------------------------------------------
# the graph of a full-model file


@dataclass
class _Node:
    name: str
    class_name: str
    config: dict[str, Any]
    inbound: list[str]


def _keras_tensors(obj: Any) -> Iterator[str]:
    """Layer names in Keras 3 ``inbound_nodes`` args (``__keras_tensor__`` / ``keras_history``)."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            yield obj["config"]["keras_history"][0]
        else:
            for v in obj.values():
                yield from _keras_tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keras_tensors(v)


def _parse_inbound(layer: dict[str, Any]) -> list[str]:
    nodes = layer.get("inbound_nodes") or []
    if not nodes:
        return []
    if len(nodes) > 1:
        raise KerasV1Error(f"layer {layer.get('name')!r} is used more than once (shared layer)")
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3
        return list(_keras_tensors(node.get("args", [])))
    return [entry[0] for entry in node]  # Keras 2: [[name, node_index, tensor_index, kwargs]]


def _parse_graph(model_config: str) -> tuple[dict[str, _Node], list[str], list[str]]:
    cfg = json.loads(model_config)
    body = cfg.get("config", {})
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise KerasV1Error("model_config has no functional 'layers' list")
    nodes: dict[str, _Node] = {}
    for layer in layers:
        name = layer.get("name") or layer.get("config", {}).get("name")
        nodes[name] = _Node(
            name, layer["class_name"], layer.get("config", {}), _parse_inbound(layer)
        )
    inputs = [entry[0] for entry in body.get("input_layers", [])]
    outputs = [entry[0] for entry in body.get("output_layers", [])]
    return nodes, inputs, outputs


_SKIPPED = {"Dropout", "Flatten", "SpatialDropout1D", "GaussianDropout", "AlphaDropout"}
_STREAM_CHAIN = ["Conv1D", "MaxPooling1D", "Conv1D", "AveragePooling1D", "GRU", "Dense", "Dense"]
_ALIASES = {"MaxPool1D": "MaxPooling1D", "AvgPool1D": "AveragePooling1D"}


def _chain_back(nodes: dict[str, _Node], start: str) -> tuple[list[_Node], _Node]:
    """Layers from ``start`` back to an input (input first), without Dropout/Flatten."""
    chain: list[_Node] = []
    name = start
    while True:
        node = nodes.get(name)
        if node is None:
            raise KerasV1Error(f"model_config refers to layer {name!r}, which it does not define")
        if node.class_name == "InputLayer":
            chain.reverse()
            return chain, node
        if len(node.inbound) != 1:
            raise KerasV1Error(
                f"layer {name!r} ({node.class_name}) has {len(node.inbound)} inputs; the v1.0 "
                "streams are single chains"
            )
        if node.class_name not in _SKIPPED:
            chain.append(node)
        name = node.inbound[0]


def _input_shape(node: _Node) -> list[Any]:
    shape = node.config.get("batch_input_shape") or node.config.get("batch_shape")
    if shape is None:
        raise KerasV1Error(f"input layer {node.name!r} records no shape")
    return list(shape)


def _check_config(
    node: _Node, role: str, key: str, allowed: Callable[[Any], bool], expected: str
) -> None:
    value = node.config.get(key)
    if not allowed(value):
        raise KerasV1Error(
            f"layer {node.name!r} ({describe_role(role)}): {key}={value!r}, expected {expected}"
        )


def _pool(node: _Node) -> tuple[int, int]:
    size = node.config.get("pool_size", [2])
    strides = node.config.get("strides") or size
    size = size[0] if isinstance(size, list) else size
    strides = strides[0] if isinstance(strides, list) else strides
    if node.config.get("padding", "valid") != "valid":
        raise KerasV1Error(
            f"layer {node.name!r}: padding {node.config.get('padding')!r}, expected 'valid'"
        )
    return int(size), int(strides)


def _graph_roles(
    nodes: dict[str, _Node], inputs: list[str], outputs: list[str]
) -> tuple[dict[str, _Node], tuple[str, str, str], int, tuple[int, int], tuple[int, int], str]:
    """Role -> node from the graph; also concat order, window, pools and hidden activation."""
    if len(outputs) != 2:
        raise KerasV1Error(
            f"expected 2 outputs ('class', 'level'), found {len(outputs)}: {outputs}"
        )
    heads = {"class": outputs[0], "level": outputs[1]}
    if set(outputs) == {"class", "level"}:
        heads = {"class": "class", "level": "level"}
    roles: dict[str, _Node] = {}
    concat_names = set()
    for role, name in heads.items():
        node = nodes[name]
        if node.class_name != "Dense" or len(node.inbound) != 1:
            raise KerasV1Error(
                f"output {name!r} is a {node.class_name} with "
                f"{len(node.inbound)} inputs; expected a Dense on the concatenation"
            )
        roles[role] = node
        concat_names.add(node.inbound[0])
    if len(concat_names) != 1:
        raise KerasV1Error(f"the two heads read different layers {sorted(concat_names)}")
    concat = nodes[concat_names.pop()]
    if concat.class_name != "Concatenate" or len(concat.inbound) != 3:
        raise KerasV1Error(
            f"layer {concat.name!r} ({concat.class_name}) has "
            f"{len(concat.inbound)} inputs; expected a Concatenate of 3 branches"
        )
    order: list[str] = []
    window = DEFAULT_WINDOW
    pools: list[tuple[int, int]] = []
    streams_seen = 0
    for branch_end in concat.inbound:
        chain, source = _chain_back(nodes, branch_end)
        shape = _input_shape(source)
        kinds = [_ALIASES.get(n.class_name, n.class_name) for n in chain]
        if len(shape) == 3:
            if kinds != _STREAM_CHAIN:
                raise KerasV1Error(
                    f"fMRI branch ending at {branch_end!r} is {kinds}, expected {_STREAM_CHAIN}"
                )
            if streams_seen >= 2:
                raise KerasV1Error("more than two fMRI streams feed the concatenation")
            branch = "cl"[streams_seen]
            streams_seen += 1
            window = int(shape[1]) if shape[1] is not None else DEFAULT_WINDOW
            conv1, pool1, conv2, pool2, gru, dense1, dense2 = chain
            for role, node in zip(STREAM_ROLES, (conv1, conv2, gru, dense1, dense2), strict=True):
                roles[f"{branch}.{role}"] = node
            pools += [_pool(pool1), _pool(pool2)]
            order.append(branch)
        elif len(shape) == 2:
            if kinds != ["Dense", "Dense"]:
                raise KerasV1Error(
                    f"physiology branch ending at {branch_end!r} is {kinds}, "
                    "expected ['Dense', 'Dense']"
                )
            roles["p.dense1"], roles["p.dense2"] = chain
            order.append("p")
        else:
            raise KerasV1Error(
                f"input {source.name!r} has shape {shape}; expected (None, T, ROIs) or (None, 2)"
            )
    if sorted(order) != ["c", "l", "p"]:
        raise KerasV1Error(
            f"the concatenation joins {order}; expected two fMRI streams and the physiology branch"
        )
    activations = set()
    for role, node in roles.items():
        act = node.config.get("activation")
        if role in ("class", "level"):
            _check_config(node, role, "activation", lambda v: v == "softmax", "'softmax'")
        elif role.endswith("gru"):
            _check_config(node, role, "reset_after", lambda v: v in (True, None), "True")
            _check_config(node, role, "activation", lambda v: v in ("tanh", None), "'tanh'")
            _check_config(
                node, role, "recurrent_activation", lambda v: v in ("sigmoid", None), "'sigmoid'"
            )
            _check_config(node, role, "go_backwards", lambda v: not v, "False")
            _check_config(node, role, "return_sequences", lambda v: not v, "False")
        else:
            activations.add(act)
        if role.endswith(("conv1", "conv2")):
            _check_config(node, role, "padding", lambda v: v == "same", "'same'")
            _check_config(node, role, "strides", lambda v: list(v) == [1], "[1]")
            _check_config(node, role, "dilation_rate", lambda v: list(v or [1]) == [1], "[1]")
            _check_config(
                node, role, "data_format", lambda v: v in ("channels_last", None), "'channels_last'"
            )
        if node.config.get("use_bias", True) is not True:
            raise KerasV1Error(
                f"layer {node.name!r} ({describe_role(role)}) has no bias; "
                "the v1.0 model uses biases everywhere"
            )
    if len(activations) != 1 or not activations <= set(HIDDEN_ACTIVATIONS):
        raise KerasV1Error(
            f"hidden activations {sorted(map(str, activations))}; expected one of "
            f"{HIDDEN_ACTIVATIONS} used throughout"
        )
    if len({pools[0], pools[2]}) != 1 or len({pools[1], pools[3]}) != 1:
        raise KerasV1Error(f"the two streams pool differently: {pools}")
    return roles, (order[0], order[1], order[2]), window, pools[0], pools[1], activations.pop()


# ---------------------------------------------------------------------------------------------
# roles without a graph (weights-only files)


@dataclass
class _Layer:
    name: str  # the key in the file
    real_name: str  # the model's layer name where the file records it, else ``name``
    kind: str  # conv, gru, dense
    weights: dict[str, np.ndarray]

    @property
    def in_dim(self) -> int:
        return int(self.weights["kernel"].shape[-2])

    @property
    def out_dim(self) -> int:
        if self.kind == "gru":
            return int(self.weights["recurrent_kernel"].shape[0])
        return int(self.weights["kernel"].shape[-1])


_ROLE_KIND = {"conv1": "conv", "conv2": "conv", "gru": "gru", "dense1": "dense", "dense2": "dense"}
_SEARCH_ORDER = (
    "c.conv1",
    "l.conv1",
    "c.conv2",
    "l.conv2",
    "c.gru",
    "l.gru",
    "p.dense1",
    "p.dense2",
    "c.dense1",
    "c.dense2",
    "l.dense1",
    "l.dense2",
    "class",
    "level",
)


def _kind_of(role: str) -> str:
    return "dense" if role in ("class", "level") else _ROLE_KIND[role.split(".")[1]]


def _consistent(a: dict[str, _Layer], n_rates: int) -> bool:
    """Shape constraints among the roles assigned so far (unassigned ones are not checked)."""

    def eq(x: str, y: str, fx: Callable[[_Layer], int], fy: Callable[[_Layer], int]) -> bool:
        return x not in a or y not in a or fx(a[x]) == fy(a[y])

    def ind(layer: _Layer) -> int:
        return layer.in_dim

    def outd(layer: _Layer) -> int:
        return layer.out_dim

    ok = eq("c.conv1", "l.conv1", ind, ind) and (
        "p.dense1" not in a or a["p.dense1"].in_dim == n_rates
    )
    for s in "cl":
        ok = ok and eq(f"{s}.conv2", f"{s}.conv1", ind, outd)
        ok = ok and eq(f"{s}.gru", f"{s}.conv2", ind, outd)
        ok = ok and eq(f"{s}.dense1", f"{s}.gru", ind, outd)
        ok = ok and eq(f"{s}.dense2", f"{s}.dense1", ind, outd)
    ok = ok and eq("p.dense2", "p.dense1", ind, outd)
    branch_ends = ("c.dense2", "l.dense2", "p.dense2")
    if ok and all(r in a for r in branch_ends):
        width = sum(a[r].out_dim for r in branch_ends)
        ok = all(h not in a or a[h].in_dim == width for h in ("class", "level"))
    return ok


def _assign_by_shapes(layers: list[_Layer], path: Path) -> dict[str, _Layer]:
    """Backtracking over roles; candidates in model order, so ties go to the earlier layer."""
    by_kind: dict[str, list[_Layer]] = {"conv": [], "gru": [], "dense": []}
    for layer in layers:
        by_kind[layer.kind].append(layer)
    want = {"conv": 4, "gru": 2, "dense": 8}
    found = {k: len(v) for k, v in by_kind.items()}
    if found != want:
        raise KerasV1Error(
            f"{path}: expected {want['conv']} Conv1D, {want['gru']} GRU and {want['dense']} Dense "
            f"layers with weights (the v1.0 model), found {found['conv']}, {found['gru']} and "
            f"{found['dense']}: "
            + ", ".join(f"{ly.name} {ly.weights['kernel'].shape}" for ly in layers)
        )
    named_heads = {
        ly.real_name: ly for ly in by_kind["dense"] if ly.real_name in ("class", "level")
    }

    def search(i: int, assigned: dict[str, _Layer]) -> dict[str, _Layer] | None:
        if i == len(_SEARCH_ORDER):
            return dict(assigned)
        role = _SEARCH_ORDER[i]
        candidates = by_kind[_kind_of(role)]
        if role in named_heads:
            candidates = [named_heads[role]]
        used = {id(v) for v in assigned.values()}
        for layer in candidates:
            if id(layer) in used:
                continue
            assigned[role] = layer
            if _consistent(assigned, 2):
                result = search(i + 1, assigned)
                if result is not None:
                    return result
            del assigned[role]
        return None

    result = search(0, {})
    if result is None:
        raise KerasV1Error(
            f"{path}: no assignment of the layers to the v1.0 roles fits their shapes "
            "(each layer's input width must equal the width of the layer feeding it): "
            + ", ".join(f"{ly.name} kernel {ly.weights['kernel'].shape}" for ly in layers)
        )
    return result


def _numbered(key: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
    assert m is not None
    return m.group(1), int(m.group(2) or 0)


# ---------------------------------------------------------------------------------------------
# sizes and shape checks


def _expect(
    path: Path, role: str, layer: str, what: str, found: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    if tuple(found) != tuple(expected):
        raise KerasV1Error(
            f"{path}: layer {layer!r} ({describe_role(role)}): {what} has shape {tuple(found)}, "
            f"expected {tuple(expected)}"
        )


def _sizes_from_weights(
    path: Path,
    w: dict[str, dict[str, np.ndarray]],
    names: dict[str, str],
    window: int,
    pools: tuple[tuple[int, int], tuple[int, int]],
    activation: str,
    concat_order: tuple[str, str, str],
    configs: dict[str, dict[str, Any]] | None = None,
) -> KerasV1Sizes:
    """Sizes from the weight shapes, every shape checked against its neighbours (and against
    the graph's config where there is one: ``filters``, ``kernel_size``, ``units``)."""
    for role in ALL_ROLES:
        if role not in w:
            raise KerasV1Error(
                f"{path}: no weights for {describe_role(role)} (layer {names.get(role, '?')!r})"
            )
        needed = (
            ("kernel", "recurrent_kernel", "bias") if role.endswith("gru") else ("kernel", "bias")
        )
        for key in needed:
            if key not in w[role]:
                raise KerasV1Error(
                    f"{path}: layer {names[role]!r} ({describe_role(role)}) has no "
                    f"{key}; it lists {sorted(w[role])}"
                )

    rois = int(w["c.conv1"]["kernel"].shape[1])
    streams = {}
    for s in "cl":
        c1, c2, g = w[f"{s}.conv1"]["kernel"], w[f"{s}.conv2"]["kernel"], w[f"{s}.gru"]
        if c1.ndim != 3 or c2.ndim != 3:
            raise KerasV1Error(
                f"{path}: layer {names[f'{s}.conv1']!r}: Conv1D kernels must be "
                f"3-D (kernel, in, out); found {c1.shape} and {c2.shape}"
            )
        units = int(g["recurrent_kernel"].shape[0])
        d1 = w[f"{s}.dense1"]["kernel"]
        d2 = w[f"{s}.dense2"]["kernel"]
        sz = StreamSizes(
            conv1_filters=int(c1.shape[2]),
            conv1_kernel=int(c1.shape[0]),
            conv2_filters=int(c2.shape[2]),
            conv2_kernel=int(c2.shape[0]),
            gru_units=units,
            dense1=int(d1.shape[-1]),
            dense2=int(d2.shape[-1]),
            pool1=pools[0],
            pool2=pools[1],
        )
        chk = [
            (f"{s}.conv1", "kernel", c1.shape, (sz.conv1_kernel, rois, sz.conv1_filters)),
            (f"{s}.conv1", "bias", w[f"{s}.conv1"]["bias"].shape, (sz.conv1_filters,)),
            (
                f"{s}.conv2",
                "kernel",
                c2.shape,
                (sz.conv2_kernel, sz.conv1_filters, sz.conv2_filters),
            ),
            (f"{s}.conv2", "bias", w[f"{s}.conv2"]["bias"].shape, (sz.conv2_filters,)),
            (f"{s}.gru", "kernel", g["kernel"].shape, (sz.conv2_filters, 3 * units)),
            (f"{s}.gru", "recurrent_kernel", g["recurrent_kernel"].shape, (units, 3 * units)),
            (f"{s}.dense1", "kernel", d1.shape, (units, sz.dense1)),
            (f"{s}.dense1", "bias", w[f"{s}.dense1"]["bias"].shape, (sz.dense1,)),
            (f"{s}.dense2", "kernel", d2.shape, (sz.dense1, sz.dense2)),
            (f"{s}.dense2", "bias", w[f"{s}.dense2"]["bias"].shape, (sz.dense2,)),
        ]
        gb = g["bias"].shape
        if gb == (3 * units,):
            raise KerasV1Error(
                f"{path}: layer {names[f'{s}.gru']!r} (stream {s} GRU): bias has shape {gb}, "
                f"expected {(2, 3 * units)}: a GRU with reset_after=False (TensorFlow 1 style) "
                "is not supported"
            )
        chk.append((f"{s}.gru", "bias", gb, (2, 3 * units)))
        for role, what, found, expected in chk:
            _expect(path, role, names[role], what, found, expected)
        streams[s] = sz

    p1, p2 = w["p.dense1"]["kernel"], w["p.dense2"]["kernel"]
    phys1, phys2 = int(p1.shape[-1]), int(p2.shape[-1])
    concat = streams["c"].dense2 + streams["l"].dense2 + phys2
    hc, hl = w["class"]["kernel"], w["level"]["kernel"]
    n_class, n_level = int(hc.shape[-1]), int(hl.shape[-1])
    for role, what, found, expected in [
        ("p.dense1", "kernel", p1.shape, (2, phys1)),
        ("p.dense1", "bias", w["p.dense1"]["bias"].shape, (phys1,)),
        ("p.dense2", "kernel", p2.shape, (phys1, phys2)),
        ("p.dense2", "bias", w["p.dense2"]["bias"].shape, (phys2,)),
        ("class", "kernel", hc.shape, (concat, n_class)),
        ("class", "bias", w["class"]["bias"].shape, (n_class,)),
        ("level", "kernel", hl.shape, (concat, n_level)),
        ("level", "bias", w["level"]["bias"].shape, (n_level,)),
    ]:
        _expect(path, role, names[role], what, found, expected)

    sizes = KerasV1Sizes(
        rois=rois,
        window=window,
        stream_c=streams["c"],
        stream_l=streams["l"],
        phys1=phys1,
        phys2=phys2,
        n_class=n_class,
        n_level=n_level,
        hidden_activation=activation,
        concat_order=concat_order,
    )
    if configs:
        _check_against_config(path, sizes, configs, names)
    return sizes


def _check_against_config(
    path: Path, sizes: KerasV1Sizes, configs: dict[str, dict[str, Any]], names: dict[str, str]
) -> None:
    """The graph says how wide each layer is; the weights must agree."""

    def first(v: Any) -> Any:
        return v[0] if isinstance(v, list) else v

    expected: list[tuple[str, str, Any, Any]] = []
    for s, sz in (("c", sizes.stream_c), ("l", sizes.stream_l)):
        expected += [
            (f"{s}.conv1", "filters", sz.conv1_filters, configs[f"{s}.conv1"].get("filters")),
            (
                f"{s}.conv1",
                "kernel_size",
                sz.conv1_kernel,
                first(configs[f"{s}.conv1"].get("kernel_size")),
            ),
            (f"{s}.conv2", "filters", sz.conv2_filters, configs[f"{s}.conv2"].get("filters")),
            (
                f"{s}.conv2",
                "kernel_size",
                sz.conv2_kernel,
                first(configs[f"{s}.conv2"].get("kernel_size")),
            ),
            (f"{s}.gru", "units", sz.gru_units, configs[f"{s}.gru"].get("units")),
            (f"{s}.dense1", "units", sz.dense1, configs[f"{s}.dense1"].get("units")),
            (f"{s}.dense2", "units", sz.dense2, configs[f"{s}.dense2"].get("units")),
        ]
    expected += [
        ("p.dense1", "units", sizes.phys1, configs["p.dense1"].get("units")),
        ("p.dense2", "units", sizes.phys2, configs["p.dense2"].get("units")),
        ("class", "units", sizes.n_class, configs["class"].get("units")),
        ("level", "units", sizes.n_level, configs["level"].get("units")),
    ]
    for role, key, from_weights, from_config in expected:
        if from_config is not None and int(from_config) != from_weights:
            raise KerasV1Error(
                f"{path}: layer {names[role]!r} ({describe_role(role)}): the graph says "
                f"{key}={from_config}, the weights have {from_weights}"
            )


# ---------------------------------------------------------------------------------------------
# entry point


def read_keras_v1_file(path: str | Path) -> KerasV1File:
    """Read any of the four layouts; raise :class:`KerasV1Error` naming what does not fit."""
    import h5py  # a package dependency; imported here so ``--help`` stays fast

    path = Path(path)
    if not path.is_file():
        raise KerasV1Error(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path):
            return _read_keras_archive(path)
        if not h5py.is_hdf5(path):
            raise KerasV1Error(
                f"{path}: not an HDF5 file (expected a Keras .h5, .weights.h5 or .keras file)"
            )
        _check_metadata(path)
        with h5py.File(path, "r") as h5:
            return _read_any(path, h5)
    except KerasV1Error as exc:
        if str(exc).startswith(str(path)):
            raise
        raise KerasV1Error(f"{path}: {exc}") from None
    except (
        KeyError,
        ValueError,
        TypeError,
        IndexError,
        AttributeError,
        RuntimeError,  # h5py: e.g. "Unable to synchronously check link existence (bad heap ...)"
        OverflowError,  # h5py reading the archive's weights from memory: an address too large
        OSError,
        zipfile.BadZipFile,
    ) as exc:
        raise KerasV1Error(f"{path}: malformed Keras file ({type(exc).__name__}: {exc})") from None


def _check_metadata(path: Path, member: str | None = None) -> None:
    """libhdf5 can spin in C on a corrupt file (a damaged heap under a string attribute), out of
    Python's reach: the metadata pass runs first in a child process with a time limit
    (:mod:`emorecog_stream.model.hdf5_probe`)."""
    from emorecog_stream.model.hdf5_probe import Hdf5ProbeError, check_hdf5_metadata

    try:
        check_hdf5_metadata(path, member)
    except Hdf5ProbeError as exc:
        where = f" ({member})" if member else ""
        raise KerasV1Error(f"{path}{where}: {exc}") from None


def _read_any(path: Path, h5: Any) -> KerasV1File:
    import h5py

    keras_version = _text(h5.attrs.get("keras_version", "unknown"))
    if "model_config" in h5.attrs and "model_weights" in h5:
        return _read_full(path, h5, keras_version)
    if "layer_names" in h5.attrs:
        return _read_weights_only_legacy(path, h5, keras_version)
    if "layers" in h5 and isinstance(h5["layers"], h5py.Group):
        return _read_weights_only_new(path, h5, keras_version)
    raise KerasV1Error(
        f"{path}: HDF5 but not a Keras model file: expected a root attribute 'model_config' "
        "with a group 'model_weights' (full model), a root attribute 'layer_names' "
        "(save_weights .h5) or a group 'layers' (.weights.h5); found groups "
        f"{sorted(h5.keys())} and attributes {sorted(h5.attrs.keys())}"
    )


def _read_full(path: Path, h5: Any, keras_version: str) -> KerasV1File:
    group = h5["model_weights"]
    listed = set(_text_list(group.attrs.get("layer_names")))

    def weights_of(name: str) -> dict[str, np.ndarray] | None:
        if name not in listed or name not in group:
            return None
        return _read_legacy_layer(group[name])

    return _from_graph(
        path, _text(h5.attrs["model_config"]), weights_of, "full-model", keras_version
    )


def _from_graph(
    path: Path,
    model_config: str,
    weights_of: Callable[[str], dict[str, np.ndarray] | None],
    layout: str,
    keras_version: str,
) -> KerasV1File:
    """Roles from the graph, weights looked up by each layer's real name."""
    nodes, inputs, outputs = _parse_graph(model_config)
    roles, concat_order, window, pool1, pool2, act = _graph_roles(nodes, inputs, outputs)
    weights: dict[str, dict[str, np.ndarray]] = {}
    names: dict[str, str] = {}
    for role, node in roles.items():
        names[role] = node.name
        try:
            found = weights_of(node.name)
        except KerasV1Error as exc:
            raise KerasV1Error(
                f"{path}: layer {node.name!r} ({describe_role(role)}): {exc}"
            ) from None
        if not found:
            raise KerasV1Error(
                f"{path}: layer {node.name!r} ({describe_role(role)}) is in the model graph but "
                "has no weights in the file"
            )
        weights[role] = found
    configs = {role: node.config for role, node in roles.items()}
    sizes = _sizes_from_weights(
        path, weights, names, window, (pool1, pool2), act, concat_order, configs
    )
    return KerasV1File(path, layout, keras_version, sizes, weights, names)


def _snake(class_name: str) -> str:
    """Keras 3's key for a layer class in ``.weights.h5``: ``MaxPooling1D`` -> ``max_pooling1d``,
    ``InputLayer`` -> ``input_layer``, ``GRU`` -> ``gru``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _read_keras_archive(path: Path) -> KerasV1File:
    """A Keras 3 ``.keras`` zip: ``config.json`` (the graph) + ``model.weights.h5`` (new layout).

    Weight groups are keyed by class-derived names in model order (``layers/conv1d_1`` may be the
    layer the graph calls ``conv1d_4``); Keras 3 records the real name in a ``name`` attribute,
    and where it does not, the key is derived from the graph's layer order the way Keras does.
    """
    import io

    import h5py

    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        for needed in ("config.json", "model.weights.h5"):
            if needed not in members:
                raise KerasV1Error(
                    f"{path}: .keras archive without {needed}; it holds {sorted(members)}"
                )
        config = archive.read("config.json").decode("utf-8")
        weights_bytes = archive.read("model.weights.h5")
        meta = json.loads(archive.read("metadata.json")) if "metadata.json" in members else {}
    body = json.loads(config).get("config", {})
    derived: dict[str, str] = {}
    counts: dict[str, int] = {}
    for layer in body.get("layers", []):
        base = _snake(layer["class_name"])
        n = counts.get(base, 0)
        counts[base] = n + 1
        derived[layer.get("name") or layer["config"]["name"]] = base if n == 0 else f"{base}_{n}"
    _check_metadata(path, "model.weights.h5")
    with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
        if "layers" not in h5:
            raise KerasV1Error(f"{path}: model.weights.h5 has no 'layers' group")
        root = h5["layers"]
        by_real: dict[str, str] = {}
        for key in root:
            for holder in (root[key], root[key].get("vars")):
                if holder is not None:
                    for attr in ("name", "@name"):
                        if attr in holder.attrs:
                            by_real[_text(holder.attrs[attr])] = key

        def weights_of(name: str) -> dict[str, np.ndarray] | None:
            key = by_real.get(name, derived.get(name))
            if key is None or key not in root:
                return None
            return _read_new_layer(root[key])

        return _from_graph(
            path, config, weights_of, "keras-archive", str(meta.get("keras_version", "unknown"))
        )


def _read_weights_only_legacy(path: Path, h5: Any, keras_version: str) -> KerasV1File:
    layers: list[_Layer] = []
    for name in _text_list(h5.attrs["layer_names"]):
        if name not in h5:
            raise KerasV1Error(f"{path}: layer {name!r} is listed in layer_names but missing")
        try:
            w = _read_legacy_layer(h5[name])
        except KerasV1Error as exc:
            raise KerasV1Error(f"{path}: layer {name!r}: {exc}") from None
        kind = _layer_type(w)
        if kind is not None:
            layers.append(_Layer(name, name, kind, w))
    return _finish_weights_only(path, layers, "legacy-weights", keras_version)


def _read_weights_only_new(path: Path, h5: Any, keras_version: str) -> KerasV1File:
    root = h5["layers"]
    keys = sorted(root.keys(), key=_numbered)  # keys re-derived from class names in model order
    layers: list[_Layer] = []
    for key in keys:
        group = root[key]
        w = _read_new_layer(group)
        kind = _layer_type(w)
        if kind is None:
            continue
        real = key
        for holder in (group, group.get("vars")):
            if holder is not None:
                for attr in ("name", "@name"):
                    if attr in holder.attrs:
                        real = _text(holder.attrs[attr])
        layers.append(_Layer(key, real, kind, w))
    return _finish_weights_only(path, layers, "weights.h5", keras_version)


def _finish_weights_only(
    path: Path, layers: list[_Layer], layout: str, keras_version: str
) -> KerasV1File:
    roles = _assign_by_shapes(layers, path)
    weights = {role: layer.weights for role, layer in roles.items()}
    names = {role: layer.name for role, layer in roles.items()}
    sizes = _sizes_from_weights(
        path, weights, names, DEFAULT_WINDOW, ((2, 2), (2, 2)), "leaky_relu", ("c", "l", "p")
    )
    sizes = KerasV1Sizes(
        **{
            **sizes.__dict__,
            "notes": (
                "weights-only file: window 25, pooling 2/2 and 'leaky_relu' assumed as upstream",
            ),
        }
    )
    return KerasV1File(path, layout, keras_version, sizes, weights, names)
