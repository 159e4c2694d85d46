"""Tests of the pure device state model (orchestrator.states).

The arc table and the path search are checked against an independent model of
the kernel's ``vfio_mig_get_next_state`` (a next-hop table plus the loop that
skips states the device lacks), written here from the kernel's behaviour, not
from ``states.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterable, Mapping

import pytest

from orchestrator.errors import PlanError, TransitionError
from orchestrator.states import (
    P2P_STATES,
    RUNNING_STATES,
    SAVING_STATES,
    V1,
    Capabilities,
    DeviceState,
    MigrationFlags,
    Side,
    V1Step,
    arcs,
    from_v1,
    is_arc,
    path,
    supported_states,
    to_v1,
    transition_table_markdown,
    v1_is_valid,
    v1_steps,
)

S = DeviceState
F = MigrationFlags

BASE = F.STOP_COPY
P2P = F.STOP_COPY | F.P2P
PRE = F.STOP_COPY | F.PRE_COPY
FULL = F.STOP_COPY | F.P2P | F.PRE_COPY
CAPABILITY_SETS = (BASE, P2P, PRE, FULL)
CAPABILITY_IDS = ("base", "p2p", "pre_copy", "full")

ALL_PAIRS = list(itertools.product(S, S))


def _name(state: DeviceState) -> str:
    return state.name


each_flags = pytest.mark.parametrize("flags", CAPABILITY_SETS, ids=CAPABILITY_IDS)
each_pair = pytest.mark.parametrize(
    ("current", "target"), ALL_PAIRS, ids=[f"{a.name}->{b.name}" for a, b in ALL_PAIRS]
)


# --- an independent model of the kernel --------------------------------------
#
# For each state the device is in: the first hop the kernel takes towards each
# target, grouped by hop.  A hop to ERROR marks a blocked request.  Then, as
# the kernel does, hops into a state the device lacks are skipped by asking
# the table again from that state.  Unlike mainline at the time of writing,
# the skip stops at the blocked marker (mainline spins forever there on a
# pre-copy device asked for STOP_COPY -> PRE_COPY; a fix is on the list).

_KERNEL_FIRST_HOP_GROUPS: dict[DeviceState, dict[DeviceState, tuple[DeviceState, ...]]] = {
    S.STOP: {
        S.STOP: (S.STOP,),
        S.RUNNING_P2P: (S.RUNNING, S.PRE_COPY, S.PRE_COPY_P2P, S.RUNNING_P2P),
        S.STOP_COPY: (S.STOP_COPY,),
        S.RESUMING: (S.RESUMING,),
        S.ERROR: (S.ERROR,),
    },
    S.RUNNING: {
        S.RUNNING: (S.RUNNING,),
        S.PRE_COPY: (S.PRE_COPY,),
        S.RUNNING_P2P: (S.STOP, S.PRE_COPY_P2P, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P),
        S.ERROR: (S.ERROR,),
    },
    S.PRE_COPY: {
        S.RUNNING: (S.STOP, S.RUNNING, S.RESUMING, S.RUNNING_P2P),
        S.PRE_COPY: (S.PRE_COPY,),
        S.PRE_COPY_P2P: (S.PRE_COPY_P2P, S.STOP_COPY),
        S.ERROR: (S.ERROR,),
    },
    S.PRE_COPY_P2P: {
        S.RUNNING_P2P: (S.STOP, S.RUNNING, S.RESUMING, S.RUNNING_P2P),
        S.PRE_COPY: (S.PRE_COPY,),
        S.PRE_COPY_P2P: (S.PRE_COPY_P2P,),
        S.STOP_COPY: (S.STOP_COPY,),
        S.ERROR: (S.ERROR,),
    },
    S.STOP_COPY: {
        S.STOP: (S.STOP, S.RUNNING, S.RESUMING, S.RUNNING_P2P),
        S.STOP_COPY: (S.STOP_COPY,),
        S.ERROR: (S.PRE_COPY, S.PRE_COPY_P2P, S.ERROR),
    },
    S.RESUMING: {
        S.STOP: (
            S.STOP,
            S.RUNNING,
            S.PRE_COPY,
            S.PRE_COPY_P2P,
            S.STOP_COPY,
            S.RUNNING_P2P,
        ),
        S.RESUMING: (S.RESUMING,),
        S.ERROR: (S.ERROR,),
    },
    S.RUNNING_P2P: {
        S.STOP: (S.STOP, S.STOP_COPY, S.RESUMING),
        S.RUNNING: (S.RUNNING, S.PRE_COPY),
        S.PRE_COPY_P2P: (S.PRE_COPY_P2P,),
        S.RUNNING_P2P: (S.RUNNING_P2P,),
        S.ERROR: (S.ERROR,),
    },
    S.ERROR: {S.ERROR: tuple(S)},
}


def _invert(
    groups: Mapping[DeviceState, Mapping[DeviceState, tuple[DeviceState, ...]]],
) -> dict[tuple[DeviceState, DeviceState], DeviceState]:
    table: dict[tuple[DeviceState, DeviceState], DeviceState] = {}
    for here, by_hop in groups.items():
        for hop, targets in by_hop.items():
            for target in targets:
                assert (here, target) not in table, (here, target)
                table[here, target] = hop
    return table


KERNEL_FIRST_HOP = _invert(_KERNEL_FIRST_HOP_GROUPS)

# The flags the kernel requires for each state; ERROR needs every bit, so no
# device ever has it.
KERNEL_STATE_FLAGS: dict[DeviceState, int] = {
    S.STOP: F.STOP_COPY,
    S.RUNNING: F.STOP_COPY,
    S.STOP_COPY: F.STOP_COPY,
    S.RESUMING: F.STOP_COPY,
    S.RUNNING_P2P: F.STOP_COPY | F.P2P,
    S.PRE_COPY: F.STOP_COPY | F.PRE_COPY,
    S.PRE_COPY_P2P: F.STOP_COPY | F.P2P | F.PRE_COPY,
    S.ERROR: ~0,
}


def _kernel_has(flags: int, state: DeviceState) -> bool:
    need = KERNEL_STATE_FLAGS[state]
    return need & flags == need


def kernel_next_state(flags: int, current: DeviceState, target: DeviceState) -> DeviceState | None:
    """One call of the kernel's next-state function; None where it says -EINVAL."""
    if not (_kernel_has(flags, current) and _kernel_has(flags, target)):
        return None
    hop = KERNEL_FIRST_HOP[current, target]
    while hop is not S.ERROR and not _kernel_has(flags, hop):
        hop = KERNEL_FIRST_HOP[hop, target]
    return None if hop is S.ERROR else hop


def kernel_path(
    flags: int, current: DeviceState, target: DeviceState
) -> tuple[DeviceState, ...] | None:
    """What a driver walks for one SET_STATE request, as the kernel drives it."""
    walked: list[DeviceState] = []
    here = current
    while here is not target:
        hop = kernel_next_state(flags, here, target)
        if hop is None:
            return None
        walked.append(hop)
        here = hop
        assert len(walked) <= len(S), "kernel model loops"
    if not (_kernel_has(flags, current) and _kernel_has(flags, target)):
        return None
    return tuple(walked)


def test_kernel_model_table_is_complete() -> None:
    assert set(KERNEL_FIRST_HOP) == set(ALL_PAIRS)
    # The table is its own diagonal: asking for where you are stays there.
    assert all(KERNEL_FIRST_HOP[s, s] is s for s in S)


# --- plain graph helpers for the properties ------------------------------------


def _bfs_len(
    graph: Mapping[DeviceState, Iterable[DeviceState]],
    start: DeviceState,
    goal: DeviceState,
    may_pass: frozenset[DeviceState],
) -> int | None:
    dist = {start: 0}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        if here is goal:
            return dist[here]
        for there in graph.get(here, ()):
            if there not in dist and (there is goal or there in may_pass):
                dist[there] = dist[here] + 1
                queue.append(there)
    return None


def _all_shortest(
    graph: Mapping[DeviceState, Iterable[DeviceState]],
    start: DeviceState,
    goal: DeviceState,
    may_pass: frozenset[DeviceState],
) -> list[tuple[DeviceState, ...]]:
    best = _bfs_len(graph, start, goal, may_pass)
    if best is None:
        return []
    found: list[tuple[DeviceState, ...]] = []

    def walk(here: DeviceState, so_far: tuple[DeviceState, ...]) -> None:
        if len(so_far) == best:
            if here is goal:
                found.append(so_far)
            return
        for there in graph.get(here, ()):
            if there is goal or (there in may_pass and there not in so_far):
                walk(there, (*so_far, there))

    walk(start, ())
    return found


def _passable(
    flags: MigrationFlags, current: DeviceState, target: DeviceState
) -> frozenset[DeviceState]:
    """States a path may pass through: saving ones only while carrying the stream."""
    carries_stream = current in SAVING_STATES and target in SAVING_STATES
    return frozenset(s for s in supported_states(flags) if (s in SAVING_STATES) == carries_stream)


# --- constants and capabilities -------------------------------------------------


def test_state_values_are_the_kernel_enum() -> None:
    assert {s.name: s.value for s in S} == {
        "ERROR": 0,
        "STOP": 1,
        "RUNNING": 2,
        "STOP_COPY": 3,
        "RESUMING": 4,
        "RUNNING_P2P": 5,
        "PRE_COPY": 6,
        "PRE_COPY_P2P": 7,
    }
    assert [int(f) for f in (F.STOP_COPY, F.P2P, F.PRE_COPY)] == [1, 2, 4]
    assert [int(b) for b in (V1.RUNNING, V1.SAVING, V1.RESUMING, V1.NDMA)] == [1, 2, 4, 8]
    assert Side("source") is Side.SOURCE
    assert isinstance(Side.DESTINATION, str)
    assert Side.DESTINATION.value == "destination"


def test_state_groups() -> None:
    assert frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}) == SAVING_STATES
    assert frozenset({S.RUNNING, S.PRE_COPY, S.RUNNING_P2P, S.PRE_COPY_P2P}) == RUNNING_STATES
    assert frozenset({S.RUNNING_P2P, S.PRE_COPY_P2P}) == P2P_STATES


def test_capabilities_defaults_and_properties() -> None:
    caps = Capabilities()
    assert caps.flags == F.STOP_COPY
    assert not caps.p2p
    assert not caps.pre_copy
    assert not caps.stop_copy_size
    assert not caps.dirty_logging
    full = Capabilities(FULL, stop_copy_size=True, dirty_logging=True)
    assert full.p2p
    assert full.pre_copy
    assert Capabilities(P2P).p2p
    assert not Capabilities(P2P).pre_copy
    assert Capabilities(PRE).pre_copy
    assert not Capabilities(PRE).p2p


def test_capabilities_are_frozen_and_take_raw_flags() -> None:
    caps = Capabilities(F(7))
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.flags = BASE  # type: ignore[misc]
    raw = Capabilities(3)  # type: ignore[arg-type]  # what a backend reads from the kernel
    assert isinstance(raw.flags, MigrationFlags)
    assert raw.flags == P2P
    assert raw == Capabilities(P2P)


@pytest.mark.parametrize("flags", [F(0), F.P2P, F.PRE_COPY, F.P2P | F.PRE_COPY])
def test_capabilities_require_stop_copy(flags: MigrationFlags) -> None:
    with pytest.raises(ValueError, match="STOP_COPY"):
        Capabilities(flags)


# --- supported states and arcs --------------------------------------------------

CORE = frozenset({S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING})
EXPECTED_STATES = {
    BASE: CORE,
    P2P: CORE | {S.RUNNING_P2P},
    PRE: CORE | {S.PRE_COPY},
    FULL: CORE | {S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P},
}

_ALWAYS = {(S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP), (S.STOP, S.RESUMING), (S.RESUMING, S.STOP)}
_WITH_P2P = {
    (S.RUNNING, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.RUNNING),
    (S.RUNNING_P2P, S.STOP),
    (S.STOP, S.RUNNING_P2P),
}
_WITHOUT_P2P = {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
_PRE = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING)}
_PRE_WITHOUT_P2P = {(S.PRE_COPY, S.STOP_COPY)}
_PRE_WITH_P2P = {
    (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.STOP_COPY),
}
EXPECTED_ARCS = {
    BASE: _ALWAYS | _WITHOUT_P2P,
    P2P: _ALWAYS | _WITH_P2P,
    PRE: _ALWAYS | _WITHOUT_P2P | _PRE | _PRE_WITHOUT_P2P,
    FULL: _ALWAYS | _WITH_P2P | _PRE | _PRE_WITH_P2P,
}


def _arc_set(flags: MigrationFlags) -> set[tuple[DeviceState, DeviceState]]:
    return {(a, b) for a, ends in arcs(flags).items() for b in ends}


@each_flags
def test_supported_states(flags: MigrationFlags) -> None:
    assert supported_states(flags) == EXPECTED_STATES[flags]
    assert S.ERROR not in supported_states(flags)


@pytest.mark.parametrize("flags", [F(0), F.P2P, F.PRE_COPY | F.P2P])
def test_no_states_without_stop_copy(flags: MigrationFlags) -> None:
    assert supported_states(flags) == frozenset()
    assert dict(arcs(flags)) == {}


@each_flags
def test_arcs_are_the_documented_ones(flags: MigrationFlags) -> None:
    assert _arc_set(flags) == EXPECTED_ARCS[flags]
    assert set(arcs(flags)) == supported_states(flags)


@each_flags
def test_arcs_stay_inside_supported_states(flags: MigrationFlags) -> None:
    states = supported_states(flags)
    for a, b in _arc_set(flags):
        assert a in states
        assert b in states
        assert a is not b


@each_flags
def test_unknown_flag_bits_are_ignored(flags: MigrationFlags) -> None:
    noisy = F(int(flags) | 0x100)
    assert _arc_set(noisy) == _arc_set(flags)
    assert supported_states(noisy) == supported_states(flags)


@each_flags
@each_pair
def test_is_arc_matches_arcs(
    flags: MigrationFlags, current: DeviceState, target: DeviceState
) -> None:
    assert is_arc(flags, current, target) == ((current, target) in EXPECTED_ARCS[flags])


@each_flags
def test_kernel_single_hops_are_arcs(flags: MigrationFlags) -> None:
    # Every hop the kernel model would hand to a driver is an arc we list, and
    # every arc we list is a hop the kernel hands out for some request.
    hops = set()
    for current, target in ALL_PAIRS:
        nxt = kernel_next_state(flags, current, target)
        if nxt is not None and current is not target:
            hops.add((current, nxt))
    assert hops == _arc_set(flags)


# --- paths --------------------------------------------------------------------


@each_flags
@each_pair
def test_path_agrees_with_kernel(
    flags: MigrationFlags, current: DeviceState, target: DeviceState
) -> None:
    expected = kernel_path(flags, current, target)
    if expected is None:
        with pytest.raises(TransitionError) as info:
            path(flags, current, target)
        message = str(info.value)
        assert current.name in message
        assert target.name in message
        assert "STOP_COPY" in message  # the capability set is named
    else:
        assert path(flags, current, target) == expected


@each_flags
@each_pair
def test_path_properties(flags: MigrationFlags, current: DeviceState, target: DeviceState) -> None:
    states = supported_states(flags)
    if current not in states or target not in states:
        with pytest.raises(TransitionError):
            path(flags, current, target)
        return
    may_pass = _passable(flags, current, target)
    shortest = _all_shortest(arcs(flags), current, target, may_pass)
    if current is target:
        assert path(flags, current, target) == ()
        return
    if not shortest:
        with pytest.raises(TransitionError):
            path(flags, current, target)
        return
    got = path(flags, current, target)
    # Each step is an arc; the path ends at the target and visits no state twice.
    assert got[-1] is target
    for a, b in itertools.pairwise((current, *got)):
        assert is_arc(flags, a, b), (a, b)
    assert len(set(got)) == len(got)
    assert current not in got
    # Nothing in between opens, closes or re-opens a save stream unasked.
    for between in got[:-1]:
        if not (current in SAVING_STATES and target in SAVING_STATES):
            assert between not in SAVING_STATES, between
        else:
            assert between in SAVING_STATES, between
    # Minimal, and the only minimal admissible path (so no tie-break is hidden).
    assert shortest == [got]
    # The restriction never costs a step over the plain shortest path.
    assert len(got) == _bfs_len(arcs(flags), current, target, states)


# Where the plain shortest-path search has a choice, and the stream rule
# makes it: (flags, from, to).  The rule never makes a path longer.
TIES_THE_STREAM_RULE_BREAKS = {
    (PRE, S.PRE_COPY, S.STOP),
    (PRE, S.PRE_COPY, S.RESUMING),
    (PRE, S.RUNNING, S.STOP_COPY),
    (FULL, S.PRE_COPY, S.STOP),
    (FULL, S.PRE_COPY, S.RESUMING),
    (FULL, S.PRE_COPY, S.RUNNING_P2P),
    (FULL, S.PRE_COPY_P2P, S.STOP),
    (FULL, S.PRE_COPY_P2P, S.RESUMING),
    (FULL, S.PRE_COPY_P2P, S.RUNNING),
    (FULL, S.STOP, S.PRE_COPY),
    (FULL, S.RESUMING, S.PRE_COPY),
    (FULL, S.RUNNING, S.PRE_COPY_P2P),
    (FULL, S.RUNNING, S.STOP_COPY),
    (FULL, S.RUNNING_P2P, S.PRE_COPY),
    (FULL, S.RUNNING_P2P, S.STOP_COPY),
}


def test_stream_rule_only_breaks_ties() -> None:
    ties = set()
    for flags in CAPABILITY_SETS:
        states = supported_states(flags)
        for current, target in itertools.product(states, repeat=2):
            if current is target or (current is S.STOP_COPY and target in SAVING_STATES):
                continue
            free = _all_shortest(arcs(flags), current, target, states)
            assert len(path(flags, current, target)) == len(free[0])
            if len(free) > 1:
                ties.add((flags, current, target))
    assert ties == TIES_THE_STREAM_RULE_BREAKS


# The multi-step paths the kernel documents for a device with every optional
# feature, as literal data.
FULL_CAPABILITY_PATHS: tuple[tuple[DeviceState, ...], ...] = (
    (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY),
    (S.PRE_COPY, S.RUNNING, S.RUNNING_P2P),
    (S.PRE_COPY, S.RUNNING, S.RUNNING_P2P, S.STOP),
    (S.PRE_COPY, S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING),
    (S.PRE_COPY_P2P, S.RUNNING_P2P, S.RUNNING),
    (S.PRE_COPY_P2P, S.RUNNING_P2P, S.STOP),
    (S.PRE_COPY_P2P, S.RUNNING_P2P, S.STOP, S.RESUMING),
    (S.RESUMING, S.STOP, S.RUNNING_P2P),
    (S.RESUMING, S.STOP, S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.RESUMING, S.STOP, S.RUNNING_P2P, S.RUNNING),
    (S.RESUMING, S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY),
    (S.RESUMING, S.STOP, S.STOP_COPY),
    (S.RUNNING, S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.RUNNING, S.RUNNING_P2P, S.STOP),
    (S.RUNNING, S.RUNNING_P2P, S.STOP, S.RESUMING),
    (S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY),
    (S.RUNNING_P2P, S.RUNNING, S.PRE_COPY),
    (S.RUNNING_P2P, S.STOP, S.RESUMING),
    (S.RUNNING_P2P, S.STOP, S.STOP_COPY),
    (S.STOP, S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.STOP, S.RUNNING_P2P, S.RUNNING),
    (S.STOP, S.RUNNING_P2P, S.RUNNING, S.PRE_COPY),
    (S.STOP_COPY, S.STOP, S.RESUMING),
    (S.STOP_COPY, S.STOP, S.RUNNING_P2P),
    (S.STOP_COPY, S.STOP, S.RUNNING_P2P, S.RUNNING),
)


@pytest.mark.parametrize(
    "walk", FULL_CAPABILITY_PATHS, ids=["->".join(s.name for s in w) for w in FULL_CAPABILITY_PATHS]
)
def test_documented_full_capability_paths(walk: tuple[DeviceState, ...]) -> None:
    assert path(FULL, walk[0], walk[-1]) == walk[1:]


def test_documented_paths_are_all_the_multi_step_ones() -> None:
    multi = {
        (a, b)
        for a, b in itertools.product(supported_states(FULL), repeat=2)
        if a is not b
        and not (a is S.STOP_COPY and b in {S.PRE_COPY, S.PRE_COPY_P2P})
        and len(path(FULL, a, b)) > 1
    }
    assert multi == {(w[0], w[-1]) for w in FULL_CAPABILITY_PATHS}


BASE_PATHS: tuple[tuple[DeviceState, ...], ...] = (
    (S.RUNNING, S.STOP, S.STOP_COPY),
    (S.RUNNING, S.STOP, S.RESUMING),
    (S.RESUMING, S.STOP, S.RUNNING),
    (S.STOP_COPY, S.STOP, S.RUNNING),
)
PRE_PATHS: tuple[tuple[DeviceState, ...], ...] = (
    (S.PRE_COPY, S.STOP_COPY),
    (S.PRE_COPY, S.RUNNING, S.STOP),
    (S.STOP, S.RUNNING, S.PRE_COPY),
    (S.RUNNING, S.STOP, S.STOP_COPY),
)
P2P_PATHS: tuple[tuple[DeviceState, ...], ...] = (
    (S.RUNNING, S.RUNNING_P2P, S.STOP),
    (S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY),
    (S.STOP_COPY, S.STOP, S.RUNNING_P2P, S.RUNNING),
)


@pytest.mark.parametrize(
    ("flags", "walk"),
    [(BASE, w) for w in BASE_PATHS] + [(PRE, w) for w in PRE_PATHS] + [(P2P, w) for w in P2P_PATHS],
)
def test_partial_capability_paths(flags: MigrationFlags, walk: tuple[DeviceState, ...]) -> None:
    assert path(flags, walk[0], walk[-1]) == walk[1:]


@each_flags
@pytest.mark.parametrize("target", [S.PRE_COPY, S.PRE_COPY_P2P])
def test_stop_copy_never_reaches_pre_copy(flags: MigrationFlags, target: DeviceState) -> None:
    with pytest.raises(TransitionError) as info:
        path(flags, S.STOP_COPY, target)
    assert "STOP_COPY" in str(info.value)
    assert target.name in str(info.value)


@each_flags
def test_no_path_from_stop_copy_passes_a_pre_copy_state(flags: MigrationFlags) -> None:
    for target in supported_states(flags) - {S.PRE_COPY, S.PRE_COPY_P2P}:
        assert not {S.PRE_COPY, S.PRE_COPY_P2P} & set(path(flags, S.STOP_COPY, target))


@each_flags
@pytest.mark.parametrize("other", list(S), ids=_name)
def test_error_is_neither_target_nor_start(flags: MigrationFlags, other: DeviceState) -> None:
    with pytest.raises(TransitionError, match="cannot be requested") as into:
        path(flags, other, S.ERROR)
    assert other.name in str(into.value)
    if other is not S.ERROR:
        with pytest.raises(TransitionError, match="reset") as out_of:
            path(flags, S.ERROR, other)
        assert other.name in str(out_of.value)
    assert not is_arc(flags, other, S.ERROR)
    assert not is_arc(flags, S.ERROR, other)


def test_unsupported_state_is_named_with_the_capabilities() -> None:
    with pytest.raises(TransitionError) as info:
        path(BASE, S.RUNNING, S.RUNNING_P2P)
    message = str(info.value)
    assert "RUNNING_P2P is not a state" in message
    assert "{STOP_COPY}" in message
    with pytest.raises(TransitionError, match=r"\{STOP_COPY, P2P\}: PRE_COPY is not a state"):
        path(P2P, S.PRE_COPY, S.RUNNING)
    with pytest.raises(TransitionError, match="PRE_COPY_P2P is not a state"):
        path(PRE, S.PRE_COPY_P2P, S.PRE_COPY_P2P)


def test_transition_error_is_a_plan_error_with_409() -> None:
    with pytest.raises(PlanError) as info:
        path(FULL, S.STOP_COPY, S.PRE_COPY)
    assert info.value.status_hint == 409


@each_flags
def test_path_accepts_raw_flags(flags: MigrationFlags) -> None:
    for current, target in itertools.product(supported_states(flags), repeat=2):
        expected = kernel_path(flags, current, target)
        if expected is not None:
            assert path(int(flags), current, target) == expected  # type: ignore[arg-type]


# --- the Markdown table ---------------------------------------------------------


@each_flags
def test_transition_table_markdown_lists_exactly_the_arcs(flags: MigrationFlags) -> None:
    text = transition_table_markdown(flags)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| from | to | implemented when |"
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]
    by_name = {state.name: state for state in S}
    listed = {(by_name[frm], by_name[to]) for frm, to, _why in cells}
    assert listed == _arc_set(flags)
    assert len(rows) - 1 == len(listed)  # each arc once
    for a, b in _arc_set(flags):
        assert f"| {a.name} | {b.name} |" in text


def test_transition_table_markdown_says_why() -> None:
    text = transition_table_markdown(FULL)
    assert "| STOP | STOP_COPY | always |" in text
    assert "| RUNNING | RUNNING_P2P | P2P |" in text
    assert "| PRE_COPY_P2P | STOP_COPY | P2P, PRE_COPY |" in text
    assert "| RUNNING | STOP | no P2P |" in transition_table_markdown(BASE)
    assert "| PRE_COPY | STOP_COPY | PRE_COPY, no P2P |" in transition_table_markdown(PRE)


# --- the v1 view -----------------------------------------------------------------

R, SV, RS, N = V1.RUNNING, V1.SAVING, V1.RESUMING, V1.NDMA

DESIGN_TABLE: tuple[tuple[V1, DeviceState], ...] = (
    (R, S.RUNNING),
    (SV | R, S.PRE_COPY),
    (N | R, S.RUNNING_P2P),
    (N | SV | R, S.PRE_COPY_P2P),
    (SV, S.STOP_COPY),
    (V1(0), S.STOP),
    (RS, S.RESUMING),
    (SV | RS, S.ERROR),
)
CANONICAL = frozenset(int(bits) for bits, _ in DESIGN_TABLE)
SUPERFLUOUS = frozenset({int(N), int(N | SV), int(N | RS)})
VALID = CANONICAL | SUPERFLUOUS


@pytest.mark.parametrize(("bits", "state"), DESIGN_TABLE, ids=[s.name for _, s in DESIGN_TABLE])
def test_v1_round_trip(bits: V1, state: DeviceState) -> None:
    assert to_v1(state) == bits
    assert isinstance(to_v1(state), V1)
    assert from_v1(bits) is state
    assert from_v1(int(bits)) is state
    assert from_v1(to_v1(state)) is state


@pytest.mark.parametrize("value", range(16))
def test_v1_validity_of_every_bitfield(value: int) -> None:
    assert v1_is_valid(value) == (value in VALID)
    assert v1_is_valid(V1(value)) == (value in VALID)


@pytest.mark.parametrize("value", range(16))
def test_from_v1_accepts_exactly_the_design_table(value: int) -> None:
    if value in CANONICAL:
        assert to_v1(from_v1(value)) == value
        return
    with pytest.raises(TransitionError) as info:
        from_v1(value)
    if value in SUPERFLUOUS:
        assert "superfluous" in str(info.value)
    else:
        assert "not a valid combination" in str(info.value)


@pytest.mark.parametrize("value", [-1, 16, 0x11, 1 << 31])
def test_reserved_v1_bits_are_invalid(value: int) -> None:
    assert not v1_is_valid(value)
    with pytest.raises(TransitionError):
        from_v1(value)
    with pytest.raises(TransitionError):
        v1_steps(value, 0)
    with pytest.raises(TransitionError):
        v1_steps(0, value)


def test_v1_rules_in_words() -> None:
    for value in range(16):
        saving, resuming, running = bool(value & SV), bool(value & RS), bool(value & R)
        if saving and resuming:
            assert v1_is_valid(value) == (value == SV | RS)
        elif resuming and running:
            assert not v1_is_valid(value)
        else:
            assert v1_is_valid(value)


PRIORITY = (
    "!SAVING",
    "NDMA",
    "!RUNNING",
    "SAVING|!RUNNING",
    "RESUMING",
    "!RESUMING",
    "RUNNING",
    "SAVING|RUNNING",
    "!NDMA",
)
ERROR_BITS = int(SV | RS)
STEP_PAIRS = [
    (a, b) for a, b in itertools.product(sorted(VALID), repeat=2) if ERROR_BITS not in {a, b}
]

# The seed's order ranks SAVING|!RUNNING above !RESUMING, so a write from a
# RESUMING value straight to a stopped SAVING value starts saving before the
# loaded state is committed and passes the bits reserved for ERROR.  Nothing
# in the order can avoid it; v2 walks RESUMING -> STOP -> STOP_COPY instead.
FORCED_ERROR_BITS = {
    (int(RS), int(SV)),
    (int(RS), int(N | SV)),
    (int(N | RS), int(SV)),
    (int(N | RS), int(N | SV)),
}


@pytest.mark.parametrize(("old", "new"), STEP_PAIRS, ids=[f"{a}->{b}" for a, b in STEP_PAIRS])
def test_v1_steps_properties(old: int, new: int) -> None:
    steps = v1_steps(old, new)
    if old == new:
        assert steps == ()
        return
    assert steps
    assert steps[-1].bits == new
    assert all(isinstance(step, V1Step) and isinstance(step.bits, V1) for step in steps)
    ranks = [PRIORITY.index(step.action) for step in steps]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)
    before = [old] + [int(step.bits) for step in steps[:-1]]
    for prior, step in zip(before, steps, strict=True):
        # Every event changes the bitfield, but the stop-copy capture, which
        # happens whenever RUNNING or SAVING change into a stopped saving state.
        assert int(step.bits) != prior or step.action == "SAVING|!RUNNING"
    captures = [step for step in steps if step.action == "SAVING|!RUNNING"]
    into_stop_copy = new & (SV | R) == SV and (old ^ new) & (SV | R) != 0
    assert len(captures) == (1 if into_stop_copy else 0)
    intermediates = [int(step.bits) for step in steps[:-1]]
    if (old, new) in FORCED_ERROR_BITS:
        # SAVING and RESUMING together: ERROR's bits, or (with NDMA) no valid value.
        assert [b for b in intermediates if b & SV and b & RS] != []
    else:
        assert all(b in VALID - {ERROR_BITS} for b in intermediates), intermediates


def test_forced_error_bits_are_exactly_the_resuming_to_stop_copy_writes() -> None:
    forced = {
        (old, new)
        for old, new in STEP_PAIRS
        if any(int(s.bits) not in VALID - {ERROR_BITS} for s in v1_steps(old, new)[:-1])
    }
    assert forced == FORCED_ERROR_BITS


def _walk(old: V1, new: V1) -> list[tuple[str, V1]]:
    return [(s.action, s.bits) for s in v1_steps(old, new)]


def test_v1_steps_examples() -> None:
    # The source's last steps: P2P grace, then stop-copy.
    assert _walk(R, N | R) == [("NDMA", N | R)]
    assert _walk(SV | R, N | SV | R) == [("NDMA", N | SV | R)]
    assert _walk(N | SV | R, SV) == [
        ("!RUNNING", N | SV),
        ("SAVING|!RUNNING", N | SV),  # the stop-copy capture, seed 001
        ("!NDMA", SV),
    ]
    assert _walk(N | R, V1(0)) == [("!RUNNING", N), ("!NDMA", V1(0))]
    # Pre-copy to stop-copy keeps the stream and captures the stop-copy state.
    assert _walk(SV | R, SV) == [("!RUNNING", SV), ("SAVING|!RUNNING", SV)]
    # Running straight to stop-copy stops, then saves (v2 goes through STOP).
    assert _walk(R, SV) == [("!RUNNING", V1(0)), ("SAVING|!RUNNING", SV)]
    # Closing the stream is its own first event, so a saving device bound for
    # RESUMING never shows SAVING|RESUMING.
    assert _walk(SV | R, RS) == [("!SAVING", R), ("!RUNNING", V1(0)), ("RESUMING", RS)]
    assert _walk(SV, V1(0)) == [("!SAVING", V1(0))]
    # The destination: load, stop, grace, run.
    assert _walk(V1(0), RS) == [("RESUMING", RS)]
    assert _walk(RS, N | R) == [("NDMA", N | RS), ("!RESUMING", N), ("RUNNING", N | R)]
    assert _walk(N | R, R) == [("!NDMA", R)]
    assert _walk(V1(0), SV | R) == [("RUNNING", R), ("SAVING|RUNNING", SV | R)]
    # The one forced pass through the ERROR bits.
    assert _walk(RS, SV) == [("SAVING|!RUNNING", SV | RS), ("!RESUMING", SV)]


@pytest.mark.parametrize("other", sorted(VALID - {ERROR_BITS}))
def test_v1_steps_error_handling(other: int) -> None:
    with pytest.raises(TransitionError, match="reset"):
        v1_steps(ERROR_BITS, other)
    with pytest.raises(TransitionError, match="never requested"):
        v1_steps(other, ERROR_BITS)


@pytest.mark.parametrize("bad", sorted(set(range(16)) - VALID))
def test_v1_steps_rejects_invalid_bitfields(bad: int) -> None:
    with pytest.raises(TransitionError, match="not valid"):
        v1_steps(bad, 0)
    with pytest.raises(TransitionError, match="not valid"):
        v1_steps(R, bad)
