"""Fuzzing harness for every reader of outside data (used by tests/test_fuzz_*.py and
benchmarks/bench_fuzz.py).

Why a separate worker process: the bar is "only the documented error types, no hang over 5 s,
no allocation driven by a size field beyond what the file can hold". A hang can only be stopped
from outside, a crash in a C library (HDF5, liblsl) must not take pytest down, and an allocation
bar needs an address-space limit (``RLIMIT_AS``) that would break the test process itself. So
each input goes to a long-lived worker that has already imported the reader; before each input
the worker lowers its own soft ``RLIMIT_AS`` to what it uses now plus a budget, and the parent
kills and restarts it when an input takes longer than the time limit.

A *target* is one reader: the bytes of one input, where the reader finds them (a file name the
reader dispatches on, or text), the calls made, and the exception types the reader documents.
An outcome is ``ok`` (read), ``rejected`` (a documented error whose message names the file) or a
failure: any other exception type, a documented error wrapping a ``MemoryError`` or
``RecursionError``, a message that does not name the file, a hang, a crash, or a broken
invariant (e.g. a stream rate that is not a finite number).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
FUZZ_FIXTURES = FIXTURES / "fuzz"
HANG_S = 5.0
"""The bar: no input may take longer than this."""
BASE_BUDGET = 256 * 2**20
"""Address space an input may add on top of what the worker already holds (plus 64x its size)."""


INPUT_NAMES = (
    "in.xdf", "in.h5", "in.keras", "in.pt", "P10_1.mat", ".npz", "config.toml", "password",
    "in.nii", "in.dcm",
)
"""File names the harness writes inputs as; an error message must name the file (or its path)."""


class Blob(bytes):
    """Input bytes whose repr is short: hypothesis prints a failing example with it."""

    def __repr__(self) -> str:
        import hashlib

        return f"Blob(<{len(self)} bytes, sha256 {hashlib.sha256(self).hexdigest()[:12]}>)"


class InvariantError(AssertionError):
    """A reader returned, but what it returned breaks a documented promise."""


# ------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Call:
    """One reader call on an input; ``allowed`` are the documented error types (dotted names)."""

    name: str
    allowed: tuple[str, ...]
    run: Callable[[Path, bytes], Any]
    names_file: bool = True  # the error message must name the input file


def _import(dotted: str) -> type[BaseException]:
    module, _, name = dotted.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _finite_positive_or_none(value: Any, what: str) -> None:
    import math

    if value is not None and not (isinstance(value, float) and math.isfinite(value) and value > 0):
        raise InvariantError(f"{what} is {value!r}; expected None or a finite number > 0")


# -- XDF


def _xdf_path(work: Path, data: bytes) -> Path:
    # a gzip stream is written as .xdfz (the readers dispatch on the suffix)
    path = work / ("in.xdfz" if data[:2] == b"\x1f\x8b" else "in.xdf")
    path.write_bytes(data)
    return path


def _xdf_session(work: Path, data: bytes) -> Any:
    from emorecog_stream.recordings import load_sessions

    sessions = load_sessions(_xdf_path(work, data))
    for s in sessions:
        _finite_positive_or_none(s.tr, "session TR")
    return sessions


def _xdf_lenient(work: Path, data: bytes) -> Any:
    from emorecog_stream.recordings.xdf import read_xdf_streams

    return read_xdf_streams(_xdf_path(work, data), strict=False)


# -- ICBHI


def _mat(work: Path, data: bytes) -> Any:
    from emorecog_stream.recordings.icbhi import read_mat_folder

    folder = work / "mat"
    folder.mkdir(exist_ok=True)
    (folder / "P10_1.mat").write_bytes(data)
    return read_mat_folder(folder)


def _npz_dir(work: Path, member: str, data: bytes) -> Path:
    import numpy as np

    folder = work / "Train" / "P01"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = {
        "fMRI_data.npz": rng.normal(size=(3, 246, 25)).astype(np.float32),
        "PPG_data.npz": rng.normal(size=(3, 1000)).astype(np.float32),
        "resp_data.npz": rng.normal(size=(3, 125)).astype(np.float32),
        "labels.npz": np.array([[-1, -2], [0, 0], [1, 3]], dtype=np.int64),
    }
    for name, array in good.items():
        if name == member:
            (folder / name).write_bytes(data)
        else:
            np.savez(folder / name, data=array)
    return folder


def _npz_fmri(work: Path, data: bytes) -> Any:
    from emorecog_stream.recordings.icbhi import read_participant_dir

    return read_participant_dir(_npz_dir(work, "fMRI_data.npz", data))


def _npz_labels(work: Path, data: bytes) -> Any:
    from emorecog_stream.recordings.icbhi import read_participant_dir

    return read_participant_dir(_npz_dir(work, "labels.npz", data))


# -- Keras and checkpoints


def _keras_name(data: bytes) -> str:
    if data[:2] == b"PK":
        return "in.keras"
    return "in.h5"


def _keras_file(work: Path, data: bytes) -> Any:
    from emorecog_stream.model.keras_v1_h5 import read_keras_v1_file

    path = work / _keras_name(data)
    path.write_bytes(data)
    return read_keras_v1_file(path)


def _keras_model(work: Path, data: bytes) -> Any:
    from emorecog_stream.model.keras_v1 import load_keras_v1_model

    path = work / _keras_name(data)
    path.write_bytes(data)
    return load_keras_v1_model(path)


def _checkpoint(work: Path, data: bytes) -> Any:
    from emorecog_stream.model.checkpoint import load_model

    path = work / "in.pt"
    path.write_bytes(data)
    return load_model(path)


def _checkpoint_keras(work: Path, data: bytes) -> Any:
    from emorecog_stream.model.checkpoint import load_model

    path = work / "in.pt"
    path.write_bytes(data)
    return load_model(f"keras-v1:{path}")


# -- configuration, MQTT


def _config(work: Path, data: bytes) -> Any:
    from emorecog_stream.config import load_config
    from emorecog_stream.engine.runner import mqtt_settings_for
    from emorecog_stream.sinks.mqtt import DEFAULT_URL

    path = work / "config.toml"
    path.write_bytes(data)
    config = load_config(path)
    return mqtt_settings_for(config, config.mqtt.url or DEFAULT_URL)


def _text(data: bytes) -> str:
    """Command-line text as Python sees it (undecodable bytes kept as surrogate escapes)."""
    return data.decode("utf-8", errors="surrogateescape")


def _mqtt_url(work: Path, data: bytes) -> Any:
    from emorecog_stream.sinks.mqtt import MqttSettings

    settings = MqttSettings.from_url(_text(data))
    if not 0 < settings.port < 65536 or not settings.host:
        raise InvariantError(f"accepted host {settings.host!r} port {settings.port}")
    return settings


def _mqtt_url_config(work: Path, data: bytes) -> Any:
    from emorecog_stream.config import apply_overrides, load_config
    from emorecog_stream.engine.runner import mqtt_settings_for

    config = apply_overrides(load_config(None), {"mqtt.url": _text(data)})
    return mqtt_settings_for(config, config.mqtt.url)


def _password_file(work: Path, data: bytes) -> Any:
    from emorecog_stream.sinks.mqtt import MqttSettings

    path = work / "password"
    path.write_bytes(data)
    settings = MqttSettings.from_url("mqtt://user@127.0.0.1:1883", password_file=str(path))
    if not settings.password:
        raise InvariantError("an empty password was accepted")
    return settings


# -- LSL stream metadata (the XML an outlet sends and liblsl parses into a StreamInfo)


def stream_info_from_xml(xml: bytes) -> Any:
    """A ``pylsl.StreamInfo`` parsed by liblsl from ``xml`` (what an inlet gets off the wire)."""
    import ctypes

    import pylsl
    from pylsl import lib as lsl_lib

    fn = lsl_lib.lib.lsl_streaminfo_from_xml
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_char_p]
    handle = fn(xml)
    if not handle:
        return None
    return pylsl.StreamInfo(handle=handle)


def check_stream_info(info: Any) -> Any:
    """Everything the engine does with a resolved stream's description, for every role."""
    import math

    from emorecog_stream.adapters.lsl_info import describe_info, parse_metadata
    from emorecog_stream.adapters.lsl_inlet import InletSpec, StreamMismatchError, check_info
    from emorecog_stream.core.streams import Role

    meta = parse_metadata(info)
    describe_info(info)
    _finite_positive_or_none(meta.tr, "desc/tr")
    for role in Role:
        for spec in (InletSpec.for_role(role), InletSpec.for_role(role, rate=0.0, channels=None)):
            try:
                check_info(spec, info)
            except StreamMismatchError:
                continue
            rate = info.nominal_srate()
            if not (math.isfinite(rate) and rate >= 0):
                raise InvariantError(f"{role.value}: accepted a nominal rate of {rate!r}")
            stall = spec.effective_stall_timeout(rate)
            if not stall > 0:
                raise InvariantError(f"{role.value}: stall timeout {stall!r} for rate {rate!r}")
    return meta


def _lsl_xml(work: Path, data: bytes) -> Any:
    info = stream_info_from_xml(data)
    return None if info is None else check_stream_info(info)


# -- markers


def check_markers(texts: list[str]) -> None:
    """A marker text anywhere: parsed (or not) without an exception, and trial building on it."""
    from emorecog_stream.recordings.session import Marker, parse_marker

    for text in texts:
        parsed = parse_marker(text)
        if parsed is not None and not isinstance(parsed, dict):
            raise InvariantError(f"parse_marker returned {type(parsed).__name__}")
    session = _marker_session([Marker(float(i), t) for i, t in enumerate(texts)])
    for trial in session.trials():
        if trial.offset < trial.onset:
            raise InvariantError("a trial ends before it starts")


def _marker_session(markers: list[Any]) -> Any:
    import numpy as np

    from emorecog_stream.core.streams import Role
    from emorecog_stream.recordings.session import Session, SignalStream

    fmri = SignalStream(Role.FMRI, "f", "fMRI", np.zeros((1, 246)), np.zeros(1), 1.0)
    return Session("P", 1.0, fmri, markers=markers)


def _markers(work: Path, data: bytes) -> Any:
    return check_markers(_text(data).split("\x1e"))


# -- the harness's own check: one input per kind of failure it must catch


def _selftest(work: Path, data: bytes) -> Any:
    import ctypes

    command = data.decode(errors="replace")
    if command == "hang":
        time.sleep(60)
    elif command == "alloc":
        return bytearray(2**36)  # 64 GiB: what a size field claiming too much asks for
    elif command == "crash":
        ctypes.string_at(0)  # a segfault, as a broken C library would cause
    elif command == "keyerror":
        raise KeyError("raw")
    elif command == "unnamed":
        raise ValueError("a documented error type that does not say which file")
    elif command == "named":
        raise ValueError(f"{work / 'in.bin'}: rejected")
    return None


# -- registry


@dataclass(frozen=True)
class Target:
    """One reader: its calls and how to make seed inputs."""

    name: str
    calls: tuple[Call, ...]
    seeds: Callable[[], list[tuple[str, bytes]]]
    warmup: Callable[[], None] | None = None


XDF_ERRORS = (
    "emorecog_stream.recordings.xdf.XdfError",
    "emorecog_stream.recordings.RecordingError",
)
ICBHI_ERRORS = ("emorecog_stream.recordings.icbhi.IcbhiError",)
KERAS_ERRORS = ("emorecog_stream.model.keras_v1_h5.KerasV1Error",)
CKPT_ERRORS = ("emorecog_stream.model.checkpoint.CheckpointError", *KERAS_ERRORS)
CONFIG_ERRORS = ("emorecog_stream.config.ConfigError", "emorecog_stream.engine.runner.RunError")
MQTT_ERRORS = ("emorecog_stream.sinks.mqtt.MqttConfigError",)
LSL_ERRORS = ("emorecog_stream.adapters.lsl_inlet.StreamMismatchError",)


def target_names() -> list[str]:
    """Every reader (the harness's own ``selftest`` target left out)."""
    return [name for name in _targets() if name != "selftest"]


def failures_of(
    worker: Worker, inputs: Iterable[bytes], target: str | None = None
) -> list[tuple[bytes, Outcome]]:
    """The inputs that broke the bar, with their outcomes (empty when all were fine)."""
    found = []
    for data in inputs:
        outcome = worker.run(data, target)
        if outcome.failed:
            found.append((data, outcome))
    return found


def report(found: list[tuple[bytes, Outcome]], limit: int = 3) -> str:
    """A readable summary of failures for an assertion message."""
    lines = [f"{len(found)} input(s) broke the bar:"]
    for data, outcome in found[:limit]:
        lines.append(f"--- {outcome.label()} ({len(data)} bytes, head {data[:32]!r})")
        lines.append(outcome.detail[-1500:])
    return "\n".join(lines)


def mutants(seeds: list[bytes], count: int, seed: int) -> Iterator[bytes]:
    """``count`` reproducible mutants of ``seeds`` (the same list on every run)."""
    rng = random.Random(seed)
    for _ in range(count):
        yield mutate(rng.choice(seeds), rng, seeds)


def get_target(name: str) -> Target:
    return _targets()[name]


def _targets() -> dict[str, Target]:
    from tests import fuzz_seeds as seeds

    targets = [
        Target(
            "xdf",
            (
                Call("load_sessions", XDF_ERRORS, _xdf_session),
                Call("read_xdf_streams(strict=False)", XDF_ERRORS, _xdf_lenient),
            ),
            seeds.xdf_seeds,
        ),
        Target("icbhi_mat", (Call("read_mat_folder", ICBHI_ERRORS, _mat),), seeds.mat_seeds),
        Target(
            "icbhi_npz",
            (
                Call("read_participant_dir(fMRI_data.npz)", ICBHI_ERRORS, _npz_fmri),
                Call("read_participant_dir(labels.npz)", ICBHI_ERRORS, _npz_labels),
            ),
            seeds.npz_seeds,
        ),
        Target(
            "keras",
            (
                Call("read_keras_v1_file", KERAS_ERRORS, _keras_file),
                Call("load_keras_v1_model", KERAS_ERRORS, _keras_model),
            ),
            seeds.keras_seeds,
        ),
        Target(
            "checkpoint",
            (
                Call("load_model", CKPT_ERRORS, _checkpoint),
                Call("load_model(keras-v1:)", CKPT_ERRORS, _checkpoint_keras),
            ),
            seeds.checkpoint_seeds,
        ),
        Target("config", (Call("load_config", CONFIG_ERRORS, _config),), seeds.config_seeds),
        Target(
            "mqtt_url",
            (
                Call("MqttSettings.from_url", MQTT_ERRORS, _mqtt_url, names_file=False),
                Call("mqtt_settings_for", CONFIG_ERRORS, _mqtt_url_config, names_file=False),
            ),
            seeds.url_seeds,
        ),
        Target(
            "mqtt_password_file",
            (Call("password_file", MQTT_ERRORS, _password_file),),
            seeds.password_seeds,
        ),
        Target(
            "lsl_xml",
            (Call("StreamInfo from XML", LSL_ERRORS, _lsl_xml, names_file=False),),
            seeds.lsl_xml_seeds,
        ),
        Target(
            "markers",
            (Call("parse_marker + trials", (), _markers, names_file=False),),
            seeds.marker_seeds,
        ),
    ]
    targets.append(
        Target(
            "selftest",
            (Call("selftest", ("builtins.ValueError",), _selftest),),
            lambda: [("ok", b"ok")],
        )
    )
    scanner = seeds.scanner_target(Call)
    if scanner is not None:
        targets.append(Target("scanner", scanner[0], scanner[1]))
    return {t.name: t for t in targets}


# ------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    """``status``: ok | rejected | failure. ``kind`` names a failure (an exception type, hang,
    crash:SIGSEGV, alloc, unnamed:<type>, invariant); ``detail`` is the message or traceback."""

    status: str
    kind: str = ""
    call: str = ""
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failure"

    def label(self) -> str:
        return f"{self.call}: {self.kind}" if self.call else self.kind


ALLOCATOR_MESSAGES = ("can't allocate memory", "Unable to allocate", "std::bad_alloc")
"""How allocators that do not raise MemoryError (torch's, numpy's, C++) say they failed."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def classify(call: Call, exc: BaseException, path_names: tuple[str, ...]) -> Outcome:
    """Whether ``exc`` is a documented rejection of the input or a failure of the reader."""
    allowed = tuple(_import(n) for n in call.allowed)
    chain = list(_chain(exc))
    detail = "".join(traceback.format_exception(exc))[-4000:]
    for inner in chain:
        if isinstance(inner, MemoryError) or any(m in str(inner) for m in ALLOCATOR_MESSAGES):
            return Outcome("failure", f"alloc({type(exc).__name__})", call.name, detail)
        if isinstance(inner, RecursionError):
            return Outcome("failure", f"recursion({type(exc).__name__})", call.name, detail)
    if isinstance(exc, InvariantError):
        return Outcome("failure", "invariant", call.name, str(exc))
    if not allowed or not isinstance(exc, allowed):
        return Outcome("failure", type(exc).__name__, call.name, detail)
    message = str(exc)
    if call.names_file and not any(n in message for n in path_names):
        return Outcome("failure", f"unnamed({type(exc).__name__})", call.name, message)
    return Outcome("rejected", type(exc).__name__, call.name, message[:300])


# ------------------------------------------------------------------------------ the worker


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_input(target: Target, data: bytes, work: Path, limit_memory: bool = True) -> Outcome:
    """Run every call of ``target`` on ``data`` in this process; the first failure wins."""
    import resource

    start = time.perf_counter()
    result = Outcome("ok")
    for call in target.calls:
        for child in list(work.iterdir()):
            _remove(child)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if limit_memory:
            soft = _vm_size() + BASE_BUDGET + 64 * len(data)
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        try:
            call.run(work, data)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = classify(call, exc, (str(work), *INPUT_NAMES))
            if outcome.failed:
                result = outcome
                break
            if result.status == "ok":
                result = outcome
        finally:
            if limit_memory:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return Outcome(
        result.status, result.kind, result.call, result.detail, time.perf_counter() - start
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


def worker_main(target_name: str) -> None:
    """Serve one target: read one JSON line per input on stdin, answer one JSON line."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # readers that print must not break the protocol
    import logging
    import warnings

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    target = get_target(target_name)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target_name}-") as tmp:
        work = Path(tmp)
        for _, seed in target.seeds()[:1]:  # warm up imports and lazy thread pools
            run_input(target, seed, work, limit_memory=False)
        out.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            request = json.loads(line)
            data = base64.b64decode(request["data"])
            other = request.get("target")  # one worker may serve related targets
            outcome = run_input(get_target(other) if other else target, data, work)
            out.write(json.dumps(outcome.__dict__) + "\n")


class Worker:
    """A worker process for one target; restarted after a hang or a crash."""

    def __init__(self, target: str, hang_s: float = HANG_S, log: Path | None = None) -> None:
        self.target = target
        self.hang_s = hang_s
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        stderr = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import tests.fuzzing as f; f.worker_main({self.target!r})"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        line = self._readline(180.0)
        if line is None or not json.loads(line).get("ready"):
            self.close()
            raise RuntimeError(f"fuzz worker for {self.target} did not start")

    def _readline(self, timeout: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line or None

    def _at_eof(self) -> bool:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 0)
        return bool(ready) and not self.proc.stdout.peek(1)  # type: ignore[attr-defined]

    def run(self, data: bytes, target: str | None = None) -> Outcome:
        """Run one input (on ``target``, default the worker's own) and classify the result."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        fields = {"data": base64.b64encode(data).decode()}
        if target:
            fields["target"] = target
        request = json.dumps(fields) + "\n"
        started = time.perf_counter()
        try:
            self.proc.stdin.write(request.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(self.hang_s)
        took = time.perf_counter() - started
        if line is None:
            code = self.proc.poll()
            if code is None and self.proc.stdout is not None and self._at_eof():
                code = self.proc.wait(timeout=10)  # it closed its end: it is dying
            if code is None:
                self._kill()
                return Outcome("failure", "hang", "", f"no answer within {self.hang_s:g} s", took)
            self.proc = None
            self.restarts += 1
            name = signal.Signals(-code).name if code < 0 else f"exit {code}"
            return Outcome("failure", f"crash({name})", "", "the worker process died", took)
        fields = json.loads(line)
        return Outcome(**fields)

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()
            self.proc = None
            self.restarts += 1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        self.proc = None

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ mutation

INTERESTING_INTS = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    2**31 - 1,
    2**40,
    2**63 - 1,
    2**64 - 1,
)


def _put_int(buf: bytearray, rng: random.Random) -> None:
    width = rng.choice((1, 2, 4, 8))
    if len(buf) < width:
        return
    pos = rng.randrange(len(buf) - width + 1)
    value = rng.choice(INTERESTING_INTS) & ((1 << (8 * width)) - 1)
    buf[pos : pos + width] = value.to_bytes(width, rng.choice(("little", "big")))


def xdf_huge_length(data: bytes, rng: random.Random) -> bytes | None:
    """Set the length field of one XDF chunk to a huge value (kept in its own width, or widened
    to 8 bytes): the file then claims far more than it holds."""
    if data[:4] != b"XDF:":
        return None
    offsets: list[tuple[int, int]] = []
    pos = 4
    while pos < len(data) and len(offsets) < 10_000:
        width = data[pos]
        if width not in (1, 4, 8) or pos + 1 + width > len(data):
            break
        length = int.from_bytes(data[pos + 1 : pos + 1 + width], "little")
        offsets.append((pos, width))
        pos += 1 + width + length
    if not offsets:
        return None
    pos, width = rng.choice(offsets)
    out = bytearray(data)
    if width == 8 or rng.random() < 0.5:
        new_len = rng.choice((2**31, 2**32 - 1, 2**40, 2**62, 2**64 - 1))
        out[pos : pos + 1 + width] = b"\x08" + new_len.to_bytes(8, "little")
    else:
        out[pos + 1 : pos + 1 + width] = ((1 << (8 * width)) - 1).to_bytes(width, "little")
    return bytes(out)


def xdf_sample_count(data: bytes, rng: random.Random) -> bytes | None:
    """Set the sample count inside one Samples chunk to a huge value."""
    if data[:4] != b"XDF:":
        return None
    hits: list[int] = []
    pos = 4
    while pos < len(data) and len(hits) < 10_000:
        width = data[pos]
        if width not in (1, 4, 8) or pos + 1 + width + 2 > len(data):
            break
        length = int.from_bytes(data[pos + 1 : pos + 1 + width], "little")
        body = pos + 1 + width
        if int.from_bytes(data[body : body + 2], "little") == 3 and body + 7 <= len(data):
            hits.append(body + 6)  # tag(2) + stream id(4), then the count's own width byte
        pos = body + length
    if not hits:
        return None
    at = rng.choice(hits)
    out = bytearray(data)
    out[at : at + 1 + 8] = b"\x08" + rng.choice((2**32, 2**48, 2**63)).to_bytes(8, "little")
    return bytes(out)


def mutate(data: bytes, rng: random.Random, others: list[bytes] | None = None) -> bytes:
    """One to four byte-level mutations: bit flips, interesting integers, truncation, deleted,
    duplicated or spliced ranges, and XDF-aware huge length fields."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:  # bit flips
            for _ in range(rng.choice((1, 1, 2, 4, 8))):
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random bytes
            i = rng.randrange(n)
            buf[i : i + rng.randint(1, 8)] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            _put_int(buf, rng)
        elif op == 3 and n:  # truncate
            del buf[rng.randrange(n) :]
        elif op == 4 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i : i + rng.choice((1, 4, 16, 256, 4096))]
        elif op == 5 and n:  # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.choice((1, 8, 64, 512)))
            k = rng.randrange(n + 1)
            buf[k:k] = buf[i:j]
        elif op == 6 and others:  # splice with another seed
            other = rng.choice(others)
            if other:
                i, j = rng.randrange(len(other)), rng.randrange(n + 1)
                buf = buf[:j] + bytearray(other[i : i + rng.choice((16, 256, 4096, 65536))])
        elif op in (7, 8):  # format-aware: a size field claiming far more than the file holds
            fn = xdf_huge_length if op == 7 else xdf_sample_count
            out = fn(bytes(buf), rng)
            if out is not None:
                buf = bytearray(out)
            else:
                _put_int(buf, rng)
    return bytes(buf)


def gzip_bytes(data: bytes) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)
    return raw.getvalue()


def pack_chunk(
    tag: int, content: bytes, width: int | None = None, length: int | None = None
) -> bytes:
    """One XDF chunk; ``width``/``length`` override the length field (to make it lie)."""
    length = len(content) + 2 if length is None else length
    if width is None:
        width = 1 if length < 256 else 4 if length < 2**32 else 8
    code = {1: "<B", 4: "<I", 8: "<Q"}.get(width)
    field = struct.pack(code, length & ((1 << (8 * width)) - 1)) if code else b""
    return struct.pack("<B", width) + field + struct.pack("<H", tag & 0xFFFF) + content


# ------------------------------------------------------------------------------ atheris

ATHERIS_INSTRUMENT = (
    "emorecog_stream",
    "pyxdf",
    "scipy.io",
    "h5py",
    "nibabel",
    "pydicom",
    "numpy.lib",
    "json",
    "tomllib",
    "urllib",
    "zipfile",
    "gzip",
)
"""Python modules atheris instruments for coverage (C extensions cannot be)."""
NO_INSTRUMENT = (
    "emorecog_stream.core.buffers",
    "emorecog_stream.core.physio_kernel",
    "emorecog_stream.scanner.motion",
)
"""numba compiles these; atheris's inserted coverage calls would break the compilation."""


class FuzzFailure(Exception):
    """Raised to atheris for an input that broke the bar (it then saves the input and stops)."""


def atheris_main(target_name: str, argv: list[str]) -> None:
    """Coverage-guided fuzzing of one target in this process with atheris (libFuzzer's
    mutator); every input still goes through :func:`run_input`, with its memory budget.
    ``argv`` are libFuzzer's arguments (corpus folder, -max_total_time=, -timeout=, ...)."""
    import logging
    import warnings

    import atheris

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    target = get_target(target_name)
    work = Path(tempfile.mkdtemp(prefix=f"atheris-{target_name}-"))
    with atheris.instrument_imports(include=list(ATHERIS_INSTRUMENT), exclude=list(NO_INSTRUMENT)):
        for _, seed in target.seeds()[:1]:
            run_input(target, seed, work, limit_memory=False)

    def one_input(data: bytes) -> None:
        outcome = run_input(target, data, work)
        if outcome.failed:
            raise FuzzFailure(f"{outcome.label()}\n{outcome.detail[-2000:]}")

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # python tests/fuzzing.py worker|atheris TARGET [libFuzzer args]
    if sys.argv[1] == "atheris":
        atheris_main(sys.argv[2], sys.argv[3:])
    else:
        worker_main(sys.argv[2])
