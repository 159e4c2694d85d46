"""The strict downtime budget: the VM's pause kept within the limit, success or not.

Under trio's MockClock the simulated devices take exactly their declared
times (and a ``delay`` fault exactly its ``delay_ms`` more), so a step that
overruns its prediction, and the pause the VM saw, are exact here.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.engine import (
    Destination,
    DeviceDriver,
    LocalDestination,
    Migration,
    Share,
)
from orchestrator.report import MigrationReport
from orchestrator.transport import RateLimiter
from tests.helpers import make_resolved, sim_device
from tests.invariants import check_all

LIMIT_MS = 200


async def run(devices: list[dict[str, Any]], **top: Any) -> MigrationReport:
    m = Migration(make_resolved(devices, **top))
    await m.run()
    await check_all(m)
    assert m.report is not None
    return m.report


def gpus(n: int, **params: Any) -> list[dict[str, Any]]:
    devices = []
    for i in range(n):
        device = sim_device(f"gpu{i}", seed=i, transition_ms=5, state_mib=1, **params)
        device["destination"] = {"transition_ms": 5}
        devices.append(device)
    return devices


def delayed(at: str, side: str = "source", ms: float = 1000) -> list[dict[str, Any]]:
    devices = gpus(2)
    fault = {"at": at, "kind": "delay", "delay_ms": ms}
    if side == "source":
        devices[1]["source"]["fault"] = fault
    else:
        devices[1]["destination"]["fault"] = fault
    return devices


async def test_a_window_that_fits_succeeds_and_every_check_is_reported(
    autojump_clock: Any,
) -> None:
    r = await run(gpus(3), downtime_limit_ms=LIMIT_MS, downtime_policy="strict")
    assert r.outcome == "succeeded", r.error
    assert r.budget is not None
    assert r.budget["policy"] == "strict" and r.budget["blown_at"] is None
    steps = [c["step"] for c in r.budget["checks"]]
    assert steps == ["pause", "stop_arcs", "settle_arcs", "vote", "commit"]
    assert all(c["fits"] for c in r.budget["checks"])
    assert r.downtime_ms is not None and r.downtime_ms <= LIMIT_MS


@pytest.mark.parametrize(
    ("at", "side"),
    [("PRE_COPY_P2P->STOP_COPY", "source"), ("RESUMING->STOP", "destination")],
    ids=["source-stop-arc", "destination-settle-arc"],
)
async def test_strict_rolls_back_a_step_that_overruns_within_the_limit(
    autojump_clock: Any, at: str, side: str
) -> None:
    r = await run(delayed(at, side), downtime_limit_ms=LIMIT_MS, downtime_policy="strict")
    assert r.outcome == "rolled_back", r.error
    assert r.error is not None and r.error.kind == "downtime_budget"
    assert "at the last moment a rollback fits the limit" in r.error.message
    assert r.budget is not None and r.budget["blown_at"] == "watchdog"
    # The pause the VM saw: the limit, not the second the delayed arc would take.
    assert r.downtime_ms is not None
    assert r.budget["pause_ms"] == r.downtime_ms
    assert LIMIT_MS * 0.9 <= r.downtime_ms <= LIMIT_MS * 1.05, r.downtime_ms
    assert {(d.source_state, d.destination_state) for d in r.devices} == {("RUNNING", "RUNNING")}


async def test_best_effort_goes_on_past_the_limit_and_the_checks_say_where(
    autojump_clock: Any,
) -> None:
    r = await run(delayed("PRE_COPY_P2P->STOP_COPY"), downtime_limit_ms=LIMIT_MS)
    assert r.outcome == "succeeded", r.error
    assert r.downtime_ms is not None and r.downtime_ms > 1000
    assert r.budget is not None
    assert r.budget["policy"] == "best_effort" and r.budget["blown_at"] is None
    misses = [c["step"] for c in r.budget["checks"] if not c["fits"]]
    assert misses and misses[0] == "settle_arcs"
    assert any("exceeded the plan's limit" in note for note in r.notes)


async def test_strict_never_switches_over_into_a_window_predicted_over_the_limit(
    autojump_clock: Any,
) -> None:
    # Pre-copy cannot converge (the device dirties about 1 MiB a round that it
    # produces at 16 MiB/s: some 70 ms against a 50 ms limit) and its policy
    # says switch over anyway: strict still guards the pause.
    devices = gpus(1)
    devices[0]["source"].update(state_mib=4, drain_mib_s=16, dirty_mib_s=12)
    r = await run(
        devices,
        downtime_limit_ms=50,
        precopy_policy="switchover",
        precopy_max_rounds=2,
        downtime_policy="strict",
    )
    assert r.outcome == "rolled_back", r.error
    assert r.precopy.decision == "switchover"
    assert r.error is not None and r.error.kind == "downtime_budget"
    assert "before pause" in r.error.message
    assert r.budget is not None and r.budget["blown_at"] == "pause"
    assert r.budget["over_ms"] > 0
    assert r.downtime_ms is None  # nothing stopped: the VM never paused


async def test_strict_refuses_before_any_change_a_window_its_arcs_alone_overrun(
    autojump_clock: Any,
) -> None:
    devices = gpus(1)
    devices[0]["source"]["transition_ms"] = 100
    devices[0]["destination"]["transition_ms"] = 100
    r = await run(
        devices, downtime_limit_ms=100, precopy_policy="switchover", downtime_policy="strict"
    )
    assert r.outcome == "refused", r.error
    assert r.error is not None and r.error.kind == "downtime_unreachable"
    assert "downtime_policy strict" in r.error.message


async def test_the_window_is_reported_predicted_against_measured(autojump_clock: Any) -> None:
    r = await run(gpus(2), downtime_limit_ms=LIMIT_MS)
    assert r.outcome == "succeeded", r.error
    window = r.window
    assert window is not None
    assert window["measured_ms"] == r.downtime_ms
    components = window["components"]
    for name in ("stop_arcs", "settle_arcs", "run_arcs"):
        c = components[name]
        assert c["measured_ms"] == pytest.approx(c["predicted_ms"]), (name, c)
    assert components["transfer"]["measured_ms"] is not None
    device = window["devices"]["gpu0"]
    assert device["stop_arcs"]["measured_ms"] == pytest.approx(5)
    assert device["settle_arcs"]["measured_ms"] == pytest.approx(10)  # RESUMING->STOP->P2P


# -- the destination's share, on its own clock ----------------------------------------


class FarDestination(LocalDestination):
    """The destination engine as another host's daemon hosts it, reached over a
    link of ``rtt_s``: it keeps its own clock and takes the share it is granted
    (the transport stands in for the daemon's channel; the engine is the same)."""

    on_this_host = False

    def __init__(self, *args: Any, rtt_s: float) -> None:
        super().__init__(*args)
        self.rtt_s = rtt_s

    def grant(self, share: Share) -> bool:
        self.engine.allowance.grant(share)
        return True


async def run_far(devices: list[dict[str, Any]], rtt_s: float, **top: Any) -> Migration:
    resolved = make_resolved(devices, **top)

    def far(driver: DeviceDriver, limiter: RateLimiter | None) -> Destination:
        return FarDestination(resolved, driver, limiter, rtt_s=rtt_s)

    m = Migration(resolved, destination=far)
    await m.run()
    await check_all(m)
    return m


async def test_the_destination_begins_no_settle_its_share_cannot_fit(autojump_clock: Any) -> None:
    # The link's round trip comes off the destination's share: a source stop arc
    # that overruns leaves the source's own checks passing, while the destination,
    # which must vote that much sooner, refuses to begin gpu1's settle.
    devices = delayed("PRE_COPY_P2P->STOP_COPY", ms=120)
    m = await run_far(devices, rtt_s=0.15, downtime_limit_ms=2 * LIMIT_MS, downtime_policy="strict")
    r = m.report
    assert r is not None
    assert r.outcome == "rolled_back", r.error
    assert r.error is not None and r.error.kind == "downtime_budget"
    assert "at the destination, before settle_arcs of gpu1" in r.error.message
    assert r.budget is not None and r.budget["blown_at"] == "settle_arcs (destination)"
    share = r.budget["destination_share"]
    assert share is not None and share["settle_ms"] == pytest.approx(10)
    assert [c["step"] for c in r.budget["checks"][:-1]] == ["pause", "stop_arcs"]
    assert all(c["fits"] for c in r.budget["checks"][:-1])
    # gpu1 never left RESUMING (its settle was not begun); gpu0 settled in time.
    allowance = m.destination.engine.allowance  # type: ignore[attr-defined]
    verdicts = {c["device"]: c["fits"] for c in allowance.as_report()["checks"]}
    assert verdicts == {"gpu0": True, "gpu1": False}
    assert {(d.source_state, d.destination_state) for d in r.devices} == {("RUNNING", "RUNNING")}
    assert r.downtime_ms is not None and r.downtime_ms <= 2 * LIMIT_MS


async def test_a_share_that_fits_is_granted_and_every_step_checked(autojump_clock: Any) -> None:
    m = await run_far(gpus(2), rtt_s=0.001, downtime_limit_ms=LIMIT_MS, downtime_policy="strict")
    r = m.report
    assert r is not None
    assert r.outcome == "succeeded", r.error
    assert r.budget is not None
    left = r.budget["destination_share"]["left_ms"]
    allowance = m.destination.engine.allowance  # type: ignore[attr-defined]
    report = allowance.as_report()
    assert report["left_ms"] == left > 0
    assert [(c["step"], c["fits"]) for c in report["checks"]] == [
        ("settle_arcs", True),
        ("settle_arcs", True),
    ]


async def test_best_effort_grants_no_share(autojump_clock: Any) -> None:
    m = await run_far(gpus(1), rtt_s=0.001, downtime_limit_ms=LIMIT_MS)
    assert m.report is not None and m.report.outcome == "succeeded"
    assert m.report.budget is not None and m.report.budget["destination_share"] is None
    assert m.destination.engine.allowance.as_report() is None  # type: ignore[attr-defined]
