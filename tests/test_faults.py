"""The fault matrix: what a lab meets, against real processes.

Every test runs ``emorecog-stream run`` as a subprocess, a real Mosquitto (the broker plugin,
on a free port) and real LSL senders (a :class:`Replayer` on a thread of this process, or pylsl
outlets pushing explicit timestamps), and checks what an independent paho subscriber and the
engine's JSONL log hold afterwards. Faults: the broker frozen (SIGSTOP), restarted three times,
refusing the engine's credentials; LSL senders restarting with other settings, clocks jumping,
duplicated and overlapping chunks; the log's disk filling up or its file deleted; SIGTERM,
Ctrl-C, and SIGKILL followed by a restart on the same session and log.

Replays run sped up (``run --replay-speed``), so session seconds pass faster than wall seconds
while windows, deadlines and stall timeouts keep their meaning.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pylsl
import pytest

from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.adapters.replay import Replayer
from emorecog_stream.core.streams import N_ROIS, Role
from emorecog_stream.sinks.jsonl import read_log
from tests.plugins.lsl import make_session
from tests.plugins.mqtt_broker import find_mosquitto

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="the fault matrix needs Mosquitto"),
    pytest.mark.timeout(180),
]

REPO = Path(__file__).resolve().parents[1]
SPEED = 10.0  # replay speed of the senders: 10 session seconds per wall second
ROLES = (Role.FMRI, Role.PPG, Role.RESP)


# --------------------------------------------------------------------------- helpers


def engine_config(
    path: Path, session_id: str, tag: str, *, mqtt: str = "", engine: str = ""
) -> Path:
    """A ``run`` config that finds this test's tagged streams (``mqtt``/``engine``: extra keys)."""
    lines = [f'[session]\nid = "{session_id}"\n', "[output]\ndashboard = false\n"]
    for role in ROLES:
        name, _type, source_id = stream_identity(role, tag)
        lines.append(f'[streams.{role.value}]\nname = "{name}"\nsource_id = "{source_id}"\n')
    if mqtt:
        lines.append(f"[mqtt]\n{mqtt}\n")
    # under a loaded CI machine finding the streams can take a while
    lines.append(f"[engine]\nresolve_timeout = 30.0\n{engine}\n")
    path.write_text("\n".join(lines))
    return path


class EngineProcess:
    """``emorecog-stream run`` in its own process; its stdout and stderr collected by a thread
    (a pipe: a file would fall under the file-size limit of the disk-full test)."""

    def __init__(
        self,
        config: Path,
        broker_url: str,
        *,
        log: Path | None = None,
        speed: float = SPEED,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        cmd = [
            sys.executable, "-m", "emorecog_stream", "run", "--config", str(config),
            "--mqtt", broker_url, "--no-dashboard", "--replay-speed", str(speed),
        ]  # fmt: skip
        if log is not None:
            cmd += ["--log", str(log)]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            preexec_fn=preexec_fn,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> str:
        """The first output line matching the regex ``pattern`` (fails the test after timeout)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output}")
                self._cond.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> float:
        """Send ``sig``, wait for the exit; returns the seconds it took."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        self._reader.join(5.0)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(5.0)


@pytest.fixture
def engines() -> Iterator[Callable[..., EngineProcess]]:
    made: list[EngineProcess] = []

    def make(*args: Any, **kwargs: Any) -> EngineProcess:
        engine = EngineProcess(*args, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.kill()
        print(f"--- engine output (exit {engine.proc.returncode}) ---\n{engine.output}")


class Replays:
    """Looping replays of a small session at ``SPEED``: :meth:`open` creates the outlets
    (before the engine starts looking), :meth:`start` plays once the engine is connected."""

    def __init__(self) -> None:
        self.made: list[Replayer] = []

    def open(self, tag: str, n_volumes: int = 60) -> Replayer:
        replayer = Replayer(make_session(n_volumes), speed=SPEED, tag=tag, loop=True)
        replayer.open()
        self.made.append(replayer)
        return replayer

    def start(self, replayer: Replayer) -> Replayer:
        assert replayer.wait_for_consumers([Role.FMRI], timeout=60.0), "engine never connected"
        replayer.wait_for_consumers(list(ROLES), timeout=10.0)  # physiology is optional
        replayer.start(delay=0.2)
        return replayer


@pytest.fixture
def replays() -> Iterator[Replays]:
    r = Replays()
    yield r
    for replayer in r.made:
        replayer.stop()


def predictions_logged(log: Path) -> list[dict[str, Any]]:
    return [r for r in read_log(log) if r["kind"] == "prediction"]


def first_receipts(sub: Any) -> list[int]:
    """Sequence numbers in the order they first arrived (QoS 1 may repeat a message)."""
    seen: set[int] = set()
    order = []
    for payload in sub.json("prediction"):
        if payload["sequence"] not in seen:
            seen.add(payload["sequence"])
            order.append(payload["sequence"])
    return order


def assert_delivered_once_in_order(sub: Any, log: Path, timeout: float = 30.0) -> list[int]:
    """Every logged prediction reached the subscriber, first receipts in order, and each
    sequence number stands for one volume only."""
    logged = predictions_logged(log)
    want = [r["sequence"] for r in logged]
    assert want == list(range(want[0], want[0] + len(want))), "log sequence has holes or repeats"
    assert sub.wait_for(
        lambda _: set(want) <= {p["sequence"] for p in sub.json("prediction")}, timeout
    ), f"missing: {sorted(set(want) - {p['sequence'] for p in sub.json('prediction')})[:20]}"
    order = first_receipts(sub)
    assert order == sorted(order), "predictions arrived out of order"
    by_seq: dict[int, float] = {}
    for payload in sub.json("prediction"):  # a repeat is the same volume, never another one
        ts = by_seq.setdefault(payload["sequence"], payload["volume_timestamp"])
        assert ts == payload["volume_timestamp"]
    return order


def collector_for(mqtt_collector: Any, broker: Any, session_id: str, **options: Any) -> Any:
    return mqtt_collector(
        broker,
        [f"emorecog/{session_id}/prediction", f"emorecog/{session_id}/status"],
        clean_session=False,
        client_id=f"faults-{uuid.uuid4().hex[:8]}",
        **options,
    )


def new_ids() -> tuple[str, str]:
    tag = "f" + uuid.uuid4().hex[:10]
    return tag, f"faults-{tag}"


def summary_of(engine: EngineProcess) -> str:
    return engine.wait_for_line(r"^stopped: ", timeout=5.0)


# --------------------------------------------------------------------------- the broker


@pytest.mark.slow
def test_broker_frozen_30_s_then_resumed_delivers_everything_in_order(
    mqtt_broker_factory: Any, mqtt_collector: Any, engines: Any, replays: Any, tmp_path: Path
) -> None:
    """SIGSTOP: the TCP connection stays open but nothing is acknowledged (a hung broker, not a
    dead one). The publisher's in-flight window fills, the rest queues (bounded, counted and
    shown on every line), the publish timeout tears the connection down with the reason in the
    log, and after SIGCONT everything arrives, in order, none twice after de-duplication."""
    broker = mqtt_broker_factory()
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, broker, session_id)
    log = tmp_path / "session.jsonl"
    replayer = replays.open(tag)
    engine = engines(engine_config(tmp_path / "run.toml", session_id, tag), broker.url, log=log)
    replays.start(replayer)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= 10, 30)
    broker._proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(30.0)
        during = engine.output
    finally:
        broker._proc.send_signal(signal.SIGCONT)
    # the backlog is on the headless lines, and the log says why the connection went
    assert re.search(r"mqtt \w+ \(queued \d+\)", during), during[-2000:]
    assert "publish failed: Operation timed out" in during, during[-2000:]
    n_before = len(predictions_logged(log))
    assert sub.wait_for(lambda _: len(first_receipts(sub)) >= n_before, 60)
    engine.stop(signal.SIGINT)
    summary = summary_of(engine)
    assert "unsent 0, dropped 0" in summary
    assert "Traceback" not in engine.output  # the lost connection is said once, in words
    assert_delivered_once_in_order(sub, log)


@pytest.mark.slow
def test_broker_restarted_three_times_in_a_row_loses_and_repeats_nothing(
    mqtt_broker_factory: Any, mqtt_collector: Any, engines: Any, replays: Any, tmp_path: Path
) -> None:
    broker = mqtt_broker_factory(persistence=True)
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, broker, session_id)
    broker.wait_persisted()  # the durable subscription survives each SIGKILL
    log = tmp_path / "session.jsonl"
    replayer = replays.open(tag)
    engine = engines(engine_config(tmp_path / "run.toml", session_id, tag), broker.url, log=log)
    replays.start(replayer)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= 10, 30)
    for _ in range(3):
        broker.stop()  # SIGKILL
        time.sleep(1.5)
        broker.start()
        time.sleep(1.5)
    engine.wait_for_line(r"mqtt disconnected \(queued \d+\)")
    time.sleep(3.0)
    engine.stop(signal.SIGINT)
    summary = summary_of(engine)
    assert "unsent 0, dropped 0" in summary
    assert_delivered_once_in_order(sub, log)


@pytest.mark.slow
def test_broker_refusing_the_engines_credentials_after_a_restart(
    mqtt_broker_factory: Any, mqtt_collector: Any, engines: Any, replays: Any, tmp_path: Path
) -> None:
    """The lab's broker comes back from a restart with the engine's password changed: the
    engine is refused, says so (state `refused`, the broker's reason, the user), keeps every
    prediction queued, and delivers them in order once the broker takes it again."""
    broker = mqtt_broker_factory(username="engine", password="first-pw", persistence=True)
    passwords = broker.workdir / "passwords"
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

    def set_password(user: str, password: str) -> None:
        subprocess.run([passwd, "-b", str(passwords), user, password], check=True, timeout=30)

    set_password("watcher", "watch-pw")  # the subscriber's own account, unchanged throughout
    broker.restart()
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, broker, session_id, username="watcher", password="watch-pw")
    broker.wait_persisted()
    secret = tmp_path / "engine.pw"
    secret.write_text("first-pw\n")
    config = engine_config(
        tmp_path / "run.toml",
        session_id,
        tag,
        mqtt=f'username = "engine"\npassword_file = "{secret}"',
    )
    log = tmp_path / "session.jsonl"
    replayer = replays.open(tag)
    engine = engines(config, broker.url, log=log)
    replays.start(replayer)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= 10, 30)
    set_password("engine", "changed-pw")
    broker.restart()
    refused = engine.wait_for_line(r"refused the connection", timeout=30)
    assert "engine" in refused and "first-pw" not in engine.output
    engine.wait_for_line(r"mqtt refused \(queued \d+\)")
    time.sleep(2.0)
    n_refused = len(predictions_logged(log))
    set_password("engine", "first-pw")  # the lab puts the engine's password back
    broker.restart()
    assert sub.wait_for(lambda _: len(first_receipts(sub)) >= n_refused, 60)
    engine.stop(signal.SIGINT)
    assert "unsent 0, dropped 0" in summary_of(engine)
    assert_delivered_once_in_order(sub, log)


# --------------------------------------------------------------------------- stopping


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "broker_up"),
    [(signal.SIGTERM, True), (signal.SIGINT, False)],
    ids=["SIGTERM-broker-up", "Ctrl-C-broker-down"],  # Ctrl-C, broker up: test_e2e.py
)
def test_sigterm_and_ctrl_c_flush_set_offline_and_close_the_log(
    sig: int,
    broker_up: bool,
    mqtt_broker_factory: Any,
    mqtt_collector: Any,
    engines: Any,
    replays: Any,
    tmp_path: Path,
) -> None:
    """A stop signal: with the broker up, the queue is delivered, `offline` comes from the
    engine (not its Last Will) and the log ends with session_end; with the broker gone, the
    engine still exits within the flush timeout (10 s) plus teardown, counting what it could
    not deliver, and still closes the log."""
    broker = mqtt_broker_factory(persistence=True)
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, broker, session_id)
    broker.wait_persisted()
    log = tmp_path / "session.jsonl"
    replayer = replays.open(tag)
    engine = engines(engine_config(tmp_path / "run.toml", session_id, tag), broker.url, log=log)
    replays.start(replayer)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= 5, 30)
    if not broker_up:
        broker.stop()
        engine.wait_for_line(r"mqtt disconnected \(queued \d+\)")
    took = engine.stop(sig)
    assert engine.proc.returncode == 0, engine.output
    summary = summary_of(engine)
    records = read_log(log)
    assert records[-1]["kind"] == "session_end"
    assert records[-1]["predictions"] == len(predictions_logged(log))
    assert [r for r in records if r["kind"] == "summary"], "no summary record in the log"
    statuses = [r for r in records if r["kind"] == "status"]
    assert statuses[-1]["state"] == "offline" and statuses[-1]["reason"] == "engine stopped"
    if broker_up:
        assert took < 8.0, f"stop took {took:.1f} s"
        assert "unsent 0" in summary
        assert sub.wait_for(lambda m: any(x.json().get("state") == "offline" for x in m), 10)
        offline = [s for s in sub.json("status") if s["state"] == "offline"]
        assert offline[-1]["reason"] == "engine stopped"  # the engine's, not the Last Will's
        assert_delivered_once_in_order(sub, log)
    else:
        # 10 s of flush timeout, about 1 s to give up on the connection, then the usual
        # teardown (inlets, process exit: seconds on a loaded 2-core machine)
        assert took < 20.0, f"stop took {took:.1f} s with the broker gone"
        unsent = int(re.search(r"unsent (\d+)", summary).group(1))  # type: ignore[union-attr]
        assert unsent > 0, summary


# --------------------------------------------------------------------------- crash and restart


@pytest.mark.slow
def test_sigkill_and_restart_on_the_same_session_and_log_continues_the_sequence(
    mqtt_broker_factory: Any, mqtt_collector: Any, engines: Any, replays: Any, tmp_path: Path
) -> None:
    """The engine dies (SIGKILL, mid-write: a torn last line is added to the log) and is
    started again with the same --session and --log: numbering goes on after the last logged
    prediction, the status says why, and no subscriber sees a number reused for another
    volume."""
    broker = mqtt_broker_factory(persistence=True)
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, broker, session_id)
    broker.wait_persisted()
    log = tmp_path / "session.jsonl"
    config = engine_config(tmp_path / "run.toml", session_id, tag)
    replayer = replays.open(tag)
    first = engines(config, broker.url, log=log)
    replays.start(replayer)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= 10, 30)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    last = predictions_logged(log)[-1]["sequence"]
    with open(log, "ab") as f:
        f.write(b'{"kind":"prediction","session":"' + session_id.encode() + b'","sequ')
    # the broker publishes the Last Will: offline, connection lost
    assert sub.wait_for(
        lambda m: any("connection lost" in x.json().get("reason", "") for x in m), 30
    )
    second = engines(config, broker.url, log=log)
    line = second.wait_for_line(r"restarted after an unclean stop", timeout=60)
    assert f"continue at sequence {last + 1}" in line
    assert sub.wait_for(lambda _: max(first_receipts(sub)) >= last + 5, 30)
    second.stop(signal.SIGINT)
    records = read_log(log)  # the torn line is skipped, everything else reads
    starts = [r for r in records if r["kind"] == "session_start"]
    assert len(starts) == 2
    assert starts[1]["meta"]["continues"] == {"last_sequence": last, "previous_run": "unclean stop"}
    seqs = [r["sequence"] for r in records if r["kind"] == "prediction"]
    assert seqs == list(range(len(seqs))), "a sequence number was reused or skipped"
    restarted = [
        s for s in sub.json("status") if s["reason"].startswith("restarted after an unclean stop")
    ]
    assert restarted and restarted[0]["state"] == "starting"
    assert_delivered_once_in_order(sub, log)


# --------------------------------------------------------------------------- the session log


def file_size_limit(n_bytes: int) -> Callable[[], None]:
    """preexec_fn: files this process writes stop at ``n_bytes`` (``ulimit -f``); SIGXFSZ
    ignored, so a write past it fails with EFBIG as on a full disk, instead of killing."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


@pytest.mark.slow
def test_log_disk_full_mid_session_predictions_and_mqtt_go_on(
    mqtt_broker: Any, mqtt_collector: Any, engines: Any, replays: Any, tmp_path: Path
) -> None:
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, mqtt_broker, session_id)
    log = tmp_path / "session.jsonl"
    replayer = replays.open(tag)
    engine = engines(
        engine_config(tmp_path / "run.toml", session_id, tag),
        mqtt_broker.url,
        log=log,
        preexec_fn=file_size_limit(20_000),  # room for a few dozen lines
    )
    replays.start(replayer)
    engine.wait_for_line(r"cannot write to session log .*File too large", timeout=60)
    n_at_failure = len(sub.unique_by_sequence())
    assert sub.wait_for(lambda _: len(sub.unique_by_sequence()) >= n_at_failure + 30, 30)
    engine.stop(signal.SIGINT)
    summary = summary_of(engine)
    assert re.search(r"session log: \d+ line\(s\) not written \(.*File too large", summary)
    degraded = [s for s in sub.json("status") if s["state"] == "degraded"]
    assert any("session log not written" in s["reason"] for s in degraded)
    # predictions kept their numbering; what the log holds is the start of what was published
    logged = [r["sequence"] for r in read_log(log) if r["kind"] == "prediction"]
    published = [p["sequence"] for p in sub.unique_by_sequence()]
    assert published == list(range(len(published))) and len(published) >= len(logged) + 20
    assert logged == published[: len(logged)]
    assert log.stat().st_size <= 20_000


@pytest.mark.slow
def test_log_deleted_mid_session_is_created_again_and_says_so(
    mqtt_broker: Any, mqtt_collector: Any, engines: Any, replays: Any, tmp_path: Path
) -> None:
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, mqtt_broker, session_id)
    log = tmp_path / "session.jsonl"
    replayer = replays.open(tag)
    engine = engines(
        engine_config(tmp_path / "run.toml", session_id, tag), mqtt_broker.url, log=log
    )
    replays.start(replayer)
    assert sub.wait_for(lambda _: len(sub.of("prediction")) >= 10, 30)
    log.unlink()
    engine.wait_for_line(r"was deleted or replaced: created it again", timeout=10)
    time.sleep(1.0)
    engine.stop(signal.SIGINT)
    assert "file deleted and created again 1 time(s)" in summary_of(engine)
    records = read_log(log)
    assert records[0]["kind"] == "log_reopened" and records[-1]["kind"] == "session_end"
    logged = [r["sequence"] for r in records if r["kind"] == "prediction"]
    published = [p["sequence"] for p in sub.unique_by_sequence()]
    assert logged and logged == published[-len(logged) :]  # everything since the deletion


@pytest.mark.slow
def test_unwritable_log_at_start_is_an_error_before_the_session_begins(
    mqtt_broker: Any, engines: Any, tmp_path: Path
) -> None:
    tag, session_id = new_ids()
    config = engine_config(tmp_path / "run.toml", session_id, tag)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be\n")
    engine = engines(config, mqtt_broker.url, log=blocker / "session.jsonl")
    assert engine.proc.wait(60) == 2
    engine.kill()
    assert "cannot open session log" in engine.output and "looking for" not in engine.output
    # no room for even the first line (the file-size limit): the same, before anything starts
    full = engines(
        config, mqtt_broker.url, log=tmp_path / "s.jsonl", preexec_fn=file_size_limit(10)
    )
    assert full.proc.wait(60) == 2
    full.kill()
    assert "cannot write to session log" in full.output and "looking for" not in full.output


# --------------------------------------------------------------------------- LSL senders

HR_BPM = 72.0  # the PPG a Sender pushes: a 1.2 Hz pulse


class Sender:
    """fMRI (TR 1 s), PPG and respiration as a live setup would push them, sped up ``SPEED``
    times, from this process's own pylsl outlets with explicit timestamps, so a test can change
    what a real sender would: restart an outlet with other settings, jump its clock, repeat or
    overlap chunks. Pushes in 20 ms wall ticks on a thread; ``faults`` hooks run each tick."""

    def __init__(self, tag: str, *, ppg_rate: float = 400.0) -> None:
        self.tag = tag
        self.ppg_rate = ppg_rate
        self.ppg_channels = 1
        self.outlets: dict[Role, pylsl.StreamOutlet] = {}
        self.clock_offset = 0.0  # added to every timestamp pushed (a sender's clock jump)
        self.repeat_volumes = False  # push every volume twice (same timestamp)
        self.overlap_ppg = False  # each PPG chunk also re-sends the previous one's samples
        self.volumes = 0
        self._rng = np.random.default_rng(0)
        for role, channels, rate in (
            (Role.FMRI, N_ROIS, 1.0),
            (Role.PPG, 1, ppg_rate),
            (Role.RESP, 1, 50.0),
        ):
            self.open_outlet(role, channels, rate)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0
        self._next = {Role.FMRI: 0, Role.PPG: 0, Role.RESP: 0}  # next sample index per role
        self._prev_ppg: tuple[np.ndarray, np.ndarray] | None = None

    def open_outlet(self, role: Role, channels: int, rate: float) -> None:
        name, type_, source_id = stream_identity(role, self.tag)
        info = pylsl.StreamInfo(name, type_, channels, rate * SPEED, pylsl.cf_float32, source_id)
        self.outlets[role] = pylsl.StreamOutlet(info)

    def restart_ppg(self, *, rate: float | None = None, channels: int | None = None) -> None:
        """The PPG sender restarts (same name and source_id) with another rate or channel
        count; its sample clock starts again at the current session time."""
        del self.outlets[Role.PPG]
        time.sleep(0.5)
        self.ppg_rate = rate or self.ppg_rate
        self.ppg_channels = channels or self.ppg_channels
        self.open_outlet(Role.PPG, self.ppg_channels, self.ppg_rate)
        self._next[Role.PPG] = int(np.ceil(self.session_now() * self.ppg_rate))
        self._prev_ppg = None

    def session_now(self) -> float:
        return (pylsl.local_clock() - self.t0) * SPEED

    def start(self) -> None:
        self.t0 = pylsl.local_clock() + 0.2
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def lsl_time(self, session_t: np.ndarray | float) -> Any:
        return self.t0 + np.asarray(session_t) / SPEED + self.clock_offset

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.session_now()
            if now >= 0:
                self._push_fmri(now)
                self._push_ppg(now)
                self._push_resp(now)
            time.sleep(0.02)

    def _push_fmri(self, now: float) -> None:
        while self._next[Role.FMRI] <= now:
            k = self._next[Role.FMRI]
            volume = self._rng.standard_normal(N_ROIS).astype(np.float32)
            stamp = float(self.lsl_time(k))
            self.outlets[Role.FMRI].push_sample(volume.tolist(), stamp)
            if self.repeat_volumes:
                self.outlets[Role.FMRI].push_sample(volume.tolist(), stamp)
            self._next[Role.FMRI] += 1
            self.volumes += 1

    def _push_ppg(self, now: float) -> None:
        outlet = self.outlets.get(Role.PPG)
        start, stop = self._next[Role.PPG], int(now * self.ppg_rate)
        if stop <= start or outlet is None:  # None: restarting
            return
        t = np.arange(start, stop) / self.ppg_rate
        wave = np.sin(2 * np.pi * HR_BPM / 60.0 * t) + 0.05 * self._rng.standard_normal(t.size)
        data = np.repeat(wave[:, None], self.ppg_channels, axis=1).astype(np.float32)
        stamps = self.lsl_time(t)
        if self.overlap_ppg and self._prev_ppg is not None:
            data = np.concatenate([self._prev_ppg[0], data])
            stamps = np.concatenate([self._prev_ppg[1], stamps])
        self._prev_ppg = (data[-t.size :], stamps[-t.size :])
        outlet.push_chunk(data, stamps.tolist())
        self._next[Role.PPG] = stop

    def _push_resp(self, now: float) -> None:
        start, stop = self._next[Role.RESP], int(now * 50.0)
        if stop <= start:
            return
        t = np.arange(start, stop) / 50.0
        data = np.sin(2 * np.pi * 0.25 * t).astype(np.float32)[:, None]
        self.outlets[Role.RESP].push_chunk(data, self.lsl_time(t).tolist())
        self._next[Role.RESP] = stop


@pytest.fixture
def senders() -> Iterator[Callable[[str], Sender]]:
    made: list[Sender] = []

    def make(tag: str) -> Sender:
        sender = Sender(tag)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        sender.stop()


def start_on(sender: Sender, engine: EngineProcess) -> None:
    """Start pushing once the engine's inlets are connected."""
    for role in ROLES:
        assert sender.outlets[role].wait_for_consumers(60.0), engine.output
    sender.start()


def assert_no_wrong_heart_rate(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every heart rate published as valid is the sender's (within 10 %); returns them."""
    valid = [p for p in predictions if p["heart_rate_valid"]]
    wrong = [p["heart_rate"] for p in valid if abs(p["heart_rate"] - HR_BPM) > 0.1 * HR_BPM]
    assert not wrong, f"heart rates published as valid but wrong: {wrong[:10]}"
    return valid


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", [{"rate": 500.0}, {"channels": 2}], ids=["other-rate", "other-channel-count"]
)
def test_sender_restarting_with_other_settings_is_detected_and_never_misread(
    change: dict[str, float],
    mqtt_broker: Any,
    mqtt_collector: Any,
    engines: Any,
    senders: Any,
    tmp_path: Path,
) -> None:
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, mqtt_broker, session_id)
    sender = senders(tag)
    log = tmp_path / "session.jsonl"
    engine = engines(
        engine_config(tmp_path / "run.toml", session_id, tag), mqtt_broker.url, log=log
    )
    start_on(sender, engine)
    # the heart rate is valid once its 15 s window is full (1.5 s at x10)
    assert sub.wait_for(lambda _: any(p["heart_rate_valid"] for p in sub.json("prediction")), 30)
    before = len(sub.json("prediction"))
    sender.restart_ppg(**change)  # type: ignore[arg-type]
    assert sub.wait_for(lambda _: len(sub.json("prediction")) >= before + 60, 30)
    engine.stop(signal.SIGINT)
    predictions = sub.unique_by_sequence()
    assert_no_wrong_heart_rate(predictions)
    reasons = " ".join(s["reason"] for s in sub.json("status"))
    if "rate" in change:  # reconnected by LSL unseen: the timestamps' spacing gives it away
        assert "samples spaced for 500 Hz, not the 400 Hz in use" in reasons, reasons
    else:  # the inlet refuses the stream
        assert "expected 1 channel, found 2" in reasons, reasons
    # either way the heart rate is missing from then on (refused, never computed at 400 Hz)
    assert not any(p["heart_rate_valid"] for p in predictions[before + 30 :])
    assert "heart_rate_missing" in predictions[-1]["flags"]
    after = predictions[before + 30 :]
    assert after and all(p["category"] for p in after)  # predictions went on


@pytest.mark.slow
@pytest.mark.parametrize("jump", [3600.0, -3600.0], ids=["forward", "back"])
def test_sender_clock_jumping_an_hour_is_detected_and_never_published_as_good(
    jump: float,
    mqtt_broker: Any,
    mqtt_collector: Any,
    engines: Any,
    senders: Any,
    tmp_path: Path,
) -> None:
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, mqtt_broker, session_id)
    sender = senders(tag)
    log = tmp_path / "session.jsonl"
    engine = engines(
        engine_config(tmp_path / "run.toml", session_id, tag), mqtt_broker.url, log=log
    )
    start_on(sender, engine)
    assert sub.wait_for(lambda _: any(p["heart_rate_valid"] for p in sub.json("prediction")), 30)
    before = len(sub.unique_by_sequence())
    jumped_at = pylsl.local_clock()
    sender.clock_offset = jump  # every stream of this sender: one machine's clock
    time.sleep(3.0)  # 30 s of session time
    engine.stop(signal.SIGINT)
    predictions = sub.unique_by_sequence()
    assert_no_wrong_heart_rate(predictions)
    stamps = [p["volume_timestamp"] for p in predictions]
    assert len(set(stamps)) == len(stamps), "a volume was predicted twice"
    assert max(stamps) < jumped_at + 5.0, "a volume stamped by the jumped clock was predicted"
    assert len(predictions) <= before + 5  # volumes in flight at the jump, nothing after
    reasons = " ".join(s["reason"] for s in sub.json("status"))
    if jump > 0:
        assert "s ahead of this machine's clock (the sender's clock jumped?)" in reasons, reasons
    else:  # liblsl's monotonize repeats the last timestamp: seen as volumes not after it
        assert "not after the previous one" in reasons, reasons
    assert any(s["state"] == "paused" for s in sub.json("status")[-3:])
    rejected = int(re.search(r"(\d+) chunks rejected", summary_of(engine)).group(1))  # type: ignore[union-attr]
    assert rejected >= 20


@pytest.mark.slow
def test_duplicated_and_overlapping_chunks_are_detected_and_never_counted_twice(
    mqtt_broker: Any, mqtt_collector: Any, engines: Any, senders: Any, tmp_path: Path
) -> None:
    tag, session_id = new_ids()
    sub = collector_for(mqtt_collector, mqtt_broker, session_id)
    sender = senders(tag)
    log = tmp_path / "session.jsonl"
    engine = engines(
        engine_config(tmp_path / "run.toml", session_id, tag), mqtt_broker.url, log=log
    )
    start_on(sender, engine)
    assert sub.wait_for(lambda _: any(p["heart_rate_valid"] for p in sub.json("prediction")), 30)
    before = len(sub.unique_by_sequence())
    volumes_before = sender.volumes
    sender.repeat_volumes = True
    sender.overlap_ppg = True
    time.sleep(3.0)
    volumes = sender.volumes - volumes_before
    engine.stop(signal.SIGINT)
    predictions = sub.unique_by_sequence()
    after = predictions[before:]
    assert len(after) >= 0.7 * volumes, "each volume sent twice should still be predicted once"
    stamps = [p["volume_timestamp"] for p in predictions]
    assert len(set(stamps)) == len(stamps), "a volume was predicted twice"
    assert_no_wrong_heart_rate(predictions)
    reasons = " ".join(s["reason"] for s in sub.json("status"))
    assert "a repeated volume or the sender's clock went back" in reasons, reasons
    assert "duplicated or overlapping chunks" in reasons, reasons


def test_resume_point_reads_the_last_sequence_of_the_session_from_the_end(tmp_path: Path) -> None:
    """The restart's bookkeeping on real log files: several runs and sessions in one file, a
    torn last line, a clean and an unclean end, a log longer than one read block."""
    from emorecog_stream.sinks.jsonl import JsonlLog, LogResume, resume_point
    from tests.plugins.mqtt_broker import sample_prediction

    path = tmp_path / "s.jsonl"
    assert resume_point(path, "A") is None  # no file yet
    log = JsonlLog(path, session="A")
    for i in range(400):  # > 64 KiB: the backwards read crosses blocks
        log.on_prediction(sample_prediction("A", i))
    log.close()
    assert resume_point(path, "A") == LogResume(399, True)
    other = JsonlLog(path, session="B")
    other.on_prediction(sample_prediction("B", 0))
    other._file.close()  # type: ignore[union-attr]  # B dies: no session_end
    with open(path, "ab") as f:
        f.write(b'{"kind":"prediction","session":"A","sequ')  # torn mid-write
    assert resume_point(path, "A") == LogResume(399, True)  # B's lines are not A's
    assert resume_point(path, "B") == LogResume(0, False)
    assert resume_point(path, "C") is None
    again = JsonlLog(path, session="A")  # appends on a fresh line after the torn one
    again.on_prediction(sample_prediction("A", 400))
    assert resume_point(path, "A") == LogResume(400, False)
    again.close()
    assert [r["sequence"] for r in read_log(path, "prediction") if r["session"] == "A"] == list(
        range(401)
    )
