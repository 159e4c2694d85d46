"""The device migration state model: states, arcs, paths, and the v1 bit view.

What it is for
--------------

Every passthrough device is driven through the Linux migration state machine
(``enum vfio_device_mig_state`` in ``include/uapi/linux/vfio.h``).  This module
is the single place that knows which states a device has, which one-step arcs
it implements, and which sequence of arcs a multi-step request walks.  It is
pure: no I/O, no trio, no backend.  ``flow`` asks it what is legal; the runner
asks it how to get somewhere; backends ask it to translate between the v2
state names and the older v1 ``device_state`` bitfield (seeds 001 and 004).

Invariants it keeps
-------------------

* ``_ARCS_BY_CAPABILITY`` is the one source of truth for transitions.  Every
  arc is listed once, under the capability condition that makes a driver
  implement it; ``arcs()``, ``is_arc()``, ``path()`` and
  ``transition_table_markdown()`` are all derived from it.
* ``ERROR`` is never a target and never a start: a device falls into it when
  an arc fails, and only a device reset takes it out (back to ``RUNNING``),
  which is not an arc.
* A state the device's capability flags do not support is never named as an
  endpoint and never appears inside a path.
* A path never opens or closes the device's data stream unless asked to.  The
  saving states (``SAVING_STATES``) are the ones with an open save stream.  A
  path whose two ends are not both saving never passes *through* a saving
  state; a path from one saving state to another carries the open stream
  along, so every state it passes through is saving.  This is why
  ``STOP_COPY`` can never go back to ``PRE_COPY``/``PRE_COPY_P2P``: the final
  stop-copy data cannot be un-sent, and the only way round (through ``STOP``)
  would close the stream and start a new one.
* ``path()`` returns exactly the arcs the kernel's ``vfio_mig_get_next_state``
  walks, for every capability set (the tests check this against an
  independent model of the kernel's next-hop table and skip loop).
* In the v1 view exactly 8 bitfields name a v2 state (``to_v1``/``from_v1``
  are inverse bijections on them); 3 more are valid in the uAPI but
  superfluous (NDMA without RUNNING) and only appear as intermediate steps.

Theory of operation
-------------------

A device advertises ``MigrationFlags``.  ``STOP_COPY`` is mandatory and gives
the core states ``STOP``, ``RUNNING``, ``STOP_COPY`` and ``RESUMING``; ``P2P``
adds ``RUNNING_P2P``; ``PRE_COPY`` adds ``PRE_COPY``; both together add
``PRE_COPY_P2P``.  The arcs a driver must implement change with the flags:
with ``P2P`` the device never goes between ``RUNNING`` and ``STOP`` directly
but through the quiescent ``RUNNING_P2P``, so the orchestrator can hold every
device of a VM at that barrier before any of them stops or starts.

A request from ``current`` to ``target`` is a breadth-first search over the
device's arcs, restricted as the stream invariant above says.  The
restriction never makes a path longer than the plain shortest one: it only
chooses among equally short paths (``RUNNING -> STOP_COPY`` goes through
``STOP``, not through ``PRE_COPY``) and refuses ``STOP_COPY -> PRE_COPY*``.
With it, the shortest path is unique for every capability set, so no
tie-break is hidden in search order and the result is the kernel's (the
tests assert both).  Paths are computed once per capability set and cached.

The runner should walk a multi-step path one arc at a time (or at least
validate the request with ``path()`` first): on some kernels a request for
``STOP_COPY -> PRE_COPY`` on a pre-copy-capable device never returns, because
the kernel's skip loop does not stop at its own "blocked" marker.

The v1 view (seed 004) is a bitfield: ``RUNNING``, ``SAVING``, ``RESUMING``,
``NDMA``.  When one write changes several bits, the driver processes the
changes as events in the priority order of seed 001: ``NDMA``, ``!RUNNING``,
``SAVING|!RUNNING``, ``RESUMING``, ``!RESUMING``, ``RUNNING``,
``SAVING|RUNNING``, ``!NDMA``.  ``v1_steps()`` spells that out; see its
docstring for how the list is read where it is silent.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Final, Literal

from orchestrator.errors import TransitionError

__all__ = [
    "P2P_STATES",
    "RUNNING_STATES",
    "SAVING_STATES",
    "V1",
    "Capabilities",
    "DeviceState",
    "MigrationFlags",
    "Side",
    "V1Action",
    "V1Step",
    "arcs",
    "from_v1",
    "is_arc",
    "path",
    "supported_states",
    "to_v1",
    "transition_table_markdown",
    "v1_is_valid",
    "v1_steps",
]


class Side(enum.StrEnum):
    """Which end of a migration a device is (a ``str``, for JSON and labels)."""

    SOURCE = "source"
    DESTINATION = "destination"


class DeviceState(enum.IntEnum):
    """The v2 migration states; values are the kernel's ``vfio_device_mig_state``.

    An IntEnum, as the uAPI's is an integer: it also hashes in C, which
    matters because every arc of a 256-device switchover looks states up in
    sets several times.
    """

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class V1(enum.IntFlag):
    """The v1 ``device_state`` bitfield (seed 004)."""

    RUNNING = 1
    SAVING = 2
    RESUMING = 4
    NDMA = 8


class MigrationFlags(enum.IntFlag):
    """``VFIO_MIGRATION_*`` capability flags of ``VFIO_DEVICE_FEATURE_MIGRATION``."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


@dataclass(frozen=True)
class Capabilities:
    """What one device can do for migration.

    ``stop_copy_size`` is ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``;
    ``dirty_logging`` is device DMA dirty logging
    (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``).  Pre-copy size information
    (``VFIO_MIG_GET_PRECOPY_INFO``) comes with the ``PRE_COPY`` flag in v2, so it
    has no field of its own.  ``precopy_reinit``: the device opted in to the
    second version of that information, by which it may report new initial
    data mid pre-copy (false: not available, its initial data only shrinks).
    """

    flags: MigrationFlags = MigrationFlags.STOP_COPY
    stop_copy_size: bool = False
    dirty_logging: bool = False
    precopy_reinit: bool = False

    def __post_init__(self) -> None:
        # Backends read the flags as a raw u64; accept that and keep the enum.
        object.__setattr__(self, "flags", MigrationFlags(self.flags))
        if MigrationFlags.STOP_COPY not in self.flags:
            raise ValueError(
                f"migration flags {_describe_flags(self.flags)} lack STOP_COPY, "
                "which the VFIO migration uAPI makes mandatory"
            )

    @property
    def p2p(self) -> bool:
        """The device has the quiescent P2P states (v1: NDMA)."""
        return MigrationFlags.P2P in self.flags

    @property
    def pre_copy(self) -> bool:
        """The device has the PRE_COPY states and reports pre-copy sizes."""
        return MigrationFlags.PRE_COPY in self.flags


_S = DeviceState
_F = MigrationFlags
_NO_FLAGS: Final = MigrationFlags(0)

SAVING_STATES: Final = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P, _S.STOP_COPY})
"""States with an open save stream (``data_fd`` readable)."""

RUNNING_STATES: Final = frozenset({_S.RUNNING, _S.PRE_COPY, _S.RUNNING_P2P, _S.PRE_COPY_P2P})
"""States in which the device executes (it may still be barred from P2P DMA)."""

P2P_STATES: Final = frozenset({_S.RUNNING_P2P, _S.PRE_COPY_P2P})
"""The quiescent grace states: running, but initiating no new P2P DMA."""


# Which flags a device must advertise to have each state.  ERROR is absent on
# purpose: it is never supported as an endpoint of a request.
_STATE_NEEDS: Final[Mapping[DeviceState, MigrationFlags]] = MappingProxyType(
    {
        _S.STOP: _F.STOP_COPY,
        _S.RUNNING: _F.STOP_COPY,
        _S.STOP_COPY: _F.STOP_COPY,
        _S.RESUMING: _F.STOP_COPY,
        _S.RUNNING_P2P: _F.STOP_COPY | _F.P2P,
        _S.PRE_COPY: _F.STOP_COPY | _F.PRE_COPY,
        _S.PRE_COPY_P2P: _F.STOP_COPY | _F.P2P | _F.PRE_COPY,
    }
)


@dataclass(frozen=True)
class _When:
    """A condition on a device's flags: all of ``has`` and none of ``lacks``."""

    has: MigrationFlags
    lacks: MigrationFlags = _NO_FLAGS

    def holds(self, flags: MigrationFlags) -> bool:
        return flags & self.has == self.has and not flags & self.lacks

    def describe(self) -> str:
        words = [f.name for f in _F if f in self.has and f is not _F.STOP_COPY and f.name]
        words += [f"no {f.name}" for f in _F if f in self.lacks and f.name]
        return ", ".join(words) or "always"


# The single transition table: each arc appears once, under the capability
# condition that obliges a driver to implement it.  The P2P split exists so
# that a P2P device always passes the RUNNING_P2P barrier between RUNNING and
# STOP, and PRE_COPY_P2P between PRE_COPY and STOP_COPY.
_ARCS_BY_CAPABILITY: Final[
    tuple[tuple[_When, tuple[tuple[DeviceState, DeviceState], ...]], ...]
] = (
    (
        _When(_F.STOP_COPY),
        (
            (_S.STOP, _S.STOP_COPY),
            (_S.STOP_COPY, _S.STOP),
            (_S.STOP, _S.RESUMING),
            (_S.RESUMING, _S.STOP),
        ),
    ),
    (
        _When(_F.STOP_COPY | _F.P2P),
        (
            (_S.RUNNING, _S.RUNNING_P2P),
            (_S.RUNNING_P2P, _S.RUNNING),
            (_S.RUNNING_P2P, _S.STOP),
            (_S.STOP, _S.RUNNING_P2P),
        ),
    ),
    (
        _When(_F.STOP_COPY, lacks=_F.P2P),
        (
            (_S.RUNNING, _S.STOP),
            (_S.STOP, _S.RUNNING),
        ),
    ),
    (
        _When(_F.STOP_COPY | _F.PRE_COPY),
        (
            (_S.RUNNING, _S.PRE_COPY),
            (_S.PRE_COPY, _S.RUNNING),
        ),
    ),
    (
        _When(_F.STOP_COPY | _F.PRE_COPY, lacks=_F.P2P),
        ((_S.PRE_COPY, _S.STOP_COPY),),
    ),
    (
        _When(_F.STOP_COPY | _F.PRE_COPY | _F.P2P),
        (
            (_S.PRE_COPY, _S.PRE_COPY_P2P),
            (_S.PRE_COPY_P2P, _S.PRE_COPY),
            (_S.PRE_COPY_P2P, _S.RUNNING_P2P),
            (_S.RUNNING_P2P, _S.PRE_COPY_P2P),
            (_S.PRE_COPY_P2P, _S.STOP_COPY),
        ),
    ),
)


def _describe_flags(flags: MigrationFlags | int) -> str:
    flags = MigrationFlags(flags)
    names = [f.name for f in _F if f in flags and f.name]
    return "{" + ", ".join(names) + "}"


@cache
def supported_states(flags: MigrationFlags) -> frozenset[DeviceState]:
    """The states a device with these flags has (ERROR is never included)."""
    return frozenset(s for s, needs in _STATE_NEEDS.items() if flags & needs == needs)


@cache
def arcs(flags: MigrationFlags) -> Mapping[DeviceState, frozenset[DeviceState]]:
    """The one-step arcs a device with these flags implements, by start state.

    Every supported state is a key.  Unknown flag bits are ignored, as the
    kernel ignores them.
    """
    flags = MigrationFlags(flags)
    out: dict[DeviceState, set[DeviceState]] = {s: set() for s in supported_states(flags)}
    for when, pairs in _ARCS_BY_CAPABILITY:
        if when.holds(flags):
            for start, end in pairs:
                out[start].add(end)
    return MappingProxyType({s: frozenset(ends) for s, ends in out.items()})


def is_arc(flags: MigrationFlags, current: DeviceState, target: DeviceState) -> bool:
    """Whether ``current -> target`` is one arc of a device with these flags."""
    return target in arcs(flags).get(current, frozenset())


@cache
def _routes(
    flags: MigrationFlags,
) -> Mapping[tuple[DeviceState, DeviceState], tuple[DeviceState, ...]]:
    """Every admissible shortest path of a capability set, keyed by its ends."""
    graph = arcs(flags)
    routes: dict[tuple[DeviceState, DeviceState], tuple[DeviceState, ...]] = {}
    for start in graph:
        for goal in graph:
            if start is goal:
                continue
            found = _search(graph, start, goal)
            if found is not None:
                routes[start, goal] = found
    return MappingProxyType(routes)


def _search(
    graph: Mapping[DeviceState, frozenset[DeviceState]], start: DeviceState, goal: DeviceState
) -> tuple[DeviceState, ...] | None:
    # A path carrying an open save stream from one saving state to another
    # must not close it on the way, and any other path must not open one: so
    # a state may be passed through only if it is saving exactly when the
    # path carries the stream.
    carries_stream = start in SAVING_STATES and goal in SAVING_STATES
    came_from: dict[DeviceState, DeviceState] = {start: start}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        # Sorted so the search is deterministic even if the table grows ties.
        for there in sorted(graph[here], key=lambda s: s.value):
            if there in came_from:
                continue
            if there is not goal and (there in SAVING_STATES) != carries_stream:
                continue
            came_from[there] = here
            if there is goal:
                steps = [goal]
                while came_from[steps[-1]] is not start:
                    steps.append(came_from[steps[-1]])
                return tuple(reversed(steps))
            queue.append(there)
    return None


def path(
    flags: MigrationFlags, current: DeviceState, target: DeviceState
) -> tuple[DeviceState, ...]:
    """The states a device visits after ``current`` on its way to ``target``.

    Cached: the downtime model and the budget's checks walk every device's
    paths inside the switchover window (a refusal is not cached: it is raised
    afresh).

    The last element is ``target``; ``()`` when ``current`` is ``target``.  Each
    consecutive pair (starting from ``current``) is an arc of ``arcs(flags)``.

    Raises ``TransitionError`` naming both states and the capability set when
    the target is ``ERROR``, the device is in ``ERROR``, either state is not
    supported by the flags, or no path keeps the data stream intact
    (``STOP_COPY`` to a pre-copy state).
    """
    return _path(flags, current, target)


@cache
def _path(
    flags: MigrationFlags, current: DeviceState, target: DeviceState
) -> tuple[DeviceState, ...]:
    flags = MigrationFlags(flags)

    def refuse(reason: str) -> TransitionError:
        return TransitionError(
            f"cannot go from {current.name} to {target.name} with migration flags "
            f"{_describe_flags(flags)}: {reason}"
        )

    if target is DeviceState.ERROR:
        raise refuse("ERROR is where a failed arc leaves a device; it cannot be requested")
    if current is DeviceState.ERROR:
        raise refuse("a device in ERROR must be reset; no state change leaves ERROR")
    supported = supported_states(flags)
    for state in (current, target):
        if state not in supported:
            raise refuse(f"{state.name} is not a state of a device with these flags")
    if current is target:
        return ()
    route = _routes(flags).get((current, target))
    if route is None:
        raise refuse(
            "every way there closes the save stream and opens a new one "
            "(stop-copy data cannot be followed by pre-copy data)"
        )
    return route


def transition_table_markdown(flags: MigrationFlags) -> str:
    """The arcs of a device with these flags as a Markdown table, for the docs."""
    flags = MigrationFlags(flags)
    lines = [
        f"Arcs of a device with migration flags {_describe_flags(flags)}:",
        "",
        "| from | to | implemented when |",
        "|------|----|------------------|",
    ]
    for when, pairs in _ARCS_BY_CAPABILITY:
        if when.holds(flags):
            lines += [f"| {a.name} | {b.name} | {when.describe()} |" for a, b in pairs]
    return "\n".join(lines) + "\n"


# --- the v1 bitfield view --------------------------------------------------

_V1_MASK: Final = int(V1.RUNNING | V1.SAVING | V1.RESUMING | V1.NDMA)

_V1_OF: Final[Mapping[DeviceState, V1]] = MappingProxyType(
    {
        _S.RUNNING: V1.RUNNING,
        _S.PRE_COPY: V1.SAVING | V1.RUNNING,
        _S.RUNNING_P2P: V1.NDMA | V1.RUNNING,
        _S.PRE_COPY_P2P: V1.NDMA | V1.SAVING | V1.RUNNING,
        _S.STOP_COPY: V1.SAVING,
        _S.STOP: V1(0),
        _S.RESUMING: V1.RESUMING,
        _S.ERROR: V1.SAVING | V1.RESUMING,
    }
)
_STATE_OF_V1: Final[Mapping[int, DeviceState]] = MappingProxyType(
    {int(bits): state for state, bits in _V1_OF.items()}
)


def _v1_name(bits: V1 | int) -> str:
    b = int(bits)
    names = [f.name for f in (V1.NDMA, V1.SAVING, V1.RESUMING, V1.RUNNING) if b & f and f.name]
    if b & ~_V1_MASK:
        names.append(hex(b & ~_V1_MASK))
    return "|".join(names) or "0"


def to_v1(state: DeviceState) -> V1:
    """The v1 bitfield of a v2 state (``ERROR`` is ``SAVING|RESUMING``)."""
    return _V1_OF[state]


def v1_is_valid(bits: V1 | int) -> bool:
    """Whether a v1 ``device_state`` value is one the uAPI allows (seed 004).

    SAVING and RESUMING together are invalid except as exactly ``SAVING|RESUMING``
    (ERROR); RESUMING with RUNNING is invalid; reserved bits 4..31 are invalid.
    NDMA without RUNNING *is* valid: seed 004 keeps every combination not
    excluded and calls NDMA "superfluous in combinations including !RUNNING",
    and seed 001's priority order (NDMA set first, cleared last) passes through
    such values whenever a P2P device stops.  Those three values (``NDMA``,
    ``NDMA|SAVING``, ``NDMA|RESUMING``) name no v2 state, so ``from_v1`` rejects
    them.
    """
    b = int(bits)
    if b < 0 or b & ~_V1_MASK:
        return False
    if b & V1.SAVING and b & V1.RESUMING:
        return b == V1.SAVING | V1.RESUMING
    return not (b & V1.RESUMING and b & V1.RUNNING)


def from_v1(bits: V1 | int) -> DeviceState:
    """The v2 state a v1 bitfield names; only the 8 canonical values name one."""
    state = _STATE_OF_V1.get(int(bits))
    if state is not None:
        return state
    if v1_is_valid(bits):
        raise TransitionError(
            f"v1 device_state {_v1_name(bits)} names no v2 state: NDMA without RUNNING "
            "is superfluous (the device is stopped anyway); clear NDMA"
        )
    raise TransitionError(f"v1 device_state {_v1_name(bits)} is not a valid combination")


V1Action = Literal[
    "!SAVING",
    "NDMA",
    "!RUNNING",
    "SAVING|!RUNNING",
    "RESUMING",
    "!RESUMING",
    "RUNNING",
    "SAVING|RUNNING",
    "!NDMA",
]


@dataclass(frozen=True)
class V1Step:
    """One event of a v1 ``device_state`` write, and the bitfield after it."""

    action: V1Action
    bits: V1


@dataclass(frozen=True)
class _V1Event:
    action: V1Action
    sets: V1
    clears: V1


# Seed 001's priority order, with the close of the save stream in front (see
# v1_steps for why).  Each event names the bits it sets and clears.
_V1_EVENTS: Final[tuple[_V1Event, ...]] = (
    _V1Event("!SAVING", V1(0), V1.SAVING),
    _V1Event("NDMA", V1.NDMA, V1(0)),
    _V1Event("!RUNNING", V1(0), V1.RUNNING),
    _V1Event("SAVING|!RUNNING", V1.SAVING, V1.RUNNING),
    _V1Event("RESUMING", V1.RESUMING, V1(0)),
    _V1Event("!RESUMING", V1(0), V1.RESUMING),
    _V1Event("RUNNING", V1.RUNNING, V1(0)),
    _V1Event("SAVING|RUNNING", V1.SAVING | V1.RUNNING, V1(0)),
    _V1Event("!NDMA", V1(0), V1.NDMA),
)


def v1_steps(old: V1 | int, new: V1 | int) -> tuple[V1Step, ...]:
    """The events one v1 write from ``old`` to ``new`` triggers, in order.

    Reading of the priority order (seed 001: NDMA, !RUNNING, SAVING|!RUNNING,
    RESUMING, !RESUMING, RUNNING, SAVING|RUNNING, !NDMA): each entry is an event
    that sets and clears the bits it names.  Going down the list, an event
    happens when it agrees with ``new`` (sets only bits ``new`` has, clears only
    bits ``new`` lacks) and changes the bits reached so far; the last step's
    bits are ``new``.  Where a bit changes under two entries, the first wins,
    with one exception: ``SAVING|!RUNNING`` is the stop-copy capture ("if
    RUNNING or SAVING change && state == !RUNNING | SAVING: save device
    state"), so it happens whenever the write changes RUNNING or SAVING and
    ends stopped and saving, even once ``!RUNNING`` has left nothing for it to
    change: ``PRE_COPY -> STOP_COPY`` is ``!RUNNING`` (the stream stays open)
    then the capture ``SAVING|!RUNNING`` on the same bits, and ``RUNNING ->
    STOP_COPY`` is ``!RUNNING`` then ``SAVING|!RUNNING``, the v2 path through
    ``STOP``.  That capture is the one step that may leave the bitfield as it
    found it.

    Clearing SAVING is not in the list.  It happens first, as the event
    ``!SAVING`` (seed 004 names it: it ends the save stream), because the
    stream ends as soon as a state without SAVING is written.  So
    ``SAVING|RUNNING -> RESUMING`` goes ``RUNNING``, ``0``, ``RESUMING``,
    never through ``SAVING|RESUMING``.  That is the one deviation from the
    list's eight names; without it, a write that only clears SAVING (e.g.
    ``STOP_COPY -> STOP``) would have no event at all.

    Every intermediate is a valid bitfield except where the list itself
    forces otherwise: it ranks ``SAVING|!RUNNING`` above ``!RESUMING``, so a
    write from a RESUMING value straight to a stopped SAVING value (v2
    ``RESUMING -> STOP_COPY``) passes through ``SAVING|RESUMING``, the
    bitfield reserved for ERROR.  v2 walks that request through ``STOP``.

    Raises ``TransitionError`` if either value is invalid, if ``old`` is ERROR
    (only a reset leaves it) or if ``new`` is ERROR (it cannot be requested).
    """
    error = int(to_v1(DeviceState.ERROR))
    for label, bits in (("old", old), ("new", new)):
        if not v1_is_valid(bits):
            raise TransitionError(f"{label} v1 device_state {_v1_name(bits)} is not valid")
    if int(old) == error:
        raise TransitionError(
            f"cannot write v1 device_state {_v1_name(new)} to a device in ERROR "
            f"({_v1_name(old)}): only a device reset leaves ERROR"
        )
    if int(new) == error:
        raise TransitionError(
            f"cannot write v1 device_state {_v1_name(new)} (ERROR) to a device in "
            f"{_v1_name(old)}: ERROR is reported, never requested"
        )
    goal = V1(new)
    here = V1(old)
    # The stop-copy capture: RUNNING or SAVING changes and the device ends saving
    # and stopped (seed 001).
    capture = bool((V1(old) ^ goal) & (V1.SAVING | V1.RUNNING)) and (
        goal & (V1.SAVING | V1.RUNNING) == V1.SAVING
    )
    steps: list[V1Step] = []
    for event in _V1_EVENTS:
        agrees = event.sets & ~goal == 0 and event.clears & goal == 0
        after = (here | event.sets) & ~event.clears
        if agrees and (after != here or (capture and event.action == "SAVING|!RUNNING")):
            here = after
            steps.append(V1Step(event.action, here))
    return tuple(steps)
