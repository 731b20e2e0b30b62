"""The live pages in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium), fed by a real Mosquitto: the engine on a replay, predictions we publish ourselves
with the engine's publisher, a broker restart, and hostile marker texts and session ids.

Skipped (with the reason) only where chromium or chromedriver is not installed; ``.ci/run``
installs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
FILL = (0x4F, 0xB3, 0xD9)  # the feedback page's default fill colour
TRACK = (0x1C, 0x1C, 0x1C)  # and its track


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"{path} not found: install Debian's {package} (.ci/run does)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator[Any]:
    """A headless Chromium with a fresh profile, removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="emorecog-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_js(driver: Any, script: str, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``return <script>`` in the page until it is truthy; its value (or AssertionError)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"page never satisfied {script!r} in {timeout} s (last: {value!r})")


def browser_clock_offset(driver: Any) -> tuple[float, float]:
    """(browser wall clock - time.time(), uncertainty) in seconds, from the tightest of 20 reads.

    The page stamps its DOM updates with performance.timeOrigin + performance.now(); this
    lines that clock up with Python's time.time() to within half a round trip.
    """
    best = (0.0, float("inf"))
    for _ in range(20):
        before = time.time()
        browser_ms = driver.execute_script("return performance.timeOrigin + performance.now()")
        after = time.time()
        half = (after - before) / 2
        if half < best[1]:
            best = (browser_ms / 1000.0 - (before + half), half)
    return best


class ServerThread:
    """A :class:`~emorecog_stream.web.WebServer` on its own event loop in a thread (selenium is
    synchronous), plus an engine publisher on the same loop for predictions we make up."""

    def __init__(self, settings: Any, **options: Any) -> None:
        from emorecog_stream.web import WebServer

        options.setdefault("port", 0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.settings = settings
        self.server = WebServer(settings, **options)
        self.publishers: dict[str, Any] = {}
        self.call(self.server.start())
        self.call(self.server.bridge.wait_connected(15))

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self.call(run())

    def url(self, path: str = "/", **query: str) -> str:
        return self.server.url(path, **query)

    def publisher(self, session: str) -> Any:
        from emorecog_stream.sinks.mqtt import MqttPublisher, MqttSettings

        if session not in self.publishers:
            settings = MqttSettings.from_url(
                self.settings.url, reconnect_min_s=0.1, reconnect_max_s=0.5
            )
            pub = MqttPublisher(settings, session, model_id="test-model")
            self.call(pub.start())
            self.publishers[session] = pub
        return self.publishers[session]

    def publish(self, session: str, predictions: list[Any], flush: bool = True) -> None:
        pub = self.publisher(session)
        self.on_loop(lambda: [pub.publish_prediction(p) for p in predictions])
        if flush:
            self.call(pub.flush(10))

    def wait(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.on_loop(lambda: predicate(self.server)):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        for pub in self.publishers.values():
            with contextlib.suppress(Exception):
                self.call(pub.close(timeout=2.0))
        with contextlib.suppress(Exception):
            self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prediction(session: str, i: int, positive: float, *, tr: float = 1.0, **extra: Any) -> Any:
    """A valid prediction with P(positive) = ``positive`` and volume times ``tr`` apart."""
    from tests.plugins.mqtt_broker import sample_prediction

    rest = 1.0 - positive
    return sample_prediction(
        session,
        i,
        probabilities=(round(rest / 2, 6), round(rest - round(rest / 2, 6), 6), positive),
        category="positive" if positive >= 0.5 else "neutral",
        volume_timestamp=1000.0 + i * tr,
        **extra,
    )


def column_fraction(png: bytes, x: int, fill: tuple[int, int, int], track: tuple[int, int, int]):
    """In the screenshot's column ``x``: (fill pixels, track pixels) counted by colour."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    column = image[:, x, :]
    near = lambda c: np.abs(column - np.array(c)).sum(axis=1) <= 24  # noqa: E731
    return int(near(fill).sum()), int(near(track).sum())


def not_blank(png: bytes, min_colours: int) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) >= min_colours, f"screenshot has only {len(colours)} colours"
    return len(colours)


def replay_through_engine(
    recording: Any,
    broker_url: str,
    session_id: str,
    *,
    speed: float,
    during: Callable[[Any, Any], None] | None = None,
) -> str:
    """Replay ``recording`` (markers included) into a real engine publishing to ``broker_url``;
    ``during(replayer, engine)`` runs in a thread once data flows. Returns what the engine
    printed (headless log lines)."""
    from emorecog_stream.adapters.lsl_info import stream_identity
    from emorecog_stream.adapters.replay import Replayer
    from emorecog_stream.config import apply_overrides, load_config
    from emorecog_stream.core.streams import Role
    from emorecog_stream.engine.runner import RunHooks, run_engine
    from emorecog_stream.model import load_model

    tag = "web" + uuid.uuid4().hex[:8]
    overrides: dict[str, Any] = {
        "session.id": session_id,
        "mqtt.url": broker_url,
        "output.dashboard": False,
    }
    for role in Role:  # every stream tagged, markers included: no clash with other tests
        name, type_, source_id = stream_identity(role, tag)
        overrides[f"streams.{role.value}.name"] = name
        overrides[f"streams.{role.value}.type"] = type_
        overrides[f"streams.{role.value}.source_id"] = source_id
    overrides["streams.markers.enabled"] = True
    config = apply_overrides(load_config(None), overrides)
    replayer = Replayer(recording, speed=speed, tag=tag)
    replayer.open()
    out = io.StringIO()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_engine(engine: Any) -> None:
            def watch() -> None:
                roles = [Role.FMRI, Role.PPG, Role.RESP, Role.MARKERS]
                replayer.wait_for_consumers(roles, timeout=10.0)
                replayer.start(delay=0.2)
                if during is not None:
                    during(replayer, engine)
                replayer.join()
                time.sleep((config.aligner.deadline + 1.0) / speed)
                loop.call_soon_threadsafe(engine.stop)

            threading.Thread(target=watch, daemon=True).start()

        await run_engine(
            config,
            model=load_model(),
            time_scale=speed,
            hooks=RunHooks(on_engine=on_engine),
            out=out,
            install_signal_handlers=False,
        )

    try:
        asyncio.run(main())
    finally:
        replayer.stop()
    return out.getvalue()


# --------------------------------------------------------------------------- tests

needs_chromium = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))
pytestmark = [needs_chromium, pytest.mark.timeout(240)]


@pytest.mark.parametrize(
    ("shape", "target"), [("bar", "positive"), ("circle", "positive"), ("bar", "intensity")]
)
def test_feedback_shows_a_known_prediction_at_its_level(
    shape: str, target: str, mqtt_broker: Any, tmp_path: Path
) -> None:
    """P(positive) = 0.75, or intensity +2 on -4..+4: the shape at 0.75 of its full size."""
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.plugins.mqtt_broker import unique_session

    session = unique_session()
    with ServerThread(MqttSettings.from_url(mqtt_broker.url)) as web, chromium() as page:
        page.get(web.url("/feedback", session=session, smooth="1", shape=shape, target=target))
        wait_js(page, "window.__emorecog && window.__emorecog.config")
        assert page.execute_script("return document.body.dataset.state") == "waiting"
        known = prediction(session, 0, 0.75) if target == "positive" else (
            prediction(session, 0, 0.1, intensity=2.0)
        )
        web.publish(session, [known])
        wait_js(page, "document.body.dataset.level === '0.7500'")
        assert page.execute_script("return document.body.dataset.state") == "live"
        time.sleep(1.8)  # the 0.8 s move (fallback TR 2 s x 0.8 = 1.5 s) has ended
        png = page.get_screenshot_as_png()
        (tmp_path / f"feedback-{shape}-{target}.png").write_bytes(png)
        not_blank(png, 3)
        width = page.execute_script("return window.innerWidth")
        if shape == "bar":
            filled, empty = column_fraction(png, width // 2, FILL, TRACK)
            assert filled + empty > 300
            assert filled / (filled + empty) == pytest.approx(0.75, abs=0.02)
        else:  # the disc's diameter is the level times the ring's
            filled, ring = column_fraction(png, width // 2, FILL, TRACK)
            assert filled / (filled + ring) == pytest.approx(0.75, abs=0.02)


def test_feedback_smooths_greys_when_stale_and_shows_paused(mqtt_broker: Any) -> None:
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.plugins.mqtt_broker import unique_session

    session = unique_session()
    tr = 0.25
    with ServerThread(MqttSettings.from_url(mqtt_broker.url)) as web, chromium() as page:
        page.get(web.url("/feedback", session=session, smooth="3", target="positive"))
        wait_js(page, "window.__emorecog && window.__emorecog.config")
        for i, value in enumerate((0.2, 0.5, 0.8, 0.9)):
            web.publish(session, [prediction(session, i, value, tr=tr)])
            if i == 2:  # mean of the last 3
                wait_js(page, "document.body.dataset.level === '0.5000'")
            time.sleep(tr * 0.8)
        wait_js(page, "document.body.dataset.level === '0.7333'")  # (0.5 + 0.8 + 0.9) / 3
        assert page.execute_script("return document.body.dataset.state") == "live"
        # no new prediction: older than 2 TRs (TR measured from the volume times: 0.25 s)
        started = time.monotonic()
        wait_js(page, "document.body.dataset.state === 'stale'", timeout=5)
        assert time.monotonic() - started < 2 * tr + 1.0
        pub = web.publisher(session)
        web.on_loop(lambda: pub.set_status("paused", "fMRI stream lost"))
        wait_js(page, "document.body.dataset.state === 'paused'")
        note = page.find_element("id", "note")
        wait_js(page, "getComputedStyle(document.getElementById('note')).opacity === '1'", 5)
        assert note.text == "paused"
        grey = page.execute_script(
            "return getComputedStyle(document.querySelector('.fill')).backgroundColor"
        )
        assert grey == "rgb(90, 90, 90)"
        web.on_loop(lambda: pub.set_status("online", "fMRI back"))
        web.publish(session, [prediction(session, 4, 0.9, tr=tr)])
        wait_js(page, "document.body.dataset.state === 'live'")


def test_marker_html_and_hostile_session_ids_show_as_text(mqtt_broker: Any) -> None:
    from emorecog_stream.sinks.mqtt import MqttSettings

    session = "<img src=x onerror=window.__pwned=1>"
    hostile = "<script>window.__pwned=2</script><b>bold</b>"
    with ServerThread(MqttSettings.from_url(mqtt_broker.url)) as web, chromium() as page:
        page.get(web.url("/"))
        wait_js(page, "document.getElementById('conn').textContent.includes('connected')")
        web.publish(session, [prediction(session, i, 0.6) for i in range(3)])
        pub = web.publisher(session)
        web.on_loop(lambda: pub.publish_marker(1001.5, hostile))
        web.call(pub.flush(10))
        wait_js(page, "document.querySelectorAll('#markers li').length === 1")
        text = page.execute_script("return document.querySelector('#markers li .text').textContent")
        assert text == hostile
        row = page.execute_script("return document.querySelector('#sessions tbody td').textContent")
        assert row == session
        assert page.execute_script("return document.getElementById('d-session').textContent") == (
            session
        )
        assert page.execute_script("return window.__pwned === undefined")
        injected = page.execute_script("return document.querySelectorAll('main img, main b')")
        assert injected == []
        assert page.execute_script("return document.querySelectorAll('script').length") == 2


@pytest.mark.slow
def test_pages_follow_the_engine_on_a_replay_and_recover_from_a_broker_restart(
    mqtt_broker_factory: Any, mqtt_collector: Any, tmp_path: Path
) -> None:
    """The engine replays a short synthetic session (3 trials) through a real Mosquitto; the
    feedback page shows every prediction within one TR of its arrival at an independent
    subscriber; the experimenter page draws it with the trials; the broker is then killed and
    restarted under live traffic and both pages carry on by themselves."""
    from emorecog_stream.recordings.synth import generate_session
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.test_e2e import SHORT, off_grid

    speed = 4.0
    tr_wall = 1.0 / speed  # the synthetic session's TR is 1 s
    broker = mqtt_broker_factory()
    session_id = f"web-{uuid.uuid4().hex[:8]}"
    sub = mqtt_collector(broker, [f"emorecog/{session_id}/prediction"])
    recording = off_grid(generate_session(1, SHORT))
    wall_minus_monotonic = time.time() - time.monotonic()
    with (
        ServerThread(MqttSettings.from_url(broker.url), session=session_id) as web,
        chromium() as feedback,
        chromium(1400, 1000) as experimenter,
    ):
        feedback.get(web.url("/feedback", shape="bar", smooth="1"))
        experimenter.get(web.url("/"))
        for page in (feedback, experimenter):
            wait_js(page, "window.EmoWeb !== undefined")
        offset, uncertainty = browser_clock_offset(feedback)
        shots: dict[str, bytes] = {}

        def mid_run(replayer: Any, engine: Any) -> None:
            time.sleep(12.0)  # ~45 volumes in, inside a trial
            shots["feedback"] = feedback.get_screenshot_as_png()
            shots["experimenter"] = experimenter.get_screenshot_as_png()

        replay_through_engine(recording, broker.url, session_id, speed=speed, during=mid_run)
        n = recording.n_volumes
        assert sub.wait_for(lambda m: len(m) >= n, 10)
        arrived = {m.json()["sequence"]: m.t + wall_minus_monotonic for m in sub.messages}
        updates = feedback.execute_script("return window.__emorecog.updates")
        shown = {u["sequence"]: u["t"] / 1000.0 - offset for u in updates}
        assert sorted(shown) == list(range(n)), "every prediction shown, in order, once"
        delays = np.array([shown[i] - arrived[i] for i in range(n)])
        assert delays.max() < tr_wall, (
            f"page update after the subscriber: max {delays.max() * 1000:.1f} ms,"
            f" p50 {np.median(delays) * 1000:.1f} ms (clock ±{uncertainty * 1000:.1f} ms)"
        )
        # the experimenter page: status, the plots with the trials, the markers as text
        wait_js(experimenter, "document.getElementById('d-state').textContent === 'offline'")
        markers = experimenter.execute_script(
            "return [...document.querySelectorAll('#markers li .text')].map(e => e.textContent)"
        )
        assert len(markers) == 2 * SHORT.n_trials and '"event":"trial_start"' in markers[-1]
        assert experimenter.execute_script(
            "return document.querySelector('#sessions tbody td').textContent"
        ) == session_id
        for name_, png in shots.items():
            (tmp_path / f"{name_}.png").write_bytes(png)
        not_blank(shots["experimenter"], 40)  # lines, spans, text
        filled, empty = column_fraction(
            shots["feedback"], feedback.execute_script("return innerWidth") // 2, FILL, TRACK
        )
        assert filled > 0 and filled + empty > 300  # the bar is there, live, at some level

        # broker restart with live traffic: both pages recover without a reload
        before = feedback.execute_script("return window.__emorecog.updates.length")
        # (the server follows only this session: a new engine run of it, made up by us)
        pub = web.publisher(session_id)
        stop = threading.Event()

        def publish_forever() -> None:
            i = 0
            while not stop.is_set():
                p = prediction(session_id, i, 0.3 + 0.4 * (i % 2), tr=0.2)
                with contextlib.suppress(Exception):
                    web.on_loop(lambda p=p: pub.publish_prediction(p))
                i += 1
                time.sleep(0.2)

        pusher = threading.Thread(target=publish_forever, daemon=True)
        pusher.start()
        try:
            wait_js(feedback, "document.body.dataset.state === 'live'")
            broker.stop()
            wait_js(feedback, "document.body.dataset.state === 'stale'", timeout=10)
            wait_js(experimenter, "document.getElementById('mqtt').className.includes('bad')", 10)
            seen = feedback.execute_script("return Number(document.body.dataset.sequence)")
            time.sleep(1.0)
            broker.start()
            wait_js(feedback, "document.body.dataset.state === 'live'", timeout=20)
            wait_js(
                feedback, f"Number(document.body.dataset.sequence) > {seen} + 3", timeout=10
            )
            wait_js(experimenter, "document.getElementById('mqtt').className.includes('good')")
        finally:
            stop.set()
            pusher.join(5)
        assert before == n


def test_many_sessions_one_row_each_click_into_one_fd_plot_only_when_carried(
    mqtt_broker: Any,
) -> None:
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.plugins.mqtt_broker import unique_session

    with_fd, without_fd, third = unique_session(), unique_session(), unique_session()
    with ServerThread(MqttSettings.from_url(mqtt_broker.url)) as web, chromium(1400, 1000) as page:
        page.get(web.url("/"))
        wait_js(page, "document.getElementById('conn').textContent.includes('connected')")
        for i in range(5):
            web.publish(with_fd, [prediction(with_fd, i, 0.5, framewise_displacement=0.1 * i)])
            web.publish(without_fd, [prediction(without_fd, i, 0.4)])
        web.publish(third, [prediction(third, 0, 0.7)])
        wait_js(page, "document.querySelectorAll('#sessions tbody tr').length === 3")
        assert page.execute_script("return document.getElementById('detail').hidden")
        rows = page.find_elements("css selector", "#sessions tbody tr")
        by_id = {row.find_element("css selector", "td").text: row for row in rows}
        assert set(by_id) == {with_fd, without_fd, third}
        by_id[with_fd].click()
        wait_js(page, f"document.getElementById('d-session').textContent === '{with_fd}'")
        wait_js(page, "!document.getElementById('plot-fd').hidden")
        cells = page.execute_script(
            "return [...document.querySelector('tr.selected').children].map(td => td.textContent)"
        )
        assert cells[0] == with_fd and cells[11] == "0.40 mm" and cells[1] == "online"
        page.find_element("id", "back").click()
        wait_js(page, "document.getElementById('detail').hidden")
        by_id[without_fd].click()
        wait_js(page, f"document.getElementById('d-session').textContent === '{without_fd}'")
        assert page.execute_script("return document.getElementById('plot-fd').hidden")
        png = page.get_screenshot_as_png()
        not_blank(png, 20)


@pytest.mark.slow
def test_demo_prints_both_urls_and_both_pages_work() -> None:
    """The README's first contact: ``demo`` prints the two URLs; in a browser the feedback page
    goes live and the experimenter page shows the demo session with its plots."""
    import re
    import subprocess
    import sys

    demo = subprocess.Popen(
        [sys.executable, "-m", "emorecog_stream", "demo", "--no-dashboard", "--speed", "10",
         "--duration", "25", "--web-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        urls: dict[str, str] = {}
        seen = []
        for line in demo.stdout:
            seen.append(line)
            found = re.search(r"web: (experimenter|feedback) page\s+(\S+)", line)
            if found:
                urls[found.group(1)] = found.group(2)
            if len(urls) == 2:
                break
        assert set(urls) == {"experimenter", "feedback"}, "".join(seen)
        assert urls["feedback"] == urls["experimenter"].rstrip("/") + "/feedback"
        threading.Thread(target=lambda: demo.stdout.read(), daemon=True).start()
        with chromium() as feedback, chromium(1400, 1000) as experimenter:
            feedback.get(urls["feedback"])
            experimenter.get(urls["experimenter"])
            wait_js(feedback, "document.body.dataset.state === 'live'", timeout=90)
            wait_js(experimenter, "document.getElementById('d-session').textContent === 'demo'")
            wait_js(experimenter, "document.getElementById('d-state').textContent === 'online'")
            level = float(feedback.execute_script("return document.body.dataset.level"))
            assert 0.0 <= level <= 1.0
            not_blank(experimenter.get_screenshot_as_png(), 40)
        assert demo.wait(timeout=90) == 0
    finally:
        if demo.poll() is None:
            demo.kill()


def test_a_page_opened_mid_session_has_the_current_state_at_once(mqtt_broker: Any) -> None:
    from emorecog_stream.recordings.session import make_marker
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.plugins.mqtt_broker import unique_session

    session = unique_session()
    with ServerThread(MqttSettings.from_url(mqtt_broker.url), history=50) as web:
        pub = web.publisher(session)
        web.publish(session, [prediction(session, i, 0.6, tr=0.5) for i in range(80)])
        web.on_loop(lambda: pub.publish_marker(1010.0, make_marker("trial_start", 0, 1, 3)))
        web.on_loop(lambda: pub.set_status("degraded", "PPG stream lost", {"missing": ["ppg"]}))
        web.call(pub.flush(10))
        assert web.wait(lambda s: s.state.sessions[session].status["state"] == "degraded")
        with chromium(1400, 1000) as page:
            page.get(web.url("/"))
            wait_js(page, "document.getElementById('d-session').textContent !== ''")
            # everything below came in the first (snapshot) event: nothing was published since
            cells = page.execute_script(
                "return [...document.querySelector('#sessions tbody tr').children]"
                ".map(td => td.textContent)"
            )
            assert cells[:4] == [session, "degraded", "PPG stream lost", "79"]
            health = page.execute_script(
                "return [...document.querySelectorAll('#health dd')].map(d => d.textContent)"
            )
            assert "80" in health and "ppg" in health
            markers = page.execute_script("return document.querySelectorAll('#markers li').length")
            assert markers == 1
            drawn = page.execute_script(
                "const c = document.querySelector('#plot-probabilities canvas');"
                "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n"
            )
            assert drawn > 2000  # lines, grid and the trial span of the last 50 predictions
            page.get(web.url("/feedback", session=session, smooth="3"))
            wait_js(page, "document.body.dataset.level === '0.6000'")
            assert page.execute_script("return document.body.dataset.state") in ("live", "stale")


def test_pages_work_with_the_token_off_loopback_and_not_without(mqtt_broker: Any) -> None:
    from emorecog_stream.sinks.mqtt import MqttSettings
    from tests.plugins.mqtt_broker import unique_session

    session = unique_session()
    with ServerThread(MqttSettings.from_url(mqtt_broker.url), host="0.0.0.0") as web:
        port, token = web.server.bound_port, web.server.token
        with chromium() as page:
            page.get(f"http://127.0.0.1:{port}/feedback?session={session}")
            assert "needs ?token=" in page.find_element("tag name", "body").text
            page.get(f"http://127.0.0.1:{port}/feedback?session={session}&token={token}")
            wait_js(page, "window.__emorecog && window.__emorecog.config")  # scripts loaded
            web.publish(session, [prediction(session, 0, 0.4)])
            wait_js(page, "document.body.dataset.level === '0.4000'")  # events flow
