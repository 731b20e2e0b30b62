"""Run the published EmoRecog-Net v1.0 Keras weights without TensorFlow, live or offline.

* :func:`load_keras_v1` reads a Keras file (h5py only) into :class:`KerasV1Model`, whose
  ``predict(mri, rates)`` equals Keras's ``model.predict`` (the fixture tests hold it to 1e-4).
* :func:`convert_keras_v1` / :func:`save_converted` turn the file into a PyTorch checkpoint
  (``emorecog-stream convert``) so a lab reads the 0.7 GB HDF5 file once.
* :func:`load_keras_v1_model` (``.h5`` or converted ``.pt``) and :func:`load_converted` give a
  :class:`KerasV1StreamingModel` for the engine: a rolling window over the last 25 volumes.

Upstream the model saw one whole 25-volume trial, each ROI min-max normalised over those 25
points, plus one pulse rate and one respiration rate per trial. Live, the stepper does the same
for the window ending at each new volume, so a prediction exists from the 25th volume on
(``ready=False`` before) and each one describes the last 25 volumes, not the current instant.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorecog_stream.model.api import SequenceOutput, StepOutput
from emorecog_stream.model.keras_v1_h5 import (
    KerasV1Error,
    KerasV1File,
    file_sha256,
    read_keras_v1_file,
)
from emorecog_stream.model.keras_v1_net import KerasV1Net, KerasV1Sizes

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_HEART_RATE",
    "DEFAULT_RESPIRATION_RATE",
    "KerasV1Error",
    "KerasV1Model",
    "KerasV1Stepper",
    "KerasV1StreamingModel",
    "convert_keras_v1",
    "load_converted",
    "load_keras_v1",
    "load_keras_v1_model",
    "normalise_window",
    "save_converted",
]

CHECKPOINT_FORMAT = "keras-v1"
CHECKPOINT_VERSION = 1
DEFAULT_HEART_RATE = 70.0
"""bpm used before any valid heart rate arrived: a typical adult resting pulse (the upstream
model cannot take a missing rate; this is our choice, documented in docs/keras-v1.md)."""
DEFAULT_RESPIRATION_RATE = 15.0
"""breaths/min used before any valid respiration rate arrived (typical adult at rest)."""


def normalise_window(window: np.ndarray) -> np.ndarray:
    """Per-ROI min-max over the window's time axis, as upstream: (T, rois) -> float32 in [0, 1].

    Computed in float64 like upstream (its ``.mat`` data are float64) and cast at the end. Upstream
    divides by zero for an ROI that is constant over the window (NaN); we return 0 for it instead.
    """
    x = np.asarray(window, dtype=np.float64)
    lo = x.min(axis=0, keepdims=True)
    span = x.max(axis=0, keepdims=True) - lo
    safe = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (x - lo) / safe, 0.0).astype(np.float32)


def _state_dict(f: KerasV1File) -> dict[str, torch.Tensor]:
    """Keras arrays -> PyTorch names and layouts (conv (k,in,out)->(out,in,k), dense transposed,
    GRU gates z,r,h -> r,z,n with the input and recurrent bias rows kept apart)."""
    sd: dict[str, torch.Tensor] = {}

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def gates(a: np.ndarray, units: int) -> np.ndarray:  # rows z, r, h -> r, z, n (axis 0)
        return np.concatenate([a[units : 2 * units], a[:units], a[2 * units :]], axis=0)

    w = f.weights
    for s in "cl":
        p = f"stream_{s}."
        for conv in ("conv1", "conv2"):
            sd[p + conv + ".weight"] = t(w[f"{s}.{conv}"]["kernel"].transpose(2, 1, 0))
            sd[p + conv + ".bias"] = t(w[f"{s}.{conv}"]["bias"])
        g = w[f"{s}.gru"]
        u = g["recurrent_kernel"].shape[0]
        sd[p + "gru.weight_ih_l0"] = t(gates(g["kernel"].T, u))
        sd[p + "gru.weight_hh_l0"] = t(gates(g["recurrent_kernel"].T, u))
        sd[p + "gru.bias_ih_l0"] = t(gates(g["bias"][0], u))
        sd[p + "gru.bias_hh_l0"] = t(gates(g["bias"][1], u))
        for dense in ("dense1", "dense2"):
            sd[p + dense + ".weight"] = t(w[f"{s}.{dense}"]["kernel"].T)
            sd[p + dense + ".bias"] = t(w[f"{s}.{dense}"]["bias"])
    for role, name in (
        ("p.dense1", "phys1"),
        ("p.dense2", "phys2"),
        ("class", "head_class"),
        ("level", "head_level"),
    ):
        sd[name + ".weight"] = t(w[role]["kernel"].T)
        sd[name + ".bias"] = t(w[role]["bias"])
    return sd


@dataclass(frozen=True)
class SourceInfo:
    """Which file the weights came from; part of every model id and converted checkpoint."""

    file: str
    sha256: str
    layout: str
    keras_version: str

    @property
    def model_id(self) -> str:
        name = Path(self.file).name
        for suffix in (".weights.h5", ".h5", ".hdf5", ".keras"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        return f"{CHECKPOINT_FORMAT}:{name}:{self.sha256[:8]}"


class KerasV1Model:
    """The v1.0 network on numpy arrays: ``predict(mri, rates) -> (class (B,3), level (B,9))``.

    ``mri`` is (B, window, rois) or one (window, rois) window, already normalised as upstream
    (:func:`normalise_window`); ``rates`` is (B, 2) or (2,): pulse rate (bpm), respiration rate
    (breaths/min), both finite (the model has no notion of a missing rate).
    """

    def __init__(self, net: KerasV1Net, source: SourceInfo) -> None:
        self.net = net.eval()
        self.sizes: KerasV1Sizes = net.sizes
        self.source = source
        self.model_id = source.model_id

    @torch.inference_mode()
    def predict(
        self, mri: np.ndarray, rates: np.ndarray, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        s = self.sizes
        mri = np.asarray(mri, dtype=np.float32)
        rates = np.asarray(rates, dtype=np.float32)
        if mri.ndim == 2:
            mri = mri[None]
        if rates.ndim == 1:
            rates = rates[None]
        if mri.ndim != 3 or mri.shape[1:] != (s.window, s.rois):
            raise ValueError(
                f"mri: expected shape (batch, {s.window}, {s.rois}) (time first, normalised per "
                f"ROI), got {mri.shape}"
            )
        if rates.shape != (mri.shape[0], s.n_rates):
            raise ValueError(
                f"rates: expected shape ({mri.shape[0]}, {s.n_rates}) [pulse rate, "
                f"respiration rate], got {rates.shape}"
            )
        if not np.isfinite(rates).all():
            raise ValueError(
                "rates: the v1.0 model cannot take a missing (NaN) rate; substitute "
                "one first (the streaming model uses the last valid value)"
            )
        if not np.isfinite(mri).all():
            raise ValueError("mri: non-finite values in the window")
        outs_c, outs_l = [], []
        for start in range(0, mri.shape[0], max(1, batch_size)):
            c, lv = self.net(
                torch.from_numpy(mri[start : start + batch_size]),
                torch.from_numpy(rates[start : start + batch_size]),
            )
            outs_c.append(c.numpy())
            outs_l.append(lv.numpy())
        if not outs_c:
            return (np.zeros((0, s.n_class), np.float32), np.zeros((0, s.n_level), np.float32))
        return np.concatenate(outs_c), np.concatenate(outs_l)


def load_keras_v1(path: str | Path) -> KerasV1Model:
    """Read a Keras v1.0 file (full model or weights only, Keras 2 or 3) with h5py alone."""
    f = read_keras_v1_file(path)
    net = KerasV1Net(f.sizes)
    net.load_state_dict(_state_dict(f))
    source = SourceInfo(Path(path).name, file_sha256(Path(path)), f.layout, f.keras_version)
    return KerasV1Model(net, source)


# ---------------------------------------------------------------------------------------------
# converted checkpoints


def convert_keras_v1(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict ``emorecog-stream convert`` writes (plain types and tensors only, so
    ``torch.load(..., weights_only=True)`` reads it)."""
    model = load_keras_v1(path)
    src = model.source
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_id": model.model_id,
        "sizes": model.sizes.to_dict(),
        "parameters": model.sizes.parameter_count,
        "state_dict": {k: v.clone() for k, v in model.net.state_dict().items()},
        "source": {
            "file": src.file,
            "sha256": src.sha256,
            "layout": src.layout,
            "keras_version": src.keras_version,
        },
    }


def save_converted(path_in: str | Path, path_out: str | Path) -> dict[str, Any]:
    """Convert ``path_in`` and write the checkpoint to ``path_out``, readable by its owner only."""
    from emorecog_stream.private_files import replace_private

    ckpt = convert_keras_v1(path_in)
    with replace_private(path_out) as f:
        torch.save(ckpt, f)
    return ckpt


def _model_from_checkpoint(ckpt: dict[str, Any], path: str | Path) -> KerasV1Model:
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KerasV1Error(
            f"{path}: not a converted Keras v1 checkpoint (format "
            f"{CHECKPOINT_FORMAT!r} expected, found {found!r})"
        )
    version = ckpt.get("format_version")
    if type(version) is not int or version != CHECKPOINT_VERSION:  # a tensor cannot compare
        raise KerasV1Error(
            f"{path}: keras-v1 checkpoint format_version {version!r}; this version "
            f"reads {CHECKPOINT_VERSION}"
        )
    missing = [k for k in ("sizes", "state_dict", "source") if k not in ckpt]
    if missing:
        raise KerasV1Error(f"{path}: keras-v1 checkpoint lacks {missing}")
    try:
        return _build_from_checkpoint(ckpt, path)
    except KerasV1Error:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        # sizes, tensors or source of another type than written (the file is outside data)
        raise KerasV1Error(
            f"{path}: keras-v1 checkpoint is malformed ({type(exc).__name__}: {exc})"
        ) from None


def _build_from_checkpoint(ckpt: dict[str, Any], path: str | Path) -> KerasV1Model:
    try:
        sizes = KerasV1Sizes.from_dict(ckpt["sizes"])
    except (TypeError, KeyError) as exc:
        raise KerasV1Error(f"{path}: keras-v1 checkpoint has malformed sizes: {exc}") from None
    with torch.device("meta"):  # shapes only: sizes read from the file allocate nothing
        expected = KerasV1Net(sizes).state_dict()
    got = ckpt["state_dict"]
    for name, tensor in expected.items():
        if name not in got:
            raise KerasV1Error(f"{path}: checkpoint lacks tensor {name!r}")
        if tuple(got[name].shape) != tuple(tensor.shape):
            raise KerasV1Error(
                f"{path}: tensor {name!r} has shape {tuple(got[name].shape)}, "
                f"expected {tuple(tensor.shape)} from the stored sizes"
            )
    net = KerasV1Net(sizes)
    net.load_state_dict(got)
    src = ckpt["source"]
    return KerasV1Model(
        net,
        SourceInfo(
            src["file"], src["sha256"], src.get("layout", "?"), src.get("keras_version", "?")
        ),
    )


def load_converted(checkpoint: dict[str, Any], path: str | Path) -> KerasV1StreamingModel:
    """A streaming model from a converted checkpoint already loaded by ``torch.load``."""
    return KerasV1StreamingModel(_model_from_checkpoint(checkpoint, path))


def load_keras_v1_model(path: str | Path, **kwargs: Any) -> KerasV1StreamingModel:
    """A streaming model from a Keras HDF5 file or from a ``convert``-ed ``.pt`` checkpoint.

    The model id is the same for both (``keras-v1:<source stem>:<sha256 of the .h5, 8 hex>``),
    so a converted file speaks with the name of the file it came from.
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise KerasV1Error(f"{p}: no such file")
    if h5py.is_hdf5(p) or p.name.lower().endswith((".h5", ".hdf5", ".keras")):
        return KerasV1StreamingModel(load_keras_v1(p), **kwargs)  # says "not an HDF5 file"
    from emorecog_stream.model.checkpoint import (
        CheckpointError,
        UnsafeCheckpointError,
        load_weights_file,
    )

    try:
        ckpt = load_weights_file(p)  # weights_only: a file holding code is refused, not run
    except UnsafeCheckpointError:
        raise
    except CheckpointError as exc:
        raise KerasV1Error(
            f"{p}: neither a Keras HDF5 file nor a converted PyTorch checkpoint ({exc})"
        ) from None
    return KerasV1StreamingModel(_model_from_checkpoint(ckpt, p), **kwargs)


# ---------------------------------------------------------------------------------------------
# the engine's view: a rolling window


class KerasV1StreamingModel:
    """:class:`~emorecog_stream.model.api.StreamingModel` over the v1.0 network.

    ``default_rates`` are the (heart, respiration) rates used before any valid value arrived.
    """

    def __init__(
        self,
        model: KerasV1Model,
        default_rates: tuple[float, float] = (DEFAULT_HEART_RATE, DEFAULT_RESPIRATION_RATE),
    ) -> None:
        s = model.sizes
        if s.n_class != 3 or s.n_level != 9:
            raise KerasV1Error(
                f"{model.source.file}: the engine maps 3 classes (-1/0/+1) and 9 levels "
                f"(-4..+4); this model has {s.n_class} and {s.n_level}"
            )
        self.model = model
        self.model_id = model.model_id
        self.window = s.window
        self.default_rates = default_rates

    def stepper(self) -> KerasV1Stepper:
        return KerasV1Stepper(self.model, self.default_rates)

    def predict_sequence(
        self,
        roi: np.ndarray,
        heart_rate: np.ndarray,
        respiration_rate: np.ndarray,
        batch_size: int = 1,
    ) -> SequenceOutput:
        """Per-volume outputs equal to stepping (rows before the window fills are NaN).

        ``batch_size`` > 1 runs several windows per forward pass: faster offline, but CPU kernels
        may round differently for different batch sizes (differences near 1e-7), so the default
        1 reproduces the stepper exactly.
        """
        roi = np.asarray(roi, dtype=np.float32)
        hr = np.asarray(heart_rate, dtype=np.float64).ravel()
        rr = np.asarray(respiration_rate, dtype=np.float64).ravel()
        n = roi.shape[0] if roi.ndim == 2 else -1
        if (
            roi.ndim != 2
            or roi.shape[1] != self.model.sizes.rois
            or hr.shape != (n,)
            or rr.shape != (n,)
        ):
            raise ValueError(
                f"expected roi (T, {self.model.sizes.rois}) and heart/respiration rates (T,); got "
                f"{roi.shape}, {hr.shape}, {rr.shape}"
            )
        rates = _RateHold(self.default_rates)
        filled = np.array(
            [rates.update(h, r)[0] for h, r in zip(hr, rr, strict=True)], dtype=np.float32
        ).reshape(n, 2)
        probs = np.full((n, 3), np.nan, dtype=np.float64)
        intensity = np.full(n, np.nan, dtype=np.float64)
        w = self.window
        ends = list(range(w - 1, n))
        for start in range(0, len(ends), max(1, batch_size)):
            chunk = ends[start : start + batch_size]
            mri = np.stack([normalise_window(roi[t - w + 1 : t + 1]) for t in chunk])
            c, lv = self.model.predict(mri, filled[chunk], batch_size=len(chunk))
            for i, t in enumerate(chunk):
                probs[t] = c[i]
                intensity[t] = _expected_level(lv[i])
        return SequenceOutput(probabilities=probs, intensity=intensity)


def _expected_level(level_probs: np.ndarray) -> float:
    """Expectation of the 9-way level softmax over -4..+4 (the published intensity)."""
    return float(np.dot(level_probs.astype(np.float64), np.arange(-4, 5, dtype=np.float64)))


class _RateHold:
    """Last valid value hold for the two rates; says which ones were substituted."""

    def __init__(self, defaults: tuple[float, float]) -> None:
        self.defaults = defaults
        self.last: list[float | None] = [None, None]

    def update(self, hr: float, rr: float) -> tuple[tuple[float, float], tuple[bool, bool]]:
        used: list[float] = []
        substituted: list[bool] = []
        for i, v in enumerate((hr, rr)):
            if v is not None and math.isfinite(v):
                self.last[i] = float(v)
                used.append(float(v))
                substituted.append(False)
            else:
                held = self.last[i]
                used.append(self.defaults[i] if held is None else held)
                substituted.append(True)
        return (used[0], used[1]), (substituted[0], substituted[1])

    def reset(self) -> None:
        self.last = [None, None]


class KerasV1Stepper:
    """Keeps the last ``window`` volumes; each :meth:`step` predicts from the window ending now.

    Output mapping: class softmax index 0/1/2 is upstream's -1/0/+1, i.e. negative/neutral/
    positive (the engine's order); ``intensity`` is the expectation of the level softmax over
    -4..+4 and ``level`` its arg-max - 4 (upstream's LEVEL). Until ``window`` volumes have
    arrived ``ready`` is False and the values are NaN.

    Missing rates (NaN) are replaced by the last valid value, or by the defaults before any
    arrived; ``last_substituted`` says which of (heart, respiration) were replaced in the last
    step, and ``last_rates`` which values were used.
    """

    def __init__(self, model: KerasV1Model, default_rates: tuple[float, float]) -> None:
        self.model = model
        self.window = model.sizes.window
        self.rois = model.sizes.rois
        self._volumes: deque[np.ndarray] = deque(maxlen=self.window)
        self._rates = _RateHold(default_rates)
        self.last_substituted: tuple[bool, bool] = (False, False)
        self.last_rates: tuple[float, float] = (math.nan, math.nan)

    def reset(self) -> None:
        self._volumes.clear()
        self._rates.reset()
        self.last_substituted = (False, False)
        self.last_rates = (math.nan, math.nan)

    @property
    def filled(self) -> int:
        """Volumes currently in the window (``window`` once ready)."""
        return len(self._volumes)

    def step(self, roi: np.ndarray, heart_rate: float, respiration_rate: float) -> StepOutput:
        vol = np.asarray(roi, dtype=np.float32).ravel()
        if vol.shape != (self.rois,):
            raise ValueError(
                f"roi: expected {self.rois} values (one volume), got shape {np.shape(roi)}"
            )
        if not np.isfinite(vol).all():
            raise ValueError("roi: the volume has non-finite values (the aligner replaces them)")
        rates, substituted = self._rates.update(heart_rate, respiration_rate)
        self.last_rates, self.last_substituted = rates, substituted
        self._volumes.append(vol)
        if len(self._volumes) < self.window:
            return StepOutput(np.full(3, np.nan), math.nan, ready=False, level=None)
        mri = normalise_window(np.stack(self._volumes))
        c, lv = self.model.predict(mri[None], np.array([rates], dtype=np.float32), batch_size=1)
        return StepOutput(
            probabilities=c[0].astype(np.float64),
            intensity=_expected_level(lv[0]),
            ready=True,
            level=int(np.argmax(lv[0])) - 4,
        )
