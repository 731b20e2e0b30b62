"""Running sessions: one session's engine, its status and telemetry, the runner that wires it
to inlets and sinks, the hub that serves many sessions, and the full-speed re-run.

``from emorecog_stream.engine import Engine`` keeps working: the single-session engine lives in
:mod:`emorecog_stream.engine.session`.
"""

from emorecog_stream.engine.session import Chunk, Engine, EngineCounters, InputError, Output

__all__ = ["Chunk", "Engine", "EngineCounters", "InputError", "Output"]
