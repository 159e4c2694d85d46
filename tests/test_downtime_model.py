"""The downtime model: the whole window predicted, and what it decides.

Under trio's MockClock the simulated devices take exactly their declared
times, so the model's figures can be checked against what the switchover
measured without depending on this machine's speed.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.engine import Migration
from orchestrator.states import DeviceState, Side
from tests.helpers import make_resolved, sim_device
from tests.invariants import check_all


async def run(devices: list[dict[str, Any]], **top: Any) -> Migration:
    m = Migration(make_resolved(devices, **top))
    await m.run()
    await check_all(m)
    return m


def both(name: str, seed: int, **params: Any) -> dict[str, Any]:
    """A simulated device whose destination takes the same arcs as its source."""
    device = sim_device(name, seed=seed, **params)
    device["destination"] = {"transition_ms": params.get("transition_ms", 0)}
    return device


async def test_a_device_whose_arcs_alone_overrun_the_limit_is_refused_before_any_change(
    autojump_clock: Any,
) -> None:
    # Of old: predicted 0.005 ms (bytes only), measured 403 ms against 100 ms,
    # "converged".  Its stop and the destination's three arcs take 400 ms, as
    # its backend declares: known before anything changes.
    m = await run([both("gpu0", 0, transition_ms=100, state_mib=1)], downtime_limit_ms=100)
    r = m.report
    assert r is not None
    assert r.outcome == "refused", r.error
    assert r.error is not None and r.error.kind == "downtime_unreachable"
    assert r.precopy.converged is False and r.precopy.decision == "abort"
    assert "cannot meet the limit" in (r.precopy.reason or "")
    assert r.precopy.expected_downtime_ms is not None
    assert r.precopy.expected_downtime_ms >= 400
    assert not [e for e in m.trace if e.kind == "arc_begin" and e.side is Side.SOURCE]
    assert {(d.source_state, d.destination_state) for d in r.devices} == {("RUNNING", "RUNNING")}


async def test_a_plan_that_may_pass_its_limit_by_policy_is_not_refused(
    autojump_clock: Any,
) -> None:
    # precopy_policy = "switchover" with best effort: the operator accepted it.
    m = await run(
        [both("gpu0", 0, transition_ms=100, state_mib=1)],
        downtime_limit_ms=100,
        precopy_policy="switchover",
    )
    assert m.report is not None
    assert m.report.outcome == "succeeded", m.report.error


@pytest.mark.parametrize(
    "devices",
    [
        [both(f"gpu{i}", i, transition_ms=5) for i in range(3)],
        [
            both(f"gpu{i}", i, transition_ms=2, state_mib=4, drain_mib_s=64, dirty_mib_s=4)
            for i in range(4)
        ],
        [both("vf0", 0, transition_ms=3, pre_copy=False, state_mib=2, drain_mib_s=100)],
        # The destination loads as slowly as the source produces: its last piece
        # arrives whole and is loaded after it was read (found by the benchmark).
        [
            {
                **both("vf0", 0, transition_ms=3, pre_copy=False, state_mib=1, drain_mib_s=16),
                "destination": {"transition_ms": 3, "drain_mib_s": 16},
            }
        ],
        # Rounds of different lengths: the quick devices dirty while they wait
        # for the slow one's report (found by the benchmark).
        [
            both("gpu0", 0, transition_ms=2, state_mib=8, drain_mib_s=64, dirty_mib_s=1),
            both("gpu1", 1, transition_ms=2, state_mib=1, drain_mib_s=64, dirty_mib_s=8),
            both("gpu2", 2, transition_ms=2, state_mib=1, drain_mib_s=64, dirty_mib_s=8),
        ],
    ],
    ids=["three-gpus", "dirtying", "no-pre-copy", "destination-bound", "uneven-rounds"],
)
async def test_the_prediction_is_the_measured_window_within_the_overhead(
    autojump_clock: Any, devices: list[dict[str, Any]]
) -> None:
    m = await run(devices, downtime_limit_ms=500)
    r = m.report
    assert r is not None
    assert r.outcome == "succeeded", r.error
    predicted, measured = r.precopy.expected_downtime_ms, r.downtime_ms
    assert predicted is not None and measured is not None
    overhead = r.precopy.forecast["components"]["overhead"]["ms"]  # type: ignore[index]
    # A virtual clock: the orchestrator's own work takes no time here, so the
    # prediction exceeds the window by its estimate of that work, and little else.
    assert measured - 0.1 <= predicted <= measured + overhead + 0.5, (predicted, measured)


async def test_no_device_stops_while_its_destination_still_loads_its_initial_data(
    autojump_clock: Any,
) -> None:
    # The source reads 4 MiB at once; the destination loads them at 40 MiB/s
    # (100 ms).  On one host too the switchover waits for that load (QEMU's
    # switchover-ack), so it does not land in the window; what was sent after
    # it, and not yet loaded, is the model's backlog.
    gpu = both("gpu0", 0, transition_ms=1, state_mib=4)
    gpu["destination"]["drain_mib_s"] = 40
    m = await run([gpu], downtime_limit_ms=60)
    r = m.report
    assert r is not None
    assert r.outcome == "succeeded", r.error
    assert r.downtime_ms is not None and r.downtime_ms < 20, r.downtime_ms
    first_stop = next(
        e.time for e in m.trace if e.kind == "arc_begin" and e.to_state is DeviceState.STOP_COPY
    )
    started = next(e.time for e in m.trace if e.kind == "arc_begin")
    assert r.devices[0].bytes_precopy >= 4 << 20
    assert first_stop - started >= 0.1, first_stop - started


async def test_a_device_announced_after_the_decision_is_waited_for_too(
    autojump_clock: Any,
) -> None:
    # The pre-copy deadline cuts gpu1's first round: it announces its initial
    # data only after the decision, while the switchover-ack already waits for
    # gpu0's slow load.  (The wait once walked a dict that grew under it.)
    gpu0 = sim_device("gpu0", seed=0, state_mib=4, transition_ms=1)
    gpu0["destination"] = {"drain_mib_s": 2}
    gpu1 = sim_device("gpu1", seed=1, state_mib=8, transition_ms=1, drain_mib_s=4)
    for _ in range(5):
        m = await run(
            [gpu0, gpu1],
            downtime_limit_ms=5000,
            precopy_policy="switchover",
            timeouts={"precopy_s": 0.5},
        )
        assert m.report is not None and m.report.outcome == "succeeded", m.report
        stops = [
            e.time for e in m.trace if e.kind == "arc_begin" and e.to_state is DeviceState.STOP_COPY
        ]
        # gpu0's 4 MiB at 2 MiB/s: no device stopped before they were loaded.
        started = next(e.time for e in m.trace if e.kind == "arc_begin")
        assert min(stops) - started >= 2.0


async def test_a_window_that_fits_only_without_its_margin_is_refused_under_abort(
    autojump_clock: Any,
) -> None:
    # 80 ms of arcs and a margin of some 8 ms against an 84 ms limit: abort can
    # never converge, so it refuses before any change instead of running rounds.
    m = await run([both("gpu0", 0, transition_ms=20, state_mib=1)], downtime_limit_ms=84)
    r = m.report
    assert r is not None
    assert r.outcome == "refused", r.error
    assert r.error is not None and "(with its margin)" in r.error.message
    assert r.precopy.rounds == 0
    forecast = r.precopy.forecast
    assert (
        forecast is not None
        and forecast["total_ms"] <= 84 < forecast["total_ms"] + forecast["margin_ms"]
    )


async def test_what_a_device_dirties_while_the_switchover_ack_waits_is_predicted(
    autojump_clock: Any,
) -> None:
    # Device-paced (13 MiB/s each way): the source reads its initial MiB in one
    # piece and the destination loads it after, 77 ms during which the device
    # dirties as many bytes again as it did in the round.  Of old the model
    # left that wait out and predicted 0.6 of the stop-copy bytes.
    devices = []
    for i in range(4):
        gpu = both(f"gpu{i}", i, transition_ms=1, state_mib=1, drain_mib_s=13, dirty_mib_s=4)
        gpu["destination"]["drain_mib_s"] = 13
        devices.append(gpu)
    m = await run(devices, downtime_limit_ms=500)
    r = m.report
    assert r is not None
    assert r.outcome == "succeeded", r.error
    forecast = r.precopy.forecast
    assert forecast is not None
    for d in r.devices:
        predicted = forecast["devices"][d.name]["stop_bytes"]
        assert predicted == pytest.approx(d.bytes_stopcopy, rel=0.15), (d.name, predicted)
    assert r.downtime_ms is not None and r.precopy.expected_downtime_ms is not None
    assert r.downtime_ms == pytest.approx(r.precopy.expected_downtime_ms, rel=0.1)


async def test_every_figure_says_where_it_came_from(autojump_clock: Any) -> None:
    m = await run([both("gpu0", 0, transition_ms=4, state_mib=1)], downtime_limit_ms=500)
    r = m.report
    assert r is not None and r.precopy.forecast is not None
    components = r.precopy.forecast["components"]
    for name in ("stop_arcs", "transfer", "settle_arcs", "run_arcs", "commit", "overhead"):
        assert components[name]["source"], name
    # Walked in prepare (the destination's RUNNING -> RUNNING_P2P), or declared.
    assert components["settle_arcs"]["source"] in ("measured", "declared", "estimated")
    assert components["stop_arcs"]["ms"] == pytest.approx(4)
    device = r.precopy.forecast["devices"]["gpu0"]
    assert device["settle_arcs"]["ms"] == pytest.approx(8)  # RESUMING -> STOP -> RUNNING_P2P
    assert device["run_arcs"]["ms"] == pytest.approx(4)


async def test_a_plan_without_pre_copy_that_cannot_meet_its_limit_is_aborted(
    autojump_clock: Any,
) -> None:
    # Of old, abort was ignored when no device had pre-copy and no bandwidth cap:
    # 256 MiB switched over with seconds of downtime against a 100 ms limit.
    # Here 4 MiB that its device produces at 16 MiB/s: 250 ms.
    device = both("vf0", 0, pre_copy=False, state_mib=4, drain_mib_s=16)
    m = await run([device], downtime_limit_ms=100, precopy_policy="abort")
    r = m.report
    assert r is not None
    assert r.outcome == "rolled_back", r.error
    assert r.downtime_ms is None  # nothing stopped
    assert "cannot converge" in (r.precopy.reason or "")


def test_a_transfer_no_bandwidth_measures_yet_is_unknown_not_infinite() -> None:
    # Between hosts, a first round may end before any byte was delivered: the
    # floor must not read "cannot converge" from a bandwidth of zero.
    from orchestrator.engine.devices import DeviceDriver, EngineContext
    from orchestrator.engine.model import DeviceForecast, DowntimeModel, Figure, Forecast
    from orchestrator.engine.trace import Trace

    resolved = make_resolved([both("gpu0", 0), both("vf0", 1, pre_copy=False)])
    driver = DeviceDriver(EngineContext.create(resolved.plan, "m", Trace()))
    model = DowntimeModel(driver, vcpus=False, remote=True)
    arcs = Figure(5.0, "declared")
    devices = {
        "gpu0": DeviceForecast(arcs, arcs, 2**20, arcs, arcs),
        "vf0": DeviceForecast(arcs, arcs, 2**20, arcs, arcs),
    }
    forecast = Forecast(
        float("inf"),
        {"stop_arcs": arcs, "transfer": Figure(float("inf"), "no bandwidth"), "run_arcs": arcs},
        devices,
    )
    assert model.floor_ms(forecast, {"vf0"}, 0.0, margin=False) == 10.0
    assert model.floor_ms(forecast, {"vf0"}, 0.0) == 11.0  # a tenth of declared arcs
    # Measured: the device without pre-copy's bytes count, the other's do not.
    assert model.floor_ms(forecast, {"vf0"}, 2**20 / 0.1, margin=False) == pytest.approx(110.0)
    assert model.floor_ms(forecast, {"vf0"}, 2**20 / 0.1) == pytest.approx(11.0 + 100 * 1.15)


async def test_arcs_not_walked_yet_come_from_this_hosts_history(
    autojump_clock: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A device whose backend declares nothing (as VFIO's): its stop arc is not
    # walked before the decision; the first migration can only estimate it, the
    # next one reads what the first measured, from the journal.
    from orchestrator.backends.simulated import SimulatedDevice
    from orchestrator.journal import Journal

    monkeypatch.setattr(SimulatedDevice, "declared_arc_s", lambda self, a, b: None)
    monkeypatch.setattr(SimulatedDevice, "model_key", lambda self: "simulated/test-model")
    devices = [both("gpu0", 0, transition_ms=7, state_mib=1)]
    async with await Journal.open(tmp_path / "state") as journal:

        async def journaled() -> Migration:
            resolved = make_resolved(devices, downtime_limit_ms=500)
            m = Migration(resolved, journal=journal)
            await journal.create(m.id, resolved.plan)
            await m.run()
            return m

        first = await journaled()
        for _ in range(2):  # an arc's history counts from its third sample
            await journaled()
        second = await journaled()
        history = await journal.arc_history(["simulated/test-model"])
    assert first.report is not None and second.report is not None
    assert second.report.outcome == "succeeded", second.report.error
    stop = ("simulated/test-model", "source", "PRE_COPY_P2P", "STOP_COPY")
    assert history[stop] == pytest.approx(0.007)
    before = first.report.precopy.forecast
    after = second.report.precopy.forecast
    assert before is not None and after is not None
    assert before["devices"]["gpu0"]["stop_arcs"]["source"] == "estimated"
    assert after["devices"]["gpu0"]["stop_arcs"] == {"ms": 7.0, "source": "history"}
