"""Figures for a model's predictions: category accuracy, macro-F1, intensity MAE, Pearson r.

Two views, as the issue asks: per TR (every labelled volume, what a live display shows) and per
trial (the prediction at each trial's last labelled volume, comparable with trial-level
benchmarks). The ICBHI 2024 challenge's Finalscore is not computed: its formula is not published
(shared/domain.md), and inventing one would give a number nobody can compare with.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from emorecog_stream.core.streams import CATEGORY_LABELS

FINALSCORE_NOTE = (
    "ICBHI 2024 Finalscore not computed: its formula is not published (the seed model's"
    " official Finalscore was 0.2815, lower is better)."
)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 3) -> float:
    """Mean over classes of F1; a class absent from both truth and prediction is skipped."""
    scores = []
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else math.nan


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or fewer than 2 values."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def scores(
    probabilities: np.ndarray, intensity: np.ndarray, category: np.ndarray, target: np.ndarray
) -> dict[str, Any]:
    """Figures for N predictions: ``category`` 0..2, ``target`` intensity (NaN = unknown)."""
    n = int(category.shape[0])
    if n == 0:
        return {"n": 0}
    pred = probabilities.argmax(axis=1)
    confusion = np.zeros((3, 3), np.int64)
    np.add.at(confusion, (category, pred), 1)
    known = np.isfinite(target)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float(np.mean(pred == category)),
        "macro_f1": macro_f1(category, pred),
        "chance_accuracy": float(np.max(np.bincount(category, minlength=3)) / n),
        "confusion": {
            "rows_true_cols_pred": list(CATEGORY_LABELS),
            "counts": confusion.tolist(),
        },
    }
    if known.any():
        out["intensity_mae"] = float(np.mean(np.abs(intensity[known] - target[known])))
        out["intensity_mae_predicting_0"] = float(np.mean(np.abs(target[known])))
        out["intensity_pearson_r"] = pearson_r(intensity[known], target[known])
    return out


def evaluate_arrays(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """``items``: per session (probabilities (T,3), intensity (T,), category (T,), target (T,),
    trial (T,), mask (T,) of the volumes to score). Returns ``{"per_tr": ..., "per_trial": ...}``.
    """
    tr_p, tr_i, tr_c, tr_t = [], [], [], []
    tl_p, tl_i, tl_c, tl_t = [], [], [], []
    for probs, inten, cat, target, trial, mask in items:
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        tr_p.append(probs[idx])
        tr_i.append(inten[idx])
        tr_c.append(cat[idx])
        tr_t.append(target[idx])
        # last labelled volume of each trial (trial ids are contiguous runs in time)
        trials = trial[idx]
        last = idx[np.r_[trials[1:] != trials[:-1], True]]
        tl_p.append(probs[last])
        tl_i.append(inten[last])
        tl_c.append(cat[last])
        tl_t.append(target[last])

    def cat_or_empty(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape)

    return {
        "per_tr": scores(
            cat_or_empty(tr_p, (0, 3)),
            cat_or_empty(tr_i, (0,)),
            cat_or_empty(tr_c, (0,)).astype(np.int64),
            cat_or_empty(tr_t, (0,)),
        ),
        "per_trial": scores(
            cat_or_empty(tl_p, (0, 3)),
            cat_or_empty(tl_i, (0,)),
            cat_or_empty(tl_c, (0,)).astype(np.int64),
            cat_or_empty(tl_t, (0,)),
        ),
        "finalscore": FINALSCORE_NOTE,
    }
