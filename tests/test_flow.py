"""The pure migration flow: routes, barriers, commit, rollback, convergence.

Plain synchronous tests, in the manner of h11's test_state.py: drive the
state machine by hand, assert the whole state after each step, and check
that every forbidden step raises and changes nothing.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import pytest

from orchestrator.convergence import Remaining, decide_precopy
from orchestrator.errors import PlanError, ProtocolViolation
from orchestrator.flow import (
    MigrationFlow,
    Phase,
    check_capabilities,
    destination_route,
    source_route,
)
from orchestrator.plan import Plan
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side
from tests.helpers import make_plan, sim_device

S = DeviceState
F = MigrationFlags
FULL = Capabilities(F.STOP_COPY | F.P2P | F.PRE_COPY)
P2P_ONLY = Capabilities(F.STOP_COPY | F.P2P)
PRECOPY_ONLY = Capabilities(F.STOP_COPY | F.PRE_COPY)
BARE = Capabilities(F.STOP_COPY)
ALL_CAPS = [FULL, P2P_ONLY, PRECOPY_ONLY, BARE]


def plan_of(n: int, **top: object) -> Plan:
    return make_plan([sim_device(f"d{i}") for i in range(n)], **top)


def flow_of(caps: list[Capabilities], **top: object) -> MigrationFlow:
    plan = plan_of(len(caps), **top)
    return MigrationFlow.create(plan, {f"d{i}": (c, c) for i, c in enumerate(caps)})


def snapshot(
    flow: MigrationFlow,
) -> dict[tuple[Side, str], tuple[DeviceState, DeviceState | None, bool]]:
    return {k: (e.state, e.pending, e.reset) for k, e in flow.endpoints.items()}


def walk(flow: MigrationFlow, side: Side, name: str, target: DeviceState) -> None:
    for step in flow.plan_arcs(side, name, target):
        flow.begin_arc(side, name, step)
        flow.end_arc(side, name)


def forbidden(flow: MigrationFlow, side: Side, name: str, target: DeviceState) -> None:
    before = snapshot(flow)
    with pytest.raises(ProtocolViolation):
        flow.begin_arc(side, name, target)
    assert snapshot(flow) == before


# -- routes and plan rules -------------------------------------------------


def test_routes_follow_capabilities() -> None:
    assert source_route(FULL).precopy is S.PRE_COPY
    assert source_route(FULL).grace is S.PRE_COPY_P2P
    assert source_route(P2P_ONLY).precopy is None
    assert source_route(P2P_ONLY).grace is S.RUNNING_P2P
    assert source_route(PRECOPY_ONLY).grace is None
    assert source_route(BARE).grace is None
    for caps in ALL_CAPS:
        assert source_route(caps).transfer is S.STOP_COPY
        assert source_route(caps).settle is S.STOP
        dst = destination_route(caps)
        assert (dst.transfer, dst.settle, dst.final) == (S.RESUMING, S.STOP, S.RUNNING)
        assert dst.grace is (S.RUNNING_P2P if caps.p2p else None)


def test_two_devices_without_p2p_are_refused_naming_both() -> None:
    plan = plan_of(4)
    problems = check_capabilities(
        plan,
        {"d0": (FULL, FULL), "d1": (BARE, BARE), "d2": (FULL, FULL), "d3": (PRECOPY_ONLY,) * 2},
    )
    assert len(problems) == 1
    assert problems[0].path == "devices[1]"
    message = problems[0].message
    assert "'d1', 'd3'" in message and "p2p = false" in message and "no order" in message
    with pytest.raises(PlanError, match="d1"):
        flow_of([FULL, BARE, FULL, PRECOPY_ONLY])


def test_one_device_without_p2p_joins_the_p2p_set_by_order() -> None:
    flow = flow_of([FULL, BARE, P2P_ONLY])
    assert flow.ordered == "d1"
    assert all(e.barrier for e in flow.endpoints.values())
    assert len(flow.notes) == 1 and "'d1'" in flow.notes[0] and "by order" in flow.notes[0]
    order = flow.order()
    assert order.source == (("grace", ("d0", "d2")), ("stop", ("d1",)), ("stop", ("d0", "d2")))
    assert order.destination == (("grace", ("d0", "d2")), ("run", ("d1",)), ("run", ("d0", "d2")))
    assert order.lines()[0] == "source: grace [d0, d2] -> stop [d1] -> stop [d0, d2]"
    # Without an ordered device every device stops, then runs, at once.
    plain = flow_of([FULL, FULL]).order()
    assert plain.source == (("grace", ("d0", "d1")), ("stop", ("d0", "d1")))
    assert flow_of([BARE]).order().as_dict() == {
        "source": [{"step": "stop", "devices": ["d0"]}],
        "destination": [{"step": "run", "devices": ["d0"]}],
    }


def test_ordered_device_stops_last_runs_first_by_hand() -> None:
    flow = flow_of([FULL, BARE, FULL])
    src, dst = Side.SOURCE, Side.DESTINATION
    for n in ("d0", "d1", "d2"):
        walk(flow, dst, n, S.RESUMING)
    flow.enter_phase(Phase.PRECOPY)
    walk(flow, src, "d0", S.PRE_COPY)
    walk(flow, src, "d2", S.PRE_COPY)
    flow.enter_phase(Phase.SOURCE_GRACE)
    # d1 may not stop while a peer could still DMA into it.
    forbidden(flow, src, "d1", S.STOP_COPY)
    walk(flow, src, "d0", S.PRE_COPY_P2P)
    forbidden(flow, src, "d1", S.STOP_COPY)
    walk(flow, src, "d2", S.PRE_COPY_P2P)
    # Its peers are in their grace states: still none may stop while d1 runs.
    forbidden(flow, src, "d0", S.STOP_COPY)
    with pytest.raises(ProtocolViolation):
        flow.enter_phase(Phase.STOP_COPY)
    walk(flow, src, "d1", S.STOP_COPY)
    flow.enter_phase(Phase.STOP_COPY)
    walk(flow, src, "d0", S.STOP_COPY)
    walk(flow, src, "d2", S.STOP_COPY)
    flow.enter_phase(Phase.DESTINATION_GRACE)
    walk(flow, dst, "d1", S.STOP)
    for n in ("d0", "d2"):
        walk(flow, dst, n, S.RUNNING_P2P)
    assert flow.commit_point_reached()  # d1 counts once loaded, in STOP
    flow.enter_phase(Phase.COMMIT)
    flow.record_commit()
    # No peer runs fully while d1 stands stopped; d1 runs first.
    forbidden(flow, dst, "d0", S.RUNNING)
    walk(flow, dst, "d1", S.RUNNING)
    walk(flow, dst, "d0", S.RUNNING)
    walk(flow, dst, "d2", S.RUNNING)


def test_ordered_device_resumes_first_in_a_rollback() -> None:
    flow = flow_of([FULL, BARE, FULL])
    for step in forward_steps(flow):
        if step[0] == "phase" and step[3] is Phase.DESTINATION_GRACE:
            break
        apply_step(flow, step)
    flow.enter_phase(Phase.ROLLBACK)
    steps = {(s.side, s.name): s for s in flow.rollback_plan().steps}
    assert steps[(Side.SOURCE, "d1")].quiesce is None
    for n in ("d0", "d2"):
        assert steps[(Side.SOURCE, n)].quiesce is S.RUNNING_P2P
        walk(flow, Side.SOURCE, n, S.RUNNING_P2P)
    forbidden(flow, Side.SOURCE, "d0", S.RUNNING)
    walk(flow, Side.SOURCE, "d1", S.RUNNING)
    walk(flow, Side.SOURCE, "d0", S.RUNNING)


def test_plan_declaring_no_p2p_dma_allows_mix_and_records_why() -> None:
    flow = flow_of([FULL, BARE, PRECOPY_ONLY], p2p=False)
    assert [e.barrier for e in flow.side(Side.SOURCE)] == [True, False, False]
    assert len(flow.notes) == 2 and all("p2p = false" in n for n in flow.notes)


def test_single_device_without_p2p_needs_no_declaration() -> None:
    flow = flow_of([BARE])
    assert flow.endpoint(Side.SOURCE, "d0").barrier is False
    assert flow.notes == []


def test_source_and_destination_must_agree_on_p2p() -> None:
    problems = check_capabilities(plan_of(1), {"d0": (FULL, PRECOPY_ONLY)})
    assert len(problems) == 1 and "destination lacks" in problems[0].message


# -- the happy path, step by step --------------------------------------------


def test_full_flow_by_hand_with_every_barrier_enforced() -> None:
    flow = flow_of([FULL, FULL, FULL])
    names = ["d0", "d1", "d2"]
    src, dst = Side.SOURCE, Side.DESTINATION
    for n in names:
        walk(flow, dst, n, S.RESUMING)
        assert flow.endpoint(dst, n).state is S.RESUMING
    flow.enter_phase(Phase.PRECOPY)
    for n in names:
        walk(flow, src, n, S.PRE_COPY)
    flow.enter_phase(Phase.SOURCE_GRACE)
    walk(flow, src, "d0", S.PRE_COPY_P2P)
    # d0 is quiesced but d1, d2 could still DMA to it: nobody may stop yet.
    forbidden(flow, src, "d0", S.STOP_COPY)
    with pytest.raises(ProtocolViolation):
        flow.enter_phase(Phase.STOP_COPY)
    assert flow.phase is Phase.SOURCE_GRACE
    walk(flow, src, "d1", S.PRE_COPY_P2P)
    assert not flow.source_grace_met()
    walk(flow, src, "d2", S.PRE_COPY_P2P)
    assert flow.source_grace_met()
    flow.enter_phase(Phase.STOP_COPY)
    for n in names:
        walk(flow, src, n, S.STOP_COPY)
        assert flow.endpoint(src, n).state is S.STOP_COPY
    flow.enter_phase(Phase.DESTINATION_GRACE)
    walk(flow, dst, "d0", S.STOP)
    walk(flow, dst, "d0", S.RUNNING_P2P)
    # Before the commit point is recorded no destination device may run.
    forbidden(flow, dst, "d0", S.RUNNING)
    with pytest.raises(ProtocolViolation):
        flow.enter_phase(Phase.COMMIT)
    for n in ["d1", "d2"]:
        walk(flow, dst, n, S.STOP)
        walk(flow, dst, n, S.RUNNING_P2P)
    assert flow.commit_point_reached()
    forbidden(flow, dst, "d0", S.RUNNING)  # reached, but not yet recorded
    with pytest.raises(ProtocolViolation):
        flow.record_commit()
    flow.enter_phase(Phase.COMMIT)
    flow.record_commit()
    assert flow.committed
    with pytest.raises(ProtocolViolation):
        flow.rollback_plan()
    flow.enter_phase(Phase.RESUME)
    for n in names:
        walk(flow, dst, n, S.RUNNING)
    flow.enter_phase(Phase.RELEASE)
    # The source never runs again once the destination has won.
    for n in names:
        walk(flow, src, n, S.STOP)
    for n in names:
        forbidden(flow, src, n, S.RUNNING_P2P)
    flow.enter_phase(Phase.DONE)
    assert {(k[0], e.state) for k, e in flow.endpoints.items()} == {(src, S.STOP), (dst, S.RUNNING)}


def test_destination_waits_for_every_peer_in_grace_even_after_commit_recorded() -> None:
    flow = flow_of([FULL, FULL])
    for n in ["d0", "d1"]:
        walk(flow, Side.DESTINATION, n, S.RESUMING)
        walk(flow, Side.DESTINATION, n, S.STOP)
    walk(flow, Side.DESTINATION, "d0", S.RUNNING_P2P)
    flow.committed = True  # as if recorded; the barrier still has to hold
    forbidden(flow, Side.DESTINATION, "d0", S.RUNNING)


def test_arc_bookkeeping_errors_change_nothing() -> None:
    flow = flow_of([FULL])
    forbidden(flow, Side.SOURCE, "d0", S.STOP_COPY)  # not one arc from RUNNING
    flow.begin_arc(Side.SOURCE, "d0", S.PRE_COPY)
    forbidden(flow, Side.SOURCE, "d0", S.PRE_COPY)  # an arc already in flight
    flow.arc_failed(Side.SOURCE, "d0", S.ERROR)
    forbidden(flow, Side.SOURCE, "d0", S.RUNNING)  # ERROR: only a reset leaves it
    with pytest.raises(ProtocolViolation):
        flow.end_arc(Side.SOURCE, "d0")
    flow.record_reset(Side.SOURCE, "d0")
    e = flow.endpoint(Side.SOURCE, "d0")
    assert (e.state, e.reset, e.pending) == (S.RUNNING, True, None)
    with pytest.raises(ProtocolViolation):
        flow.endpoint(Side.SOURCE, "nope")


def test_phase_order_is_enforced() -> None:
    flow = flow_of([FULL])
    for bad in [Phase.COMMIT, Phase.STOP_COPY, Phase.RESUME, Phase.RELEASE]:
        with pytest.raises(ProtocolViolation):
            flow.enter_phase(bad)
        assert flow.phase is Phase.PREPARE


# -- rollback from every point before the commit -------------------------------


def forward_steps(
    flow: MigrationFlow,
) -> Iterator[tuple[str, Side | None, str, DeviceState | Phase]]:
    """The reference flow as a sequence of single steps."""
    names = [e.name for e in flow.side(Side.SOURCE)]
    for n in names:
        for st in flow.plan_arcs(Side.DESTINATION, n, S.RESUMING):
            yield ("arc", Side.DESTINATION, n, st)
    yield ("phase", None, "", Phase.PRECOPY)
    for n in names:
        r = flow.endpoint(Side.SOURCE, n).route
        if r.precopy:
            yield ("arc", Side.SOURCE, n, r.precopy)
    yield ("phase", None, "", Phase.SOURCE_GRACE)
    for n in names:
        r = flow.endpoint(Side.SOURCE, n).route
        if r.grace:
            current = r.precopy or S.RUNNING
            for st in _arcs_between(flow, Side.SOURCE, n, current, r.grace):
                yield ("arc", Side.SOURCE, n, st)
    if flow.ordered is not None:
        # Once its peers stand in their grace states, before the barrier lets them stop.
        r = flow.endpoint(Side.SOURCE, flow.ordered).route
        current = r.precopy or S.RUNNING
        for st in _arcs_between(flow, Side.SOURCE, flow.ordered, current, S.STOP_COPY):
            yield ("arc", Side.SOURCE, flow.ordered, st)
    yield ("phase", None, "", Phase.STOP_COPY)
    for n in names:
        if n == flow.ordered:
            continue
        r = flow.endpoint(Side.SOURCE, n).route
        current = r.grace or r.precopy or S.RUNNING
        for st in _arcs_between(flow, Side.SOURCE, n, current, S.STOP_COPY):
            yield ("arc", Side.SOURCE, n, st)
    yield ("phase", None, "", Phase.DESTINATION_GRACE)
    for n in names:
        r = flow.endpoint(Side.DESTINATION, n).route
        yield ("arc", Side.DESTINATION, n, S.STOP)
        if r.grace:
            yield ("arc", Side.DESTINATION, n, r.grace)


def _arcs_between(
    flow: MigrationFlow, side: Side, name: str, a: DeviceState, b: DeviceState
) -> tuple[DeviceState, ...]:
    from orchestrator.states import path

    return path(flow.endpoint(side, name).capabilities.flags, a, b)


def apply_step(
    flow: MigrationFlow, step: tuple[str, Side | None, str, DeviceState | Phase]
) -> None:
    kind, side, name, what = step
    if kind == "phase":
        assert isinstance(what, Phase)
        flow.enter_phase(what)
    else:
        assert side is not None and isinstance(what, DeviceState)
        flow.begin_arc(side, name, what)
        flow.end_arc(side, name)


def execute_rollback(flow: MigrationFlow) -> None:
    """Carry out rollback_plan the way the runner does, through the flow's guards:
    every grace state first, then the ordered device, the resets, the others."""
    flow.enter_phase(Phase.ROLLBACK)
    plan = flow.rollback_plan()
    for step in plan.steps:
        if not step.reset and step.quiesce is not None:
            walk(flow, step.side, step.name, step.quiesce)
    finals = [s for s in plan.for_side(Side.SOURCE) if s.final is not None]
    for step in finals:
        if step.name == flow.ordered:
            assert step.final is not None
            walk(flow, Side.SOURCE, step.name, step.final)
    for step in plan.steps:
        if step.reset:
            flow.record_reset(step.side, step.name)
    for step in finals:
        if step.name != flow.ordered and not flow.endpoint(Side.SOURCE, step.name).reset:
            assert step.final is not None
            walk(flow, Side.SOURCE, step.name, step.final)


CAP_MIXES = [
    ([FULL, FULL, FULL], {}),
    ([P2P_ONLY, FULL], {}),
    ([FULL, BARE, PRECOPY_ONLY], {"p2p": False}),
    ([FULL, BARE, FULL], {}),
    ([P2P_ONLY, PRECOPY_ONLY], {}),
    ([BARE], {}),
    ([PRECOPY_ONLY], {}),
]


@pytest.mark.parametrize(("caps", "top"), CAP_MIXES)
def test_rollback_from_every_point_before_commit(
    caps: list[Capabilities], top: dict[str, bool]
) -> None:
    template = flow_of(caps, **top)
    steps = list(forward_steps(copy.deepcopy(template)))
    assert steps, "the reference flow has steps"
    for cut in range(len(steps) + 1):
        flow = copy.deepcopy(template)
        for step in steps[:cut]:
            apply_step(flow, step)
        execute_rollback(flow)
        for e in flow.side(Side.SOURCE):
            assert e.state is S.RUNNING and not e.reset, (cut, e)
        for e in flow.side(Side.DESTINATION):
            assert e.state is S.RUNNING
            assert e.reset == e.touched, (cut, e)


def test_rollback_resets_a_source_device_in_error_and_keeps_the_barrier() -> None:
    flow = flow_of([FULL, FULL])
    for step in forward_steps(flow):
        if step[0] == "phase" and step[3] is Phase.DESTINATION_GRACE:
            break
        if step[1] is Side.SOURCE and step[2] == "d1" and step[3] is S.STOP_COPY:
            flow.begin_arc(Side.SOURCE, "d1", S.STOP_COPY)
            flow.arc_failed(Side.SOURCE, "d1", S.ERROR)
            continue
        apply_step(flow, step)
    flow.enter_phase(Phase.ROLLBACK)
    plan = flow.rollback_plan()
    by_name = {(s.side, s.name): s for s in plan.steps}
    assert by_name[(Side.SOURCE, "d1")].reset
    assert by_name[(Side.SOURCE, "d0")].quiesce is S.RUNNING_P2P
    walk(flow, Side.SOURCE, "d0", S.RUNNING_P2P)
    # d1 may not be reset (it would read RUNNING) while d0 is stopped; once d0 is
    # in its grace state it may, and d0 runs.  A peer in ERROR is no obstacle to
    # d0 running: whatever reaches d1 is lost in its reset.
    flow.record_reset(Side.SOURCE, "d1")
    walk(flow, Side.SOURCE, "d0", S.RUNNING)


# -- pre-copy convergence ----------------------------------------------------


def decide(
    plan: Plan,
    remaining: dict[str, Remaining],
    *,
    bw: float = 100 * 2**20,
    rnd: int = 1,
    elapsed: float = 0.0,
    forced: bool = False,
) -> tuple[str, str]:
    d = decide_precopy(
        plan,
        round_number=rnd,
        remaining=remaining,
        bandwidth_bytes_s=bw,
        elapsed_s=elapsed,
        forced=forced,
    )
    return d.action, d.reason


def test_converges_when_initial_drained_and_bytes_fit() -> None:
    plan = plan_of(2, downtime_limit_ms=100)  # 100 ms at 100 MiB/s = 10 MiB
    ok = {"d0": Remaining(0, 4 << 20, 4 << 20), "d1": Remaining(0, 0, 5 << 20)}
    action, reason = decide(plan, ok)
    assert action == "switchover" and "converged" in reason
    d = decide_precopy(
        plan, round_number=1, remaining=ok, bandwidth_bytes_s=100 * 2**20, elapsed_s=0
    )
    assert d.converged and d.expected_downtime_ms == pytest.approx(90.0)


def test_the_models_margin_must_fit_the_limit_too() -> None:
    # 90 ms predicted fits 100 ms; with 15 ms of margin it does not: another round.
    plan = plan_of(2, downtime_limit_ms=100)
    ok = {"d0": Remaining(0, 4 << 20, 4 << 20), "d1": Remaining(0, 0, 5 << 20)}
    d = decide_precopy(
        plan,
        round_number=1,
        remaining=ok,
        bandwidth_bytes_s=100 * 2**20,
        elapsed_s=0,
        predicted_ms=90.0,
        margin_ms=15.0,
    )
    assert d.action == "continue" and not d.converged
    assert "predicted at 90 ms (+15 ms margin), over the 100 ms limit" in d.reason


def test_waits_for_initial_bytes_even_when_small() -> None:
    plan = plan_of(1)
    action, reason = decide(plan, {"d0": Remaining(10, 0, 10)})
    assert action == "continue" and "initial data not drained on d0" in reason


def test_no_convergence_on_the_round_initial_data_came_back() -> None:
    # Drained by the round's end, and the window fits: still another round, since
    # the destination has not acknowledged the new initial data.
    plan = plan_of(2, downtime_limit_ms=100)
    back = {"d0": Remaining(0, 0, 1 << 20, initial_back=True), "d1": Remaining(0, 0, 1 << 20)}
    d = decide_precopy(
        plan, round_number=3, remaining=back, bandwidth_bytes_s=100 * 2**20, elapsed_s=0
    )
    assert d.action == "continue" and not d.converged
    assert d.reason == "new initial data came back on d0 this round"
    # Not drained either: the return is what the reason names.
    still = {**back, "d0": Remaining(4096, 0, 1 << 20, initial_back=True)}
    assert decide(plan, still)[1] == "new initial data came back on d0 this round"
    # The next round's report, drained, converges as before.
    after = {**back, "d0": Remaining(0, 0, 1 << 20)}
    assert decide(plan, after)[0] == "switchover"


def test_a_return_does_not_stop_the_policy_or_the_operator() -> None:
    back = {"d0": Remaining(0, 0, 1 << 20, initial_back=True)}
    plan = plan_of(1, downtime_limit_ms=100, precopy_max_rounds=5, precopy_policy="abort")
    action, reason = decide(plan, back, rnd=5)
    assert action == "abort" and "(new initial data came back on d0 this round)" in reason
    action, reason = decide(plan, back, rnd=2, forced=True)
    assert action == "switchover" and "not converged: new initial data came back on d0" in reason
    # A device without pre-copy has no initial data to come back.
    fixed = {"d0": Remaining(0, 0, 1 << 20, pre_copy=False, initial_back=True)}
    assert "came back" not in decide(plan_of(1, downtime_limit_ms=100), fixed)[1]


def test_continues_then_applies_policy_at_max_rounds() -> None:
    big = {"d0": Remaining(0, 50 << 20, 50 << 20)}
    for policy in ("abort", "switchover"):
        plan = plan_of(1, downtime_limit_ms=100, precopy_max_rounds=5, precopy_policy=policy)
        assert decide(plan, big, rnd=4)[0] == "continue"
        action, reason = decide(plan, big, rnd=5)
        assert action == policy and "after 5 round(s)" in reason


def test_precopy_deadline_applies_policy() -> None:
    plan = plan_of(1, downtime_limit_ms=100, timeouts={"precopy_s": 30})
    action, reason = decide(plan, {"d0": Remaining(0, 50 << 20, 50 << 20)}, elapsed=31)
    assert action == "abort" and "deadline" in reason


def test_device_without_precopy_that_cannot_fit_decides_at_once() -> None:
    plan = plan_of(2, downtime_limit_ms=100, precopy_policy="switchover")
    remaining = {"d0": Remaining(0, 0, 0), "d1": Remaining(0, 0, 20 << 20, pre_copy=False)}
    action, reason = decide(plan, remaining, rnd=1)
    assert action == "switchover" and "cannot converge" in reason


def test_without_any_precopy_device_switches_over_at_once() -> None:
    plan = plan_of(2, downtime_limit_ms=100)
    remaining = {n: Remaining(0, 0, 1 << 20, pre_copy=False) for n in ("d0", "d1")}
    # Bandwidth unknown: nothing was sent in pre-copy to measure it.
    action, reason = decide(plan, remaining, bw=0.0)
    assert action == "switchover" and "no device has pre-copy" in reason


@pytest.mark.parametrize(("rnd", "limit"), list(itertools.product([1, 3], [10, 1000])))
def test_decision_is_never_continue_past_max_rounds(rnd: int, limit: int) -> None:
    plan = plan_of(1, downtime_limit_ms=limit, precopy_max_rounds=rnd)
    action, _ = decide(plan, {"d0": Remaining(5, 1 << 30, 1 << 30)}, rnd=rnd)
    assert action in ("abort", "switchover")


def test_the_destination_half_refuses_two_devices_without_p2p() -> None:
    """Its own check, should a source (an old or a faulty one) send such a plan."""
    plan = plan_of(3)
    with pytest.raises(PlanError, match="no order helps"):
        MigrationFlow.for_destination(plan, {"d0": FULL, "d1": BARE, "d2": PRECOPY_ONLY})
    flow = MigrationFlow.for_destination(plan, {"d0": FULL, "d1": BARE, "d2": FULL})
    assert flow.ordered == "d1"
