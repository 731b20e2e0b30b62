"""Recorded sessions and the files they live in (XDF, ICBHI challenge files, synthetic corpus)."""

from emorecog_stream.recordings.session import Marker, Session, SignalStream, Trial

__all__ = ["Marker", "Session", "SignalStream", "Trial"]
