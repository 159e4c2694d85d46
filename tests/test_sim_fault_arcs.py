"""Faults at the destination's post-load arcs, and delays, in whole migrations.

A fault at a state fires on its first entry, so a destination fault at STOP
or RUNNING_P2P strikes the walk to RESUMING, in prepare.  A fault at an arc
reaches the arcs after the load: RESUMING -> STOP (the end of the stream
loaded) and STOP -> RUNNING_P2P (the destination's grace barrier), both
before the commit point, so the migration rolls back.  A delay lengthens
one arc by exactly its ``delay_ms`` (trio's MockClock), which is how a
budget overrun is staged.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from orchestrator.engine import Migration
from orchestrator.report import MigrationReport
from orchestrator.states import DeviceState, Side
from tests.helpers import make_resolved, sim_device
from tests.invariants import check_all

S = DeviceState


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def gpus(n: int, **source: Any) -> list[dict[str, Any]]:
    params = {"transition_ms": 2, "dirty_mib_s": 1, "drain_mib_s": 64, **source}
    return [sim_device(f"gpu{i}", seed=i, **params) for i in range(n)]


async def migrate(devices: list[dict[str, Any]], **top: Any) -> tuple[Migration, MigrationReport]:
    m = Migration(make_resolved(devices, **top))
    await m.run()
    await check_all(m)
    assert m.report is not None
    return m, m.report


# The arcs after the load, with the P2P states and (one device) without.
POST_LOAD_ARCS = [(True, "RESUMING->STOP"), (True, "STOP->RUNNING_P2P"), (False, "RESUMING->STOP")]


@pytest.mark.parametrize(("p2p", "at"), POST_LOAD_ARCS)
@pytest.mark.parametrize("kind", ["error", "error_state", "hang"])
async def test_a_fault_at_a_post_load_arc_rolls_back(
    autojump_clock: Any, p2p: bool, at: str, kind: str
) -> None:
    devices = gpus(3) if p2p else gpus(1, p2p=False)
    victim = devices[-1]["name"]
    devices[-1]["destination"]["fault"] = {"at": at, "kind": kind}
    m, r = await migrate(devices, timeouts={"device_call_s": 2})
    # Pre-copy had begun: rolled back, not refused, and by the arc's own device call.
    assert r.outcome == "rolled_back", r.error
    assert not r.committed
    assert r.error is not None
    assert (r.error.side, r.error.device, r.error.operation) == ("destination", victim, "set_state")
    assert r.error.kind == ("device_timeout" if kind == "hang" else "device_error")
    # The destination finishes its load while the source drains (stop_copy).
    assert r.error.phase in ("stop_copy", "destination_grace")
    start, _, end = at.partition("->")
    if kind != "hang":
        assert f"injected {kind} fault at entering {end} from {start}" in r.error.message
    for d in r.devices:
        assert d.source_state == "RUNNING"
    # The walk to RESUMING entered the arc's end by another arc, untouched; the
    # first arc of the victim's to fail is the faulty one.
    arcs = [e for e in m.trace if e.side is Side.DESTINATION and e.device == victim]
    taken = [(e.from_state, e.to_state) for e in arcs if e.kind == "arc_end"]
    assert (S.STOP, S.RESUMING) in taken
    assert any(to is DeviceState[end] for _, to in taken[: taken.index((S.STOP, S.RESUMING))])
    failed = [(e.from_state, e.detail["target"]) for e in arcs if e.kind == "arc_failed"]
    assert failed[:1] == [(DeviceState[start], end)]


async def test_a_state_fault_at_stop_still_strikes_the_walk_to_resuming(
    autojump_clock: Any,
) -> None:
    devices = gpus(2)
    devices[1]["destination"]["fault"] = {"at": "STOP", "kind": "error"}
    _, r = await migrate(devices)
    assert r.outcome == "refused"
    assert r.error is not None and r.error.phase == "prepare"


def _downtime(r: MigrationReport) -> float:
    assert r.outcome == "succeeded", r.error
    assert r.downtime_ms is not None
    return r.downtime_ms


@pytest.mark.parametrize("at", ["RESUMING->STOP", "STOP->RUNNING_P2P", "RUNNING_P2P->RUNNING"])
async def test_a_delay_in_the_switchover_lengthens_the_downtime_by_exactly_delay_ms(
    autojump_clock: Any, at: str
) -> None:
    _, plain = await migrate(gpus(1))
    devices = gpus(1)
    devices[0]["destination"]["fault"] = {"at": at, "kind": "delay", "delay_ms": 40}
    _, delayed = await migrate(devices)
    assert _downtime(delayed) - _downtime(plain) == pytest.approx(40, abs=1e-6)


async def test_a_delay_past_the_call_deadline_times_out_and_rolls_back(
    autojump_clock: Any,
) -> None:
    devices = gpus(2)
    devices[1]["destination"]["fault"] = {
        "at": "STOP->RUNNING_P2P",
        "kind": "delay",
        "delay_ms": 5000,
    }
    _, r = await migrate(devices, timeouts={"device_call_s": 2})
    assert r.outcome == "rolled_back"
    assert r.error is not None
    assert (r.error.kind, r.error.side, r.error.device, r.error.operation) == (
        "device_timeout",
        "destination",
        "gpu1",
        "set_state",
    )
