"""Outputs: MQTT publisher, embedded broker, JSONL session log, terminal dashboard."""
