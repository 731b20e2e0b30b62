"""EmoRecog-Stream: real-time emotion recognition from fMRI ROI series and physiology.

Data flows adapters (LSL in) -> buffers/aligner -> model -> sinks (MQTT, log, dashboard).
Research software, not a medical device.
"""

__version__ = "0.1.0"
