"""Live control of a migration in pre-copy: new limits, a forced switchover.

The engine's half on a virtual clock (``autojump_clock``): pre-copy of a
device that dirties faster than it drains never converges at 1 ms, so a
migration stays in pre-copy until the test changes something, however busy
the machine; the rounds and the rate limiter see only virtual time.  The
service's, the API's and the CLI's halves are in ``test_control_api.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from pydantic import ValidationError

from orchestrator.control import Control, ControlRefused, ControlRequest
from orchestrator.convergence import Remaining, decide_precopy
from orchestrator.engine import Migration, TraceEvent
from orchestrator.flow import Phase
from orchestrator.transport import RateLimiter
from tests.helpers import make_plan, make_resolved, sim_device
from tests.invariants import check_all

MIB = 1 << 20


def never_converging(**top: Any) -> Migration:
    """Two devices dirtying faster than they drain: at 10 ms (over the window's
    floor, its arcs; under what the dirty bytes take), rounds for ever."""
    devices = [
        sim_device(f"gpu{i}", seed=i, state_mib=1, dirty_mib_s=64, drain_mib_s=16, transition_ms=2)
        for i in range(2)
    ]
    settings = {
        "downtime_limit_ms": 10,
        "precopy_max_rounds": 100_000,
        "timeouts": {"precopy_s": 3600},
        **top,
    }
    return Migration(make_resolved(devices, **settings))


async def rounds_done(m: Migration, n: int) -> None:
    """Return once ``n`` pre-copy rounds have been decided."""
    reached = trio.Event()

    def count(event: TraceEvent) -> None:
        if m.recorder.precopy.rounds >= n:
            reached.set()

    m.observers.append(count)
    try:
        if m.recorder.precopy.rounds < n:
            await reached.wait()
    finally:
        m.observers.remove(count)


async def run_with(m: Migration, change: Any, after_rounds: int = 3) -> None:
    """Run ``m``; after ``after_rounds`` rounds, call ``change(m)``."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.run)
        await rounds_done(m, after_rounds)
        assert m.phase is Phase.PRECOPY
        change(m)
    await check_all(m)


async def test_raising_the_limit_lets_a_migration_converge(autojump_clock: Any) -> None:
    m = never_converging()
    await run_with(m, lambda m: m.control(ControlRequest(downtime_limit_ms=60_000), at=1.0))
    r = m.report
    assert r is not None and r.outcome == "succeeded"
    assert r.precopy.converged and r.precopy.decision == "switchover"
    assert r.precopy.reason is not None and "within 60000 ms" in r.precopy.reason
    # The decision was judged against the limit in force, and so was the downtime.
    assert r.precopy.downtime_limit_ms == 60_000
    assert not any("exceeded" in note for note in r.notes)
    assert r.control is not None and r.control.downtime_limit_ms == 60_000
    (event,) = r.control.events
    assert (event.at, event.action, event.phase) == (1.0, "set", "precopy")
    assert [(c.field, c.before, c.after) for c in event.changes] == [
        ("downtime_limit_ms", 10, 60_000)
    ]


async def test_a_forced_switchover_ends_rounds_that_would_go_on(autojump_clock: Any) -> None:
    m = never_converging()
    await run_with(m, lambda m: m.force_switchover(at=2.0), after_rounds=4)
    r = m.report
    assert r is not None and r.outcome == "succeeded"
    assert r.precopy.decision == "switchover" and not r.precopy.converged
    assert r.precopy.reason is not None
    assert r.precopy.reason.startswith("switchover forced by the operator after")
    assert "over the 10 ms limit" in r.precopy.reason
    # Ended by the round in flight (cut), not several rounds later.
    assert r.precopy.rounds in (4, 5)
    assert any("exceeded the plan's limit of 10 ms" in note for note in r.notes)
    assert r.control is not None and r.control.switchover_forced
    assert [e.action for e in r.control.events] == ["switchover"]


async def test_in_prepare_a_change_applies_from_the_first_round(autojump_clock: Any) -> None:
    m = never_converging()
    assert m.phase is Phase.PREPARE
    m.control(ControlRequest(downtime_limit_ms=60_000), at=0.0)
    m.force_switchover(at=0.0)
    await m.run()
    r = m.report
    assert r is not None and r.outcome == "succeeded"
    assert r.precopy.rounds == 1 and r.precopy.downtime_limit_ms == 60_000
    assert r.precopy.reason is not None
    assert "forced by the operator after 1 round" in r.precopy.reason
    assert r.control is not None
    assert [e.phase for e in r.control.events] == ["prepare", "prepare"]


async def test_the_same_change_twice_is_one_event(autojump_clock: Any) -> None:
    m = never_converging()
    request = ControlRequest(downtime_limit_ms=20, bandwidth_limit_mib_s=100)
    first = m.control(request, at=1.0)
    assert m.control(request, at=2.0) is first
    assert len(first.events) == 1 and len(first.events[0].changes) == 2
    forced = m.force_switchover(at=3.0)
    assert m.force_switchover(at=4.0) is forced and len(forced.events) == 2


async def test_after_the_decision_every_change_is_refused(autojump_clock: Any) -> None:
    m = never_converging(downtime_limit_ms=60_000)
    refusals: list[str] = []

    def in_grace(event: TraceEvent) -> None:
        if event.kind == "phase" and event.detail["phase"] == Phase.SOURCE_GRACE.value:
            with pytest.raises(ControlRefused) as refused:
                m.control(ControlRequest(downtime_limit_ms=5), at=0.0)
            refusals.append(str(refused.value))
            with pytest.raises(ControlRefused) as refused:
                m.force_switchover(at=0.0)
            refusals.append(str(refused.value))

    m.observers.append(in_grace)
    await m.run()
    assert m.report is not None and m.report.outcome == "succeeded"
    assert len(refusals) == 2
    for message in refusals:
        assert "in phase source_grace, past its pre-copy decision (switchover)" in message
    with pytest.raises(ControlRefused, match=r"it has ended \(succeeded\)"):
        m.control(ControlRequest(downtime_limit_ms=5), at=0.0)
    with pytest.raises(ControlRefused, match="has ended"):
        m.force_switchover(at=0.0)
    assert m.report.control is not None and m.report.control.events == []


async def test_a_forced_switchover_asked_again_while_it_goes_on_is_the_same(
    autojump_clock: Any,
) -> None:
    m = never_converging()
    answers: list[Control] = []

    def in_stop_copy(event: TraceEvent) -> None:
        if event.kind == "phase" and event.detail["phase"] == Phase.STOP_COPY.value:
            answers.append(m.force_switchover(at=9.0))

    m.observers.append(in_stop_copy)
    await run_with(m, lambda m: answers.append(m.force_switchover(at=1.0)))
    assert len(answers) == 2 and answers[0] is answers[1]


async def test_a_lowered_cap_holds_the_next_rounds_and_removing_it_lets_them_converge(
    autojump_clock: Any,
) -> None:
    # Devices that drain as fast as the link allows: the cap is the bottleneck.
    devices = [
        sim_device(f"gpu{i}", seed=i, state_mib=8, dirty_mib_s=256, drain_mib_s=None)
        for i in range(2)
    ]
    m = Migration(
        make_resolved(
            devices,
            downtime_limit_ms=10,
            bandwidth_limit_mib_s=64,
            precopy_max_rounds=100_000,
            timeouts={"precopy_s": 3600},
        )
    )

    async def rate_over(seconds: float) -> float:
        before, start = m.recorder.precopy_bytes, trio.current_time()
        await trio.sleep(seconds)
        return (m.recorder.precopy_bytes - before) / (trio.current_time() - start) / MIB

    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.run)
        await rounds_done(m, 2)
        assert 32 < await rate_over(1.0) <= 64 * 1.1
        m.control(ControlRequest(bandwidth_limit_mib_s=4), at=1.0)
        await trio.sleep(0.5)  # what was booked at the old rate crosses
        assert await rate_over(2.0) <= 4 * 1.1
        await rounds_done(m, m.recorder.precopy.rounds + 1)
        assert m.recorder.precopy.bandwidth_limit_mib_s == 4
        # No cap: the devices drain at once, and the next decision converges.
        m.control(ControlRequest.model_validate({"bandwidth_limit_mib_s": None}), at=2.0)
    r = m.report
    assert r is not None and r.outcome == "succeeded"
    assert r.precopy.converged and r.precopy.bandwidth_limit_mib_s is None
    assert r.control is not None and r.control.bandwidth_limit_mib_s is None
    assert [c.after for e in r.control.events for c in e.changes] == [4, None]


async def test_a_waiting_sender_is_held_to_the_new_rate_not_the_old(autojump_clock: Any) -> None:
    limiter = RateLimiter(1 * MIB, burst_s=0)
    done: list[float] = []

    async def send() -> None:
        await limiter.consume(8 * MIB)  # 8 s at the first rate
        done.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(1)  # 1 MiB crossed at 1 MiB/s; 7 MiB left
        limiter.set_rate(7 * MIB)
    assert done == [pytest.approx(start + 2)]

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(0.5)
        limiter.set_rate(None)
    assert done[-1] == pytest.approx(start + 0.5)
    await limiter.consume(100 * MIB)  # no cap: no wait
    assert trio.current_time() == pytest.approx(start + 0.5)


def test_a_request_is_held_to_the_plans_bounds_and_names_the_field() -> None:
    for body, field in [
        ({"downtime_limit_ms": 0}, "downtime_limit_ms"),
        ({"downtime_limit_ms": 3_600_001}, "downtime_limit_ms"),
        ({"downtime_limit_ms": None}, "downtime_limit_ms"),
        ({"bandwidth_limit_mib_s": -1}, "bandwidth_limit_mib_s"),
        ({"bandwidht_limit_mib_s": 5}, "bandwidht_limit_mib_s"),
    ]:
        with pytest.raises(ValidationError) as invalid:
            ControlRequest.model_validate(body)
        assert [e["loc"] for e in invalid.value.errors()] == [(field,)], body
    with pytest.raises(ValidationError, match="give downtime_limit_ms, bandwidth_limit_mib_s"):
        ControlRequest.model_validate({})
    # null removes the cap; a field left out is left as it is.
    assert ControlRequest.model_validate({"bandwidth_limit_mib_s": None}).model_fields_set == {
        "bandwidth_limit_mib_s"
    }


def test_the_decision_reads_the_limit_in_force_and_the_operators_force() -> None:
    plan = make_plan([sim_device("gpu0")], downtime_limit_ms=1)
    remaining = {"gpu0": Remaining(0, 0, MIB)}
    common: dict[str, Any] = {
        "round_number": 2,
        "remaining": remaining,
        "bandwidth_bytes_s": 100 * MIB,
        "elapsed_s": 1.0,
    }
    assert decide_precopy(plan, **common).action == "continue"
    raised = decide_precopy(plan, **common, downtime_limit_ms=100)
    assert raised.action == "switchover" and raised.converged
    forced = decide_precopy(plan, **common, forced=True)
    assert forced.action == "switchover" and not forced.converged
    assert forced.reason == (
        "switchover forced by the operator after 2 round(s) (not converged: the window is "
        "predicted at 10 ms, over the 1 ms limit)"
    )
    both = decide_precopy(plan, **common, downtime_limit_ms=100, forced=True)
    assert both.converged and "(it had converged)" in both.reason
