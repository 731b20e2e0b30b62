"""Session discovery: the pairing rule (pure) and the one process-wide resolver (real LSL)."""

from __future__ import annotations

import asyncio
import itertools
import time

import pylsl
import pytest

from emorecog_stream.adapters.lsl_discovery import (
    DiscoveryResult,
    StreamDirectory,
    StreamSighting,
    group_sessions,
    role_of,
    session_id_for,
    session_key,
)
from emorecog_stream.adapters.lsl_info import stream_identity
from emorecog_stream.core.streams import DEFAULT_LSL_TYPE, Role
from emorecog_stream.sinks.payload import validate_session_id

pytestmark = pytest.mark.timeout(60)

_uids = itertools.count()


def sighting(
    identity: str = "",
    type: str = "fMRI",
    *,
    name: str = "",
    host: str = "lab1",
) -> StreamSighting:
    """A stream seen on ``host`` with source id ``identity`` (name-only when ``identity`` is
    empty)."""
    return StreamSighting(
        name=name or identity,
        type=type,
        source_id=identity,
        hostname=host,
        uid=f"uid-{next(_uids)}",
        channel_count=1,
        nominal_srate=1.0,
    )


def ours(role: Role, tag: str = "", host: str = "lab1") -> StreamSighting:
    name, type_, source_id = stream_identity(role, tag)
    return sighting(source_id, type_, name=name, host=host)


def roles_of(result: DiscoveryResult, session_id: str) -> set[Role]:
    return set(result.sessions[session_id].streams)


# ---------------------------------------------------------------------------------------------
# role_of


def test_role_by_type_any_case():
    assert role_of(sighting("x", "fmri")) is Role.FMRI
    assert role_of(sighting("x", "RESPIRATION")) is Role.RESP
    assert role_of(sighting("x", "EEG")) is None


def test_role_by_configured_type_others_keep_default():
    types = {Role.PPG: "Pleth"}
    assert role_of(sighting("x", "pleth"), types) is Role.PPG
    assert role_of(sighting("x", "PPG"), types) is None
    assert role_of(sighting("x", "Markers"), types) is Role.MARKERS


def test_shared_type_decided_by_role_word():
    types = {Role.PPG: "Physio", Role.RESP: "Physio"}
    assert role_of(sighting("belt_resp", "Physio"), types) is Role.RESP
    assert role_of(sighting("finger_ppg", "Physio"), types) is Role.PPG
    assert role_of(sighting("device7", "Physio"), types) is None  # cannot tell: not guessed


# ---------------------------------------------------------------------------------------------
# session_key and session_id_for


@pytest.mark.parametrize("role", list(Role))
def test_our_tagged_streams_share_a_key(role):
    assert session_key(ours(role, "t-P15"), role) == "emorecog-stream-t-P15"


def test_our_untagged_streams_share_the_bare_key():
    keys = {session_key(ours(role), role) for role in Role}
    assert keys == {"emorecog-stream"}
    assert session_id_for("emorecog-stream") == "default"


def test_tag_containing_a_role_word_or_underscore_is_kept_as_written():
    assert session_key(ours(Role.RESP, "resp-pilot"), Role.RESP) == "emorecog-stream-resp-pilot"
    assert session_key(ours(Role.FMRI, "resp-pilot"), Role.FMRI) == "emorecog-stream-resp-pilot"
    assert session_key(ours(Role.PPG, "P15_2"), Role.PPG) == "emorecog-stream-P15_2"
    assert session_id_for("emorecog-stream-P15_2") == "P15_2"


def test_third_party_names():
    assert session_key(sighting("scanner1_fmri"), Role.FMRI) == "scanner1"
    assert session_key(sighting("scanner1_ppg", "PPG"), Role.PPG) == "scanner1"
    assert session_key(sighting("Lab.BOLD:roi scanner1"), Role.FMRI) == "Lab-scanner1"
    # only the stream's own role words go: a PPG stream keeps "fmri" in its key
    assert session_key(sighting("fmri_pulse", "PPG"), Role.PPG) == "fmri"


def test_name_only_streams_use_the_name():
    s = sighting("", name="EmoRecog-fMRI-t-P15")
    assert session_key(s, Role.FMRI) == "EmoRecog-t-P15"
    assert session_id_for(session_key(s, Role.FMRI)) == "t-P15"
    assert session_key(sighting("", "PPG", name="bed 3 pulse"), Role.PPG) == "bed-3"


def test_old_source_ids_without_stream_word():
    assert session_key(sighting("emorecog-fmri-P15-2"), Role.FMRI) == "emorecog-P15-2"
    assert session_id_for("emorecog-P15-2") == "P15-2"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("emorecog-stream-t-P15", "t-P15"),
        ("EmoRecog-t-P15", "t-P15"),
        ("emorecog", "default"),
        ("", "default"),
        ("scanner1", "scanner1"),
        ("emorecog-streamline", "streamline"),
        ("a+b#c/d e", "a-b-c-d-e"),
        ("+#/", "default"),
        ("x" * 300, "x" * 128),
    ],
)
def test_session_id_for(key, expected):
    assert session_id_for(key) == expected
    assert validate_session_id(session_id_for(key)) == expected


def test_session_id_with_host():
    assert session_id_for("emorecog-stream-P15", "mri-pc.local") == "P15-mri-pc.local"
    assert session_id_for("", "pc/2") == "default-pc-2"


# ---------------------------------------------------------------------------------------------
# group_sessions


def test_groups_our_tagged_sessions():
    streams = [ours(role, tag) for tag in ("A", "B") for role in Role]
    result = group_sessions(streams)
    assert sorted(result.sessions) == ["A", "B"]
    assert roles_of(result, "A") == set(Role)
    assert result.sessions["A"].streams[Role.PPG].source_id == "emorecog-stream-ppg-A"
    assert result.sessions["B"].key == "emorecog-stream-B"
    assert result.problems == []


def test_groups_third_party_pair_and_ignores_other_types():
    streams = [
        sighting("scanner1_fmri"),
        sighting("scanner1_ppg", "PPG"),
        sighting("scanner1_eeg", "EEG"),
    ]
    result = group_sessions(streams)
    assert list(result.sessions) == ["scanner1"]
    assert roles_of(result, "scanner1") == {Role.FMRI, Role.PPG}


def test_configured_types():
    streams = [sighting("s_fmri", "BOLD-ROI"), sighting("s_ppg", "Pleth")]
    result = group_sessions(streams, {Role.FMRI: "bold-roi", Role.PPG: "pleth"})
    assert roles_of(result, "s") == {Role.FMRI, Role.PPG}


def test_physiology_pairs_only_on_the_same_host():
    streams = [sighting("s1_fmri", host="mri"), sighting("s1_ppg", "PPG", host="biopac")]
    result = group_sessions(streams)
    assert roles_of(result, "s1") == {Role.FMRI}
    assert result.problems == []


def test_two_hosts_same_key_second_gets_host_suffix():
    streams = [ours(r, "P15", host=h) for h in ("mri2", "mri1") for r in (Role.FMRI, Role.PPG)]
    result = group_sessions(streams)
    assert sorted(result.sessions) == ["P15", "P15-mri2"]
    assert result.sessions["P15"].hostname == "mri1"  # order by host: repeatable
    assert roles_of(result, "P15-mri2") == {Role.FMRI, Role.PPG}


def test_assigned_ids_are_kept_and_reserved():
    earlier = {("mri2", "emorecog-stream-P15"): "P15"}
    streams = [ours(Role.FMRI, "P15", host=h) for h in ("mri1", "mri2")]
    result = group_sessions(streams, assigned=earlier)
    assert result.sessions["P15"].hostname == "mri2"
    assert result.sessions["P15-mri1"].hostname == "mri1"
    # mri2's session is gone for now: its id is not handed to anyone else meanwhile
    alone = group_sessions([ours(Role.FMRI, "P15", host="mri1")], assigned=earlier)
    assert list(alone.sessions) == ["P15-mri1"]


def test_assignments_round_trip_keeps_ids_when_more_sessions_appear():
    first = group_sessions([ours(Role.FMRI, "P15", host="mri2")])
    assert list(first.sessions) == ["P15"]
    later = group_sessions(
        [ours(Role.FMRI, "P15", host=h) for h in ("mri1", "mri2")],
        assigned=first.assignments(),
    )
    assert later.sessions["P15"].hostname == "mri2"
    assert later.sessions["P15-mri1"].hostname == "mri1"


def test_same_host_keys_with_one_id_stay_distinct():
    streams = [sighting("emorecog-stream-fmri-x"), sighting("x_fmri")]
    result = group_sessions(streams)
    assert sorted(result.sessions) == ["x", "x-lab1"]


def test_two_fmri_streams_one_key_form_no_session():
    a, b = sighting("scanner1_fmri", name="A"), sighting("scanner1_bold", name="B")
    result = group_sessions([a, b, sighting("scanner1_ppg", "PPG")])
    assert result.sessions == {}
    (problem,) = result.problems
    assert "2 fMRI streams" in problem and "'lab1'" in problem and "'scanner1'" in problem
    assert a.uid in problem and b.uid in problem and "name='A'" in problem


def test_two_streams_of_one_role_none_taken():
    ppg1, ppg2 = sighting("s_ppg", "PPG"), sighting("s_pulse", "PPG")
    result = group_sessions([sighting("s_fmri"), ppg1, ppg2, sighting("s_resp", "Respiration")])
    assert roles_of(result, "s") == {Role.FMRI, Role.RESP}
    (problem,) = result.problems
    assert "session 's'" in problem and "2 ppg streams" in problem
    assert ppg1.uid in problem and ppg2.uid in problem


def test_physiology_without_fmri_is_not_a_problem():
    result = group_sessions([ours(Role.PPG, "later"), ours(Role.RESP, "later")])
    assert result.sessions == {} and result.problems == []


def test_include_glob_selects_fmri_streams():
    streams = [ours(r, t) for t in ("run1-A", "run2-A") for r in (Role.FMRI, Role.PPG)]
    result = group_sessions(streams, include="*run1*")
    assert list(result.sessions) == ["run1-A"]
    assert roles_of(result, "run1-A") == {Role.FMRI, Role.PPG}
    by_name = group_sessions([sighting("", name="Scanner-fMRI")], include="Scanner-*")
    assert list(by_name.sessions) == ["Scanner"]


def test_same_stream_twice_counts_once():
    fmri = sighting("s_fmri")
    result = group_sessions([fmri, fmri, sighting("s_ppg", "PPG")])
    assert roles_of(result, "s") == {Role.FMRI, Role.PPG} and result.problems == []


def test_default_types_are_the_engine_defaults():
    assert {role_of(ours(r), DEFAULT_LSL_TYPE) for r in Role} == set(Role)


# ---------------------------------------------------------------------------------------------
# StreamDirectory on real outlets (loopback, unique tags)


def outlets_for(identities: list[tuple[str, str, str]]) -> list[pylsl.StreamOutlet]:
    return [
        pylsl.StreamOutlet(pylsl.StreamInfo(name, type_, 1, 1.0, pylsl.cf_float32, source_id))
        for name, type_, source_id in identities
    ]


async def wait_until(directory: StreamDirectory, check, timeout: float) -> DiscoveryResult:
    """Regroup on every change until ``check(result)`` holds (or fail after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        generation = directory.generation
        result = check.group(directory.snapshot())
        if check(result):
            return result
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; sessions {sorted(result.sessions)}"
        await directory.wait_change(generation, timeout=min(left, 1.0))


class Expect:
    """A check on a grouping of this test's streams (``include`` keeps other tests' out)."""

    def __init__(self, include: str, ids: set[str]) -> None:
        self.include, self.ids = include, ids

    def group(self, sightings: list[StreamSighting]) -> DiscoveryResult:
        return group_sessions(sightings, include=self.include)

    def __call__(self, result: DiscoveryResult) -> bool:
        return set(result.sessions) == self.ids


async def test_directory_finds_sessions_and_forgets_them(lsl_tag):
    roles = (Role.FMRI, Role.PPG, Role.RESP)
    a = outlets_for([stream_identity(r, f"{lsl_tag}-A") for r in roles])
    b = outlets_for([stream_identity(r, f"{lsl_tag}-B") for r in roles])
    lab = f"lab{lsl_tag}"
    third = outlets_for(
        [(f"{lab}_fmri", "fMRI", f"{lab}_fmri"), (f"{lab}_ppg", "PPG", f"{lab}_ppg")]
    )
    include = f"*{lsl_tag}*"
    forget_after = 1.0
    with StreamDirectory(forget_after=forget_after, period=0.1) as directory:
        everyone = {f"{lsl_tag}-A", f"{lsl_tag}-B", lab}
        result = await wait_until(directory, Expect(include, everyone), timeout=10.0)
        assert roles_of(result, f"{lsl_tag}-A") == set(roles)
        assert roles_of(result, f"{lsl_tag}-B") == set(roles)
        assert roles_of(result, lab) == {Role.FMRI, Role.PPG}
        assert result.problems == []
        fmri = result.sessions[f"{lsl_tag}-A"].streams[Role.FMRI]
        assert isinstance(fmri.info, pylsl.StreamInfo) and fmri.info.uid() == fmri.uid
        assert fmri.hostname and fmri.channel_count == 1

        before = directory.generation
        del a[:]  # destroys session A's outlets
        started = time.monotonic()
        remaining = {f"{lsl_tag}-B", lab}
        await wait_until(directory, Expect(include, remaining), timeout=forget_after + 3.0)
        assert time.monotonic() - started < forget_after + 3.0
        assert directory.generation > before
    assert directory.closed
    del b[:], third[:]


async def test_wait_change_times_out_and_close_wakes_waiters():
    directory = StreamDirectory(period=0.05)
    generation = directory.generation
    started = time.monotonic()
    assert await directory.wait_change(generation, timeout=0.2) == generation
    assert time.monotonic() - started >= 0.15
    waiter = asyncio.ensure_future(directory.wait_change(generation, timeout=10.0))
    await asyncio.sleep(0.05)
    directory.close()
    assert await asyncio.wait_for(waiter, 2.0) == generation


def test_directory_rejects_bad_timing():
    with pytest.raises(ValueError, match="must be > 0"):
        StreamDirectory(forget_after=0)
