"""Random migrations: 1 to 64 devices, random latencies, sizes and faults.

Whatever happens, the recorded trace and the devices must keep the promises
of DESIGN.md (tests/invariants.py): the barriers held; a success means every
digest matches, every destination runs and every source is stopped; a
rollback means every source runs again with its own state (or was reset
from ERROR, and the report says so) and every touched destination was
reset; no destination ran before the commit and no source after it.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.engine import Migration
from tests.helpers import make_resolved
from tests.invariants import check_all

# States each side enters, so that a fault has a chance to fire.
SOURCE_STATES = ["PRE_COPY", "PRE_COPY_P2P", "RUNNING_P2P", "STOP_COPY", "STOP"]
DESTINATION_STATES = ["RUNNING_P2P", "STOP", "RESUMING", "RUNNING"]


@st.composite
def device_lists(draw: st.DrawFn) -> tuple[list[dict[str, Any]], bool]:
    n = draw(st.integers(min_value=1, max_value=64))
    p2p_plan = draw(st.booleans())
    # A P2P plan of several devices may have one without P2P: it joins by order.
    ordered = draw(st.none() | st.integers(min_value=0, max_value=n - 1))
    devices: list[dict[str, Any]] = []
    for i in range(n):
        pre_copy = draw(st.booleans())
        p2p = i != ordered if p2p_plan and n > 1 else draw(st.booleans())
        source: dict[str, Any] = {
            "state_mib": draw(st.sampled_from([0.0625, 0.125, 0.25])),
            "dirty_mib_s": draw(st.sampled_from([0, 0.5, 4])),
            "transition_ms": draw(st.floats(min_value=0, max_value=20)),
            "drain_mib_s": draw(st.sampled_from([None, 8.0, 64.0])),
            "p2p": p2p,
            "pre_copy": pre_copy,
            "seed": i,
        }
        destination: dict[str, Any] = {"transition_ms": draw(st.floats(min_value=0, max_value=20))}
        devices.append(
            {"name": f"d{i}", "backend": "simulated", "source": source, "destination": destination}
        )
    # Up to two faults, so that a failure can also strike during the rollback
    # the first one causes (a fault that is not "once" fires again there).
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        victim = draw(st.integers(min_value=0, max_value=n - 1))
        side = draw(st.sampled_from(["source", "destination"]))
        states = SOURCE_STATES if side == "source" else DESTINATION_STATES
        kind = draw(st.sampled_from(["error", "error_state", "hang", "corrupt"]))
        fault: dict[str, Any]
        if draw(st.booleans()):
            fault = {"at": "stream", "offset": draw(st.integers(0, 70_000)), "kind": kind}
        else:
            fault = {"at": draw(st.sampled_from(states)), "kind": kind}
        fault["once"] = draw(st.booleans())
        devices[victim][side]["fault"] = fault
    return devices, p2p_plan


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=device_lists(), sequential=st.booleans())
def test_random_migrations_keep_every_promise(
    case: tuple[list[dict[str, Any]], bool], sequential: bool
) -> None:
    devices, p2p_plan = case
    resolved = make_resolved(
        devices,
        p2p=p2p_plan,
        downtime_limit_ms=200,
        precopy_max_rounds=8,
        precopy_policy="switchover",
        timeouts={"device_call_s": 5},
    )

    async def main() -> None:
        m = Migration(resolved, sequential_switchover=sequential)
        report = await m.run()
        await check_all(m)
        if report.outcome == "failed":
            # Failed means: a fault after the commit point, or a rollback that
            # could not finish; either way the report says what went wrong.
            assert report.error is not None
            assert report.committed or report.notes

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
