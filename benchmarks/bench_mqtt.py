"""MQTT output cost: hand-off time, publish-to-receipt latency, backlog flush rate.

Why: the publisher sits on the engine's event loop inside the 20 ms step budget, and after an
outage it must drain its backlog quickly. Measures, for a real Mosquitto (started here on a
free port, if installed) and the embedded amqtt broker:

* ``handoff_us``: the engine-side cost of ``publish_prediction`` (payload + enqueue);
* ``latency_ms``: from ``publish_prediction`` to receipt by a subscriber in a *separate
  process* (paho-mqtt, QoS 1), predictions sent every ``--interval`` seconds;
* ``flush_msgs_per_s``: how fast a backlog of ``--backlog`` queued predictions is delivered
  (acknowledged) once the broker is reachable.

Prints one JSON object on its last line. ``python benchmarks/bench_mqtt.py [--n N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emorecog_stream.core.messages import Prediction  # noqa: E402
from emorecog_stream.sinks.broker import EmbeddedBroker, free_port  # noqa: E402
from emorecog_stream.sinks.mqtt import MqttPublisher, MqttSettings  # noqa: E402

SUBSCRIBER = r"""
import sys, time, json
import paho.mqtt.client as mqtt
host, port, topic, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
got = {}
def on_connect(c, u, f, rc, p=None):
    c.subscribe(topic, qos=1)
def on_subscribe(c, u, mid, codes, p=None):
    print("ready", flush=True)
def on_message(c, u, msg):
    t = time.monotonic()
    seq = json.loads(msg.payload)["sequence"]
    got.setdefault(seq, t)
    if len(got) >= n:
        c.disconnect()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, port)
c.loop_forever()
print(json.dumps(got), flush=True)
"""


def prediction(i: int) -> Prediction:
    return Prediction(
        session="bench",
        sequence=i,
        tr_index=i,
        volume_timestamp=1000.0 + i,
        utc="2026-11-25T10:00:00.000Z",
        probabilities=(0.2, 0.3, 0.5),
        category="positive",
        intensity=1.25,
        heart_rate=70.0,
        heart_rate_valid=True,
        respiration_rate=15.0,
        respiration_rate_valid=True,
        model_id="bench",
        latency_ms=2.0,
        level=1,
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(url: str, host: str, port: int, n: int, interval: float, backlog: int) -> dict:
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, host, str(port), "emorecog/bench/prediction", str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    line = await asyncio.to_thread(sub.stdout.readline)
    assert line.strip() == "ready", line
    settings = MqttSettings.from_url(url)
    sent_at: dict[int, float] = {}
    handoff: list[float] = []
    async with MqttPublisher(settings, "bench") as pub:
        assert await pub.wait_connected(10), pub.stats
        for i in range(n):
            p = prediction(i)
            t0 = time.monotonic()
            pub.publish_prediction(p)
            handoff.append(time.monotonic() - t0)
            sent_at[i] = t0
            await asyncio.sleep(interval)
        assert await pub.flush(30)
        out = await asyncio.to_thread(sub.communicate, timeout=60)
        received = {int(k): v for k, v in json.loads(out[0].strip().splitlines()[-1]).items()}
        latency = [(received[i] - sent_at[i]) * 1000 for i in range(n)]
        # Backlog: enqueue everything at once (as after an outage), time until all acknowledged.
        t0 = time.monotonic()
        for i in range(n, n + backlog):
            pub.publish_prediction(prediction(i))
        assert await pub.flush(120)
        flush_s = time.monotonic() - t0
        protocol = pub.stats.protocol
    return {
        "protocol": protocol,
        "handoff_us": {
            "p50": round(statistics.median(handoff) * 1e6, 1),
            "p99": round(pct(handoff, 99) * 1e6, 1),
        },
        "latency_ms": {
            "p50": round(statistics.median(latency), 3),
            "p99": round(pct(latency, 99), 3),
            "max": round(max(latency), 3),
        },
        "flush_msgs_per_s": round(backlog / flush_s),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="predictions for the latency run")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between them")
    parser.add_argument("--backlog", type=int, default=2000, help="messages in the flush run")
    args = parser.parse_args()
    result: dict[str, Any] = {"n": args.n, "interval_s": args.interval, "backlog": args.backlog}

    from tests.plugins.mqtt_broker import MosquittoBroker, find_mosquitto

    if find_mosquitto() is not None:
        with tempfile.TemporaryDirectory() as tmp:
            broker = MosquittoBroker(Path(tmp))
            broker.start()
            try:
                result["mosquitto"] = await measure(
                    broker.url, broker.host, broker.port, args.n, args.interval, args.backlog
                )
            finally:
                broker.stop()
    else:
        result["mosquitto"] = None
    async with EmbeddedBroker(port=free_port()) as embedded:
        assert embedded.port is not None
        result["amqtt"] = await measure(
            embedded.url, embedded.host, embedded.port, args.n, args.interval, args.backlog
        )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
