"""Session segmentation (TR indices, GRU resets) and the status the engine derives from arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from emorecog_stream.core.streams import Role
from emorecog_stream.engine.state import SessionTracker, StatusTracker


def test_tr_index_counts_volumes_and_a_long_gap_resets() -> None:
    tracker = SessionTracker(reset_gap_trs=3.0, tr=1.0)
    stamps = [10.0, 11.0, 12.0, 13.0, 16.5, 17.5]  # 3.5 s gap > 3 TRs
    admissions = [tracker.admit(t) for t in stamps]
    assert [a.tr_index for a in admissions] == [0, 1, 2, 3, 0, 1]
    assert [a.reset for a in admissions] == [False, False, False, False, True, False]
    assert admissions[4].gap_s == pytest.approx(3.5)
    assert tracker.resets == 1 and tracker.sessions == 2


def test_gap_of_exactly_the_limit_does_not_reset() -> None:
    tracker = SessionTracker(reset_gap_trs=3.0, tr=2.0)
    tracker.admit(0.0)
    assert not tracker.admit(6.0).reset  # 6 s = 3 TRs: not longer than the limit
    assert tracker.admit(12.01).reset


def test_tr_from_nominal_rate_then_from_intervals() -> None:
    tracker = SessionTracker(reset_gap_trs=2.0)
    assert tracker.tr is None
    tracker.admit(0.0)
    assert not tracker.admit(5.0).reset  # TR unknown: a gap cannot be judged yet
    for t in (7.0, 9.0, 11.0, 13.0):
        tracker.admit(t)
    assert tracker.tr == pytest.approx(2.0)  # median of intervals, robust to the first 5 s
    assert tracker.admit(17.5).reset  # 4.5 s > 2 TRs of 2 s
    tracker.set_nominal_tr(0.5)
    assert tracker.tr == 0.5
    configured = SessionTracker(reset_gap_trs=2.0, tr=1.5)
    configured.set_nominal_tr(0.5)
    assert configured.tr == 1.5  # the config wins over the stream's declaration


def test_status_starting_online_degraded_paused() -> None:
    st = StatusTracker([Role.PPG, Role.RESP], stall_timeout=2.0, fmri_stall_trs=2.5, started_at=0.0)
    assert st.status(0.5, tr=1.0).state == "starting"
    for role in (Role.FMRI, Role.PPG, Role.RESP):
        st.arrived(role, 1.0)
    assert st.status(1.5, tr=1.0).state == "online"
    st.arrived(Role.FMRI, 3.0)
    st.arrived(Role.RESP, 3.0)
    degraded = st.status(3.5, tr=1.0)  # PPG silent for 2.5 s > 2 s
    assert degraded.state == "degraded"
    assert degraded.missing == ("heart_rate",)
    assert "PPG stream stalled" in degraded.reason and "heart rate missing" in degraded.reason
    paused = st.status(6.0, tr=1.0)  # no volume for 3 s > 2.5 TRs
    assert paused.state == "paused"
    assert "fMRI stream stalled" in paused.reason and "predictions paused" in paused.reason
    st.arrived(Role.FMRI, 6.1)
    st.arrived(Role.PPG, 6.1)
    st.arrived(Role.RESP, 6.1)
    assert st.status(6.2, tr=1.0).state == "online"


def test_status_reason_is_stable_while_the_cause_lasts() -> None:
    st = StatusTracker([Role.PPG], stall_timeout=1.0, fmri_stall_trs=3.0, started_at=0.0)
    st.arrived(Role.FMRI, 0.0)
    st.arrived(Role.PPG, 0.0)
    st.arrived(Role.FMRI, 2.0)
    assert st.status(2.0, tr=1.0) == st.status(2.5, tr=1.0)  # no churn on the status topic


def test_absent_stream_and_next_change() -> None:
    st = StatusTracker([Role.PPG, Role.RESP], stall_timeout=2.0, fmri_stall_trs=2.0, started_at=0.0)
    st.mark_absent(Role.RESP, "respiration stream not found (type='Respiration')")
    st.arrived(Role.FMRI, 1.0)
    st.arrived(Role.PPG, 1.0)
    status = st.status(1.0, tr=1.0)
    assert status.state == "degraded" and status.missing == ("respiration_rate",)
    assert "not found" in status.reason
    # next change: PPG would stall at 3.0, fMRI would pause at 3.0
    assert st.next_change(1.0, tr=1.0) == pytest.approx(3.0)
    st.arrived(Role.PPG, 2.5)
    assert st.next_change(2.6, tr=1.0) == pytest.approx(3.0)  # the fMRI pause comes first
    st.arrived(Role.RESP, 2.6)  # a stream that comes back is no longer absent
    assert st.status(2.6, tr=1.0).state == "online"


def test_a_rate_is_missing_only_when_every_stream_feeding_it_stalled() -> None:
    st = StatusTracker(
        [Role.PPG, Role.RESP, Role.RATES], stall_timeout=1.0, fmri_stall_trs=5.0, started_at=0.0
    )
    for role in (Role.FMRI, Role.PPG, Role.RESP, Role.RATES):
        st.arrived(role, 0.0)
    for role in (Role.FMRI, Role.PPG, Role.RESP):
        st.arrived(role, 2.0)
    rates_down = st.status(2.0, tr=1.0)  # the rates stream stalled, the waveforms flow
    assert rates_down.state == "degraded" and rates_down.missing == ()
    assert rates_down.stalled == (Role.RATES,)
    st.arrived(Role.FMRI, 4.0)
    st.arrived(Role.RESP, 4.0)
    ppg_down_too = st.status(4.0, tr=1.0)
    assert ppg_down_too.missing == ("heart_rate",)
    assert "heart rate missing" in ppg_down_too.reason


def test_arrived_says_when_the_status_can_change() -> None:
    """The engine recomputes the status only when an arrival can change it: the role's first
    sample, a return from absence, a silence that counted as a stall. A stream that keeps
    delivering cannot (changes that come with time alone are the engine timer's)."""
    st = StatusTracker([Role.PPG], stall_timeout=2.0, fmri_stall_trs=2.5, started_at=0.0)
    assert st.arrived(Role.FMRI, 1.0, tr=1.0)  # first volume: starting -> online
    assert not st.arrived(Role.FMRI, 2.0, tr=1.0)
    assert st.arrived(Role.FMRI, 5.0, tr=1.0)  # 3 s > 2.5 TRs: it was paused
    assert st.arrived(Role.FMRI, 5.5)  # TR not known yet: any silence may have mattered
    assert st.arrived(Role.PPG, 5.5)  # first PPG sample
    assert not st.arrived(Role.PPG, 7.0)
    assert st.arrived(Role.PPG, 9.5)  # 2.5 s > the 2 s stall timeout
    st.mark_absent(Role.PPG, "PPG stream lost")
    assert st.arrived(Role.PPG, 9.6)  # back from absence
    assert not st.arrived(Role.PPG, 9.7)


def test_an_arrival_said_not_to_matter_leaves_the_status_as_it_was() -> None:
    """Random arrivals of three streams: whenever ``arrived`` says False, the status right
    after it equals the status right before it (so skipping the recomputation is exact)."""
    rng = np.random.default_rng(7)
    roles = [Role.FMRI, Role.PPG, Role.RESP]
    st = StatusTracker([Role.PPG, Role.RESP], stall_timeout=2.0, fmri_stall_trs=2.5,
                       started_at=0.0)  # fmt: skip
    now, skipped = 0.0, 0
    for _ in range(3000):
        now += float(rng.exponential(0.4))
        role = roles[int(rng.integers(3))]
        if rng.random() < 0.01:
            st.mark_absent(role, "gone")
        before = st.status(now, tr=1.0)
        if not st.arrived(role, now, tr=1.0):
            skipped += 1
            assert st.status(now, tr=1.0) == before
    assert skipped > 1000  # the usual case: most arrivals need no recomputation
