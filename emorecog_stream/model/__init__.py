"""Models: the streaming EmoRecog-Net (default) and the published Keras v1.0 port."""

from emorecog_stream.model.api import SequenceOutput, StepOutput, Stepper, StreamingModel

__all__ = ["SequenceOutput", "StepOutput", "Stepper", "StreamingModel"]
