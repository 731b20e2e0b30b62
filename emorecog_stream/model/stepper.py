"""One volume in, one answer out: the streaming EmoRecog-Net at inference time.

``StreamingEmoRecogNet`` is what :func:`emorecog_stream.model.load_model` returns. Offline,
``predict_sequence`` computes the causal baselines over the recording and runs the PyTorch module
once. Online, ``stepper()`` and ``batch_stepper(B)`` run the same network one volume at a time in
NumPy, carrying the GRU state, the running baselines and the last ``temporal_kernel - 1`` volumes.
Why NumPy for the step: at batch 1 a step is a few dozen small operations, and each costs several
times less in NumPy than in PyTorch; property tests hold the two implementations equal (within
1e-5), so they also check each other.

Why float64 inside (the weights are float32 values; inputs are rounded to float32, outputs are
float32): a float32 step and a float32 whole-sequence pass, or a batch of B and a batch of 1 (BLAS
sums in a different order for a matrix than for a vector), differ in the last bits of each product,
and the GRU state and the running baselines carry those differences from volume to volume; over a
few hundred volumes they reached 1e-5. In float64 every path (single stepper, batch stepper, and
``predict_sequence`` on a float64 copy of the module) agrees to about 1e-12 before the final
rounding to float32, whatever the session length. The price is about 15 us per step on one core.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from emorecog_stream.model.api import SequenceOutput, StepOutput
from emorecog_stream.model.features import (
    RateBaseline,
    alpha,
    rate_deviation_batch,
    rate_deviation_sequence,
    roi_deviation_sequence,
)
from emorecog_stream.model.net import LEAKY_SLOPE, EmoRecogNet, NetConfig


@dataclass(frozen=True)
class _Weights:
    """The network's parameters re-laid out for a step with as few NumPy calls as possible.

    Every layer's bias is folded into its weight matrix as the last row, multiplied by a constant 1
    kept at the end of the layer's input buffer. The ROI z-scoring is folded into the first layer
    (weights divided by the ROI spread, the mean moved into the bias). ``w_front`` maps the newest
    ROI deviation vector to the spatial stream and to its contribution to the temporal
    convolution's output at this volume and at each of the next ``k - 1`` (one block per tap, the
    newest tap first); the stepper adds what earlier volumes contributed (its carry), so each volume
    passes through the weights once. The GRU's products are ``[front, 1] @ w_gru_x`` giving ``[r+z
    input parts + both biases, W_in x + b_in]`` and ``[h, 1] @ w_gru_h`` giving ``[r+z recurrent
    parts, W_hn h + b_hn]`` (PyTorch's reset-after form).
    """

    w_front: np.ndarray  # (R + 1, Cs + k*Ct)
    w_gru_x: np.ndarray  # (C + 1, 3H)
    w_gru_h: np.ndarray  # (H + 1, 3H)
    w_physio: np.ndarray  # (7, P): rows z_hr, z_rr, zd_hr, zd_rr, valid_hr, valid_rr, 1
    w_fusion: np.ndarray  # (H + 1 + P, F): rows h, 1, p
    w_heads: np.ndarray  # (F + 1, 4): three category logits and the intensity pre-activation
    physio_mean: tuple[float, float]
    physio_std: tuple[float, float]
    physio_dev_std: tuple[float, float]
    physio_fill: tuple[float, float, float, float]
    physio_clip: float
    intensity_scale: float
    roi_window: float
    rate_window: float
    n_rois: int
    kernel: int
    n_front: int
    temporal_channels: int
    hidden: int
    physio_hidden: int
    fusion_hidden: int

    @classmethod
    def from_net(cls, net: EmoRecogNet) -> _Weights:
        c = net.config

        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().double().numpy()

        def with_bias(weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
            return np.concatenate([a(weight).T, a(bias)[None, :]])

        def floats(t: torch.Tensor) -> tuple[float, ...]:
            return tuple(float(v) for v in t.detach().cpu().float().tolist())

        k, r, cs, ct, hd = (
            c.temporal_kernel,
            c.n_rois,
            c.spatial_channels,
            c.temporal_channels,
            c.hidden,
        )
        inv_sd = 1.0 / a(net.roi_std)
        mu = a(net.roi_mean)
        conv = a(net.temporal.weight) * inv_sd[None, :, None]  # (Ct, R, k); tap k-1 = newest
        spatial = a(net.spatial.weight) * inv_sd[None, :]  # (Cs, R)
        bias_s = a(net.spatial.bias) - spatial @ mu
        bias_t = a(net.temporal.bias) - conv.sum(axis=2) @ mu
        w_front = np.zeros((r + 1, cs + k * ct))
        w_front[:r, :cs] = spatial.T
        w_front[r, :cs] = bias_s
        for age in range(k):  # block ``age``: this volume's part of the output ``age`` volumes on
            w_front[:r, cs + age * ct : cs + (age + 1) * ct] = conv[:, :, k - 1 - age].T
        w_front[r, cs : cs + ct] = bias_t
        w_ih, w_hh = a(net.gru.weight_ih_l0).T, a(net.gru.weight_hh_l0).T  # (in, 3H), (H, 3H)
        b_ih, b_hh = a(net.gru.bias_ih_l0), a(net.gru.bias_hh_l0)
        n_front = cs + ct
        w_gru_x = np.concatenate([w_ih, b_ih[None, :]])
        w_gru_x[-1, : 2 * hd] += b_hh[: 2 * hd]
        w_gru_h = np.concatenate([w_hh, b_hh[None, :]])
        w_gru_h[-1, : 2 * hd] = 0.0
        fw = a(net.fusion.weight).T  # (H + P, F)
        w_fusion = np.concatenate([fw[:hd], a(net.fusion.bias)[None, :], fw[hd:]])
        heads_w = torch.cat([net.category_head.weight, net.intensity_head.weight])
        heads_b = torch.cat([net.category_head.bias, net.intensity_head.bias])

        def f64(x: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(x, dtype=np.float64)

        return cls(
            w_front=f64(w_front),
            w_gru_x=f64(w_gru_x),
            w_gru_h=f64(w_gru_h),
            w_physio=f64(with_bias(net.physio.weight, net.physio.bias)),
            w_fusion=f64(w_fusion),
            w_heads=f64(with_bias(heads_w, heads_b)),
            physio_mean=floats(net.physio_mean),  # type: ignore[arg-type]
            physio_std=floats(net.physio_std),  # type: ignore[arg-type]
            physio_dev_std=floats(net.physio_dev_std),  # type: ignore[arg-type]
            physio_fill=floats(net.physio_fill),  # type: ignore[arg-type]
            physio_clip=float(c.physio_clip),
            intensity_scale=float(c.intensity_scale),
            roi_window=float(c.roi_window),
            rate_window=float(c.rate_window),
            n_rois=r,
            kernel=k,
            n_front=n_front,
            temporal_channels=ct,
            hidden=hd,
            physio_hidden=c.physio_hidden,
            fusion_hidden=c.fusion_hidden,
        )


_SLOPE = np.float64(LEAKY_SLOPE)


def _leaky_into(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """``out[:] = leaky_relu(x)``; max(x, 0.2 x) equals it bit for bit for a slope below 1."""
    np.multiply(x, _SLOPE, out=tmp)
    np.maximum(x, tmp, out=out)


def _physio_value(w: _Weights, i: int, value: float, dev: float) -> tuple[float, float, float]:
    """(z, z of deviation, valid) of rate ``i`` (0 heart, 1 respiration); fill if missing."""
    if not math.isfinite(value):
        return w.physio_fill[i], w.physio_fill[2 + i], 0.0
    clip = w.physio_clip
    z = (value - w.physio_mean[i]) / w.physio_std[i]
    zd = dev / w.physio_dev_std[i]
    return min(max(z, -clip), clip), min(max(zd, -clip), clip), 1.0


class NetBatchStepper:
    """Advances ``batch_size`` independent sessions by one volume per call (implements
    :class:`~emorecog_stream.model.api.BatchStepper`).

    ``step_batch(roi (B, R), hr (B,), rr (B,))`` returns ``(probabilities (B, 3), intensity (B,))``
    (fresh float32 arrays); ``reset(i)`` starts session ``i`` afresh (``reset()`` resets all).
    Each row depends only on that row's history, so a batch equals B single steppers. State and
    arithmetic are float64 (see the module docstring).
    """

    def __init__(self, weights: _Weights, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        w = self._w = weights
        self.batch_size = b = batch_size
        k, r, c, hd, ct = w.kernel, w.n_rois, w.n_front, w.hidden, w.temporal_channels
        ph, fh = w.physio_hidden, w.fusion_hidden
        f64 = np.float64
        self._x = np.zeros((b, r + 1), f64)  # [ROI deviations, 1]
        self._pre = np.zeros((b, w.w_front.shape[1]), f64)  # front pre-activations + taps
        # Temporal outputs still owed to the next k - 1 volumes by the volumes seen so far
        # (zero after a reset: the convolution's zero padding before a session).
        self._carry = np.zeros((b, (k - 1) * ct), f64)
        self._roi_mean = np.zeros((b, r), f64)  # running ROI baselines
        self._rate_mean = np.zeros((b, 2), f64)  # running HR / RR baselines
        self._rate_count = np.zeros((b, 2), f64)
        self._u = np.zeros((b, c + 1 + hd + 1 + ph), f64)  # [front, 1, h, 1, p]
        self._f = np.zeros((b, fh + 1), f64)  # [fusion, 1]
        # Fixed views into the buffers (made once: slicing costs as much as a small ufunc).
        self._dev = self._x[:, :r]
        # pre = [spatial | temporal block 0 (this volume's output) | blocks 1..k-1 (owed)]
        self._pre_out = self._pre[:, :c]
        self._pre_taps = self._pre[:, c - ct : c - ct + (k - 1) * ct]  # blocks 0..k-2
        self._pre_owed = self._pre[:, c:]  # blocks 1..k-1: the next carry
        u = self._u
        self._front, self._h = u[:, :c], u[:, c + 1 : c + 1 + hd]
        self._p = u[:, c + 1 + hd + 1 :]
        self._gru_x, self._gru_h = u[:, : c + 1], u[:, c + 1 : c + 1 + hd + 1]
        self._fusion_in = u[:, c + 1 :]
        self._fusion_out = self._f[:, :-1]
        self._e = np.empty((b, r), f64)
        self._ae = np.empty((b, r), f64)
        self._tmp_front = np.empty((b, c), f64)
        self._tmp_ph = np.empty((b, ph), f64)
        self._tmp_f = np.empty((b, fh), f64)
        self._tmp_h = np.empty((b, hd), f64)
        self._gx = np.empty((b, 3 * hd), f64)
        self._gh = np.empty((b, 3 * hd), f64)
        self._count = 0  # volumes advanced by this stepper (all sessions step together)
        self._reset_at = np.zeros(b, np.int64)  # per session: ``_count`` at its last reset
        self.reset()

    def reset(self, index: int | None = None) -> None:
        """Zero the state (GRU, baselines, convolution carry) of one session, or of all."""
        rows = slice(None) if index is None else index
        w = self._w
        self._x[rows] = 0.0
        self._x[rows, -1] = 1.0
        self._carry[rows] = 0.0
        self._roi_mean[rows] = 0.0
        self._rate_mean[rows] = 0.0
        self._rate_count[rows] = 0.0
        self._u[rows] = 0.0
        self._u[rows, w.n_front] = 1.0
        self._u[rows, w.n_front + 1 + w.hidden] = 1.0
        self._f[rows, -1] = 1.0
        self._reset_at[rows] = self._count

    @property
    def steps(self) -> np.ndarray:
        """Volumes each session has seen since its last reset, (B,)."""
        return self._count - self._reset_at

    def step_batch(
        self, roi: np.ndarray, heart_rate: np.ndarray, respiration_rate: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        w = self._w
        b = self.batch_size
        roi = np.asarray(roi, dtype=np.float32)
        if roi.shape != (b, w.n_rois):
            raise ValueError(
                f"step_batch: expected roi of shape ({b}, {w.n_rois}) (one volume per session),"
                f" got {roi.shape}"
            )
        rates = np.stack(
            [
                np.asarray(heart_rate, dtype=np.float32).reshape(-1),
                np.asarray(respiration_rate, dtype=np.float32).reshape(-1),
            ],
            axis=1,
        ).astype(np.float64)
        if rates.shape != (b, 2):
            raise ValueError(
                f"step_batch: expected heart_rate and respiration_rate of shape ({b},),"
                f" got {np.shape(heart_rate)} and {np.shape(respiration_rate)}"
            )
        dev = np.stack(
            [
                rate_deviation_batch(
                    rates[:, i], self._rate_mean[:, i], self._rate_count[:, i], w.rate_window
                )
                for i in (0, 1)
            ],
            axis=1,
        )
        valid = np.isfinite(rates)
        mean = np.array(w.physio_mean)
        z = np.clip(
            (np.where(valid, rates, mean) - mean) / np.array(w.physio_std),
            -w.physio_clip,
            w.physio_clip,
        )
        zd = np.clip(
            np.where(valid, dev, 0.0) / np.array(w.physio_dev_std), -w.physio_clip, w.physio_clip
        )
        fill = np.array(w.physio_fill)
        feats = np.where(np.concatenate([valid, valid], axis=1), np.concatenate([z, zd], 1), fill)
        p_in = np.concatenate([feats, valid, np.ones((b, 1))], axis=1)
        a = np.maximum(1.0 / (self.steps + 1.0), 1.0 / w.roi_window)
        out = self._advance(roi, a[:, None], p_in)
        logits = out[:, :3]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        intensity = w.intensity_scale * np.tanh(out[:, 3])
        return probs.astype(np.float32), intensity.astype(np.float32)

    def _advance(self, roi: np.ndarray, a: np.ndarray | float, p_in: np.ndarray) -> np.ndarray:
        """One volume for every session (``roi`` float32 (B, R); ``a``: ROI baseline weights;
        ``p_in`` physiology inputs (B, 7)); float64 throughout; returns the heads (B, 4)."""
        w = self._w
        hd = w.hidden
        e, ae = self._e, self._ae
        np.subtract(roi, self._roi_mean, out=e)
        if not math.isfinite(float(np.add.reduce(e, axis=None))):
            e[~np.isfinite(e)] = 0.0
        np.multiply(e, a, out=ae)
        self._roi_mean += ae
        np.subtract(e, ae, out=self._dev)
        pre = self._pre
        np.matmul(self._x, w.w_front, out=pre)
        if w.kernel > 1:
            self._pre_taps += self._carry  # what the previous k - 1 volumes contributed
            self._carry[...] = self._pre_owed
        _leaky_into(self._pre_out, self._front, self._tmp_front)
        gx, gh = self._gx, self._gh
        np.matmul(self._gru_x, w.w_gru_x, out=gx)  # [r+z input parts and biases, W_in x + b_in]
        np.matmul(self._gru_h, w.w_gru_h, out=gh)  # [r+z recurrent parts, W_hn h + b_hn]
        rz = gx[:, : 2 * hd]
        rz += gh[:, : 2 * hd]
        expit(rz, out=rz)
        cand = gx[:, 2 * hd :]
        tmp = self._tmp_h
        np.multiply(rz[:, :hd], gh[:, 2 * hd :], out=tmp)
        cand += tmp
        np.tanh(cand, out=cand)
        h = self._h
        np.subtract(h, cand, out=tmp)
        tmp *= rz[:, hd:]
        np.add(cand, tmp, out=h)
        _leaky_into(p_in @ w.w_physio, self._p, self._tmp_ph)
        _leaky_into(self._fusion_in @ w.w_fusion, self._fusion_out, self._tmp_f)
        self._count += 1
        return self._f @ w.w_heads


class NetStepperPool:
    """Steps several sessions' :class:`NetStepper` objects, one volume each, as one batch.

    Why: a hub serves sessions whose volumes arrive at their own times. Each session keeps its
    own :class:`NetStepper` (the cheapest path when it steps alone); when several are ready at
    once, their states (GRU, baselines, convolution carry, volume counts) are gathered into one
    :class:`NetBatchStepper`, advanced in one pass and written back. Each row depends only on
    its own history and the arithmetic is float64 (see the module docstring), so the result
    equals stepping each session alone.
    """

    _STATE = ("_x", "_carry", "_u", "_f")

    def __init__(self, weights: _Weights) -> None:
        self._w = weights
        self._work: dict[int, NetBatchStepper] = {}  # batch steppers by batch size, reused

    def stepper(self) -> NetStepper:
        return NetStepper(self._w)

    def step_together(
        self,
        steppers: list[NetStepper],
        roi: np.ndarray,
        heart_rate: np.ndarray,
        respiration_rate: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One volume for each of ``steppers`` (distinct); returns (probabilities (k, 3),
        intensity (k,)) in their order. Nothing is written back if the step raises."""
        k = len(steppers)
        if len({id(s) for s in steppers}) != k:
            raise ValueError("step_together: a session may step once per call")
        work = self._work.get(k)
        if work is None:
            work = self._work[k] = NetBatchStepper(self._w, k)
        singles = [s._batch for s in steppers]
        for name in self._STATE:
            np.concatenate([getattr(b, name) for b in singles], out=getattr(work, name))
        np.concatenate([b._roi_mean for b in singles], out=work._roi_mean)
        work._rate_mean[:] = [(s._hr.mean, s._rr.mean) for s in steppers]
        work._rate_count[:] = [(s._hr.count, s._rr.count) for s in steppers]
        work._count = 0
        work._reset_at[:] = [-s._n for s in steppers]
        out = work.step_batch(roi, heart_rate, respiration_rate)
        for i, (s, b) in enumerate(zip(steppers, singles, strict=True)):
            for name in self._STATE:
                getattr(b, name)[0] = getattr(work, name)[i]
            b._roi_mean[0] = work._roi_mean[i]
            s._hr.mean, s._rr.mean = float(work._rate_mean[i, 0]), float(work._rate_mean[i, 1])
            s._hr.count, s._rr.count = int(work._rate_count[i, 0]), int(work._rate_count[i, 1])
            s._n += 1
        return out


class NetStepper:
    """The :class:`~emorecog_stream.model.api.Stepper` of one session (a batch of one, with the
    per-volume bookkeeping in plain Python floats, which is cheaper than NumPy at this size)."""

    def __init__(self, weights: _Weights) -> None:
        self._w = weights
        self._batch = NetBatchStepper(weights, 1)
        self._hr = RateBaseline(weights.rate_window)
        self._rr = RateBaseline(weights.rate_window)
        self._n = 0

    def step(self, roi: np.ndarray, heart_rate: float, respiration_rate: float) -> StepOutput:
        w = self._w
        roi = np.asarray(roi, dtype=np.float32)
        if roi.shape != (w.n_rois,):
            raise ValueError(
                f"step: expected roi of shape ({w.n_rois},) (one volume), got {roi.shape}"
            )
        # float32 first, as the offline path sees the rates
        hr = float(np.float32(heart_rate))
        rr = float(np.float32(respiration_rate))
        z_hr, zd_hr, v_hr = _physio_value(w, 0, hr, self._hr.update(hr))
        z_rr, zd_rr, v_rr = _physio_value(w, 1, rr, self._rr.update(rr))
        p_in = np.array([[z_hr, z_rr, zd_hr, zd_rr, v_hr, v_rr, 1.0]])
        a = alpha(self._n, w.roi_window)
        self._n += 1
        out = self._batch._advance(roi, a, p_in)[0].tolist()
        # softmax of three logits and tanh in plain Python floats: cheaper than NumPy calls here
        top = max(out[0], out[1], out[2])
        e0, e1, e2 = math.exp(out[0] - top), math.exp(out[1] - top), math.exp(out[2] - top)
        total = e0 + e1 + e2
        probs = np.array([e0 / total, e1 / total, e2 / total], np.float32)
        intensity = float(np.float32(w.intensity_scale * math.tanh(out[3])))
        return StepOutput(probabilities=probs, intensity=intensity)

    def reset(self) -> None:
        self._batch.reset()
        self._hr.reset()
        self._rr.reset()
        self._n = 0

    @property
    def steps(self) -> int:
        """Volumes seen since the last reset."""
        return self._n


class StreamingEmoRecogNet:
    """A loaded streaming EmoRecog-Net (a :class:`~emorecog_stream.model.api.StreamingModel`).

    ``model_id`` names the exact weights (``emorecog-net-stream:<version>:<hash>``);
    ``metadata`` holds what the checkpoint recorded (training data, metrics, seed).
    """

    def __init__(self, net: EmoRecogNet, model_id: str, metadata: dict[str, Any] | None = None):
        self.net = net.eval()
        self.model_id = model_id
        self.metadata = metadata or {}
        self._weights = _Weights.from_net(self.net)
        # predict_sequence's twin of the module in float64, the steppers' precision
        self._net64 = copy.deepcopy(self.net).double().eval()

    @property
    def config(self) -> NetConfig:
        return self.net.config

    def stepper(self) -> NetStepper:
        """A fresh single-session stepper (GRU state and baselines at zero)."""
        return NetStepper(self._weights)

    def batch_stepper(self, batch_size: int) -> NetBatchStepper:
        """A stepper advancing ``batch_size`` independent sessions per call."""
        return NetBatchStepper(self._weights, batch_size)

    def stepper_pool(self) -> NetStepperPool:
        """Single-session steppers that can also be stepped together as one batch (the hub)."""
        return NetStepperPool(self._weights)

    def predict_sequence(
        self, roi: np.ndarray, heart_rate: np.ndarray, respiration_rate: np.ndarray
    ) -> SequenceOutput:
        """Outputs for every volume of one recording, from a fresh state (equal to stepping).

        Computed in float64 (a float64 copy of the module, float64 baselines) like the steppers,
        then rounded to float32.
        """
        roi, hr, rr = check_sequence(roi, heart_rate, respiration_rate, self.config.n_rois)
        if roi.shape[0] == 0:
            return SequenceOutput(np.zeros((0, 3), np.float32), np.zeros(0, np.float32))
        inputs = sequence_inputs(roi, hr, rr, self.config)
        with torch.inference_mode():
            logits, intensity = self._net64(*(torch.from_numpy(x)[None] for x in inputs))
            probs = torch.softmax(logits[0], dim=-1)
        return SequenceOutput(
            probabilities=probs.numpy().astype(np.float32),
            intensity=intensity[0].numpy().astype(np.float32),
        )


def sequence_inputs(
    roi: np.ndarray,
    hr: np.ndarray,
    rr: np.ndarray,
    config: NetConfig,
    dtype: type[np.floating] = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The network's inputs for one recording: ROI deviations (T, R), rates (T, 2), rate
    deviations (T, 2), computed causally from the first volume on in float64 (the steppers'
    arithmetic), returned as ``dtype`` (float32 for the float32 module)."""
    roi_dev = roi_deviation_sequence(roi, config.roi_window, dtype)
    rates = np.stack([hr, rr], axis=1).astype(np.float32).astype(dtype)
    rate_dev = np.stack(
        [
            rate_deviation_sequence(hr, config.rate_window),
            rate_deviation_sequence(rr, config.rate_window),
        ],
        axis=1,
    ).astype(dtype)
    return roi_dev, rates, rate_dev


def check_sequence(
    roi: np.ndarray, heart_rate: np.ndarray, respiration_rate: np.ndarray, n_rois: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert one recording's arrays to float32; errors say expected vs found."""
    roi = np.ascontiguousarray(roi, dtype=np.float32)
    if roi.ndim != 2 or roi.shape[1] != n_rois:
        raise ValueError(f"predict_sequence: expected roi of shape (T, {n_rois}), got {roi.shape}")
    t = roi.shape[0]
    hr = np.ascontiguousarray(heart_rate, dtype=np.float32)
    rr = np.ascontiguousarray(respiration_rate, dtype=np.float32)
    if hr.shape != (t,) or rr.shape != (t,):
        raise ValueError(
            f"predict_sequence: expected heart_rate and respiration_rate of shape ({t},)"
            f" to match roi, got {hr.shape} and {rr.shape}"
        )
    return roi, hr, rr
