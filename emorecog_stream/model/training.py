"""Training the streaming EmoRecog-Net: augmentation, crops, loss, early stopping.

One epoch: every training session is augmented afresh (:mod:`emorecog_stream.model.augment`),
its causal inputs are computed over the *whole* session (so each volume's baseline is what the
live stepper would have at that point), then random crops of ``crop_volumes`` volumes are drawn
to cover the data about once. The GRU starts from zeros at each crop, so the first ``burn_in``
volumes of a crop that does not start the session are left out of the loss. Loss, per labelled
volume of the training split: ``category_weight * cross-entropy + intensity_weight *
MSE(intensity / 4)`` (the seed's 0.3 / 0.7 weighting; the seed's second term was an MSE on a
9-way level softmax, ours is a regression scaled to -1..1 so both terms are of similar size).
After each epoch the validation split is scored with the whole-session forward pass (exactly
what ``predict_sequence`` computes); training stops after ``patience`` epochs without a lower
validation loss and the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emorecog_stream.model.augment import AugmentConfig, augment
from emorecog_stream.model.data import SessionData, Split
from emorecog_stream.model.features import rate_deviation_sequence, roi_deviation_batch
from emorecog_stream.model.metrics import evaluate_arrays
from emorecog_stream.model.net import EmoRecogNet, NetConfig


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 2024
    epochs: int = 80
    patience: int = 15
    batch_size: int = 16
    crop_volumes: int = 256
    burn_in: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    category_weight: float = 0.3
    intensity_weight: float = 0.7
    grad_clip: float = 1.0
    device: str = "cpu"
    threads: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    net: NetConfig = field(default_factory=NetConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Inputs:
    """The network's inputs and targets for one session, as arrays of one row per volume."""

    roi_dev: np.ndarray  # (T, R) float32
    rates: np.ndarray  # (T, 2) float32, NaN = missing
    rate_dev: np.ndarray  # (T, 2) float32
    category: np.ndarray  # (T,) int64, -1 = unlabelled
    intensity: np.ndarray  # (T,) float32
    mask: np.ndarray  # (T,) bool: counts in the loss / figures
    trial: np.ndarray  # (T,) int64 trial index, -1 for rest


def make_inputs(
    datas: list[SessionData], masks: list[np.ndarray], net_config: NetConfig
) -> list[Inputs]:
    """Causal inputs of whole sessions (sessions of equal length share one vectorised pass)."""
    out: list[Inputs | None] = [None] * len(datas)
    by_length: dict[int, list[int]] = {}
    for i, d in enumerate(datas):
        by_length.setdefault(d.n_volumes, []).append(i)
    for indices in by_length.values():
        roi_dev = roi_deviation_batch(
            np.stack([datas[i].roi for i in indices]), net_config.roi_window, np.float32
        )
        for j, i in enumerate(indices):
            d = datas[i]
            rates = np.stack([d.heart_rate, d.respiration_rate], axis=1).astype(np.float32)
            rate_dev = np.stack(
                [
                    rate_deviation_sequence(rates[:, 0], net_config.rate_window),
                    rate_deviation_sequence(rates[:, 1], net_config.rate_window),
                ],
                axis=1,
            ).astype(np.float32)
            out[i] = Inputs(
                roi_dev[j],
                rates,
                rate_dev,
                d.category,
                d.intensity.astype(np.float32),
                masks[i],
                d.trial,
            )
    return [x for x in out if x is not None]


def normalisation_from(inputs: list[Inputs]) -> dict[str, torch.Tensor]:
    """Per-ROI mean/std of the baseline deviations, HR/RR mean/std, and deviation spreads."""
    roi = np.concatenate([x.roi_dev for x in inputs]).astype(np.float64)
    rates = np.concatenate([x.rates for x in inputs]).astype(np.float64)
    dev = np.concatenate([x.rate_dev for x in inputs]).astype(np.float64)

    def nan_stats(a: np.ndarray, default_mean: float, default_sd: float) -> tuple[float, float]:
        a = a[np.isfinite(a)]
        if a.size < 2:
            return default_mean, default_sd
        return float(a.mean()), float(a.std())

    hr = nan_stats(rates[:, 0], 70.0, 10.0)
    rr = nan_stats(rates[:, 1], 15.0, 4.0)
    dhr = nan_stats(dev[:, 0], 0.0, 3.0)
    drr = nan_stats(dev[:, 1], 0.0, 1.0)
    return {
        "roi_mean": torch.tensor(roi.mean(axis=0), dtype=torch.float32),
        "roi_std": torch.tensor(roi.std(axis=0), dtype=torch.float32),
        "physio_mean": torch.tensor([hr[0], rr[0]], dtype=torch.float32),
        "physio_std": torch.tensor([hr[1], rr[1]], dtype=torch.float32),
        "physio_dev_std": torch.tensor([dhr[1], drr[1]], dtype=torch.float32),
    }


def loss_terms(
    logits: torch.Tensor,
    intensity: torch.Tensor,
    category: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    config: TrainConfig,
) -> tuple[torch.Tensor, float, float]:
    """Weighted loss over the masked volumes, and its two parts (for the log)."""
    m = mask & (category >= 0)
    if not bool(m.any()):
        zero = logits.sum() * 0.0
        return zero, 0.0, 0.0
    ce = F.cross_entropy(logits[m], category[m])
    known = m & torch.isfinite(target)
    if bool(known.any()):
        mse = torch.mean(((intensity[known] - target[known]) / 4.0) ** 2)
    else:
        mse = logits.sum() * 0.0
    loss = config.category_weight * ce + config.intensity_weight * mse
    return loss, float(ce.detach()), float(mse.detach())


def _tensors(items: list[Inputs], device: torch.device) -> tuple[torch.Tensor, ...]:
    def t(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).to(device)

    return (
        t([x.roi_dev for x in items]),
        t([x.rates for x in items]),
        t([x.rate_dev for x in items]),
        t([x.category for x in items]),
        t([x.intensity for x in items]),
        t([x.mask for x in items]),
    )


def predict_inputs(
    net: EmoRecogNet, items: list[Inputs], device: torch.device
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probabilities (T, 3), intensity (T,)) per session, whole-session forward in eval mode."""
    net.eval()
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(items)
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(items):
        by_length.setdefault(x.roi_dev.shape[0], []).append(i)
    with torch.inference_mode():
        for indices in by_length.values():
            group = [items[i] for i in indices]
            roi, rates, dev, *_ = _tensors(group, device)
            logits, intensity = net(roi, rates, dev)
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            inten = intensity.cpu().numpy()
            for j, i in enumerate(indices):
                out[i] = (probs[j], inten[j])
    return [x for x in out if x is not None]


def score_inputs(
    net: EmoRecogNet, items: list[Inputs], config: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Validation loss and figures (per TR and per trial) of whole sessions."""
    preds = predict_inputs(net, items, device)
    total, weight = 0.0, 0
    arrays = []
    for (probs, inten), x in zip(preds, items, strict=True):
        m = x.mask & (x.category >= 0)
        n = int(m.sum())
        if n:
            logits = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
            loss, _, _ = loss_terms(
                logits,
                torch.from_numpy(inten),
                torch.from_numpy(x.category),
                torch.from_numpy(x.intensity),
                torch.from_numpy(m),
                config,
            )
            total += float(loss) * n
            weight += n
        arrays.append((probs, inten, x.category, x.intensity, x.trial, m))
    figures = evaluate_arrays(arrays)
    figures["loss"] = total / weight if weight else math.nan
    return figures


@dataclass
class TrainResult:
    net: EmoRecogNet
    history: list[dict[str, Any]]
    best_epoch: int
    seconds: float
    stopped_early: bool


EpochCallback = Callable[[int, dict[str, Any]], None]


def train(
    datas: list[SessionData],
    split: Split,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train on ``split``'s train volumes, early-stop on its validation volumes."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    if config.device == "cpu":
        torch.set_num_threads(config.threads)
    train_masks = [split.mask(d, "train") for d in datas]
    val_masks = [split.mask(d, "val") for d in datas]
    train_idx = [i for i, m in enumerate(train_masks) if m.any()]
    val_idx = [i for i, m in enumerate(val_masks) if m.any()]
    if not train_idx:
        raise ValueError(
            "no labelled training volumes: check the split (participants "
            f"{sorted({d.participant for d in datas})} found)"
        )
    train_data = [datas[i] for i in train_idx]
    clean_train = make_inputs(train_data, [train_masks[i] for i in train_idx], config.net)
    val_inputs = make_inputs(
        [datas[i] for i in val_idx], [val_masks[i] for i in val_idx], config.net
    )
    net = EmoRecogNet(config.net)
    net.set_normalisation(**normalisation_from(clean_train))
    net.to(device)
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    best_loss, best_state, best_epoch, bad_epochs = math.inf, None, 0, 0
    history: list[dict[str, Any]] = []
    stopped_early = False
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        augmented = [augment(d, rng, config.augment) for d in train_data]
        masks = [split.mask(a, "train") for a in augmented]
        inputs = make_inputs(augmented, masks, config.net)
        net.train()
        crops = _draw_crops(inputs, config, rng)
        batch_losses = []
        for start in range(0, len(crops), config.batch_size):
            batch = crops[start : start + config.batch_size]
            roi, rates, dev, cat, inten, mask = _tensors(batch, device)
            logits, pred = net(roi, rates, dev)
            loss, _, _ = loss_terms(logits, pred, cat, inten, mask, config)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            optimiser.step()
            batch_losses.append(float(loss.detach()))
        info: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.mean(batch_losses)) if batch_losses else math.nan,
            "seconds": time.perf_counter() - t0,
        }
        if val_inputs:
            val = score_inputs(net, val_inputs, config, device)
            info["val_loss"] = val["loss"]
            info["val_trial_accuracy"] = val["per_trial"].get("accuracy")
            info["val_tr_accuracy"] = val["per_tr"].get("accuracy")
            info["val_trial_mae"] = val["per_trial"].get("intensity_mae")
            monitored = val["loss"]
        else:
            monitored = info["train_loss"]
        history.append(info)
        if monitored < best_loss - 1e-6:
            best_loss, best_epoch, bad_epochs = monitored, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            bad_epochs += 1
        info["best_epoch"] = best_epoch
        if on_epoch is not None:
            on_epoch(epoch, info)
        if bad_epochs >= config.patience:
            stopped_early = True
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.to("cpu").eval()
    return TrainResult(net, history, best_epoch, time.perf_counter() - started, stopped_early)


def _draw_crops(
    inputs: list[Inputs], config: TrainConfig, rng: np.random.Generator
) -> list[Inputs]:
    """Random crops covering the data about once; shorter sessions are used whole (padded)."""
    length = config.crop_volumes
    total = sum(x.roi_dev.shape[0] for x in inputs)
    n_crops = max(1, math.ceil(total / length))
    crops = []
    for _ in range(n_crops):
        x = inputs[int(rng.integers(len(inputs)))]
        n = x.roi_dev.shape[0]
        if n <= length:
            crops.append(_pad(x, length))
            continue
        start = 0 if rng.random() < 0.2 else int(rng.integers(0, n - length + 1))
        mask = x.mask[start : start + length].copy()
        if start > 0:
            mask[: config.burn_in] = False
        crops.append(
            Inputs(
                x.roi_dev[start : start + length],
                x.rates[start : start + length],
                x.rate_dev[start : start + length],
                x.category[start : start + length],
                x.intensity[start : start + length],
                mask,
                x.trial[start : start + length],
            )
        )
    return crops


def _pad(x: Inputs, length: int) -> Inputs:
    """A session shorter than a crop, padded at the end with unlabelled, masked-out volumes."""
    n = x.roi_dev.shape[0]
    extra = length - n

    def pad(a: np.ndarray, value: float | int | bool) -> np.ndarray:
        widths = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
        return np.pad(a, widths, constant_values=value)

    return Inputs(
        pad(x.roi_dev, 0.0),
        pad(x.rates, np.nan),
        pad(x.rate_dev, np.nan),
        pad(x.category, -1),
        pad(x.intensity, np.nan),
        pad(x.mask, False),
        pad(x.trial, -1),
    )
