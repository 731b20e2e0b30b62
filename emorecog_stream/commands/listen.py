"""`emorecog-stream listen`: subscribe to a broker and print predictions and status changes.

Why: the quickest way to see that the engine publishes, and the reference for how a subscriber
reads the payloads (schema in ``emorecog_stream/sinks/prediction.schema.json``). QoS 1 means a
prediction can arrive twice after a reconnect; this command shows each ``sequence`` once per
engine run (the memory of seen sequences is cleared when the session goes ``offline``).
Human-readable lines go to stdout; ``--json`` prints each payload as one JSON line instead.
Progress and errors go to stderr.

Sessions served by a hub (``run --sessions``) share its one connection and its Last Will, on
``<prefix>/_hubs/<hub id>/status``; this command subscribes to it too. When a hub's
``offline`` arrives, a status line is printed for each session whose last status named that hub
(``details.hub``): ``OFFLINE (hub <id> offline: <reason>)`` (in ``--json``: the session's
status with that state and reason and ``"derived_from_hub": true``). A session's own status
naming a hub that is offline is shown the same way; once the hub is back and the session
publishes again, its own status is shown again. The rule is
:class:`~emorecog_stream.web.state.HubWatch`, shared with the web pages.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from typing import Any

DEFAULT_URL = "mqtt://127.0.0.1:1883"
_SEEN_WINDOW = 4096


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mqtt",
        default=DEFAULT_URL,
        metavar="URL",
        help=f"broker, mqtt://[user@]host:port or mqtts://... (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--session", default=None, metavar="ID", help="only this session (default: every session)"
    )
    parser.add_argument("--prefix", default="emorecog", help="topic prefix (default emorecog)")
    parser.add_argument("--json", action="store_true", help="print raw JSON payloads, one per line")
    parser.add_argument("--physio", action="store_true", help="also print the per-TR physio topic")
    parser.add_argument(
        "--count", type=int, default=None, metavar="N", help="exit after N predictions"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="exit after S seconds (status 1 if --count was not reached)",
    )
    parser.add_argument(
        "--password-env", metavar="VAR", help="read the password from this variable"
    )
    parser.add_argument("--password-file", metavar="FILE", help="read the password from this file")
    parser.add_argument("--ca-file", metavar="FILE", help="CA certificate for mqtts://")
    parser.add_argument("--cert-file", metavar="FILE", help="client certificate for mqtts://")
    parser.add_argument("--key-file", metavar="FILE", help="client key for mqtts://")
    parser.add_argument("--insecure", action="store_true",
                        help="mqtts:// without certificate checks (testing only)")  # fmt: skip
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow sending the password in clear (mqtt://) to a broker off this machine",
    )


def _fmt_rate(value: Any, valid: Any, unit: str) -> str:
    if valid and isinstance(value, (int, float)):
        return f"{value:5.1f} {unit}"
    return f"  -- {unit}"


def format_prediction(p: dict[str, Any]) -> str:
    """One readable line per prediction (raises KeyError/TypeError on a malformed payload)."""
    probs = p["probabilities"]
    level = p.get("level")
    parts = [
        f"[{p['session']}] #{p['sequence']:<5d} TR {p['tr_index']:<4d}"
        f" t={p['volume_timestamp']:.3f}",
        f"{p['category']:<8}",
        f"neg {probs['negative']:.2f} neu {probs['neutral']:.2f} pos {probs['positive']:.2f}",
        f"intensity {p['intensity']:+.2f}" + (f" (level {level:+d})" if level is not None else ""),
        f"HR {_fmt_rate(p['heart_rate'], p['heart_rate_valid'], 'bpm')}",
        f"RR {_fmt_rate(p['respiration_rate'], p['respiration_rate_valid'], '/min')}",
        *_fd(p),
        f"latency {p['latency_ms']:.1f} ms",
    ]
    if p.get("flags"):
        parts.append("flags " + ",".join(p["flags"]))
    return "  ".join(parts)


def _fd(p: dict[str, Any]) -> list[str]:
    """``FD 0.12 mm`` when the payload carries the volume's head motion (a Motion stream)."""
    fd = p.get("framewise_displacement")
    return [f"FD {fd:.2f} mm"] if isinstance(fd, (int, float)) else []


def format_physio(p: dict[str, Any]) -> str:
    return (
        f"[{p['session']}] #{p['sequence']:<5d} TR {p['tr_index']:<4d} physio"
        f"  HR {_fmt_rate(p['heart_rate'], p['heart_rate_valid'], 'bpm')}"
        f"  RR {_fmt_rate(p['respiration_rate'], p['respiration_rate_valid'], '/min')}"
        + "".join(f"  {part}" for part in _fd(p))
    )


def format_status(p: dict[str, Any]) -> str:
    reason = f" ({p['reason']})" if p.get("reason") else ""
    return f"[{p['session']}] status {p['state'].upper()}{reason}  at {p['utc']}"


class _Printer:
    """Turns messages into output lines; de-duplicates predictions by (session, sequence);
    combines a hub's status with its sessions' (:class:`~emorecog_stream.web.state.HubWatch`).
    """

    def __init__(self, as_json: bool, prefix: str | None = None) -> None:
        from emorecog_stream.web.state import HubWatch

        self.as_json = as_json
        self.prefix = prefix
        self.predictions = 0
        self.hubs = HubWatch()
        self._seen: dict[str, tuple[set[int], deque[int]]] = {}

    def _show(self, payload: dict[str, Any]) -> str:
        if self.as_json:
            return json.dumps(payload, separators=(",", ":"))
        return format_status(payload)

    def _hub(self, topic: str, hub: str, raw: bytes) -> str | None:
        """A hub's status: a line for each session it takes offline with it (or None)."""
        from emorecog_stream.web.state import check_hub_status

        payload = check_hub_status(topic, json.loads(raw), hub)
        lines = []
        for derived in self.hubs.hub_status(payload):
            self._seen.pop(str(derived["session"]), None)  # its next run counts from 0 again
            lines.append(self._show(derived))
        return "\n".join(lines) or None

    def handle(self, topic: str, raw: bytes) -> str | None:
        from emorecog_stream.web.state import HUBS_LEVEL, split_topic

        kind = topic.rsplit("/", 1)[-1]
        try:
            levels = topic.split("/")
            if len(levels) >= 3 and levels[-3] == HUBS_LEVEL:
                what, hub, _ = split_topic(topic, self.prefix)
                if what == "hub":
                    return self._hub(topic, hub, raw)
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise TypeError(f"expected a JSON object, got {type(payload).__name__}")
            session = str(payload["session"])
            if kind == "prediction":
                seen, order = self._seen.setdefault(session, (set(), deque()))
                seq = int(payload["sequence"])
                if seq in seen:
                    return None
                seen.add(seq)
                order.append(seq)
                if len(order) > _SEEN_WINDOW:
                    seen.discard(order.popleft())
                line = format_prediction(payload)
                self.predictions += 1
            elif kind == "status":
                if not isinstance(payload.get("state"), str):
                    raise TypeError("status without a state")
                shown = self.hubs.session_status(payload)  # offline when its hub is
                if shown["state"] == "offline":
                    self._seen.pop(session, None)  # a restarted engine counts from 0 again
                return self._show(shown)
            elif kind == "physio":
                line = format_physio(payload)
            else:
                return None
        except (ValueError, KeyError, TypeError) as exc:  # MessageError is a ValueError
            print(f"listen: ignoring malformed message on {topic}: {exc!r}", file=sys.stderr)
            return None
        return json.dumps(payload, separators=(",", ":")) if self.as_json else line


def main(args: argparse.Namespace) -> int:
    import threading

    import paho.mqtt.client as mqtt

    from emorecog_stream.cli import UsageError
    from emorecog_stream.sinks.mqtt import MqttConfigError, MqttSettings
    from emorecog_stream.sinks.payload import PayloadError, validate_session_id

    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be >= 1, got {args.count}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    try:
        settings = MqttSettings.from_url(
            args.mqtt,
            password_env=args.password_env,
            password_file=args.password_file,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            tls_insecure=args.insecure,
            allow_insecure=args.allow_insecure,
            topic_prefix=args.prefix,
        )
        session = "+" if args.session is None else validate_session_id(args.session)
        context = settings.ssl_context()
    except (MqttConfigError, PayloadError) as exc:
        raise UsageError(str(exc)) from None

    from emorecog_stream.web.state import HUBS_LEVEL

    kinds = ["prediction", "status"] + (["physio"] if args.physio else [])
    topics = [f"{settings.topic_prefix}/{session}/{kind}" for kind in kinds]
    topics.append(f"{settings.topic_prefix}/{HUBS_LEVEL}/+/status")  # hubs' Last Wills
    printer = _Printer(args.json, prefix=settings.topic_prefix)
    outcome: dict[str, Any] = {"error": None, "done": False}

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if context is not None:
        client.tls_set_context(context)
        if settings.tls_insecure:
            client.tls_insecure_set(True)

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            user = f" (user {settings.username!r})" if settings.username else ""
            outcome["error"] = f"broker {settings.url} refused the connection: {rc}{user}"
            c.disconnect()
            return
        c.subscribe([(topic, 1) for topic in topics])

    def on_subscribe(c: Any, userdata: Any, mid: Any, codes: Any, props: Any = None) -> None:
        # Announced only once the broker confirmed: from here on nothing published is missed.
        failed = [str(code) for code in codes if getattr(code, "is_failure", False)]
        if failed:
            outcome["error"] = f"broker {settings.url} refused the subscription: {failed}"
            c.disconnect()
            return
        print(f"listening on {settings.url}: {', '.join(topics)}", file=sys.stderr, flush=True)

    def on_disconnect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure and not outcome["done"] and outcome["error"] is None:
            print(f"listen: connection lost ({rc}); reconnecting", file=sys.stderr, flush=True)

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        line = printer.handle(msg.topic, msg.payload)
        if line is not None:
            print(line, flush=True)
        if args.count is not None and printer.predictions >= args.count:
            outcome["done"] = True
            c.disconnect()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    try:
        client.connect(settings.host, settings.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot reach MQTT broker at {settings.url}: {exc}") from None

    timer = None
    if args.timeout is not None:

        def expire() -> None:
            outcome["timed_out"] = True
            client.disconnect()

        timer = threading.Timer(args.timeout, expire)
        timer.daemon = True
        timer.start()
    try:
        client.loop_forever(retry_first_connection=False)
    finally:
        if timer is not None:
            timer.cancel()
    if outcome["error"]:
        raise UsageError(outcome["error"])
    if outcome.get("timed_out") and args.count is not None and not outcome["done"]:
        print(
            f"listen: {printer.predictions} of {args.count} predictions within {args.timeout} s",
            file=sys.stderr,
        )
        return 1
    return 0
