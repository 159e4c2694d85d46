"""The migration of one VM's devices, as a pure state machine.

This module decides; it does no I/O and never waits.  The runner
(``orchestrator.engine``) executes its decisions against real or simulated
devices and reports back what happened, one arc at a time.  Everything here
can be driven by plain synchronous tests.

Theory of operation
-------------------

Every device of the VM has two endpoints, a source and a destination, and a
*route*: the states each endpoint passes through in the reference flow of
DESIGN.md, chosen from its capabilities::

    source        RUNNING -> PRE_COPY -> PRE_COPY_P2P -> STOP_COPY ... STOP
    destination   RUNNING -> ... -> RESUMING -> STOP -> RUNNING_P2P -> RUNNING

A device without PRE_COPY skips pre-copy (all its state moves in
STOP_COPY).  A device without P2P has no grace state.  It skips the
barriers when the VM has no other device or when the plan declares
``p2p = false`` (the VM uses no peer-to-peer DMA).  Otherwise one such
device (never two: each could DMA into the other while it is stopped) joins
the barriers *by order*, as the VM's ``ordered`` device: on the source it
stops after every peer stands in its grace state (a peer there may still
receive DMA and starts none) and before any peer stops; on the destination
it runs after every peer stands in RUNNING_P2P and before any peer runs
fully; a rollback resumes it before its peers leave their grace states.
Whenever it is stopped no peer can initiate DMA, and no peer is stopped
while it runs.  ``switchover_order`` says the order a plan uses.

The VM as a whole moves through phases (``Phase``): prepare, precopy,
source_grace, stop_copy, destination_grace, commit, resume, release, or
rollback.  Devices move independently inside a phase; the flow only cares
about the few points where they must not:

Invariants (checked on every arc the runner is about to take; a violation
raises ``ProtocolViolation`` and changes nothing):

1. Source P2P barrier: no barrier device of the source stops (enters a
   state outside ``RUNNING_STATES``) while another barrier device of the
   source could still issue P2P DMA (is in RUNNING or PRE_COPY).  The
   ordered device is a barrier device with no grace state: it stops only
   once every peer is in its grace state, and no peer stops while it runs.
2. Reverse barrier, in rollback: no barrier device of the source runs fully
   again (RUNNING or PRE_COPY) while another is still stopped.
3. Destination barrier: no destination device runs fully before every
   barrier device of the destination is in RUNNING_P2P or RUNNING (so the
   ordered device, which waits in STOP, runs before any peer).
4. Commit: no destination device runs fully before the commit decision is
   recorded; no source device enters any running state after it.
5. A device in ERROR leaves it only by a reset, and a reset device no
   longer takes part in any barrier (its DMA context is gone).  A device in
   ERROR does not count as stopped for its peers: before the commit whatever
   DMA reaches it is lost in the reset it is due for; after the commit (a
   destination device is never reset then) its state is lost already, and
   its peers run rather than hold the VM's other devices in their grace
   states (the migration ends failed, naming it).

The commit point is reached when every destination device has loaded its
stream and stands in its grace state; the runner then records the decision
durably and calls ``record_commit``.  Before that, any failure leads to
``rollback_plan``; after it, the only way is forward.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.errors import PlanError, Problem, ProtocolViolation
from orchestrator.plan import Plan
from orchestrator.states import (
    P2P_STATES,
    RUNNING_STATES,
    Capabilities,
    DeviceState,
    Side,
    is_arc,
    path,
)

FULLY_RUNNING = frozenset({DeviceState.RUNNING, DeviceState.PRE_COPY})


class Phase(enum.StrEnum):
    """Phases of one VM's migration, in the order a successful one takes them."""

    PREPARE = "prepare"
    PRECOPY = "precopy"
    SOURCE_GRACE = "source_grace"
    STOP_COPY = "stop_copy"
    DESTINATION_GRACE = "destination_grace"
    COMMIT = "commit"
    RESUME = "resume"
    RELEASE = "release"
    ROLLBACK = "rollback"
    DONE = "done"


#: The phases a migration may move to from each phase.  ROLLBACK is allowed
#: until the commit decision is recorded (COMMIT is the phase in which it is
#: being recorded; if that fails, the migration still rolls back): that is
#: the two-phase commit's promise.
PHASE_ORDER: Mapping[Phase, frozenset[Phase]] = {
    Phase.PREPARE: frozenset({Phase.PRECOPY, Phase.ROLLBACK, Phase.DONE}),
    Phase.PRECOPY: frozenset({Phase.SOURCE_GRACE, Phase.ROLLBACK}),
    Phase.SOURCE_GRACE: frozenset({Phase.STOP_COPY, Phase.ROLLBACK}),
    Phase.STOP_COPY: frozenset({Phase.DESTINATION_GRACE, Phase.ROLLBACK}),
    Phase.DESTINATION_GRACE: frozenset({Phase.COMMIT, Phase.ROLLBACK}),
    Phase.COMMIT: frozenset({Phase.RESUME, Phase.ROLLBACK}),
    Phase.RESUME: frozenset({Phase.RELEASE}),
    Phase.RELEASE: frozenset({Phase.DONE}),
    Phase.ROLLBACK: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


@dataclass(frozen=True)
class Route:
    """The states one device endpoint is driven to, phase by phase.

    ``None`` for a grace state means the endpoint has no P2P states and
    skips the barrier.
    """

    precopy: DeviceState | None
    grace: DeviceState | None
    # Source: the state that stops it (STOP_COPY); destination: RESUMING.
    transfer: DeviceState
    # Source: STOP after commit; destination: STOP once its stream is loaded.
    settle: DeviceState
    # Destination only: RUNNING after commit.
    final: DeviceState | None


def source_route(caps: Capabilities) -> Route:
    grace = None
    if caps.p2p:
        grace = DeviceState.PRE_COPY_P2P if caps.pre_copy else DeviceState.RUNNING_P2P
    return Route(
        precopy=DeviceState.PRE_COPY if caps.pre_copy else None,
        grace=grace,
        transfer=DeviceState.STOP_COPY,
        settle=DeviceState.STOP,
        final=None,
    )


def destination_route(caps: Capabilities) -> Route:
    return Route(
        precopy=None,
        grace=DeviceState.RUNNING_P2P if caps.p2p else None,
        transfer=DeviceState.RESUMING,
        settle=DeviceState.STOP,
        final=DeviceState.RUNNING,
    )


def check_capabilities(
    plan: Plan, capabilities: Mapping[str, tuple[Capabilities, Capabilities]]
) -> list[Problem]:
    """The cross-device rules a plan must meet, given its devices' capabilities.

    ``capabilities`` maps a device name to its (source, destination)
    capabilities; devices whose capabilities are not known yet are left out
    and checked again once they are opened.
    """
    problems: list[Problem] = []
    index = {spec.name: i for i, spec in enumerate(plan.devices)}
    for name, (src, dst) in capabilities.items():
        if src.p2p != dst.p2p:
            problems.append(
                Problem(
                    f"devices[{index.get(name, 0)}]",
                    f"device {name!r}: the source {'has' if src.p2p else 'lacks'} the P2P states "
                    f"but the destination {'has' if dst.p2p else 'lacks'} them; "
                    "both ends must agree "
                    "for the grace barriers to mean the same on both hosts",
                )
            )
    problems.extend(_unorderable(plan, _lacking_p2p(plan, capabilities)))
    return problems


def _lacking_p2p(plan: Plan, capabilities: Mapping[str, tuple[Capabilities, ...]]) -> list[str]:
    """The devices of a multi-device P2P plan without the P2P states at an end (of
    those whose capabilities are known), in plan order."""
    if len(plan.devices) < 2 or not plan.p2p:
        return []
    return [
        spec.name
        for spec in plan.devices
        if spec.name in capabilities and not all(caps.p2p for caps in capabilities[spec.name])
    ]


def _unorderable(plan: Plan, lacking: list[str]) -> list[Problem]:
    """The refusal of two or more devices without P2P: no order makes them safe."""
    if len(lacking) < 2:
        return []
    index = {spec.name: i for i, spec in enumerate(plan.devices)}
    names = ", ".join(repr(n) for n in lacking)
    return [
        Problem(
            f"devices[{index.get(lacking[0], 0)}]",
            f"devices {names} have no P2P (NDMA) states: one such device can join "
            "the P2P set by order (it stops after its peers enter their grace states "
            "and runs before they leave them), but with two no order helps, since each "
            "could DMA into the other while it is stopped; the plan must declare "
            "p2p = false (the VM uses no peer-to-peer DMA between its devices) or "
            "migrate at most one device without P2P",
        )
    ]


def ordered_device(plan: Plan, capabilities: Mapping[str, Capabilities]) -> str | None:
    """The VM's ordered device: the one device without P2P of a multi-device
    plan that does not declare ``p2p = false`` (it takes part in the barriers
    by order); None when there is none."""
    lacking = _lacking_p2p(plan, {n: (c,) for n, c in capabilities.items()})
    return lacking[0] if len(lacking) == 1 else None


def barrier_skip_reason(plan: Plan, name: str, caps: Capabilities) -> str | None:
    """Why a device skips the P2P barriers, or None when it takes part (with its
    grace state, or as the ordered device)."""
    if caps.p2p:
        return None
    if len(plan.devices) == 1:
        return (
            f"device {name!r} has no P2P states; it is the VM's only device, "
            "so no peer can DMA to it"
        )
    if plan.p2p:
        return None
    return (
        f"device {name!r} has no P2P states; the plan declares p2p = false "
        "(the VM uses no peer-to-peer DMA), so it skips the grace barriers"
    )


def ordered_note(name: str) -> str:
    return (
        f"device {name!r} has no P2P states: it joins the P2P set by order, stopping "
        "on the source after every peer stands in its grace state and before any "
        "peer stops, and running on the destination before any peer leaves its "
        "grace state"
    )


@dataclass(frozen=True)
class SwitchoverOrder:
    """The order of the switchover, as stages: the devices of one stage move
    together, a stage begins once the one before it is done."""

    #: Source, from running to stopped: (what the stage does, its devices).
    source: tuple[tuple[str, tuple[str, ...]], ...]
    #: Destination, from loaded to running.
    destination: tuple[tuple[str, tuple[str, ...]], ...]

    def lines(self) -> list[str]:
        def side(label: str, stages: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
            steps = " -> ".join(f"{what} [{', '.join(names)}]" for what, names in stages)
            return f"{label}: {steps}"

        return [side("source", self.source), side("destination", self.destination)]

    def as_dict(self) -> dict[str, list[dict[str, object]]]:
        return {
            side: [{"step": what, "devices": list(names)} for what, names in stages]
            for side, stages in (("source", self.source), ("destination", self.destination))
        }


def switchover_order(plan: Plan, capabilities: Mapping[str, Capabilities]) -> SwitchoverOrder:
    """The order in which a plan's devices stop and run, given their (source)
    capabilities: every device stops at once after the source barrier and runs
    at once after the commit, except the ordered device, which has a stage of
    its own between its peers' grace states and their stop (and run)."""
    names = tuple(spec.name for spec in plan.devices)
    ordered = ordered_device(plan, capabilities)
    graced = tuple(n for n in names if capabilities[n].p2p and len(names) > 1)
    if ordered is None:
        src: list[tuple[str, tuple[str, ...]]] = []
        if graced:
            src.append(("grace", graced))
        src.append(("stop", names))
        dst: list[tuple[str, tuple[str, ...]]] = []
        if graced:
            dst.append(("grace", graced))
        dst.append(("run", names))
        return SwitchoverOrder(tuple(src), tuple(dst))
    peers = tuple(n for n in names if n != ordered)
    return SwitchoverOrder(
        source=(("grace", peers), ("stop", (ordered,)), ("stop", peers)),
        destination=(("grace", peers), ("run", (ordered,)), ("run", peers)),
    )


# --------------------------------------------------------------------------
# The per-VM state machine


@dataclass
class Endpoint:
    """What the flow knows of one device endpoint."""

    name: str
    side: Side
    capabilities: Capabilities
    route: Route
    #: Takes part in the P2P barriers of its side.
    barrier: bool
    state: DeviceState = DeviceState.RUNNING
    #: The arc in flight, if any: the runner asked for it and has not reported back.
    pending: DeviceState | None = None
    reset: bool = False
    #: Touched by the migration (left its initial state at least once).
    touched: bool = False


@dataclass(frozen=True)
class RollbackStep:
    """One endpoint's part in a rollback."""

    name: str
    side: Side
    #: Reset the device first (it is in ERROR, or it is a destination).
    reset: bool
    #: State to reach before the reverse barrier (a grace state, or the final one).
    quiesce: DeviceState | None
    #: State to reach after the reverse barrier.
    final: DeviceState | None


@dataclass(frozen=True)
class RollbackPlan:
    steps: tuple[RollbackStep, ...]

    def for_side(self, side: Side) -> tuple[RollbackStep, ...]:
        return tuple(s for s in self.steps if s.side is side)


@dataclass
class MigrationFlow:
    """The VM-level state machine: phases, barriers, commit, rollback."""

    plan: Plan
    endpoints: dict[tuple[Side, str], Endpoint] = field(default_factory=dict)
    phase: Phase = Phase.PREPARE
    committed: bool = False
    notes: list[str] = field(default_factory=list)
    #: The one device without P2P that joins the barriers by order, if any.
    ordered: str | None = None
    # Barrier members of each side that could issue P2P DMA (fully running,
    # or an arc there in flight), and those that are stopped (or stopping).
    # Kept up to date on every change so that checking an arc costs O(1)
    # whatever the number of devices.
    _exposed: dict[Side, set[str]] = field(default_factory=lambda: {s: set() for s in Side})
    _stopped: dict[Side, set[str]] = field(default_factory=lambda: {s: set() for s in Side})

    @classmethod
    def create(
        cls, plan: Plan, capabilities: Mapping[str, tuple[Capabilities, Capabilities]]
    ) -> MigrationFlow:
        """The flow for a plan whose devices reported these capabilities.

        Raises PlanError (through ``check_capabilities``) if the devices
        cannot migrate together.  Nothing has been changed at that point.
        """
        problems = check_capabilities(plan, capabilities)
        if problems:
            raise PlanError(problems)
        flow = cls(plan)
        flow.ordered = ordered_device(plan, {n: caps[0] for n, caps in capabilities.items()})
        if flow.ordered is not None:
            flow.notes.append(ordered_note(flow.ordered))
        for spec in plan.devices:
            src, dst = capabilities[spec.name]
            skip = barrier_skip_reason(plan, spec.name, src)
            if skip is not None and len(plan.devices) > 1:
                flow.notes.append(skip)
            for side, caps, route in (
                (Side.SOURCE, src, source_route(src)),
                (Side.DESTINATION, dst, destination_route(dst)),
            ):
                endpoint = Endpoint(
                    name=spec.name, side=side, capabilities=caps, route=route, barrier=skip is None
                )
                flow.endpoints[(side, spec.name)] = endpoint
                flow._track(endpoint)
        return flow

    @classmethod
    def for_destination(cls, plan: Plan, capabilities: Mapping[str, Capabilities]) -> MigrationFlow:
        """The flow of a destination half on the destination daemon: its own endpoints.

        The cross-device rules were checked by the source's flow, which knows
        both ends; this one keeps the destination's invariants (3 to 5), and
        refuses (PlanError) what no order could make safe here either: two
        devices without P2P among P2P peers.
        """
        problems = _unorderable(
            plan, _lacking_p2p(plan, {n: (c,) for n, c in capabilities.items()})
        )
        if problems:
            raise PlanError(problems)
        flow = cls(plan)
        flow.ordered = ordered_device(plan, capabilities)
        for spec in plan.devices:
            caps = capabilities[spec.name]
            endpoint = Endpoint(
                name=spec.name,
                side=Side.DESTINATION,
                capabilities=caps,
                route=destination_route(caps),
                barrier=barrier_skip_reason(plan, spec.name, caps) is None,
            )
            flow.endpoints[(Side.DESTINATION, spec.name)] = endpoint
            flow._track(endpoint)
        return flow

    # -- queries -----------------------------------------------------------

    def endpoint(self, side: Side, name: str) -> Endpoint:
        try:
            return self.endpoints[(side, name)]
        except KeyError:
            raise ProtocolViolation(f"no {side.value} device {name!r} in this migration") from None

    def side(self, side: Side) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.side is side]

    def order(self) -> SwitchoverOrder:
        """The order in which this migration's devices stop and run."""
        endpoints = self.side(Side.SOURCE) or self.side(Side.DESTINATION)
        return switchover_order(self.plan, {e.name: e.capabilities for e in endpoints})

    def barrier_members(self, side: Side) -> list[Endpoint]:
        return [e for e in self.side(side) if e.barrier and not e.reset]

    def source_grace_met(self) -> bool:
        """Every barrier device of the source stands in its grace state (or beyond)."""
        return all(
            e.state in P2P_STATES or e.state not in RUNNING_STATES
            for e in self.barrier_members(Side.SOURCE)
        )

    def commit_point_reached(self) -> bool:
        """Every destination device loaded its stream and stands in its grace state.

        Devices without P2P states count once loaded (STOP).
        """
        for e in self.side(Side.DESTINATION):
            wanted = e.route.grace or e.route.settle
            if e.state is not wanted or e.pending is not None:
                return False
        return True

    # -- phases ------------------------------------------------------------

    def enter_phase(self, phase: Phase) -> None:
        if phase not in PHASE_ORDER[self.phase]:
            raise ProtocolViolation(f"cannot go from phase {self.phase.value} to {phase.value}")
        if phase is Phase.ROLLBACK and self.committed:
            raise ProtocolViolation("no rollback after the commit decision was recorded")
        if phase is Phase.COMMIT and not self.commit_point_reached():
            raise ProtocolViolation(
                "commit before every destination device reached its grace state"
            )
        if phase is Phase.STOP_COPY and not self.source_grace_met():
            raise ProtocolViolation("stop-copy before the source P2P barrier was met")
        self.phase = phase

    def record_commit(self) -> None:
        """The decision is durably recorded: from now on only forward."""
        if self.phase is not Phase.COMMIT:
            raise ProtocolViolation(f"commit recorded in phase {self.phase.value}")
        self.committed = True

    def learn_commit(self) -> None:
        """The decision is recorded, by this flow's runner or (for a destination
        half) by the source: from now on only forward.  Idempotent."""
        self.committed = True

    # -- arcs --------------------------------------------------------------

    def plan_arcs(self, side: Side, name: str, target: DeviceState) -> tuple[DeviceState, ...]:
        """The arcs that take an endpoint to ``target``, from the state model."""
        e = self.endpoint(side, name)
        return path(e.capabilities.flags, e.state, target)

    def begin_arc(self, side: Side, name: str, target: DeviceState) -> None:
        """The runner is about to ask for one arc; refuse it if an invariant forbids it."""
        e = self.endpoint(side, name)
        if e.pending is not None:
            raise ProtocolViolation(f"{side.value} device {name!r} already has an arc in flight")
        if e.state is DeviceState.ERROR:
            raise ProtocolViolation(
                f"{side.value} device {name!r} is in ERROR: only a reset leaves it"
            )
        if not is_arc(e.capabilities.flags, e.state, target):
            raise ProtocolViolation(
                f"{e.state.name} -> {target.name} is not one arc for {side.value} device {name!r}"
            )
        self._check_barriers(e, target)
        e.pending = target
        e.touched = True
        self._track(e)

    def end_arc(self, side: Side, name: str) -> None:
        """The arc in flight succeeded."""
        e = self.endpoint(side, name)
        if e.pending is None:
            raise ProtocolViolation(f"{side.value} device {name!r} has no arc in flight")
        e.state, e.pending = e.pending, None
        self._track(e)

    def arc_failed(self, side: Side, name: str, now: DeviceState) -> None:
        """The arc in flight failed; the device reports ``now`` (its old state or ERROR)."""
        e = self.endpoint(side, name)
        e.pending = None
        e.state = now
        self._track(e)

    def check_reset(self, side: Side, name: str) -> None:
        """A reset is about to be asked: refuse it while it would break the reverse
        barrier.  A reset source device reads RUNNING (it runs fully), so none of
        its barrier peers may still be stopped (invariant 2, resets included)."""
        e = self.endpoint(side, name)
        if side is Side.SOURCE and e.barrier and not e.reset:
            # A peer in ERROR is no obstacle (not among the stopped): it is itself
            # to be reset.
            peers = _others(self._stopped[side], name)
            if peers:
                raise ProtocolViolation(
                    f"{_who(e)} may not be reset (it would read RUNNING) while {peers} is stopped"
                )

    def record_reset(self, side: Side, name: str) -> None:
        """The device was reset: it reads RUNNING and has lost its state."""
        e = self.endpoint(side, name)
        e.pending = None
        e.state = DeviceState.RUNNING
        e.reset = True
        e.touched = True
        self._track(e)

    # -- recovery ----------------------------------------------------------

    def adopt_state(self, side: Side, name: str, state: DeviceState) -> None:
        """Recovery: a device reports where a previous run left it.

        The endpoint counts as touched, so that a rollback resets it if it is
        a destination: after a crash nobody knows what it has loaded.
        """
        e = self.endpoint(side, name)
        if e.pending is not None:
            raise ProtocolViolation(f"{side.value} device {name!r} has an arc in flight")
        e.state = state
        e.touched = True
        self._track(e)

    def adopt_commit(self) -> None:
        """Recovery: the journal says a previous run recorded the commit decision."""
        if self.phase is not Phase.PREPARE:
            raise ProtocolViolation(f"cannot adopt a commit in phase {self.phase.value}")
        self.phase = Phase.COMMIT
        self.committed = True

    def _track(self, e: Endpoint) -> None:
        exposed, stopped = self._exposed[e.side], self._stopped[e.side]
        exposed.discard(e.name)
        stopped.discard(e.name)
        if e.barrier and not e.reset:
            if e.state in FULLY_RUNNING or e.pending in FULLY_RUNNING:
                exposed.add(e.name)
            # A device in ERROR is no obstacle: whatever reaches it is lost in
            # the reset it is due for.
            if _stopped(e) and e.state is not DeviceState.ERROR:
                stopped.add(e.name)

    def _check_barriers(self, e: Endpoint, target: DeviceState) -> None:
        exposed, stopped = self._exposed[e.side], self._stopped[e.side]
        stops = target not in RUNNING_STATES
        # Moving between RUNNING and PRE_COPY adds no P2P exposure.
        runs_fully = target in FULLY_RUNNING and e.state not in FULLY_RUNNING
        if e.side is Side.SOURCE:
            if self.committed and target in RUNNING_STATES:
                raise ProtocolViolation(f"{_who(e)} may not run again after the commit point")
            if e.barrier and stops and _others(exposed, e.name):
                raise ProtocolViolation(
                    f"{_who(e)} may not stop while {_others(exposed, e.name)} "
                    "could still send it P2P DMA"
                )
            if e.barrier and runs_fully and _others(stopped, e.name):
                raise ProtocolViolation(
                    f"{_who(e)} may not run fully while {_others(stopped, e.name)} is stopped"
                )
        else:
            if runs_fully and not self.committed:
                raise ProtocolViolation(
                    f"{_who(e)} may not run before the commit point is recorded"
                )
            if e.barrier and runs_fully and _others(stopped, e.name):
                raise ProtocolViolation(
                    f"{_who(e)} may not run while {_others(stopped, e.name)} "
                    "is not in its grace state"
                )

    # -- rollback ----------------------------------------------------------

    def rollback_plan(self) -> RollbackPlan:
        """How to return to where the migration started, from the current states.

        Source devices go back to RUNNING through the reverse P2P barrier
        (grace state first, then RUNNING); a source device in ERROR is reset
        instead.  Every destination device that the migration touched is
        reset.  Only valid before the commit point.
        """
        if self.committed:
            raise ProtocolViolation("no rollback after the commit point")
        steps: list[RollbackStep] = []
        for e in self.side(Side.SOURCE):
            if e.state is DeviceState.ERROR:
                steps.append(RollbackStep(e.name, e.side, reset=True, quiesce=None, final=None))
                continue
            # A device that never left the fully running states needs no
            # grace state: it cannot be the target of a stopped peer's DMA.
            quiesce = None
            if e.barrier and e.capabilities.p2p and e.state not in FULLY_RUNNING:
                quiesce = DeviceState.RUNNING_P2P
            steps.append(
                RollbackStep(
                    e.name, e.side, reset=False, quiesce=quiesce, final=DeviceState.RUNNING
                )
            )
        for e in self.side(Side.DESTINATION):
            if e.touched or e.state is not DeviceState.RUNNING:
                steps.append(RollbackStep(e.name, e.side, reset=True, quiesce=None, final=None))
        return RollbackPlan(tuple(steps))


def _stopped(e: Endpoint) -> bool:
    return e.state not in RUNNING_STATES or (
        e.pending is not None and e.pending not in RUNNING_STATES
    )


def _others(members: set[str], name: str) -> str:
    """The members other than ``name``, as text; empty (false) when there are none.

    Cheap when there are none, the common case on every arc.
    """
    if len(members) <= (name in members):
        return ""
    return ", ".join(sorted(members - {name}))


def _who(e: Endpoint) -> str:
    return f"{e.side.value} device {e.name!r}"
