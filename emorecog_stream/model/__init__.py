"""Models: the streaming EmoRecog-Net (default) and the published Keras v1.0 port.

``load_model()`` gives the shipped default checkpoint; ``load_model(path)`` a trained or converted
one; ``load_model("keras-v1:PATH")`` the published Keras weights. Heavy imports happen on call.
"""

from __future__ import annotations

from pathlib import Path

from emorecog_stream.model.api import (
    BatchStepper,
    SequenceOutput,
    StepOutput,
    Stepper,
    StreamingModel,
)


def load_model(path: str | Path | None = None) -> StreamingModel:
    """See :func:`emorecog_stream.model.checkpoint.load_model`."""
    from emorecog_stream.model.checkpoint import load_model as _load

    return _load(path)


__all__ = [
    "BatchStepper",
    "SequenceOutput",
    "StepOutput",
    "Stepper",
    "StreamingModel",
    "load_model",
]
