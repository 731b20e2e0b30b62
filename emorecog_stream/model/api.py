"""What the engine needs from any model: a stepper that takes one volume per call.

Both the streaming EmoRecog-Net (``emorecog_stream.model.net``) and the rolling-window port of
the published Keras v1.0 model (``emorecog_stream.model.keras_v1``) satisfy these protocols, so
the engine does not care which one speaks; ``model_id`` says which did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class StepOutput:
    """The model's answer for one TR.

    ``probabilities`` are (negative, neutral, positive); ``intensity`` is on -4..+4.
    ``ready`` is False while a windowed model is still filling its window (then the
    probabilities and intensity are NaN and must not be published as a prediction).
    ``level`` is the arg-max level (-4..4) for models with a 9-way level head, else None.
    """

    probabilities: np.ndarray  # (3,) float
    intensity: float
    ready: bool = True
    level: int | None = None


@dataclass(frozen=True)
class SequenceOutput:
    """Outputs for a whole sequence: probabilities (T, 3), intensity (T,)."""

    probabilities: np.ndarray
    intensity: np.ndarray


class Stepper(Protocol):
    """Holds the recurrent state of one session; ``reset`` starts a new session."""

    def step(self, roi: np.ndarray, heart_rate: float, respiration_rate: float) -> StepOutput: ...

    def reset(self) -> None: ...


class BatchStepper(Protocol):
    """Advances ``batch_size`` independent sessions by one volume each per call.

    ``step_batch`` takes roi (B, 246), heart_rate (B,), respiration_rate (B,) (NaN = missing) and
    returns probabilities (B, 3) and intensity (B,); ``reset(i)`` starts session ``i`` afresh,
    ``reset()`` all of them. Row ``i`` equals what a single stepper fed row ``i`` would give.
    Offered by models that can batch (the streaming EmoRecog-Net's ``batch_stepper(B)``).
    """

    batch_size: int

    def step_batch(
        self, roi: np.ndarray, heart_rate: np.ndarray, respiration_rate: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def reset(self, index: int | None = None) -> None: ...


class StreamingModel(Protocol):
    """A loaded model: ``model_id`` names it in every published prediction."""

    model_id: str

    def stepper(self) -> Stepper: ...

    def predict_sequence(
        self, roi: np.ndarray, heart_rate: np.ndarray, respiration_rate: np.ndarray
    ) -> SequenceOutput: ...
