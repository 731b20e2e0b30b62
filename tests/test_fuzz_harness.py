"""The fuzz harness catches what the bar forbids: a hang, an allocation beyond the budget, a
crash, an undocumented exception type and an error message that does not name the file."""

from __future__ import annotations

import pytest

from tests.fuzzing import Worker


@pytest.fixture(scope="module")
def worker():
    with Worker("selftest", hang_s=2.0) as w:
        yield w


@pytest.mark.parametrize(
    ("command", "status", "kind"),
    [
        (b"ok", "ok", ""),
        (b"named", "rejected", "ValueError"),
        (b"unnamed", "failure", "unnamed(ValueError)"),
        (b"keyerror", "failure", "KeyError"),
        (b"alloc", "failure", "alloc(MemoryError)"),
        (b"hang", "failure", "hang"),
        (b"crash", "failure", "crash(SIGSEGV)"),
    ],
)
def test_the_harness_tells_each_outcome(worker, command, status, kind) -> None:
    outcome = worker.run(command)
    assert (outcome.status, outcome.kind) == (status, kind), outcome.detail
    assert worker.run(b"ok").status == "ok"  # a fresh worker after a hang or a crash
