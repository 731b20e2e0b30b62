"""PyTorch port of the published EmoRecog-Net v1.0 (Keras ``DL_CNN``), sized from its file.

The network computes what Keras computes for the same weights: 'same' padding split the Keras way
(kernel 10 pads 4 left and 5 right), Keras's ``'leaky_relu'`` with negative slope 0.2 (not
PyTorch's 0.01), 'valid' pooling, and the TensorFlow 2 GRU (``reset_after=True``) whose gates the
loader reorders from Keras's z, r, h into PyTorch's r, z, n. Dropout is an inference no-op and
Flatten of a (batch, units) tensor changes nothing, so neither appears here.

Sizes come from :class:`KerasV1Sizes`, filled by the loader from the file, so re-trained
variants of other widths load as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_ACTIVATIONS = ("leaky_relu", "relu", "linear", "tanh", "sigmoid", "elu")
KERAS_LEAKY_RELU_SLOPE = 0.2
"""Keras's ``'leaky_relu'`` activation string uses negative slope 0.2 (TF 2.x and Keras 3)."""


@dataclass(frozen=True)
class StreamSizes:
    """One fMRI stream: Conv1D -> MaxPool1D -> Conv1D -> AveragePooling1D -> GRU -> Dense x2."""

    conv1_filters: int
    conv1_kernel: int
    conv2_filters: int
    conv2_kernel: int
    gru_units: int
    dense1: int
    dense2: int
    pool1: tuple[int, int] = (2, 2)  # (pool size, stride) of the max pooling
    pool2: tuple[int, int] = (2, 2)  # (pool size, stride) of the average pooling


@dataclass(frozen=True)
class KerasV1Sizes:
    """Every width of the model, as read from the file (the upstream values are the defaults
    of nothing: a loader always fills them; ``window`` is 25 unless the file's graph says
    otherwise, since weights alone do not fix it)."""

    rois: int
    window: int
    stream_c: StreamSizes
    stream_l: StreamSizes
    phys1: int
    phys2: int
    n_class: int
    n_level: int
    n_rates: int = 2
    hidden_activation: str = "leaky_relu"
    concat_order: tuple[str, str, str] = ("c", "l", "p")
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so ``torch.load(weights_only=True)`` can read a checkpoint."""
        d = asdict(self)
        for key in ("stream_c", "stream_l"):
            d[key]["pool1"] = list(d[key]["pool1"])
            d[key]["pool2"] = list(d[key]["pool2"])
        d["concat_order"] = list(self.concat_order)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KerasV1Sizes:
        def stream(s: dict[str, Any]) -> StreamSizes:
            s = dict(s)
            s["pool1"] = tuple(s.get("pool1", (2, 2)))
            s["pool2"] = tuple(s.get("pool2", (2, 2)))
            return StreamSizes(**s)

        d = dict(d)
        d["stream_c"] = stream(d["stream_c"])
        d["stream_l"] = stream(d["stream_l"])
        d["concat_order"] = tuple(d.get("concat_order", ("c", "l", "p")))
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)

    @property
    def parameter_count(self) -> int:
        def stream(s: StreamSizes) -> int:
            return (
                self.rois * s.conv1_kernel * s.conv1_filters
                + s.conv1_filters
                + s.conv1_filters * s.conv2_kernel * s.conv2_filters
                + s.conv2_filters
                + 3 * s.gru_units * (s.conv2_filters + s.gru_units + 2)
                + s.gru_units * s.dense1
                + s.dense1
                + s.dense1 * s.dense2
                + s.dense2
            )

        concat = self.stream_c.dense2 + self.stream_l.dense2 + self.phys2
        return (
            stream(self.stream_c)
            + stream(self.stream_l)
            + self.n_rates * self.phys1
            + self.phys1
            + self.phys1 * self.phys2
            + self.phys2
            + (concat + 1) * (self.n_class + self.n_level)
        )


UPSTREAM_SIZES = KerasV1Sizes(
    rois=246,
    window=25,
    stream_c=StreamSizes(5000, 10, 2000, 3, 32, 1000, 500),
    stream_l=StreamSizes(5000, 10, 2000, 3, 128, 1000, 500),
    phys1=128,
    phys2=64,
    n_class=3,
    n_level=9,
)
"""The published v1.0 widths (86,811,604 parameters): for benchmarks without a file."""


def keras_same_padding(kernel: int) -> tuple[int, int]:
    """Zeros Keras adds left and right for 'same' (stride 1): the extra one goes right."""
    total = kernel - 1
    return total // 2, total - total // 2


def conv1d_as_gemm(x: torch.Tensor, conv: nn.Conv1d, pad: tuple[int, int]) -> torch.Tensor:
    """Stride-1 Conv1d on (B, in, T) as one matrix product: weights (out, in*k) @ columns.

    Why: at batch 1 and 12-25 time steps the layer is bound by reading its weights (the second
    convolution holds 120 MB per stream); PyTorch's oneDNN convolution path was about 3x slower
    than one GEMM over the unfolded input on the 2-core target (benchmarks/bench_keras_v1.py).
    """
    out_ch, in_ch, k = conv.weight.shape
    x = F.pad(x, pad)
    b, _, t_pad = x.shape
    t = t_pad - k + 1
    cols = x.unfold(2, k, 1).permute(1, 3, 0, 2).reshape(in_ch * k, b * t)  # (in*k, B*T)
    y = torch.addmm(conv.bias[:, None], conv.weight.reshape(out_ch, in_ch * k), cols)
    return y.reshape(out_ch, b, t).transpose(0, 1)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """A Keras activation by its string name, computed as Keras does."""
    if name == "leaky_relu":
        return F.leaky_relu(x, KERAS_LEAKY_RELU_SLOPE)
    if name == "relu":
        return F.relu(x)
    if name == "linear":
        return x
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu":
        return F.elu(x)
    raise ValueError(f"activation {name!r} is not supported; expected one of {HIDDEN_ACTIVATIONS}")


class KerasV1Stream(nn.Module):
    """One fMRI stream, on (batch, rois, time) tensors (PyTorch's channels-first)."""

    def __init__(self, rois: int, s: StreamSizes, act: str) -> None:
        super().__init__()
        self.sizes = s
        self.act = act
        self.pad1 = keras_same_padding(s.conv1_kernel)
        self.pad2 = keras_same_padding(s.conv2_kernel)
        self.conv1 = nn.Conv1d(rois, s.conv1_filters, s.conv1_kernel)
        self.conv2 = nn.Conv1d(s.conv1_filters, s.conv2_filters, s.conv2_kernel)
        self.gru = nn.GRU(s.conv2_filters, s.gru_units, batch_first=True)
        self.dense1 = nn.Linear(s.gru_units, s.dense1)
        self.dense2 = nn.Linear(s.dense1, s.dense2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sizes
        x = activation(self.act, conv1d_as_gemm(x, self.conv1, self.pad1))
        x = F.max_pool1d(x, s.pool1[0], s.pool1[1])
        x = activation(self.act, conv1d_as_gemm(x, self.conv2, self.pad2))
        x = F.avg_pool1d(x, s.pool2[0], s.pool2[1])
        _, h = self.gru(x.transpose(1, 2))  # last state only, as Keras GRU(return_sequences=False)
        h = activation(self.act, self.dense1(h[0]))
        return activation(self.act, self.dense2(h))


class KerasV1Net(nn.Module):
    """The whole v1.0 model: ``forward(mri (B, T, rois), rates (B, 2)) -> (class, level)``
    probabilities (softmax outputs, as the Keras heads return them)."""

    def __init__(self, sizes: KerasV1Sizes) -> None:
        super().__init__()
        self.sizes = sizes
        act = sizes.hidden_activation
        if act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden activation {act!r} is not supported")
        self.stream_c = KerasV1Stream(sizes.rois, sizes.stream_c, act)
        self.stream_l = KerasV1Stream(sizes.rois, sizes.stream_l, act)
        self.phys1 = nn.Linear(sizes.n_rates, sizes.phys1)
        self.phys2 = nn.Linear(sizes.phys1, sizes.phys2)
        concat = sizes.stream_c.dense2 + sizes.stream_l.dense2 + sizes.phys2
        self.head_class = nn.Linear(concat, sizes.n_class)
        self.head_level = nn.Linear(concat, sizes.n_level)
        self.eval()

    def forward(self, mri: torch.Tensor, rates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        act = self.sizes.hidden_activation
        x = mri.transpose(1, 2)  # Keras is time-first (B, T, rois); Conv1d wants (B, rois, T)
        parts = {
            "c": self.stream_c(x),
            "l": self.stream_l(x),
            "p": activation(act, self.phys2(activation(act, self.phys1(rates)))),
        }
        joined = torch.cat([parts[k] for k in self.sizes.concat_order], dim=1)
        return (
            torch.softmax(self.head_class(joined), dim=1),
            torch.softmax(self.head_level(joined), dim=1),
        )
