"""The migration service: many migrations, device locks, journal, cancel, shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from orchestrator import service as service_module
from orchestrator.errors import PlanError
from orchestrator.journal import Journal
from orchestrator.metrics import Metrics
from orchestrator.service import (
    DeviceBusy,
    MigrationNotFound,
    MigrationService,
    MigrationStatus,
    PastCommitPoint,
    ShuttingDown,
)
from tests.helpers import SUCCESS_PHASES, make_plan, sim_device


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MigrationService]:
    async with await Journal.open(tmp_path / "state") as journal:
        svc = MigrationService(journal, Metrics(CollectorRegistry()))
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            yield svc
            await svc.shutdown(grace_s=5)
            nursery.cancel_scope.cancel()


def plan_for(vm: str, *names: str, **source: Any) -> Any:
    params = {"transition_ms": 1, **source}
    return make_plan([sim_device(n, **params) for n in names], vm=vm)


async def wait_done(svc: MigrationService, migration_id: str) -> MigrationStatus:
    async for _ in svc.follow(migration_id):
        pass
    return await svc.status(migration_id)


async def test_a_migration_runs_to_its_report_and_is_journaled(service: MigrationService) -> None:
    status, created = await service.submit(plan_for("vm1", "gpu0", "gpu1"))
    assert created and status.outcome is None and status.progress is not None
    final = await wait_done(service, status.id)
    assert final.outcome == "succeeded" and final.report is not None
    assert all(d.source_digest == d.destination_digest for d in final.report.devices)
    record = await service.journal.get(status.id)
    assert record is not None and record.committed and record.outcome == "succeeded"
    kinds = [e.kind for e in await service.journal.events(status.id)]
    assert "commit" in kinds and kinds.count("arc_end") >= 10


async def test_events_replay_then_follow_live(service: MigrationService) -> None:
    status, _ = await service.submit(plan_for("vm1", "gpu0", state_mib=1, drain_mib_s=16))
    seen = [e async for e in service.follow(status.id)]
    seqs = [e.seq for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    again = [e.seq async for e in service.follow(status.id, after_seq=seqs[3])]
    assert again == seqs[4:]


async def test_a_busy_device_is_refused_and_freed_when_the_migration_ends(
    service: MigrationService,
) -> None:
    first, _ = await service.submit(plan_for("vm1", "gpu0", state_mib=1, drain_mib_s=8))
    with pytest.raises(DeviceBusy, match="simulated:gpu0"):
        await service.submit(plan_for("vm2", "gpu0"))
    assert {d.name: d.migration for d in service.devices()} == {"gpu0": first.id}
    await wait_done(service, first.id)
    assert {d.name: d.migration for d in service.devices()} == {"gpu0": None}
    second, created = await service.submit(plan_for("vm2", "gpu0"))
    assert created and (await wait_done(service, second.id)).outcome == "succeeded"


async def test_idempotency_key_returns_the_first_migration(service: MigrationService) -> None:
    first, created = await service.submit(plan_for("vm1", "gpu0"), idempotency_key="abc")
    again, created_again = await service.submit(plan_for("vm1", "gpu0"), idempotency_key="abc")
    assert created and not created_again and again.id == first.id


async def test_concurrent_retries_with_one_idempotency_key_all_get_the_first_migration(
    service: MigrationService,
) -> None:
    # Twenty retries at once, as a management layer's timeouts fire them: one
    # migration, and none of them refused as busy by its own device lock.
    answers: list[tuple[str, bool]] = []

    async def retry() -> None:
        status, created = await service.submit(plan_for("vm1", "gpu0"), idempotency_key="k")
        answers.append((status.id, created))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(retry)
    assert len({id_ for id_, _ in answers}) == 1
    assert sorted(created for _, created in answers) == [False] * 19 + [True]
    assert (await wait_done(service, answers[0][0])).outcome == "succeeded"


async def test_a_plan_that_cannot_succeed_is_refused_and_not_recorded(
    service: MigrationService,
) -> None:
    # Two devices without P2P: no order can keep each from DMA into the other.
    bad = make_plan(
        [sim_device("gpu0"), sim_device("nic0", p2p=False), sim_device("nic1", p2p=False)]
    )
    with pytest.raises(PlanError, match="'nic0', 'nic1'"):
        await service.submit(bad)
    assert await service.list() == []
    assert service.devices() == []


async def test_cancel_rolls_back_before_the_commit_and_is_refused_after(
    service: MigrationService,
) -> None:
    status, _ = await service.submit(plan_for("vm1", "gpu0", state_mib=4, drain_mib_s=4))
    await trio.sleep(0.2)
    await service.cancel(status.id)
    final = await wait_done(service, status.id)
    assert final.outcome == "rolled_back"
    assert final.report is not None and final.report.error is not None
    assert final.report.error.kind == "cancelled"
    with pytest.raises(PastCommitPoint, match="already ended"):
        await service.cancel(status.id)
    with pytest.raises(MigrationNotFound):
        await service.cancel("nope")


async def test_fifty_migrations_at_once_all_succeed_and_share_no_device(
    service: MigrationService,
) -> None:
    ids: list[str] = []

    async def submit(i: int) -> None:
        devices = [sim_device(n, transition_ms=1) for n in (f"gpu{i}a", f"gpu{i}b")]
        # Fifty journals' writes queue behind each other: the commit record is
        # predicted (rightly) at hundreds of ms. This test is about concurrency.
        plan = make_plan(devices, vm=f"vm{i}", downtime_limit_ms=60_000)
        status, _ = await service.submit(plan)
        ids.append(status.id)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(submit, i)
    finals = [await wait_done(service, i) for i in ids]
    assert [f.outcome for f in finals] == ["succeeded"] * 50
    holders = {d.name for f in finals for d in (f.report.devices if f.report else [])}
    assert len(holders) == 100
    listed = await service.list(outcome="succeeded")
    assert {s.id for s in listed} == set(ids)


async def test_shutdown_refuses_new_work_and_rolls_back_what_does_not_finish(
    tmp_path: Path,
) -> None:
    async with await Journal.open(tmp_path / "state") as journal:
        svc = MigrationService(journal)
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            slow, _ = await svc.submit(plan_for("vm1", "gpu0", state_mib=8, drain_mib_s=2))
            quick, _ = await svc.submit(plan_for("vm2", "nic0"))
            await svc.shutdown(grace_s=0.5)
            with pytest.raises(ShuttingDown):
                await svc.submit(plan_for("vm3", "nic1"))
            nursery.cancel_scope.cancel()
        assert (await svc.status(quick.id)).outcome == "succeeded"
        assert (await svc.status(slow.id)).outcome == "rolled_back"
        assert await journal.unfinished() == []


async def _journaled_phases(svc: MigrationService, migration_id: str) -> list[str]:
    events = await svc.journal.events(migration_id)
    return [str(e.detail["phase"]) for e in events if e.kind == "phase"]


async def _inside_stop_copy(svc: MigrationService, migration_id: str) -> None:
    # The journaled events are what is held back: poll the live status.
    for _ in range(1000):
        if (await svc.status(migration_id)).phase == "stop_copy":
            return
        await trio.sleep(0.01)
    raise AssertionError("the migration never reached stop_copy")


async def test_the_trace_of_a_downtime_window_is_journaled_once_it_closes(
    service: MigrationService,
) -> None:
    # Arcs of 0.3 s: the window lasts well over a second, the hold's bound.
    status, _ = await service.submit(plan_for("vm1", "gpu0", transition_ms=300))
    await _inside_stop_copy(service, status.id)
    await trio.sleep(0.2)
    held = await _journaled_phases(service, status.id)
    assert "precopy" in held and "source_grace" not in held
    final = await wait_done(service, status.id)
    assert final.outcome == "succeeded"
    phases = await _journaled_phases(service, status.id)
    assert phases == ["prepare", *SUCCESS_PHASES]  # prepare: journaled at creation
    seqs = [e.seq for e in await service.journal.events(status.id)]
    assert seqs == sorted(seqs)


async def test_the_trace_is_held_back_no_longer_than_the_bound(
    service: MigrationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "TRACE_HOLD_MAX_S", 0.05)
    status, _ = await service.submit(plan_for("vm1", "gpu0", transition_ms=300))
    await _inside_stop_copy(service, status.id)
    await trio.sleep(0.2)
    assert "stop_copy" in await _journaled_phases(service, status.id)
    assert (await wait_done(service, status.id)).outcome == "succeeded"


async def test_a_failing_journal_makes_the_daemon_unready_but_never_hangs_it(
    tmp_path: Path,
) -> None:
    from orchestrator.journal import JournalError

    async with await Journal.open(tmp_path / "state") as journal:
        svc = MigrationService(journal)

        async def broken(*args: Any, **kwargs: Any) -> int:
            raise JournalError("disk full", path=tmp_path)

        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            journal.record_events = broken  # type: ignore[method-assign]
            status, _ = await svc.submit(plan_for("vm1", "gpu0"))
            with trio.fail_after(10):
                async for _ in svc.follow(status.id):
                    pass
            assert not svc.ready and svc.journal_failure is not None
            assert svc.devices()[0].migration is None  # the lock was released
            with trio.fail_after(10):
                await svc.shutdown(grace_s=1)
            nursery.cancel_scope.cancel()
