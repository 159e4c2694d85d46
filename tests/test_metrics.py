"""The Prometheus metrics, read back from the text exposition after real runs.

Every test builds its own ``CollectorRegistry``.  The last ones lint the
exposition with ``promtool check metrics`` (Debian package ``prometheus``);
without promtool, and without a way to install it, they skip and say why.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import __version__
from orchestrator.engine import Migration
from orchestrator.metrics import (
    BARRIERS,
    DEVICE_ERROR_KINDS,
    OUTCOMES,
    Metrics,
)
from orchestrator.report import ErrorInfo, MigrationReport
from tests.helpers import debian_tool, make_resolved, sim_device

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# The destination refuses its stream: after pre-copy began, so it rolls back.
LOAD_FAULT = {"fault": {"at": "stream", "offset": 0, "kind": "corrupt"}}


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of the text exposition, by name and label set."""
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition(registry)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def run_tracked(metrics: Metrics, devices: list[dict[str, Any]]) -> Migration:
    migration = Migration(make_resolved(devices))
    with metrics.track(migration):
        await migration.run()
    return migration


def two_gpus(**destination: Any) -> list[dict[str, Any]]:
    return [
        sim_device("gpu0", transition_ms=1),
        sim_device("gpu1", transition_ms=1, destination=destination or None),
    ]


def test_every_series_alerts_read_exists_at_zero_before_any_migration(
    registry: CollectorRegistry,
) -> None:
    Metrics(registry, backends=["simulated"], node="node-7")
    samples = scrape(registry)
    for outcome in OUTCOMES:
        assert value(samples, "orchestrator_migrations_total", outcome=outcome) == 0
    for kind in DEVICE_ERROR_KINDS:
        assert (
            value(samples, "orchestrator_device_errors_total", backend="simulated", kind=kind) == 0
        )
    for phase in ("precopy", "stop_copy"):
        assert (
            value(samples, "orchestrator_device_bytes_total", backend="simulated", phase=phase) == 0
        )
    for name in (
        "orchestrator_migration_downtime_seconds_count",
        "orchestrator_migration_duration_seconds_count",
        "orchestrator_downtime_limit_ratio_count",
        "orchestrator_precopy_rounds_count",
        "orchestrator_precopy_rounds_completed_total",
        "orchestrator_precopy_remaining_bytes",
        "orchestrator_stop_copy_bytes",
        "orchestrator_migrations_active",
        "orchestrator_migrations_in_doubt",
    ):
        assert value(samples, name) == 0
    build = [labels for (name, labels) in samples if name == "orchestrator_build_info"]
    assert [dict(labels)["node"] for labels in build] == ["node-7"]
    assert dict(build[0])["version"] == __version__
    assert total(samples, "process_resident_memory_bytes") > 0
    assert total(samples, "process_open_fds") > 0


def test_an_idle_daemon_exposes_a_bounded_set_of_series(registry: CollectorRegistry) -> None:
    """What each family costs idle (docs/metrics.md lists it): no labelled histogram
    series before its first sample, no _created series, none for absent backends."""
    Metrics(registry, backends=["simulated"])
    samples = scrape(registry)
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert not [ls for _, ls in samples if ("backend", "vfio") in ls]
    for name in (
        "orchestrator_device_transition_seconds_count",
        "orchestrator_migration_phase_seconds_count",
        "orchestrator_barrier_wait_seconds_count",
    ):
        assert total(samples, name) == 0 and not [n for n, _ in samples if n == name]
    assert len(samples) <= 110, len(samples)


def test_downtime_buckets_span_1_ms_to_30_s(registry: CollectorRegistry) -> None:
    Metrics(registry)
    bounds = sorted(
        float(dict(labels)["le"])
        for (name, labels), _ in scrape(registry).items()
        if name == "orchestrator_migration_downtime_seconds_bucket"
    )
    assert bounds[0] == 0.001
    assert bounds[-2:] == [30.0, math.inf]


def test_registries_do_not_share_series() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Metrics(first).migrations.labels("failed").inc()
    Metrics(second)
    assert value(scrape(first), "orchestrator_migrations_total", outcome="failed") == 1
    assert value(scrape(second), "orchestrator_migrations_total", outcome="failed") == 0


async def test_a_successful_run_is_recorded_as_its_report_says(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    m = await run_tracked(metrics, two_gpus())
    r = m.report
    assert r is not None and r.outcome == "succeeded" and r.downtime_ms is not None
    s = scrape(registry)

    assert value(s, "orchestrator_migrations_total", outcome="succeeded") == 1
    assert value(s, "orchestrator_migrations_total", outcome="rolled_back") == 0
    assert value(s, "orchestrator_migrations_active") == 0
    assert value(s, "orchestrator_migration_downtime_seconds_count") == 1
    assert value(s, "orchestrator_migration_downtime_seconds_sum") == pytest.approx(
        r.downtime_ms / 1000
    )
    assert value(s, "orchestrator_migration_duration_seconds_sum") == pytest.approx(
        r.duration_ms / 1000
    )
    for phase, ms in r.phases.items():
        assert value(s, "orchestrator_migration_phase_seconds_count", phase=phase) == 1
        assert value(s, "orchestrator_migration_phase_seconds_sum", phase=phase) == pytest.approx(
            ms / 1000
        )
    assert value(s, "orchestrator_precopy_rounds_count") == 1
    assert value(s, "orchestrator_precopy_rounds_sum") == r.precopy.rounds

    arc_ends = [e for e in m.trace if e.kind == "arc_end"]
    assert arc_ends
    assert total(s, "orchestrator_device_transition_seconds_count") == len(arc_ends)
    assert total(s, "orchestrator_device_transition_seconds_sum") == pytest.approx(
        sum(e.detail["duration_s"] for e in arc_ends)
    )
    first = arc_ends[0]
    assert first.from_state is not None and first.to_state is not None
    same_arc = [
        e for e in arc_ends if (e.from_state, e.to_state) == (first.from_state, first.to_state)
    ]
    labels = {
        "backend": "simulated",
        "from_state": first.from_state.name,
        "to_state": first.to_state.name,
    }
    assert value(s, "orchestrator_device_transition_seconds_count", **labels) == len(same_arc)

    precopy = sum(d.bytes_precopy for d in r.devices)
    stopcopy = sum(d.bytes_stopcopy for d in r.devices)
    assert precopy > 0 and stopcopy > 0
    bytes_total = "orchestrator_device_bytes_total"
    assert value(s, bytes_total, backend="simulated", phase="precopy") == precopy
    assert value(s, bytes_total, backend="simulated", phase="stop_copy") == stopcopy

    for barrier in BARRIERS:
        waits = [d.barrier_wait_ms[barrier] for d in r.devices]
        name = "orchestrator_barrier_wait_seconds"
        assert value(s, f"{name}_count", barrier=barrier) == len(r.devices)
        assert value(s, f"{name}_sum", barrier=barrier) == pytest.approx(sum(waits) / 1000)
    assert total(s, "orchestrator_device_errors_total") == 0


async def test_a_rolled_back_run_counts_the_device_error(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    m = await run_tracked(metrics, two_gpus(**LOAD_FAULT))
    r = m.report
    assert r is not None and r.outcome == "rolled_back"
    assert r.error is not None and r.error.kind == "device_error" and r.error.device == "gpu1"
    s = scrape(registry)
    assert value(s, "orchestrator_migrations_total", outcome="rolled_back") == 1
    assert value(s, "orchestrator_migrations_total", outcome="succeeded") == 0
    errors = "orchestrator_device_errors_total"
    assert value(s, errors, backend="simulated", kind="device_error") == 1
    assert total(s, errors) == 1
    assert value(s, "orchestrator_migration_phase_seconds_count", phase="rollback") == 1
    assert value(s, "orchestrator_migrations_active") == 0
    if r.downtime_ms is not None:
        assert value(s, "orchestrator_migration_downtime_seconds_sum") == pytest.approx(
            r.downtime_ms / 1000
        )


def test_a_refused_migration_counts_apart_from_the_failures(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    # A destination that said no during prepare: nothing moved, nothing stopped.
    metrics.record_report(
        MigrationReport(
            id="m1",
            vm="vm1",
            outcome="refused",
            duration_ms=40.0,
            phases={"prepare": 30.0, "rollback": 10.0},
            error=ErrorInfo(kind="peer_error", message="the destination said no", phase="prepare"),
        )
    )
    s = scrape(registry)
    by_outcome = {o: value(s, "orchestrator_migrations_total", outcome=o) for o in OUTCOMES}
    assert by_outcome == {"succeeded": 0, "refused": 1, "rolled_back": 0, "failed": 0}
    assert value(s, "orchestrator_migration_duration_seconds_count") == 1
    # It never stopped the VM nor began pre-copy: no downtime, no rounds.
    assert value(s, "orchestrator_migration_downtime_seconds_count") == 0
    assert value(s, "orchestrator_precopy_rounds_count") == 0
    assert total(s, "orchestrator_device_errors_total") == 0


async def test_counts_add_up_over_several_migrations(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    reports: list[MigrationReport] = []
    for devices in (two_gpus(), two_gpus(**LOAD_FAULT), two_gpus()):
        m = await run_tracked(metrics, devices)
        assert m.report is not None
        reports.append(m.report)
    s = scrape(registry)
    assert value(s, "orchestrator_migrations_total", outcome="succeeded") == 2
    assert value(s, "orchestrator_migrations_total", outcome="rolled_back") == 1
    assert value(s, "orchestrator_migration_duration_seconds_count") == 3
    assert value(s, "orchestrator_device_bytes_total", backend="simulated", phase="precopy") == sum(
        d.bytes_precopy for r in reports for d in r.devices
    )


async def test_the_active_gauge_counts_running_migrations_and_returns_to_zero(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    seen: list[float] = []
    migrations = [Migration(make_resolved(two_gpus())) for _ in range(2)]

    def watch_active(event: Any) -> None:
        if event.kind == "commit":
            seen.append(value(scrape(registry), "orchestrator_migrations_active"))

    async def run(m: Migration) -> None:
        with metrics.track(m):
            m.observers.append(watch_active)
            await m.run()

    async with trio.open_nursery() as nursery:
        for m in migrations:
            nursery.start_soon(run, m)
    assert seen and max(seen) == 2
    assert value(scrape(registry), "orchestrator_migrations_active") == 0


async def test_the_active_gauge_is_decremented_when_the_run_raises(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    m = Migration(make_resolved(two_gpus()))
    with trio.CancelScope() as outer:

        def cancel_in_stop_copy(event: Any) -> None:
            if event.kind == "phase" and event.detail["phase"] == "stop_copy":
                outer.cancel()

        m.observers.append(cancel_in_stop_copy)
        with metrics.track(m):
            assert value(scrape(registry), "orchestrator_migrations_active") == 1
            await m.run()
    assert outer.cancelled_caught
    # run() re-raised the cancellation after rolling back, and left its report.
    assert m.report is not None and m.report.outcome == "rolled_back"
    s = scrape(registry)
    assert value(s, "orchestrator_migrations_active") == 0
    assert value(s, "orchestrator_migrations_total", outcome="rolled_back") == 1
    # A cancellation is no device's fault.
    assert total(s, "orchestrator_device_errors_total") == 0

    def boom() -> None:
        raise RuntimeError("the daemon failed before run()")

    other = Migration(make_resolved(two_gpus()))
    with pytest.raises(RuntimeError), metrics.track(other):
        boom()
    assert value(scrape(registry), "orchestrator_migrations_active") == 0
    # No report, nothing recorded.
    assert total(scrape(registry), "orchestrator_migrations_total") == 1


def test_finishing_twice_does_not_drive_the_gauge_below_zero(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    m = Migration(make_resolved(two_gpus()))
    metrics.migration_started(m)
    metrics.migration_started(m)
    assert value(scrape(registry), "orchestrator_migrations_active") == 1
    metrics.migration_finished(None, m)
    metrics.migration_finished(None, m)
    assert value(scrape(registry), "orchestrator_migrations_active") == 0


# -- promtool ------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_tool("promtool", "prometheus", 600)


def promtool_check(promtool: str, text: str) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"


def test_promtool_accepts_the_fresh_exposition(
    promtool: str, registry: CollectorRegistry, metrics: Metrics
) -> None:
    promtool_check(promtool, exposition(registry))


async def test_promtool_accepts_the_exposition_after_runs(
    promtool: str, autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    await run_tracked(metrics, two_gpus())
    await run_tracked(metrics, two_gpus(**LOAD_FAULT))
    text = exposition(registry)
    assert 'orchestrator_migrations_total{outcome="rolled_back"} 1.0' in text
    promtool_check(promtool, text)


def test_in_doubt_counts_what_the_service_says(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    assert value(scrape(registry), "orchestrator_migrations_in_doubt") == 0
    metrics.count_in_doubt = lambda: 3
    assert value(scrape(registry), "orchestrator_migrations_in_doubt") == 3


def test_the_exposition_names_exactly_the_issue_s_metrics(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    families: Mapping[str, str] = {
        f.name: f.type for f in text_string_to_metric_families(exposition(registry))
    }
    created = {n for n in families if n.endswith("_created")}
    assert {n: t for n, t in families.items() if n not in created} == {
        "orchestrator_migration_downtime_seconds": "histogram",
        "orchestrator_migration_duration_seconds": "histogram",
        "orchestrator_migrations": "counter",  # exposed as orchestrator_migrations_total
        "orchestrator_migrations_active": "gauge",
        "orchestrator_migration_phase_seconds": "histogram",
        "orchestrator_device_transition_seconds": "histogram",
        "orchestrator_device_bytes": "counter",
        "orchestrator_precopy_rounds": "histogram",
        "orchestrator_barrier_wait_seconds": "histogram",
        "orchestrator_device_errors": "counter",
        # Issue 6: the VMMs' vCPU pause and resume.
        "orchestrator_vmm_seconds": "histogram",
        "orchestrator_vmm_errors": "counter",
        # Issue 18: migrations whose end waits on an unreachable peer.
        "orchestrator_migrations_in_doubt": "gauge",
        # Issue 19: the downtime model's accuracy, and the strict budget's rollbacks.
        "orchestrator_downtime_prediction_ratio": "histogram",
        "orchestrator_downtime_budget_rollbacks": "counter",
        # Issue 21: a fleet's dashboards.
        "orchestrator_downtime_limit_ratio": "histogram",
        "orchestrator_precopy_rounds_completed": "counter",
        "orchestrator_precopy_remaining_bytes": "gauge",
        "orchestrator_stop_copy_bytes": "gauge",
        "orchestrator_build_info": "gauge",
        "process_virtual_memory_bytes": "gauge",
        "process_resident_memory_bytes": "gauge",
        "process_start_time_seconds": "gauge",
        "process_cpu_seconds": "counter",
        "process_open_fds": "gauge",
        "process_max_fds": "gauge",
        "python_info": "gauge",
    }
    text = exposition(registry)
    for name in (
        "orchestrator_migrations_total",
        "orchestrator_device_bytes_total",
        "orchestrator_device_errors_total",
        "orchestrator_vmm_errors_total",
    ):
        assert f"# TYPE {name} counter" in text


async def test_the_prediction_ratio_and_budget_rollbacks_are_counted(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    m = await run_tracked(metrics, two_gpus())
    r = m.report
    assert r is not None and r.downtime_ms and r.precopy.expected_downtime_ms
    s = scrape(registry)
    assert value(s, "orchestrator_downtime_prediction_ratio_count") == 1
    assert value(s, "orchestrator_downtime_prediction_ratio_sum") == pytest.approx(
        r.downtime_ms / r.precopy.expected_downtime_ms
    )
    devices = two_gpus()
    devices[1]["source"]["fault"] = {
        "at": "PRE_COPY_P2P->STOP_COPY",
        "kind": "delay",
        "delay_ms": 900,
    }
    strict = Migration(make_resolved(devices, downtime_limit_ms=100, downtime_policy="strict"))
    with metrics.track(strict):
        await strict.run()
    assert strict.report is not None and strict.report.outcome == "rolled_back"
    s = scrape(registry)
    assert value(s, "orchestrator_downtime_budget_rollbacks_total", step="watchdog") == 1
    # A rollback's pause is no test of the prediction: still one observation.
    assert value(s, "orchestrator_downtime_prediction_ratio_count") == 1


async def test_bytes_rounds_and_remaining_move_while_a_migration_runs(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    # Dirtying half as fast as it drains, against a tight limit: several rounds.
    devices = [
        sim_device("gpu0", state_mib=4, dirty_mib_s=4, drain_mib_s=8, transition_ms=1),
        sim_device("gpu1", state_mib=4, dirty_mib_s=4, drain_mib_s=8, transition_ms=1),
    ]
    resolved = make_resolved(
        devices, downtime_limit_ms=20, precopy_max_rounds=4, precopy_policy="switchover"
    )
    migration = Migration(resolved)
    seen: list[tuple[float, float, float]] = []

    async def watch() -> None:
        # Scrape as a Prometheus would, while the migration is in flight.
        while migration.report is None:
            samples = scrape(registry)
            seen.append(
                (
                    total(samples, "orchestrator_device_bytes_total", phase="precopy"),
                    value(samples, "orchestrator_precopy_rounds_completed_total"),
                    value(samples, "orchestrator_precopy_remaining_bytes"),
                )
            )
            assert value(samples, "orchestrator_migrations_total", outcome="succeeded") == 0
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        with metrics.track(migration):
            await migration.run()
    report = migration.report
    assert report is not None and report.outcome == "succeeded"
    live_bytes = [b for b, _, _ in seen]
    assert live_bytes == sorted(live_bytes), "a counter never goes down"
    assert live_bytes[-1] > 0, "bytes counted before the migration ended"
    assert any(r > 0 for _, r, _ in seen), seen
    assert any(left > 0 for _, _, left in seen), seen
    after = scrape(registry)
    sent = sum(d.bytes_precopy for d in report.devices)
    assert total(after, "orchestrator_device_bytes_total", phase="precopy") == sent
    assert sent >= live_bytes[-1]
    assert value(after, "orchestrator_precopy_rounds_completed_total") == report.precopy.rounds
    assert value(after, "orchestrator_precopy_remaining_bytes") == 0


async def test_downtime_against_its_limit(
    autojump_clock: Any, registry: CollectorRegistry, metrics: Metrics
) -> None:
    migration = await run_tracked(metrics, two_gpus())
    report = migration.report
    assert report is not None and report.downtime_ms is not None
    limit = report.precopy.downtime_limit_ms
    assert limit
    samples = scrape(registry)
    assert value(samples, "orchestrator_downtime_limit_ratio_count") == 1
    assert value(samples, "orchestrator_downtime_limit_ratio_sum") == pytest.approx(
        report.downtime_ms / limit
    )
