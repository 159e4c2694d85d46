"""The journal: round trips, history across restarts, concurrency, durability, damage.

The durability tests kill a real process (tests/journal_child.py) with
SIGKILL and read what it left on disk.
"""

from __future__ import annotations

import math
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, get_args

import pytest
import trio
import trio.lowlevel

from orchestrator import journal as journal_module
from orchestrator import journal_schema
from orchestrator.engine import Migration, TraceEvent
from orchestrator.errors import OrchestratorError
from orchestrator.journal import (
    FILENAME,
    SCHEMA_VERSION,
    Journal,
    JournalError,
    JournalEvent,
    MigrationRecord,
)
from orchestrator.plan import Plan
from orchestrator.report import ErrorInfo, MigrationReport, Outcome
from orchestrator.states import DeviceState, Side
from tests.helpers import kill_child, make_plan, make_resolved, read_line, sim_device, spawn_child


def plan(*devices: str, vm: str = "vm-test") -> Plan:
    return make_plan([sim_device(d) for d in devices or ("gpu0", "gpu1")], vm=vm)


def report(
    migration_id: str, outcome: Outcome = "succeeded", *, committed: bool = True
) -> MigrationReport:
    error = None
    if outcome != "succeeded":
        error = ErrorInfo(kind="device_error", message="no", phase="precopy", device="gpu0")
    return MigrationReport(
        id=migration_id,
        vm="vm-test",
        outcome=outcome,
        duration_ms=12.5,
        downtime_ms=3.0 if committed else None,
        committed=committed,
        error=error,
    )


def trace(seq: int, kind: str = "arc_end", **fields: Any) -> TraceEvent:
    base: dict[str, Any] = {
        "side": Side.SOURCE,
        "device": "gpu0",
        "from_state": DeviceState.RUNNING,
        "to_state": DeviceState.PRE_COPY,
        "detail": {"duration_s": 0.002},
    }
    base.update(fields)
    return TraceEvent(seq=seq, time=100.0 + seq, kind=kind, **base)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with await Journal.open(tmp_path / "state") as j:
        yield j


@contextmanager
def raw(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to the journal's file, as an operator's sqlite3 shell would have."""
    db = sqlite3.connect(tmp_path / "state" / FILENAME, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


# -- opening ------------------------------------------------------------------


async def test_open_creates_a_private_wal_database_at_the_current_schema(tmp_path: Path) -> None:
    state = tmp_path / "var" / "state"
    j = await Journal.open(state)
    await j.close()
    assert j.path == state / FILENAME
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(j.path.stat().st_mode) == 0o600
    db = sqlite3.connect(j.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"migrations", "events", "devices", "schema_version"} <= tables
    finally:
        db.close()


async def test_reopening_keeps_the_schema_version_row_single(tmp_path: Path) -> None:
    for _ in range(3):
        await (await Journal.open(tmp_path / "state")).close()
    with raw(tmp_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


# -- writes and reads -----------------------------------------------------------


async def test_create_then_get_round_trips_the_plan_and_starts_in_prepare(
    journal: Journal,
) -> None:
    p = plan("gpu0", "nic0")
    before = time.time()
    assert await journal.create("m1", p, "key-1") == ("m1", True)
    rec = await journal.get("m1")
    assert isinstance(rec, MigrationRecord)
    assert rec.id == "m1" and rec.vm == "vm-test" and rec.idempotency_key == "key-1"
    assert rec.plan == p
    assert rec.phase == "prepare"
    assert rec.committed is False and rec.committed_at is None
    assert rec.outcome is None and rec.report is None and rec.finished_at is None
    assert not rec.finished
    assert before <= rec.created_at == rec.updated_at <= time.time()
    events = await journal.events("m1")
    assert [(e.seq, e.kind, dict(e.detail)) for e in events] == [
        (1, "phase", {"phase": "prepare", "previous": None})
    ]
    assert await journal.get("nobody") is None


async def test_a_migration_id_is_recorded_once(journal: Journal) -> None:
    await journal.create("m1", plan())
    with pytest.raises(JournalError, match="already exists"):
        await journal.create("m1", plan("other"))
    rec = await journal.get("m1")
    assert rec is not None and [d.name for d in rec.plan.devices] == ["gpu0", "gpu1"]


async def test_a_repeated_idempotency_key_returns_the_first_migration(journal: Journal) -> None:
    assert await journal.create("m1", plan(), "k") == ("m1", True)
    assert await journal.create("m2", plan("nic0"), "k") == ("m1", False)
    assert await journal.get("m2") is None
    assert [r.id for r in await journal.list()] == ["m1"]
    assert await journal.active_devices() == {"gpu0": "m1", "gpu1": "m1"}
    # No key: every create is new; another key: new too.
    assert await journal.create("m3", plan("a"), None) == ("m3", True)
    assert await journal.create("m4", plan("b"), None) == ("m4", True)
    assert await journal.create("m5", plan("c"), "k2") == ("m5", True)
    # The key survives the migration's end.
    await journal.record_commit("m1")
    await journal.finish("m1", report("m1"))
    assert await journal.create("m6", plan(), "k") == ("m1", False)


async def test_phases_and_trace_events_are_appended_in_order(journal: Journal) -> None:
    await journal.create("m1", plan())
    assert await journal.record_phase("m1", "precopy") == 2
    assert await journal.record_event("m1", trace(7)) == 3
    event = trace(
        8,
        "barrier",
        side=None,
        device=None,
        from_state=None,
        to_state=None,
        detail={"barrier": "source_p2p"},
    )
    assert await journal.record_event("m1", event) == 4
    events = await journal.events("m1")
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.kind for e in events] == ["phase", "phase", "arc_end", "barrier"]
    assert dict(events[1].detail) == {"phase": "precopy", "previous": "prepare"}
    arc = events[2]
    assert (arc.migration_id, arc.side, arc.device, arc.from_state, arc.to_state) == (
        "m1",
        "source",
        "gpu0",
        "RUNNING",
        "PRE_COPY",
    )
    assert dict(arc.detail) == {"duration_s": 0.002} and arc.trace_time == 107.0
    assert events[3].side is None and dict(events[3].detail) == {"barrier": "source_p2p"}
    assert all(e.time <= time.time() for e in events)
    assert [e.seq for e in await journal.events("m1", after_seq=2)] == [3, 4]
    assert await journal.events("m1", after_seq=4) == []
    rec = await journal.get("m1")
    assert rec is not None and rec.phase == "precopy" and rec.updated_at >= rec.created_at


async def test_a_phase_trace_event_moves_the_phase(journal: Journal) -> None:
    await journal.create("m1", plan())
    phase = trace(
        0,
        "phase",
        side=None,
        device=None,
        from_state=None,
        to_state=None,
        detail={"phase": "precopy", "previous": "prepare"},
    )
    last = await journal.record_events("m1", [phase, trace(1), trace(2)])
    assert last == 4
    rec = await journal.get("m1")
    assert rec is not None and rec.phase == "precopy"
    events = await journal.events("m1", after_seq=1)
    assert [(e.kind, e.trace_time) for e in events] == [
        ("phase", 100.0),
        ("arc_end", 101.0),
        ("arc_end", 102.0),
    ]


async def test_a_batch_is_all_or_nothing(journal: Journal) -> None:
    await journal.create("m1", plan())
    bad = trace(1, "phase", detail={"phase": "teleport"})
    with pytest.raises(JournalError, match="unknown phase 'teleport'"):
        await journal.record_events("m1", [trace(0), bad, trace(2)])
    assert [e.seq for e in await journal.events("m1")] == [1]


async def test_misuse_is_a_journal_error(journal: Journal) -> None:
    assert issubclass(JournalError, OrchestratorError)
    for call in (
        journal.record_phase("ghost", "precopy"),
        journal.record_event("ghost", trace(0)),
        journal.record_commit("ghost"),
        journal.finish("ghost", report("ghost")),
        journal.events("ghost"),
    ):
        with pytest.raises(JournalError, match="ghost"):
            await call
    await journal.create("m1", plan())
    with pytest.raises(JournalError, match="unknown phase"):
        await journal.record_phase("m1", "warp")
    with pytest.raises(JournalError, match="unknown outcome"):
        await journal.list(outcome="maybe")  # type: ignore[arg-type]
    with pytest.raises(JournalError, match="unknown phase"):
        await journal.list(phase="warp")
    with pytest.raises(JournalError, match="limit"):
        await journal.list(limit=0)
    with pytest.raises(JournalError, match="report of migration 'other'"):
        await journal.finish("m1", report("other", "rolled_back", committed=False))
    with pytest.raises(JournalError, match="the report says committed"):
        await journal.finish("m1", report("m1"))
    rec = await journal.get("m1")
    assert rec is not None and rec.outcome is None


async def test_commit_is_recorded_once_and_a_second_call_is_harmless(journal: Journal) -> None:
    await journal.create("m1", plan())
    before = time.time()
    await journal.record_commit("m1")
    first = await journal.get("m1")
    assert first is not None and first.committed
    assert first.committed_at is not None and before <= first.committed_at <= time.time()
    await journal.record_commit("m1")
    again = await journal.get("m1")
    assert again is not None and again.committed_at == first.committed_at
    # The commit is no event of the journal's: the runner's trace carries it.
    assert [e.kind for e in await journal.events("m1")] == ["phase"]


async def test_a_committed_migration_never_rolls_back(journal: Journal) -> None:
    await journal.create("m1", plan())
    await journal.record_commit("m1")
    with pytest.raises(JournalError, match="committed: it cannot enter rollback"):
        await journal.record_phase("m1", "rollback")
    with pytest.raises(JournalError, match="the journal says committed"):
        await journal.finish("m1", report("m1", "rolled_back", committed=False))
    for outcome in ("rolled_back", "refused"):
        with pytest.raises(JournalError, match=f"committed: it cannot end {outcome}"):
            await journal.finish("m1", report("m1", outcome, committed=True))
    # Late forward phases are fine: a forwarded trace lags the runner's commit.
    await journal.record_phase("m1", "destination_grace")
    await journal.record_phase("m1", "commit")
    rec = await journal.get("m1")
    assert rec is not None and rec.committed and rec.outcome is None and rec.phase == "commit"


async def test_finish_stores_the_report_and_freezes_the_migration(journal: Journal) -> None:
    await journal.create("m1", plan())
    await journal.record_phase("m1", "rollback")
    r = report("m1", "rolled_back", committed=False)
    assert await journal.finish("m1", r) == 3
    rec = await journal.get("m1")
    assert rec is not None and rec.finished
    assert rec.outcome == "rolled_back" and rec.report == r
    assert rec.finished_at is not None and rec.updated_at == rec.finished_at
    last = (await journal.events("m1"))[-1]
    assert (last.kind, dict(last.detail)) == (
        "finished",
        {"outcome": "rolled_back", "committed": False},
    )
    for call in (
        journal.record_commit("m1"),
        journal.record_phase("m1", "done"),
        journal.record_event("m1", trace(0)),
        journal.finish("m1", r),
    ):
        with pytest.raises(JournalError, match="it finished \\(rolled_back\\)"):
            await call
    with raw(journal.path.parent.parent) as db:
        (error_json,) = db.execute("SELECT error_json FROM migrations").fetchone()
    assert ErrorInfo.model_validate_json(error_json) == r.error


async def test_list_is_newest_first_and_filters(journal: Journal) -> None:
    for i in range(5):
        await journal.create(f"m{i}", plan(f"d{i}"))
    await journal.record_commit("m0")
    await journal.finish("m0", report("m0"))
    await journal.finish("m1", report("m1", "failed", committed=False))
    await journal.record_phase("m2", "precopy")
    assert [r.id for r in await journal.list()] == ["m4", "m3", "m2", "m1", "m0"]
    assert [r.id for r in await journal.list(limit=2)] == ["m4", "m3"]
    assert [r.id for r in await journal.list(limit=None)] == ["m4", "m3", "m2", "m1", "m0"]
    assert [r.id for r in await journal.list(outcome="succeeded")] == ["m0"]
    assert [r.id for r in await journal.list(outcome="failed")] == ["m1"]
    assert [r.id for r in await journal.list(phase="precopy")] == ["m2"]
    assert [r.id for r in await journal.list(phase="prepare")] == ["m4", "m3", "m1", "m0"]
    assert await journal.list(phase="prepare", outcome="rolled_back") == []
    assert [r.id for r in await journal.list(phase="prepare", outcome="failed")] == ["m1"]


async def test_every_outcome_can_be_recorded_and_nothing_else(
    journal: Journal, tmp_path: Path
) -> None:
    outcomes: tuple[Outcome, ...] = get_args(Outcome)
    assert "refused" in outcomes
    for outcome in outcomes:
        committed = outcome in ("succeeded", "failed")
        await journal.create(outcome, plan(vm=f"vm-{outcome}"))
        if committed:
            await journal.record_commit(outcome)
        await journal.finish(outcome, report(outcome, outcome, committed=committed))
    for outcome in outcomes:
        assert [r.id for r in await journal.list(outcome=outcome)] == [outcome]
    await journal.create("m1", plan())
    # The database's CHECK admits the outcomes of report.Outcome, and only those.
    with raw(tmp_path) as db, pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute("UPDATE migrations SET outcome = 'lost' WHERE id = 'm1'")
    with pytest.raises(JournalError, match="unknown outcome 'lost'"):
        await journal.list(outcome="lost")  # type: ignore[arg-type]


async def test_unfinished_and_active_devices_follow_the_outcome(journal: Journal) -> None:
    assert await journal.unfinished() == []
    assert await journal.active_devices() == {}
    await journal.create("a", plan("gpu0", "gpu1", vm="vm-a"))
    await journal.create("b", plan("nic0", vm="vm-b"))
    await journal.create("c", plan("nic1", vm="vm-c"))
    await journal.record_commit("b")
    await journal.finish("c", report("c", "rolled_back", committed=False))
    unfinished = await journal.unfinished()
    assert [(r.id, r.committed) for r in unfinished] == [("a", False), ("b", True)]
    assert await journal.active_devices() == {"gpu0": "a", "gpu1": "a", "nic0": "b"}
    await journal.finish("b", report("b"))
    assert await journal.active_devices() == {"gpu0": "a", "gpu1": "a"}
    assert [r.id for r in await journal.unfinished()] == ["a"]


async def test_history_survives_close_and_reopen(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "state")
    await j.create("m1", plan(), "k1")
    await j.record_phase("m1", "precopy")
    await j.record_event("m1", trace(0))
    await j.record_commit("m1")
    await j.finish("m1", report("m1"))
    await j.create("m2", plan("nic0"))
    before = [await j.get("m1"), await j.get("m2")]
    events = await j.events("m1")
    await j.close()

    async with await Journal.open(tmp_path / "state") as again:
        assert [await again.get("m1"), await again.get("m2")] == before
        assert await again.events("m1") == events
        assert [r.id for r in await again.unfinished()] == ["m2"]
        assert await again.create("m3", plan(), "k1") == ("m1", False)
        # Numbering goes on where it stopped.
        assert await again.record_phase("m2", "precopy") == 2


async def test_a_closed_journal_refuses_politely(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "state")
    await j.close()
    await j.close()
    with pytest.raises(JournalError, match="closed"):
        await j.get("m1")
    with pytest.raises(JournalError, match="closed"):
        await j.record_commit("m1")


async def test_close_waits_for_the_writes_in_flight(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "state")
    await j.create("m1", plan())
    results: list[int] = []

    async def write(i: int) -> None:
        results.append(await j.record_event("m1", trace(i)))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(write, i)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(j.close)
    assert sorted(results) == list(range(2, 12))


async def test_the_database_itself_refuses_to_forget(journal: Journal, tmp_path: Path) -> None:
    await journal.create("m1", plan())
    await journal.record_commit("m1")
    await journal.finish("m1", report("m1"))
    with raw(tmp_path) as db:
        for sql in (
            "DELETE FROM events",
            "UPDATE events SET kind = 'x'",
            "DELETE FROM devices",
            "DELETE FROM migrations",
            "UPDATE migrations SET outcome = NULL",
        ):
            with pytest.raises(sqlite3.DatabaseError):
                db.execute(sql)
    rec = await journal.get("m1")
    assert rec is not None and rec.outcome == "succeeded"


async def test_a_commit_cannot_be_undone_even_in_sql(journal: Journal, tmp_path: Path) -> None:
    await journal.create("m1", plan())
    await journal.record_commit("m1")
    with raw(tmp_path) as db, pytest.raises(sqlite3.DatabaseError, match="cannot be undone"):
        db.execute("UPDATE migrations SET committed = 0")


# -- concurrency ------------------------------------------------------------------


async def test_fifty_concurrent_migrations_lose_no_event(journal: Journal) -> None:
    n, per = 50, 20

    async def one(i: int) -> None:
        mid = f"m{i:02}"
        await journal.create(mid, plan(f"gpu{i}", vm=f"vm{i}"))
        for s in range(per):
            await journal.record_event(mid, trace(s, device=f"gpu{i}"))
            if s == per // 2:
                await journal.record_phase(mid, "precopy")
        await journal.record_commit(mid)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    assert len(await journal.unfinished()) == n
    for i in range(n):
        events = await journal.events(f"m{i:02}")
        assert [e.seq for e in events] == list(range(1, per + 3))
        arcs = [e for e in events if e.kind == "arc_end"]
        assert [e.trace_time for e in arcs] == [100.0 + s for s in range(per)]
        assert {e.device for e in arcs} == {f"gpu{i}"}
        rec = await journal.get(f"m{i:02}")
        assert rec is not None and rec.committed and rec.phase == "precopy"
    assert len(await journal.active_devices()) == n


async def test_concurrent_creates_with_one_idempotency_key_make_one_migration(
    journal: Journal,
) -> None:
    results: list[tuple[str, bool]] = []

    async def create(i: int) -> None:
        results.append(await journal.create(f"m{i}", plan(), "same-key"))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(create, i)
    assert sum(created for _, created in results) == 1
    assert len({mid for mid, _ in results}) == 1
    assert len(await journal.list()) == 1


# -- durability: a killed process -----------------------------------------------------


def test_a_recorded_commit_survives_sigkill(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = spawn_child("tests.journal_child", "commit", state)
    try:
        assert read_line(proc) == "committed"
    finally:
        kill_child(proc)

    async def check() -> None:
        async with await Journal.open(state) as j:
            [rec] = await j.unfinished()
            assert rec.id == "m-child" and rec.committed and rec.committed_at is not None
            # Recovery would complete the destination of this one.
            assert await j.active_devices() == {"gpu0": "m-child", "gpu1": "m-child"}

    trio.run(check)


def test_a_write_cut_by_sigkill_leaves_a_readable_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = spawn_child("tests.journal_child", "write", state)
    try:
        acknowledged = [int(read_line(proc)) for _ in range(10)]
    finally:
        # The child writes without pause: the kill lands in or between writes.
        kill_child(proc)
    db = sqlite3.connect(state / FILENAME)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()

    async def check() -> None:
        async with await Journal.open(state) as j:
            events = await j.events("m-child")
            seqs = [e.seq for e in events]
            # Every acknowledged batch is there, whole; a cut batch is wholly absent.
            assert seqs == list(range(1, len(seqs) + 1))
            assert len(seqs) >= acknowledged[-1]
            assert (len(seqs) - 1) % 200 == 0
            # And the journal goes on.
            assert await j.record_phase("m-child", "rollback") == len(seqs) + 1

    trio.run(check)


# -- damage -------------------------------------------------------------------------


async def test_a_file_that_is_not_a_database_is_a_journal_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / FILENAME).write_bytes(b"this is not an SQLite file\n" * 200)
    with pytest.raises(JournalError, match="unreadable or corrupt") as info:
        await Journal.open(state)
    assert str(state / FILENAME) in str(info.value)
    assert info.value.path == state / FILENAME
    assert info.value.__cause__ is None and info.value.__suppress_context__


async def test_damaged_pages_are_a_journal_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with await Journal.open(state) as j:
        for i in range(40):
            await j.create(f"m{i}", plan(f"gpu{i}"))
            await j.record_events(f"m{i}", [trace(s) for s in range(20)])
    path = state / FILENAME
    assert (
        not (state / f"{FILENAME}-wal").exists() or (state / f"{FILENAME}-wal").stat().st_size == 0
    )
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    for offset in range(2 * page, len(data), page):
        data[offset : offset + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match=r"corrupt|malformed") as info:
        await read_everything(state, 40)
    assert str(path) in str(info.value)


async def read_everything(state: Path, migrations: int) -> None:
    async with await Journal.open(state) as j:
        await j.unfinished()
        for i in range(migrations):
            await j.events(f"m{i}")


async def test_a_state_dir_that_is_a_file_is_a_journal_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(JournalError, match="cannot create"):
        await Journal.open(tmp_path / "state")


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    await (await Journal.open(tmp_path / "state")).close()
    with raw(tmp_path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(JournalError, match="schema version 99 was written by a newer"):
        await Journal.open(tmp_path / "state")


async def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with raw(tmp_path) as db:
        db.execute("CREATE TABLE cats (name TEXT)")
    with pytest.raises(JournalError, match="not a journal"):
        await Journal.open(tmp_path / "state")


# -- schema upgrades --------------------------------------------------------------


@dataclass(frozen=True)
class JournalContents:
    records: list[MigrationRecord]
    events: dict[str, list[JournalEvent]]
    devices: dict[str, str]


async def contents(j: Journal) -> JournalContents:
    records = await j.list(limit=None)
    events = {r.id: await j.events(r.id) for r in records}
    return JournalContents(records, events, await j.active_devices())


@pytest.fixture
async def version_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JournalContents:
    """A journal file in tmp_path/state as the daemon wrote it at schema version 2
    (the v1 and v2 statements), holding migrations in every state that version
    could record; what it read back from the file."""
    with monkeypatch.context() as patch:
        # The schema's module upgrades (and stops) at it; the journal's selects by it.
        patch.setattr(journal_schema, "SCHEMA_VERSION", 2)
        patch.setattr(journal_module, "SCHEMA_VERSION", 2)
        async with await Journal.open(tmp_path / "state") as old:
            await old.create("done", plan("gpu0"), "key-done")
            await old.record_phase("done", "precopy")
            await old.record_events("done", [trace(i) for i in range(3)])
            await old.record_commit("done")
            await old.finish("done", report("done"))
            await old.create("back", plan("gpu1"))
            await old.record_phase("back", "rollback")
            await old.finish("back", report("back", "rolled_back", committed=False))
            await old.create("broken", plan("nic0"))
            await old.finish("broken", report("broken", "failed", committed=False))
            await old.create("past", plan("gpu2"))
            await old.record_commit("past")
            await old.create("early", plan("gpu3", "gpu4"), "key-early")
            await old.create("peer", plan("gpu5"), role="destination")
            # Version 2 has no room for a refused migration.
            with pytest.raises(JournalError, match="CHECK constraint failed"):
                await old.finish("early", report("early", "refused", committed=False))
            written = await contents(old)
    with raw(tmp_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    return written


def schema_objects(db: sqlite3.Connection) -> set[tuple[str, str, str]]:
    """(type, name, table) of every index and trigger in the file."""
    rows = db.execute(
        "SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('index', 'trigger')"
    )
    return {(str(kind), str(name), str(table)) for kind, name, table in rows}


#: What the journal's triggers refuse, and the words they refuse it with.
FORBIDDEN_SQL: Final = (
    ("DELETE FROM migrations WHERE id = 'early'", "the journal deletes nothing"),
    ("UPDATE migrations SET outcome = NULL WHERE id = 'done'", "a finished migration is frozen"),
    ("UPDATE migrations SET committed = 0 WHERE id = 'past'", "a commit cannot be undone"),
    ("DELETE FROM events WHERE migration_id = 'done'", "journal events are append-only"),
    ("UPDATE events SET kind = 'x'", "journal events are append-only"),
    ("DELETE FROM devices", "the journal deletes nothing"),
)


async def test_a_version_2_journal_upgrades_keeping_every_row_index_and_trigger(
    version_2: JournalContents, tmp_path: Path
) -> None:
    with raw(tmp_path) as db:
        objects = schema_objects(db)
        rowids = db.execute("SELECT rowid, id FROM migrations ORDER BY rowid").fetchall()
    assert len(objects) == 11

    async with await Journal.open(tmp_path / "state") as j:
        assert await contents(j) == version_2
        assert len(version_2.events["done"]) == 6
        assert [r.id for r in await j.unfinished()] == ["past", "early", "peer"]
        # The new outcome can be recorded now, and the journal's own rule holds.
        await j.finish("early", report("early", "refused", committed=False))
        assert [r.id for r in await j.list(outcome="refused")] == ["early"]
        with pytest.raises(JournalError, match="committed: it cannot end refused"):
            await j.finish("past", report("past", "refused", committed=True))

    with raw(tmp_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        # Every index and trigger kept (version 7 makes the no-delete ones again, with
        # retention's one way through); version 6's arc history brings its key's index,
        # version 7 retention's tables their triggers.
        assert schema_objects(db) == objects | {
            ("index", "sqlite_autoindex_arc_history_1", "arc_history"),
            ("trigger", "pruning_only_finished", "pruning"),
            ("trigger", "peer_acks_no_delete", "peer_acks"),
            ("trigger", "peer_acks_no_update", "peer_acks"),
        }
        assert db.execute("SELECT rowid, id FROM migrations ORDER BY rowid").fetchall() == rowids
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        for sql, refusal in FORBIDDEN_SQL:
            with pytest.raises(sqlite3.IntegrityError, match=refusal):
                db.execute(sql)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("UPDATE migrations SET outcome = 'lost' WHERE id = 'past'")


async def test_an_upgrade_that_cannot_finish_leaves_the_file_as_it_was(
    version_2: JournalContents, tmp_path: Path
) -> None:
    with raw(tmp_path) as db:
        # An event of a migration the file does not hold (written with foreign keys off).
        db.execute("INSERT INTO events VALUES ('ghost', 1, 0.0, 'phase', '{}')")
        objects = schema_objects(db)
        (table_sql,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'migrations'"
        ).fetchone()
    with pytest.raises(JournalError, match=r"from version 2: 1 row\(s\) refer to rows that do not"):
        await Journal.open(tmp_path / "state")
    with raw(tmp_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        assert db.execute("SELECT sql FROM sqlite_master WHERE name = 'migrations'").fetchone() == (
            table_sql,
        )
        assert "refused" not in table_sql
        assert schema_objects(db) == objects
        assert db.execute("SELECT COUNT(*) FROM migrations").fetchone() == (len(version_2.records),)
        assert (
            db.execute("SELECT name FROM sqlite_master WHERE name = 'migrations_v3'").fetchall()
            == []
        )


# -- with the runner ----------------------------------------------------------------------


async def test_a_migration_records_its_commit_before_any_destination_runs(
    tmp_path: Path,
) -> None:
    devices = [sim_device(f"gpu{i}", seed=i, transition_ms=1, drain_mib_s=64) for i in range(3)]
    resolved = make_resolved(devices)
    seen_on_disk: list[tuple[int, float, int]] = []
    send, receive = trio.open_memory_channel[TraceEvent](math.inf)

    def watch(event: TraceEvent) -> None:
        # What another process would read from the file the moment a
        # destination device is asked to run.
        if (
            event.kind == "arc_begin"
            and event.side is Side.DESTINATION
            and event.to_state is DeviceState.RUNNING
        ):
            with raw(tmp_path) as db:
                (committed,) = db.execute(
                    "SELECT committed FROM migrations WHERE id = 'm1'"
                ).fetchone()
            seen_on_disk.append((event.seq, time.time(), committed))
        send.send_nowait(event)

    async def forward() -> None:
        # The daemon's shape: drain what piled up, write it in one transaction.
        async with receive:
            async for event in receive:
                batch = [event]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await j.record_events("m1", batch)

    async with await Journal.open(tmp_path / "state") as j:
        assert await j.create("m1", resolved.plan, "req-1") == ("m1", True)
        m = Migration(resolved, migration_id="m1", journal=j, observers=[watch])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            result = await m.run()
            send.close()
        assert result.outcome == "succeeded" and result.committed
        await j.finish("m1", result)
        rec = await j.get("m1")
        events = await j.events("m1")

    assert rec is not None and rec.committed and rec.committed_at is not None
    assert rec.outcome == "succeeded" and rec.report == result and rec.phase == "done"
    [commit] = [e for e in m.trace if e.kind == "commit"]
    assert len(seen_on_disk) == 3
    for seq, wall, committed in seen_on_disk:
        assert committed == 1
        assert seq > commit.seq
        assert rec.committed_at <= wall
    # The whole trace is journaled, in order, between the journal's own events.
    assert len(events) == len(m.trace) + 2
    assert [e.kind for e in events[1:-1]] == [e.kind for e in m.trace]
    assert [e.trace_time for e in events[1:-1]] == [e.time for e in m.trace]
    assert events[-1].kind == "finished"
    assert await journal_is_quiet(tmp_path)


async def journal_is_quiet(tmp_path: Path) -> bool:
    async with await Journal.open(tmp_path / "state") as j:
        return await j.unfinished() == [] and await j.active_devices() == {}


async def test_a_commit_the_journal_cannot_record_rolls_the_migration_back(
    tmp_path: Path,
) -> None:
    async with await Journal.open(tmp_path / "state") as j:
        # Never created: record_commit raises JournalError, as a full disk would.
        m = Migration(
            make_resolved([sim_device("gpu0", transition_ms=1)]),
            migration_id="never-created",
            journal=j,
        )
        report = await m.run()
        assert await j.get("never-created") is None
    assert report.outcome == "rolled_back" and not report.committed
    assert report.error is not None and report.error.kind == "journal_error"
    assert [(d.source_state, d.destination_reset) for d in report.devices] == [("RUNNING", True)]


async def test_idempotency_key_lookup(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path / "state") as j:
        plan = make_resolved([sim_device("gpu0")]).plan
        assert await j.find_by_idempotency_key("k1") is None
        await j.create("m1", plan, "k1")
        await j.create("m2", plan, None)
        found = await j.find_by_idempotency_key("k1")
        assert found is not None and found.id == "m1"


async def test_the_arc_history_is_a_running_mean_per_model_side_and_arc(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path / "state") as j:
        key = ("vfio/mdev:mtty-1", "source", "PRE_COPY_P2P", "STOP_COPY")
        await j.record_arcs([(*key, 0.010)])
        await j.record_arcs([(*key, 0.020), ("other", "destination", "STOP", "RUNNING", 1.0)])
        # One or two samples do not speak for a model yet.
        assert await j.arc_history(["vfio/mdev:mtty-1"]) == {}
        await j.record_arcs([(*key, 0.030)])
        assert await j.arc_history(["vfio/mdev:mtty-1"]) == {key: pytest.approx(0.020)}
        assert await j.arc_history([]) == {}
        # The last samples weigh most: a device that became slower is seen so.
        await j.record_arcs([(*key, 0.100)] * 40)
        assert (await j.arc_history(["vfio/mdev:mtty-1"]))[key] > 0.09
    async with await Journal.open(tmp_path / "state") as j:
        assert key in await j.arc_history(["vfio/mdev:mtty-1"])  # on disk
