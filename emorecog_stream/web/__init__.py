"""Live web pages for a session: the participant's feedback display and the experimenter's view.

``server.WebServer`` subscribes to the engine's MQTT topics (``bridge.MqttBridge``), keeps the
recent messages (``state.LiveState``) and pushes them to browsers as server-sent events. The
pages and their scripts are in ``static/`` (shipped in the package: no CDN, nothing downloaded
at run time). See docs/web.md.
"""

from emorecog_stream.web.server import FeedbackDefaults, WebServer

__all__ = ["FeedbackDefaults", "WebServer"]
