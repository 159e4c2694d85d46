"""Retention: the journal's one deliberate way to delete (``Journal.prune``), and the
daemon setting that runs it (``journal_retention_days``, off by default)."""

from __future__ import annotations

import sqlite3
import time
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from orchestrator import journal as journal_module
from orchestrator.journal import Journal
from orchestrator.plan import Plan, parse_plan
from orchestrator.report import MigrationReport, Outcome
from orchestrator.service import MigrationService
from orchestrator.settings import Settings
from tests.helpers import sim_device
from tests.two_daemons import Host, cross_plan, ended, two_daemons, until

DAY = 86400.0


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with await Journal.open(tmp_path / "state") as j:
        yield j


def plan(vm: str, device: str, *, remote: bool = False) -> Plan:
    data: dict[str, Any] = {"vm": vm, "downtime_limit_ms": 500, "devices": [sim_device(device)]}
    if remote:
        data["destination"] = {"url": "https://peer.example:8443", "token_file": "/dev/null"}
    return parse_plan(data)


@contextmanager
def clock_at(at: float) -> Iterator[None]:
    """The journal's wall clock reads ``at`` meanwhile (what it stamps rows with)."""
    clock = types.SimpleNamespace(time=lambda: at, perf_counter=time.perf_counter)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(journal_module, "time", clock)
        yield


async def finished(
    journal: Journal,
    migration_id: str,
    *,
    at: float,
    outcome: Outcome = "succeeded",
    remote: bool = False,
    role: str = "source",
) -> None:
    """A migration created and ended at ``at`` (Unix time)."""
    with clock_at(at):
        await journal.create(
            migration_id, plan(migration_id, f"d-{migration_id}", remote=remote), role=role
        )
        if outcome == "succeeded":
            await journal.record_commit(migration_id)
        report = MigrationReport(
            id=migration_id,
            vm=migration_id,
            outcome=outcome,
            duration_ms=1.0,
            committed=outcome == "succeeded",
        )
        await journal.finish(migration_id, report)


def raw(journal: Journal) -> sqlite3.Connection:
    return sqlite3.connect(journal.path)


async def test_prune_takes_only_old_finished_migrations_nobody_can_ask_about(
    journal: Journal,
) -> None:
    now = time.time()
    old = now - 10 * DAY
    await finished(journal, "local-old", at=old)
    await finished(journal, "local-old-rolled-back", at=old, outcome="rolled_back")
    await finished(journal, "local-new", at=now - 0.5 * DAY)
    await finished(journal, "remote-old", at=old, remote=True)
    await finished(journal, "remote-acked", at=old, remote=True)
    await finished(journal, "incoming-old", at=old, role="destination")
    await finished(journal, "incoming-acked", at=old, role="destination")
    with clock_at(old):
        await journal.create("running-old", plan("running-old", "d-running"))
    assert await journal.acknowledge("remote-acked")
    assert await journal.acknowledge("incoming-acked")
    # Only a finished migration is acknowledged.
    assert not await journal.acknowledge("running-old")
    assert not await journal.acknowledge("nope")

    pruned = await journal.prune(now - DAY)
    assert sorted(pruned) == [
        "incoming-acked",
        "local-old",
        "local-old-rolled-back",
        "remote-acked",
    ]
    left = [r.id for r in await journal.list(limit=None)]
    assert sorted(left) == ["incoming-old", "local-new", "remote-old", "running-old"]
    for gone in pruned:
        assert await journal.get(gone) is None
        with pytest.raises(journal_module.JournalError, match="unknown migration"):
            await journal.events(gone)
    with raw(journal) as db:
        for table in ("events", "devices", "peer_acks"):
            ids = {row[0] for row in db.execute(f"SELECT migration_id FROM {table}")}
            assert not ids & set(pruned), table
        assert db.execute("SELECT COUNT(*) FROM pruning").fetchone() == (0,)
    # What is left is whole, and a second pass finds nothing more.
    assert len(await journal.events("remote-old")) == 2
    assert await journal.active_devices() == {"d-running": "running-old"}
    assert await journal.prune(now - DAY) == []


async def test_prune_goes_in_batches(journal: Journal) -> None:
    old = time.time() - 10 * DAY
    for i in range(7):
        await finished(journal, f"m{i}", at=old + i)
    assert await journal.prune(time.time(), batch=3) == [f"m{i}" for i in range(7)]
    assert await journal.list() == []


async def test_outside_prune_the_triggers_still_refuse_every_delete(journal: Journal) -> None:
    old = time.time() - 10 * DAY
    await finished(journal, "done", at=old)
    await journal.create("running", plan("running", "d-running"))
    with raw(journal) as db:
        for sql in (
            "DELETE FROM migrations WHERE id = 'done'",
            "DELETE FROM events WHERE migration_id = 'done'",
            "DELETE FROM devices WHERE migration_id = 'done'",
        ):
            with pytest.raises(sqlite3.IntegrityError, match=r"deletes nothing|append-only"):
                db.execute(sql)
        # The way through is for finished migrations only, and only inside prune's
        # own transaction (a name left in pruning would open it: nothing is left).
        with pytest.raises(sqlite3.IntegrityError, match="only a finished migration"):
            db.execute("INSERT INTO pruning VALUES ('running')")
        db.execute("INSERT INTO pruning VALUES ('done')")
        db.execute("DELETE FROM events WHERE migration_id = 'done'")
        db.rollback()
        with pytest.raises(sqlite3.IntegrityError, match="deletes nothing"):
            db.execute("DELETE FROM migrations WHERE id = 'running'")
    assert len(await journal.events("done")) == 2


async def test_the_service_prunes_at_start_when_retention_is_set(tmp_path: Path) -> None:
    now = time.time()
    async with await Journal.open(tmp_path / "state") as journal:
        await finished(journal, "old", at=now - 40 * DAY)
        await finished(journal, "recent", at=now - 2 * DAY)
        for days, left in ((None, ["recent", "old"]), (30.0, ["recent"])):
            service = MigrationService(journal, retention_days=days)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                if days is not None:
                    with trio.fail_after(10):
                        await service.retention_started.wait()
                assert [r.id for r in await journal.list()] == left
                await service.shutdown(grace_s=1)
                nursery.cancel_scope.cancel()


def test_the_setting_is_off_by_default_and_must_be_positive() -> None:
    assert Settings.load(flags={}).journal_retention_days is None
    assert Settings.load(flags={"journal_retention_days": 7}).journal_retention_days == 7
    with pytest.raises(Exception, match="journal_retention_days"):
        Settings.load(flags={"journal_retention_days": 0})


# -- between two hosts -----------------------------------------------------------------


def acked(host: Host) -> set[str]:
    with sqlite3.connect(host.base / "state" / "journal.sqlite3") as db:
        return {str(row[0]) for row in db.execute("SELECT migration_id FROM peer_acks")}


async def test_between_two_hosts_only_what_the_peer_acknowledged_is_pruned(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file) as (a, b):
        moved = await a.submit(cross_plan(b, token_file, "gpu0"))
        failing = cross_plan(b, token_file, "gpu1")
        failing["devices"][0]["destination"] = {
            "fault": {"at": "stream", "offset": 65536, "kind": "corrupt"}
        }
        rolled_back = await a.submit(failing)
        for migration_id, outcome in ((moved, "succeeded"), (rolled_back, "rolled_back")):
            assert (await until(partial(a.status, migration_id), ended))["outcome"] == outcome
            assert (await until(partial(b.incoming, migration_id), ended))["outcome"] == outcome
        # The source knows the destination recorded the commit and ran its devices: it
        # will not ask again.  The destination of the rolled back one ended with the
        # outcome the source journaled: the source will not ask either.  The other two
        # may still be asked about (the destination could ask how the rollback ended; the
        # source could ask how the committed one ended).
        assert acked(a) == {moved}
        assert acked(b) == {rolled_back}
        later = time.time() + 1
        assert await a.service.journal.prune(later) == [moved]
        assert await b.service.journal.prune(later) == [rolled_back]
        assert a.journal_rows(moved) == [] and a.journal_rows(rolled_back) != []
        assert b.journal_rows(rolled_back) == [] and b.journal_rows(moved) != []
        assert (await a.get(f"/v1/migrations/{moved}"))[0] == 404
        assert (await a.get(f"/v1/migrations/{rolled_back}"))[0] == 200

        # A retention pass asks the peer about the others.  The destination holds the
        # rolled back one's outcome: the source prunes it.  The source no longer knows
        # the committed one (it pruned it, having known the destination's record was
        # final): the destination prunes it too.
        assert await a.service.retain(later) == [rolled_back]
        assert await b.service.retain(later) == [moved]
        for host in (a, b):
            assert await host.service.journal.list() == []


async def test_a_peer_that_cannot_be_asked_acknowledges_nothing(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file) as (a, b):
        failing = cross_plan(b, token_file, "gpu1")
        failing["devices"][0]["destination"] = {
            "fault": {"at": "stream", "offset": 65536, "kind": "corrupt"}
        }
        rolled_back = await a.submit(failing)
        assert (await until(partial(a.status, rolled_back), ended))["outcome"] == "rolled_back"
        await until(partial(b.incoming, rolled_back), ended)
    # Both daemons stopped: whether the destination holds the outcome cannot be known.
    async with await Journal.open(a.base / "state") as journal:
        service = MigrationService(journal)
        assert await service.retain(time.time() + 1) == []
        assert [r.id for r in await journal.unacknowledged(time.time() + 1)] == [rolled_back]
