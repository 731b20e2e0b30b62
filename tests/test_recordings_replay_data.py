"""Every shipped replay file loads and equals a fresh generation with the seed recorded in it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from emorecog_stream.recordings import load_sessions
from emorecog_stream.recordings.synth import GENERATOR, SynthConfig, generate_session
from emorecog_stream.recordings.xdf import XDF_SUFFIXES

REPLAY = Path(__file__).resolve().parent.parent / "replay_data"
FILES = sorted(p for p in REPLAY.iterdir() if p.suffix in XDF_SUFFIXES)


def test_replay_data_is_small_and_holds_the_test_participants():
    assert [p.stem for p in FILES] == ["P15", "P16"]
    total = sum(p.stat().st_size for p in REPLAY.rglob("*") if p.is_file())
    assert total < 30 * 2**20
    readme = (REPLAY / "README.md").read_text()
    assert "synthetic" in readme.lower()
    assert "emorecog-stream synth replay_data --participants P15,P16 --seed 2024" in readme
    # the checksums the README lists are those of the files
    for path in FILES:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert re.search(rf"{digest}\s+{path.name}", readme), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_replay_file_equals_fresh_generation(path):
    [loaded] = load_sessions(path)
    meta = loaded.metadata
    assert meta["generator"] == GENERATOR
    config = SynthConfig.from_dict(meta["synth_config"])
    assert config.seed == meta["seed"] == 2024
    index = int(loaded.participant[1:])
    fresh = generate_session(index, config)
    assert loaded.participant == fresh.participant and loaded.tr == fresh.tr
    for a, b in zip(loaded.streams, fresh.streams, strict=True):
        assert a.name == b.name and a.nominal_srate == b.nominal_srate
        # timestamps are exact arithmetic; the data may differ in the last float32 bit on a CPU
        # whose SIMD/BLAS kernels round differently from the one that wrote the file
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-5)
    assert loaded.markers == fresh.markers
    assert len(loaded.trials()) == config.n_trials
