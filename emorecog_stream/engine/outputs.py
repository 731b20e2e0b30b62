"""Adapters from the engine's :class:`~emorecog_stream.engine.session.Output` protocol to the sinks.

Each keeps the engine's hot path short: the MQTT publisher queues (its own task owns the
network) and the dashboard only swaps an immutable snapshot (rich's own thread renders it).
The JSONL log (``sinks.jsonl.JsonlLog``) and the headless log line
(``sinks.dashboard.LogLinePrinter``) have the engine's hooks themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from emorecog_stream.core.messages import AlignedStep, Prediction
from emorecog_stream.engine.state import EngineStatus
from emorecog_stream.engine.telemetry import EngineSnapshot


class MqttOutput:
    """Predictions, physio and status to an :class:`~emorecog_stream.sinks.mqtt.MqttPublisher`.

    ``aclose`` publishes ``offline`` and waits up to ``flush_timeout`` seconds for the queue to
    drain (the publisher's own ``close``), so a clean stop loses nothing the broker can take.
    """

    def __init__(self, publisher: Any, *, flush_timeout: float = 10.0) -> None:
        self.publisher = publisher
        self.flush_timeout = float(flush_timeout)
        self._reason = "engine stopped"

    def on_prediction(self, prediction: Prediction, step: AlignedStep) -> None:
        self.publisher.publish_prediction(prediction)
        self.publisher.publish_physio(
            prediction,
            heart_rate_quality=_quality(step.heart_rate_quality, step.heart_rate_valid),
            respiration_rate_quality=_quality(
                step.respiration_rate_quality, step.respiration_rate_valid
            ),
        )

    def on_marker(self, timestamp: float, text: str) -> None:
        """Trial markers on ``<prefix>/<session>/marker``, so live views can show the trials."""
        self.publisher.publish_marker(timestamp, text)

    def on_status(self, status: EngineStatus) -> None:
        if status.state == "offline":  # close() publishes offline after the queue
            self._reason = status.reason or self._reason
            return
        details = {"missing": list(status.missing)} if status.missing else None
        self.publisher.set_status(status.state, status.reason, details=details)

    async def aclose(self) -> None:
        await self.publisher.close(timeout=self.flush_timeout, reason=self._reason)


def _quality(value: float, valid: bool) -> float | None:
    if not valid:
        return None
    return min(1.0, max(0.0, float(value)))


class DashboardOutput:
    """Feeds the rich dashboard a fresh snapshot on every prediction and status change, and at
    its refresh rate in between (``Dashboard.follow``) so stream rates and lags stay current
    while nothing arrives. This is a display refresh, not a processing tick.
    """

    def __init__(self, dashboard: Any, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.dashboard = dashboard
        self.snapshot = snapshot
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.dashboard.start()
        self._task = asyncio.get_running_loop().create_task(self.dashboard.follow(self.snapshot))

    def on_prediction(self, prediction: Prediction, step: AlignedStep) -> None:
        self.dashboard.update(self.snapshot())

    def on_status(self, status: EngineStatus) -> None:
        self.dashboard.update(self.snapshot())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.dashboard.update(self.snapshot())
        self.dashboard.stop()


class MarkerLog:
    """Trial markers into the JSONL audit log (``{"kind": "marker", ...}`` lines), beside the
    predictions, so the record shows which stimulus each prediction belongs to."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def on_marker(self, timestamp: float, text: str) -> None:
        from emorecog_stream.recordings.session import parse_marker

        fields: dict[str, Any] = {"timestamp": timestamp, "text": text}
        parsed = parse_marker(text)
        if parsed is not None:
            fields["marker"] = parsed
        self.log.record("marker", fields)  # counted, not raised, when it cannot be written

    def on_prediction(self, prediction: Prediction, step: AlignedStep) -> None:
        pass

    def on_status(self, status: EngineStatus) -> None:
        pass

    async def aclose(self) -> None:
        pass


class RunSummaryLog:
    """At the end of a run, one ``{"kind": "summary", ...}`` line in the JSONL audit log with
    the MQTT counters (sent, queued, dropped, unsent at close) and the engine's counters.

    Why an output of its own: the counters are final only once the MQTT output has flushed its
    queue and before the log writes ``session_end``; the engine closes its outputs in list
    order, so this one sits between the two. ``report`` shows the record.
    """

    def __init__(self, log: Any, mqtt_stats: Callable[[], Any], counters: Callable[[], Any]):
        self.log = log
        self.mqtt_stats = mqtt_stats
        self.counters = counters

    def on_prediction(self, prediction: Prediction, step: AlignedStep) -> None:
        pass

    def on_status(self, status: EngineStatus) -> None:
        pass

    async def aclose(self) -> None:
        from dataclasses import asdict, is_dataclass

        from emorecog_stream.sinks.payload import utc_now

        fields: dict[str, Any] = {"utc": utc_now(), "session": self.log.session}
        for key, get in (("mqtt", self.mqtt_stats), ("engine", self.counters)):
            value = get()
            if is_dataclass(value) and not isinstance(value, type):
                fields[key] = asdict(value)
        self.log.record("summary", fields)  # counted, not raised, when it cannot be written
