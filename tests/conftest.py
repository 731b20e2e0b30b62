"""Shared fixtures. Fixture plugins live in ``tests/plugins`` (one module per real part)."""

from __future__ import annotations

import os

# LSL on loopback only: tests never look for streams beyond this machine.
os.environ.setdefault("LSLAPICFG", os.path.join(os.path.dirname(__file__), "lsl_api.cfg"))

pytest_plugins: list[str] = ["tests.plugins.mqtt_broker", "tests.plugins.lsl"]
