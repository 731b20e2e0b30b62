"""Trial markers on MQTT (``<prefix>/<session>/marker``): what the live pages draw trials from.

A real Mosquitto and an independent paho subscriber; the engine's own publisher and output
adapter (``MqttOutput.on_marker``) send them.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from emorecog_stream.engine.outputs import MqttOutput
from emorecog_stream.recordings.session import make_marker
from emorecog_stream.sinks.mqtt import MqttPublisher, MqttSettings
from emorecog_stream.sinks.payload import PayloadError, load_schema, marker_payload
from tests.plugins.mqtt_broker import unique_session

pytestmark = pytest.mark.timeout(60)


def test_marker_payload_keeps_the_text_verbatim_and_parses_ours() -> None:
    ours = marker_payload("S01", 12.5, make_marker("trial_start", 3, 2, 3))
    assert ours["marker"] == {"event": "trial_start", "trial": 3, "category": 2, "intensity": 3}
    hostile = marker_payload("S01", 13.0, "<script>alert(1)</script>")
    assert hostile["text"] == "<script>alert(1)</script>" and "marker" not in hostile
    schema = load_schema("marker")
    jsonschema.validate(ours, schema)
    jsonschema.validate(hostile, schema)
    with pytest.raises(PayloadError, match="timestamp must be finite"):
        marker_payload("S01", float("nan"), "x")
    with pytest.raises(PayloadError, match="session id"):
        marker_payload("a/b", 1.0, "x")


async def test_engine_output_publishes_markers_in_order(mqtt_broker: Any, mqtt_collector) -> None:
    session = unique_session()
    sub = mqtt_collector(mqtt_broker, [f"emorecog/{session}/marker"])
    publisher = MqttPublisher(MqttSettings.from_url(mqtt_broker.url), session)
    await publisher.start()
    output = MqttOutput(publisher)
    start, end = make_marker("trial_start", 0, 0, -2), make_marker("trial_end", 0, 0, -2)
    texts = [start, "<b>bold</b>", end]
    for i, text in enumerate(texts):
        output.on_marker(100.0 + i, text)
    assert await publisher.flush(10)
    await output.aclose()
    assert sub.wait_for(lambda m: len(m) >= 3, 10)
    got = sub.json("marker")
    assert [m["text"] for m in got] == texts
    assert [m["timestamp"] for m in got] == [100.0, 101.0, 102.0]
    assert json.loads(got[0]["text"]) == got[0]["marker"]
    for m in got:
        jsonschema.validate(m, load_schema("marker"))
