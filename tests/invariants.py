"""Checks of a finished migration against the promises of DESIGN.md.

Every check reads the recorded trace and the devices themselves, never the
runner's own conclusions alone, so a runner that lies in its report fails.
"""

from __future__ import annotations

from orchestrator.backends.simulated import SimulatedDevice, reference_digest
from orchestrator.engine import Migration, TraceEvent
from orchestrator.flow import FULLY_RUNNING, Phase
from orchestrator.report import DeviceReport
from orchestrator.states import P2P_STATES, RUNNING_STATES, DeviceState, Side


def _forward(trace: list[TraceEvent]) -> list[TraceEvent]:
    """The trace up to the start of a rollback, if any."""
    for i, e in enumerate(trace):
        if e.kind == "phase" and e.detail.get("phase") == "rollback":
            return trace[:i]
    return trace


def check_barriers_held(m: Migration) -> None:
    """(a) No barrier device stopped before every barrier device of its side was
    in its grace state; no destination device ran before every destination
    barrier device was in its grace state."""
    if m.flow is None:
        # The devices were never opened together: none may have moved.
        assert not [e for e in m.trace if e.kind == "arc_begin"], "an arc without a flow"
        return
    src_members = {e.name for e in m.flow.side(Side.SOURCE) if e.barrier}
    dst_members = {e.name for e in m.flow.side(Side.DESTINATION) if e.barrier}
    in_grace: dict[Side, set[str]] = {Side.SOURCE: set(), Side.DESTINATION: set()}
    # The ordered device has no grace state: stopped (source) or loaded in STOP
    # (destination) stands for it, and it needs none of its own to stop or run.
    ordered = m.flow.ordered
    own = {ordered} if ordered is not None else set()
    for e in _forward(m.trace):
        if e.kind == "arc_end" and e.side is not None:
            assert e.device is not None
            if e.to_state in P2P_STATES or (e.device == ordered and e.to_state is DeviceState.STOP):
                in_grace[e.side].add(e.device)
            if e.device == ordered and e.to_state not in RUNNING_STATES and e.side is Side.SOURCE:
                in_grace[e.side].add(e.device)
        if e.kind != "arc_begin" or e.device is None:
            continue
        if e.side is Side.SOURCE and e.device in src_members and e.to_state not in RUNNING_STATES:
            missing = src_members - in_grace[Side.SOURCE] - (own & {e.device})
            assert not missing, f"source {e.device} stopped (seq {e.seq}) before {missing} in grace"
        if e.side is Side.DESTINATION and e.device in dst_members and e.to_state in FULLY_RUNNING:
            missing = dst_members - in_grace[Side.DESTINATION] - (own & {e.device})
            assert not missing, (
                f"destination {e.device} ran (seq {e.seq}) before {missing} in grace"
            )


def check_commit_ordering(m: Migration) -> None:
    """(d) No destination device ran before the commit was recorded; no source
    device entered a running state after it."""
    committed = False
    for e in m.trace:
        if e.kind == "commit":
            committed = True
        if e.kind != "arc_begin":
            continue
        if e.side is Side.DESTINATION and e.to_state in FULLY_RUNNING:
            assert committed, f"destination {e.device} ran before the commit (seq {e.seq})"
        if e.side is Side.SOURCE and committed:
            assert e.to_state not in RUNNING_STATES, f"source {e.device} ran after the commit"
    assert committed == m.committed


def _sim(device: object) -> SimulatedDevice:
    assert isinstance(device, SimulatedDevice)
    return device


def _took_an_arc(m: Migration, side: Side, name: str) -> bool:
    return any(e.side is side and e.device == name and e.kind == "arc_begin" for e in m.trace)


async def _check_source_holds_its_own_state(src: SimulatedDevice, name: str) -> None:
    """Nothing was loaded into the source and it was not reset."""
    assert src.resets == 0, name
    digest = await src.state_digest()  # brings dirtying up to now, then hashes
    assert digest == reference_digest(src.params, src.mutations), name


def _check_destination_fresh(m: Migration, d: DeviceReport) -> None:
    """A destination device the migration moved was reset: a fresh device again."""
    if _took_an_arc(m, Side.DESTINATION, d.name):
        dst = _sim(m.destinations[d.name])
        assert d.destination_reset and dst.state is DeviceState.RUNNING, d.name


async def check_outcome(m: Migration) -> None:
    """(b) and (c): what each outcome promises about every device."""
    report = m.report
    assert report is not None
    devices = {d.name: d for d in report.devices}
    if report.outcome == "succeeded":
        assert report.error is None
        assert report.downtime_ms is not None and report.downtime_ms >= 0
        for name, d in devices.items():
            src, dst = _sim(m.sources[name]), _sim(m.destinations[name])
            assert src.state not in RUNNING_STATES, name
            if src.state is not DeviceState.STOP:
                assert any(name in n and "could not be released" in n for n in report.notes)
            assert dst.state is DeviceState.RUNNING, name
            assert d.source_digest == d.destination_digest is not None, name
            assert await src.state_digest() == await dst.state_digest(), name
    elif report.outcome == "refused":
        # It ended before pre-copy began, every device as it was: no source
        # device took a step, and the VM never stopped.
        assert report.error is not None and not report.committed
        assert report.downtime_ms is None
        assert Phase.PRECOPY.value not in report.phases
        for name, d in devices.items():
            assert not _took_an_arc(m, Side.SOURCE, name), name
            assert not d.source_reset, name
            if name in m.sources:  # opened, at least
                await _check_source_holds_its_own_state(_sim(m.sources[name]), name)
            _check_destination_fresh(m, d)
    elif report.outcome == "rolled_back":
        # The VM runs on the source as before: every source device runs, holding
        # its own state (never reset: a reset loses it, and that is "failed").
        assert report.error is not None
        for name, d in devices.items():
            src = _sim(m.sources[name])
            assert src.state is DeviceState.RUNNING, (name, src.state)
            assert not d.source_reset, name
            await _check_source_holds_its_own_state(src, name)
            _check_destination_fresh(m, d)
    else:
        assert report.outcome == "failed"
        assert report.error is not None


def check_reverse_barrier(m: Migration) -> None:
    """(a), on the way back: no source barrier device runs fully again, nor is
    reset (a reset device reads RUNNING), while another barrier device of the
    source is still stopped."""
    if m.flow is None:
        return
    members = {e.name for e in m.flow.side(Side.SOURCE) if e.barrier}
    state = dict.fromkeys(members, DeviceState.RUNNING)
    for e in m.trace:
        if e.side is not Side.SOURCE or e.device not in members:
            continue
        if (e.kind == "arc_end" and e.to_state is not None) or (
            e.kind in ("arc_failed", "arc_settled") and e.to_state is not None
        ):
            state[e.device] = e.to_state
        runs = (e.kind == "arc_begin" and e.to_state in FULLY_RUNNING) or e.kind == "reset"
        if runs and e.from_state not in FULLY_RUNNING:
            stopped = {
                n
                for n, s in state.items()
                if n != e.device and s not in RUNNING_STATES and s is not DeviceState.ERROR
            }
            assert not stopped, f"source {e.device} {e.kind} (seq {e.seq}) while {stopped} stopped"
        if e.kind == "reset":
            state[e.device] = DeviceState.RUNNING


def check_no_dma_into_a_stopped_device(m: Migration) -> None:
    """(a), whatever the order, forward and back: on the source no barrier device
    stops while another could still initiate P2P DMA (runs fully, or is on its
    way there), and on either side none runs fully again, nor (source) is reset,
    while another is stopped (a device in ERROR is not: it is to be reset)."""
    if m.flow is None:
        return
    for side in Side:
        _Replay(side, {e.name for e in m.flow.side(side) if e.barrier}).check(m.trace)


class _Replay:
    """One side's barrier devices, replayed from the trace."""

    def __init__(self, side: Side, members: set[str]) -> None:
        self.side = side
        self.members = members
        self.state = dict.fromkeys(members, DeviceState.RUNNING)
        self.pending: dict[str, DeviceState] = {}

    def exposed(self, n: str) -> bool:
        return self.state[n] in FULLY_RUNNING or self.pending.get(n) in FULLY_RUNNING

    def stopped(self, n: str) -> bool:
        state, pending = self.state[n], self.pending.get(n)
        stops = state not in RUNNING_STATES
        stops |= pending is not None and pending not in RUNNING_STATES
        return stops and state is not DeviceState.ERROR

    def check(self, trace: list[TraceEvent]) -> None:
        side, members = self.side, self.members
        for e in trace:
            name = e.device
            if e.side is not side or name is None or name not in members:
                continue
            others = members - {name}
            if e.kind == "arc_begin" and e.to_state is not None:
                if side is Side.SOURCE and e.to_state not in RUNNING_STATES:
                    risk = {n for n in others if self.exposed(n)}
                    assert not risk, f"source {name} stopped (seq {e.seq}) while {risk} could DMA"
                if e.to_state in FULLY_RUNNING and self.state[name] not in FULLY_RUNNING:
                    risk = {n for n in others if self.stopped(n)}
                    assert not risk, f"{side.value} {name} ran (seq {e.seq}) while {risk} stopped"
                self.pending[name] = e.to_state
            elif e.kind in ("arc_end", "arc_failed", "arc_settled"):
                self.pending.pop(name, None)
                if e.to_state is not None:
                    self.state[name] = e.to_state
            elif e.kind == "reset":
                if side is Side.SOURCE:
                    risk = {n for n in others if self.stopped(n)}
                    assert not risk, f"source {name} reset (seq {e.seq}) while {risk} stopped"
                # A reset device reads RUNNING and no longer takes part.
                members.discard(name)


def check_acknowledged_before_the_switchover(m: Migration) -> None:
    """No source device takes a step of the switchover (its grace state, a stop)
    before the destination acknowledged every device's initial data as last
    announced: after every return of initial data that had to be acknowledged
    again (``initial_back``)."""
    acknowledged = False
    for e in _forward(m.trace):
        if e.kind == "switchover_ack":
            acknowledged = True
        elif e.kind == "initial_back" and e.detail.get("reacknowledge"):
            assert not acknowledged, f"initial data of {e.device} came back after the ack"
        elif (
            e.kind == "arc_begin"
            and e.side is Side.SOURCE
            and e.to_state is not DeviceState.PRE_COPY
        ):
            assert acknowledged, (
                f"source {e.device} {e.from_state} -> {e.to_state} (seq {e.seq}) before "
                "the destination acknowledged the initial data"
            )


def check_downtime_window_closed(m: Migration) -> None:
    """However the migration ended, it is no longer inside its downtime window
    (the daemon's journal writer holds back while any migration is)."""
    assert not m.in_downtime_window, f"{m.id} ended in {m.phase} with its downtime window open"


async def check_all(m: Migration) -> None:
    check_barriers_held(m)
    check_reverse_barrier(m)
    check_no_dma_into_a_stopped_device(m)
    check_commit_ordering(m)
    check_acknowledged_before_the_switchover(m)
    check_downtime_window_closed(m)
    await check_outcome(m)
