"""LSL fixtures: unique stream tags, real outlets on loopback, small in-memory sessions.

Every stream a test creates carries a fresh tag in its name and source_id, so tests running in
parallel (other helpers, CI workers) never resolve each other's streams.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pylsl
import pytest

from emorecog_stream.core.streams import N_ROIS, Role
from emorecog_stream.recordings.session import Marker, Session, SignalStream, make_marker


def new_tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def lsl_tag() -> str:
    """A unique tag for the names and source_ids of this test's streams."""
    return new_tag()


def make_session(
    n_volumes: int = 10,
    tr: float = 1.0,
    ppg_rate: float | None = 400.0,
    resp_rate: float | None = 50.0,
    t0: float = 5000.0,
    participant: str = "P15",
    markers: bool = True,
    seed: int = 0,
) -> Session:
    """A small session with known content: volume k has ROI values ``k + channel/1000``."""
    rng = np.random.default_rng(seed)
    roi = (np.arange(n_volumes)[:, None] + np.arange(N_ROIS)[None, :] / 1000.0).astype(np.float32)
    fmri = SignalStream(Role.FMRI, "scanner", "fMRI", roi, t0 + np.arange(n_volumes) * tr, 1.0 / tr)
    ppg = resp = None
    duration = n_volumes * tr
    if ppg_rate:
        n = round(duration * ppg_rate)
        t = np.arange(n) / ppg_rate
        wave = np.sin(2 * np.pi * 1.2 * t) + 0.05 * rng.standard_normal(n)
        ppg = SignalStream(Role.PPG, "pulse", "PPG", wave, t0 + t, ppg_rate, ["pleth"], ["V"])
    if resp_rate:
        n = round(duration * resp_rate)
        t = np.arange(n) / resp_rate
        resp = SignalStream(
            Role.RESP, "belt", "Respiration", np.sin(2 * np.pi * 0.25 * t), t0 + t, resp_rate
        )
    marks = []
    if markers:
        marks = [
            Marker(t0 + 1.0 * tr, make_marker("trial_start", 0, 1, 3)),
            Marker(t0 + (n_volumes - 1) * tr, make_marker("trial_end", 0, 1, 3)),
        ]
    return Session(participant, tr, fmri, ppg, resp, markers=marks)


@pytest.fixture
def outlet_factory() -> Iterator[Callable[..., pylsl.StreamOutlet]]:
    """``make(name, type, channels, srate, source_id, fmt)`` -> a live outlet, destroyed after."""
    outlets: list[pylsl.StreamOutlet] = []

    def make(
        name: str,
        type: str = "PPG",
        channels: int = 1,
        srate: float = 400.0,
        source_id: str | None = None,
        fmt: int = pylsl.cf_float32,
    ) -> pylsl.StreamOutlet:
        info = pylsl.StreamInfo(
            name, type, channels, srate, fmt, name if source_id is None else source_id
        )
        outlet = pylsl.StreamOutlet(info)
        outlets.append(outlet)
        return outlet

    yield make
    outlets.clear()
