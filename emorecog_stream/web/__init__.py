"""Live web pages for a session: the participant's feedback display and the experimenter's view.

``server.WebServer`` subscribes to the engine's MQTT topics (``bridge.MqttBridge``), keeps the
recent messages (``state.LiveState``) and pushes them to browsers as server-sent events. The
pages and their scripts are in ``static/`` (shipped in the package: no CDN, nothing downloaded
at run time). See docs/web.md.

The server is imported on first use, so ``listen`` can use ``state`` (no I/O, standard library
only) without loading aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emorecog_stream.web.server import FeedbackDefaults, WebServer

__all__ = ["FeedbackDefaults", "WebServer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from emorecog_stream.web import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
