"""The durable record of migrations: SQLite under the daemon's state directory.

The journal is what lets the daemon keep its promise across a crash.  It holds
every migration, its plan, each phase change, the trace events the API
replays as Server-Sent Events, the devices each migration holds, the commit
decision and the final report.  On start the daemon asks it which migrations
are unfinished and splits them on ``committed``: before the commit point it
rolls them back, after it it completes the destination.

Invariants:

* **Written before acted on.**  Every write is one transaction, committed (and,
  with ``synchronous=FULL``, fsynced) before the method returns.  A caller
  that awaits a write and then acts knows the record survives a crash.
* **The commit is durable.**  ``record_commit`` is the runner's
  ``CommitJournal``: when it returns, the decision is on disk, power loss
  included.  A committed migration never goes back: the journal refuses to
  enter the rollback phase or to finish it as ``rolled_back`` or ``refused``.
* **Nothing journaled is ever deleted, but by retention.**  Events are
  append-only and a finished migration is frozen; SQL triggers refuse an
  UPDATE or DELETE that would break this, whoever issues it.  One path
  deletes, ``prune`` (the daemon's ``journal_retention_days``, off by
  default): a finished migration whole, once old enough, and only one this
  host ran alone or whose outcome the peer daemon acknowledged
  (``acknowledge``), for the peer may still ask about it.  The triggers
  let a migration's rows go only while ``prune`` names it (schema version 7).
* **Errors are ours.**  Misuse (an unknown migration, a write after
  ``finish``) and a corrupt or unreadable database are a
  :class:`JournalError` naming the file, never a raw ``sqlite3`` exception.

Theory of operation: sqlite3 blocks, so every public method is ``async`` and
runs its SQL in a worker thread (``trio.to_thread.run_sync``), one at a time
(a ``CapacityLimiter(1)``), on a single connection opened with
``check_same_thread=False``.  A worker thread is never abandoned on cancel,
so a transaction is either wholly written or not at all.  Writers in one
daemon are serialized by the limiter; another process (a CLI reading history)
waits on SQLite's busy timeout.

Schema (version 7, in :mod:`orchestrator.journal_schema`; ``schema_version``
holds the number, and ``open`` upgrades an older file step by step in
``SCHEMA_UPGRADES``, each step one transaction that keeps every row, index
and trigger).  Times are Unix seconds
(``time.time()``, REAL)::

    migrations(
        id              TEXT PRIMARY KEY,
        vm              TEXT NOT NULL,
        plan_json       TEXT NOT NULL,      -- Plan.model_dump_json()
        idempotency_key TEXT UNIQUE,        -- NULL: none given
        created_at, updated_at REAL NOT NULL,
        phase           TEXT NOT NULL,      -- a flow.Phase value, the last recorded
        committed       INTEGER 0/1,        -- the commit decision
        committed_at    REAL,
        outcome         TEXT,               -- NULL until finished; succeeded, refused,
                                            -- rolled_back or failed (report.Outcome)
        finished_at     REAL,
        report_json     TEXT,               -- MigrationReport, at finish
        error_json      TEXT,               -- the report's ErrorInfo, if any
        role            TEXT,               -- source or destination (version 2)
        peer_json       TEXT,               -- destination role: the source's API and
                                            -- decision credential (version 4)
        control_json    TEXT)               -- control.Control: the limits in force and an
                                            -- operator's changes in pre-copy; NULL: the
                                            -- plan's, unchanged (version 5)
    events(                                 -- append-only
        migration_id    TEXT REFERENCES migrations,
        seq             INTEGER,            -- 1, 2, ... per migration
        time            REAL,               -- when journaled
        kind            TEXT,               -- phase, arc_begin, ..., finished
        data_json       TEXT,               -- side, device, from, to, detail, trace_time
        PRIMARY KEY (migration_id, seq))
    devices(                                -- the devices a migration holds
        migration_id    TEXT REFERENCES migrations,
        device          TEXT,               -- the plan's device name
        side            TEXT,               -- source or destination
        PRIMARY KEY (migration_id, device, side))
    arc_history(                            -- this host's arcs by device model
        model           TEXT,               -- Device.model_key(), e.g. vfio/mdev:mtty-1
        side            TEXT,               -- source or destination
        from_state      TEXT,
        to_state        TEXT,
        count           INTEGER,            -- samples folded in so far
        mean_s          REAL,               -- running mean, the last 20 weigh most
        updated_at      REAL,
        PRIMARY KEY (model, side, from_state, to_state))    (version 6)
    peer_acks(                              -- the peer daemon holds the outcome too
        migration_id    TEXT REFERENCES migrations,
        at              REAL)                                (version 7)
    pruning(migration_id TEXT)              -- empty but inside ``prune``  (version 7)

Events the journal writes itself: ``phase`` (at ``create`` and on every
``record_phase``) and ``finished`` (at ``finish``).  Everything else comes
from the runner's trace through ``record_event``; a trace event of kind
``phase`` also moves the migration's phase, so a daemon that forwards the
whole trace need not call ``record_phase`` as well.  ``record_commit`` writes
no event: the runner's own ``commit`` trace event, right after it, is the one
subscribers see.  ``record_control`` writes a ``control`` event with the change
it records.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import trio
from pydantic import ValidationError

from orchestrator.flow import Phase
from orchestrator.journal_schema import (
    OUTCOMES,
    PHASES,
    SCHEMA_VERSION,
    JournalError,
    connect,
    connect_reader,
    describe,
    transaction,
)
from orchestrator.plan import Plan
from orchestrator.report import Control, MigrationReport, Outcome
from orchestrator.states import Side
from orchestrator.trace import TraceEvent

__all__ = [
    "FILENAME",
    "GENERATION_FILE",
    "SCHEMA_VERSION",
    "Cursor",
    "Journal",
    "JournalError",
    "JournalEvent",
    "MigrationFilter",
    "MigrationPage",
    "MigrationRecord",
    "MigrationSummary",
]

T = TypeVar("T")

#: An arc in the history: (device model, side, from state, to state), names as text.
ArcKey = tuple[str, str, str, str]
#: One measured arc: its key's fields, then its seconds.
ArcSample = tuple[str, str, str, str, float]
#: The history's running mean weighs about the last this many samples.
HISTORY_WEIGHT: Final = 20
#: An arc's history counts once it holds this many samples.
HISTORY_MIN_SAMPLES: Final = 3

#: The database file's name inside the state directory.
FILENAME: Final = "journal.sqlite3"
#: The generation marker's, beside it: the journal's generation (SQLite's
#: ``user_version``, raised by every write that creates, commits, ends or prunes a
#: migration) as last committed, so that a journal that lost some is refused.
GENERATION_FILE: Final = "journal.generation"


def read_generation(marker: Path) -> int | None:
    """The generation a marker file records (None: there is none); JournalError for
    one that cannot be read."""
    try:
        text = marker.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise JournalError(f"cannot read the generation marker {marker}: {exc}") from None
    if not text.strip().isdigit():
        raise JournalError(
            f"the generation marker {marker} holds {text[:40]!r}, not a generation "
            "(the daemon writes it: move it away to start afresh on purpose)"
        )
    return int(text.strip())


#: A committed migration never rolls back: the two-phase commit's promise.  (Earlier
#: forward phases are not refused: a forwarded trace may deliver them after the
#: runner itself recorded the commit.)
_NEVER_AFTER_COMMIT: Final = frozenset({Phase.ROLLBACK})
#: Nor does it end as if it never started, or as if it went back to its source.
_OUTCOMES_NEVER_AFTER_COMMIT: Final[frozenset[Outcome]] = frozenset({"refused", "rolled_back"})


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    """One migration as the journal knows it."""

    id: str
    vm: str
    plan: Plan
    idempotency_key: str | None
    phase: str
    committed: bool
    committed_at: float | None
    #: None until the migration finished.
    outcome: Outcome | None
    report: MigrationReport | None
    created_at: float
    updated_at: float
    finished_at: float | None
    #: ``source`` (this daemon runs it) or ``destination`` (another host's does).
    role: str = "source"
    #: For ``destination``: how to reach the source (``api``, ``token``).
    peer: dict[str, Any] | None = None
    #: The limits in force and an operator's changes (None: the plan's, unchanged).
    control: Control | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One journaled event; ``seq`` counts from 1 per migration (an SSE id)."""

    migration_id: str
    seq: int
    #: Wall-clock time it was journaled, Unix seconds.
    time: float
    kind: str
    side: str | None
    device: str | None
    from_state: str | None
    to_state: str | None
    detail: Mapping[str, Any]
    #: The runner's own clock for a trace event (``trio.current_time()``).
    trace_time: float | None


@dataclass(frozen=True, slots=True)
class MigrationFilter:
    """Which migrations a list shows (None: any)."""

    vm: str | None = None
    outcome: Outcome | None = None
    phase: str | None = None
    #: Only migrations created at or after this Unix time.
    since: float | None = None

    def sql(self) -> tuple[builtins.list[str], builtins.list[Any]]:
        """The WHERE clauses (on ``migrations m``) and their arguments."""
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise JournalError(f"unknown outcome {self.outcome!r}")
        if self.phase is not None and self.phase not in PHASES:
            raise JournalError(f"unknown phase {self.phase!r}")
        clauses: builtins.list[str] = []
        args: builtins.list[Any] = []
        for column, value in (("vm", self.vm), ("outcome", self.outcome), ("phase", self.phase)):
            if value is not None:
                clauses.append(f"m.{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("m.created_at >= ?")
            args.append(self.since)
        return clauses, args


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of a list starts: after this migration, in the list's order
    (newest first).  Opaque to clients: ``encode`` and ``decode`` round-trip it."""

    created_at: float
    rowid: int

    def encode(self) -> str:
        text = f"{self.created_at!r}/{self.rowid}".encode()
        return base64.urlsafe_b64encode(text).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor ``encode`` gave; ValueError for anything else."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            created, _, rowid = raw.partition("/")
            cursor = cls(float(created), int(rowid))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ValueError("not a cursor this daemon gave (use next_cursor as given)") from None
        if not math.isfinite(cursor.created_at) or cursor.rowid < 0:
            raise ValueError("not a cursor this daemon gave (use next_cursor as given)")
        return cursor


@dataclass(frozen=True, slots=True)
class MigrationSummary:
    """A migration in a list: what an operator scans, without its plan or report."""

    id: str
    vm: str
    role: str
    phase: str
    committed: bool
    outcome: Outcome | None
    created_at: float
    finished_at: float | None
    #: The report's downtime (None: not finished, or no downtime window).
    downtime_ms: float | None
    #: How many devices the plan names.
    devices: int
    #: The report's error, as ``kind: message`` (None: no error).
    error: str | None
    #: Its place in the list (where the page after it starts).
    position: Cursor
    #: The whole record, when the page was asked ``full``.
    record: MigrationRecord | None = None


@dataclass(frozen=True, slots=True)
class MigrationPage:
    """One page of a list, and where the next starts (None: this is the last)."""

    entries: builtins.list[MigrationSummary]
    next: Cursor | None


class Journal:
    """The migration journal on one SQLite file.  Open with ``await Journal.open(dir)``."""

    def __init__(
        self, path: Path, connection: sqlite3.Connection, reader: sqlite3.Connection
    ) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._limiter = trio.CapacityLimiter(1)
        #: How long the last durable write took (a migration's creation, its commit).
        self.last_write_s: float | None = None
        # Reads go through a connection of their own: in WAL mode they see
        # the last committed state without waiting behind a write's fsync,
        # so the API's GETs stay fast while migrations journal their events.
        self._reader: sqlite3.Connection | None = reader
        self._read_limiter = trio.CapacityLimiter(1)
        # The generation marker beside the file (``GENERATION_FILE``): the journal's
        # generation as last committed, and one a transaction raised, until it commits.
        self._marker = path.with_name(GENERATION_FILE)
        self._generation = 0
        self._raised: int | None = None

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    async def open(cls, state_dir: Path) -> Journal:
        """Open (or create) ``state_dir/journal.sqlite3``, upgrading its schema."""
        path = Path(state_dir) / FILENAME
        connection = await trio.to_thread.run_sync(connect, Path(state_dir), path)
        try:
            reader = await trio.to_thread.run_sync(connect_reader, path)
        except BaseException:
            connection.close()
            raise
        journal = cls(path, connection, reader)
        try:
            await trio.to_thread.run_sync(journal._check_generation)
        except BaseException:
            with trio.CancelScope(shield=True):
                await journal.close()
            raise
        return journal

    async def close(self) -> None:
        """Close the database after any read or write in flight.  Safe to call twice."""
        await trio.to_thread.run_sync(self._close_reader, limiter=self._read_limiter)
        await trio.to_thread.run_sync(self._close_now, limiter=self._limiter)

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _close_now(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:
                raise JournalError(str(exc), path=self.path) from None

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await self.close()

    # -- writes ----------------------------------------------------------------

    async def create(
        self,
        migration_id: str,
        plan: Plan,
        idempotency_key: str | None = None,
        *,
        role: str = "source",
        peer: Mapping[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Record a new migration in phase ``prepare``, with the devices it holds.

        Returns ``(id, True)``; or, when ``idempotency_key`` was seen before,
        the first migration's ``(id, False)`` and records nothing.
        """

        def write(db: sqlite3.Connection) -> tuple[str, bool]:
            with transaction(db):
                if idempotency_key is not None:
                    row = db.execute(
                        "SELECT id FROM migrations WHERE idempotency_key = ?", (idempotency_key,)
                    ).fetchone()
                    if row is not None:
                        return str(row[0]), False
                if _exists(db, migration_id):
                    raise JournalError(f"migration {migration_id!r} already exists", path=self.path)
                now = time.time()
                db.execute(
                    "INSERT INTO migrations (id, vm, plan_json, idempotency_key, created_at, "
                    "updated_at, phase, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        migration_id,
                        plan.vm,
                        plan.model_dump_json(),
                        idempotency_key,
                        now,
                        now,
                        Phase.PREPARE.value,
                        role,
                    ),
                )
                if peer is not None:
                    db.execute(
                        "UPDATE migrations SET peer_json = ? WHERE id = ?",
                        (json.dumps(dict(peer)), migration_id),
                    )
                sides = [Side.DESTINATION] if role == "destination" else list(Side)
                if role == "source" and plan.destination is not None:
                    sides = [Side.SOURCE]
                db.executemany(
                    "INSERT INTO devices (migration_id, device, side) VALUES (?, ?, ?)",
                    [(migration_id, d.name, side.value) for d in plan.devices for side in sides],
                )
                _append(
                    db,
                    migration_id,
                    now,
                    "phase",
                    {"detail": {"phase": Phase.PREPARE.value, "previous": None}},
                )
                self._bump(db)
            return migration_id, True

        return await self._write(write)

    async def record_phase(self, migration_id: str, phase: str) -> int:
        """The migration entered ``phase`` (a ``flow.Phase`` value); returns the event's seq."""

        def write(db: sqlite3.Connection) -> int:
            with transaction(db):
                return self._write_phase(db, migration_id, phase, time.time(), None)

        return await self._run(write)

    async def record_event(self, migration_id: str, event: TraceEvent) -> int:
        """Append one of the runner's trace events; returns its seq."""
        return await self.record_events(migration_id, [event])

    async def record_events(self, migration_id: str, events: Iterable[TraceEvent]) -> int:
        """Append trace events in one transaction (one fsync); returns the last seq.

        A forwarder that drains a channel should write what has piled up
        with one call: a 256-device switchover emits thousands of events.
        """
        batch = builtins.list(events)

        def write(db: sqlite3.Connection) -> int:
            with transaction(db):
                seq = self._require_unfinished(db, migration_id, "record an event for")[1]
                now = time.time()
                for event in batch:
                    if event.kind == "phase":
                        phase = event.detail.get("phase")
                        if not isinstance(phase, str):
                            raise JournalError(
                                f"phase event without a phase: {event!r}", path=self.path
                            )
                        seq = self._write_phase(db, migration_id, phase, now, event)
                    else:
                        seq = _append(db, migration_id, now, event.kind, _trace_data(event))
            return seq

        return await self._run(write)

    async def record_commit(self, migration_id: str) -> None:
        """Record the commit decision; it is on disk when this returns.

        A second call is harmless.  Committing a finished or unknown
        migration is a JournalError.
        """

        def write(db: sqlite3.Connection) -> None:
            with transaction(db):
                committed, _ = self._require_unfinished(db, migration_id, "commit")
                if committed:
                    return
                now = time.time()
                db.execute(
                    "UPDATE migrations SET committed = 1, committed_at = ?, updated_at = ? "
                    "WHERE id = ?",
                    (now, now, migration_id),
                )
                self._bump(db)

        await self._write(write)

    async def record_arcs(self, samples: Iterable[ArcSample]) -> None:
        """Fold arcs a migration measured into this host's history: per (model,
        side, from, to) a running mean in which the last ``HISTORY_WEIGHT``
        samples weigh most (a device's firmware or host load may change)."""
        rows = list(samples)
        if not rows:
            return

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            with transaction(db):
                for model, side, source, target, seconds in rows:
                    db.execute(
                        "INSERT INTO arc_history VALUES (?, ?, ?, ?, 1, ?, ?) "
                        "ON CONFLICT (model, side, from_state, to_state) DO UPDATE SET "
                        "mean_s = mean_s + (excluded.mean_s - mean_s) / min(count + 1, ?), "
                        "count = count + 1, updated_at = excluded.updated_at",
                        (model, side, source, target, max(0.0, seconds), now, HISTORY_WEIGHT),
                    )

        await self._run(write)

    async def arc_history(self, models: Iterable[str]) -> dict[ArcKey, float]:
        """What the history holds for these device models: (model, side, from, to) ->
        mean seconds, for the arcs seen at least ``HISTORY_MIN_SAMPLES`` times (one
        slow first arc must not speak for a model)."""
        wanted = sorted(set(models))
        if not wanted:
            return {}

        def read(db: sqlite3.Connection) -> dict[ArcKey, float]:
            marks = ", ".join("?" * len(wanted))
            rows = db.execute(
                "SELECT model, side, from_state, to_state, mean_s FROM arc_history "
                f"WHERE count >= ? AND model IN ({marks})",
                [HISTORY_MIN_SAMPLES, *wanted],
            ).fetchall()
            return {(m, side, a, b): float(mean) for m, side, a, b, mean in rows}

        return await self._read(read)

    async def record_control(self, migration_id: str, control: Control) -> int:
        """An operator changed the migration's limits (or forced its switchover):
        ``control`` is in force from now on.  On disk when this returns; returns
        the seq of the ``control`` event, whose detail is the change."""

        def write(db: sqlite3.Connection) -> int:
            with transaction(db):
                self._require_unfinished(db, migration_id, "record a control change of")
                now = time.time()
                db.execute(
                    "UPDATE migrations SET control_json = ?, updated_at = ? WHERE id = ?",
                    (control.model_dump_json(), now, migration_id),
                )
                change = control.last_event
                detail = change.model_dump(mode="json") if change is not None else {}
                return _append(db, migration_id, now, "control", {"detail": detail})

        return await self._write(write)

    async def finish(self, migration_id: str, report: MigrationReport) -> int:
        """Record the outcome and the report; the migration is frozen from now on.

        The report must be this migration's and agree with the journal on the
        commit.  Returns the seq of the ``finished`` event.
        """

        def write(db: sqlite3.Connection) -> int:
            with transaction(db):
                committed, _ = self._require_unfinished(db, migration_id, "finish")
                if report.id != migration_id:
                    raise JournalError(
                        f"report of migration {report.id!r} given for {migration_id!r}",
                        path=self.path,
                    )
                if report.committed != committed:
                    said = "committed" if report.committed else "not committed"
                    raise JournalError(
                        f"migration {migration_id!r}: the report says {said}, the journal "
                        f"says {'committed' if committed else 'not committed'}",
                        path=self.path,
                    )
                if committed and report.outcome in _OUTCOMES_NEVER_AFTER_COMMIT:
                    raise JournalError(
                        f"migration {migration_id!r} is committed: it cannot end {report.outcome}",
                        path=self.path,
                    )
                now = time.time()
                db.execute(
                    "UPDATE migrations SET outcome = ?, finished_at = ?, updated_at = ?, "
                    "report_json = ?, error_json = ? WHERE id = ?",
                    (
                        report.outcome,
                        now,
                        now,
                        report.model_dump_json(),
                        report.error.model_dump_json() if report.error else None,
                        migration_id,
                    ),
                )
                self._bump(db)
                return _append(
                    db,
                    migration_id,
                    now,
                    "finished",
                    {"detail": {"outcome": report.outcome, "committed": report.committed}},
                )

        return await self._run(write)

    async def probe(self) -> None:
        """One real, durable write that changes nothing: JournalError if the journal
        refuses writes (the service asks after a failure, with nothing else to write)."""

        def write(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute("UPDATE schema_version SET version = version")

        await self._run(write)

    # -- retention ---------------------------------------------------------------

    async def acknowledge(self, migration_id: str) -> bool:
        """Record that the peer daemon of this finished migration between two hosts
        holds its outcome too (it will not ask about it again): from now on retention
        may prune it.  False (nothing recorded) for an unknown or unfinished one."""

        def write(db: sqlite3.Connection) -> bool:
            with transaction(db):
                row = db.execute(
                    "SELECT outcome FROM migrations WHERE id = ?", (migration_id,)
                ).fetchone()
                if row is None or row[0] is None:
                    return False
                db.execute(
                    "INSERT OR IGNORE INTO peer_acks (migration_id, at) VALUES (?, ?)",
                    (migration_id, time.time()),
                )
                return True

        return await self._run(write)

    async def unacknowledged(
        self, finished_before: float, limit: int = 100
    ) -> builtins.list[MigrationRecord]:
        """Finished migrations between two hosts, ended before ``finished_before``,
        whose peer has not acknowledged the outcome yet: what retention asks about."""

        def read(db: sqlite3.Connection) -> builtins.list[MigrationRecord]:
            rows = db.execute(
                f"{_select()} WHERE m.outcome IS NOT NULL AND m.finished_at < ? "
                "AND NOT (m.role = 'source' AND json_extract(m.plan_json, '$.destination') "
                "IS NULL) "
                "AND NOT EXISTS (SELECT 1 FROM peer_acks a WHERE a.migration_id = m.id) "
                "ORDER BY m.finished_at LIMIT ?",
                (finished_before, limit),
            ).fetchall()
            return [self._record(row) for row in rows]

        return await self._read(read)

    async def prune(self, finished_before: float, batch: int = 500) -> builtins.list[str]:
        """Delete, whole, the finished migrations that ended before ``finished_before``
        (Unix time) and that nothing can ask about any more: those this host ran alone
        (no destination daemon) and those whose peer acknowledged the outcome.  An
        unfinished migration, or one between two hosts not acknowledged, stays.  At most
        ``batch`` per transaction, so that writers wait little; returns the ids pruned."""
        pruned: builtins.list[str] = []

        def write(db: sqlite3.Connection) -> builtins.list[str]:
            with transaction(db):
                ids = [
                    str(row[0])
                    for row in db.execute(
                        "SELECT m.id FROM migrations m WHERE m.outcome IS NOT NULL "
                        "AND m.finished_at < ? AND ("
                        " (m.role = 'source' AND json_extract(m.plan_json, '$.destination') "
                        "  IS NULL)"
                        " OR EXISTS (SELECT 1 FROM peer_acks a WHERE a.migration_id = m.id)) "
                        "ORDER BY m.finished_at LIMIT ?",
                        (finished_before, batch),
                    )
                ]
                db.executemany("INSERT INTO pruning (migration_id) VALUES (?)", [(i,) for i in ids])
                for table in ("events", "devices", "peer_acks"):
                    db.execute(
                        f"DELETE FROM {table} WHERE migration_id IN "
                        "(SELECT migration_id FROM pruning)"
                    )
                db.execute("DELETE FROM migrations WHERE id IN (SELECT migration_id FROM pruning)")
                db.execute("DELETE FROM pruning")
                if ids:
                    self._bump(db)
                return ids

        while True:
            ids = await self._run(write)
            pruned.extend(ids)
            if len(ids) < batch:
                return pruned

    # -- reads -----------------------------------------------------------------

    async def get(self, migration_id: str) -> MigrationRecord | None:
        """The migration, or None if the journal never heard of it."""

        def read(db: sqlite3.Connection) -> MigrationRecord | None:
            row = db.execute(f"{_select()} WHERE id = ?", (migration_id,)).fetchone()
            return None if row is None else self._record(row)

        return await self._read(read)

    async def find_by_idempotency_key(self, key: str) -> MigrationRecord | None:
        """The migration first created with this idempotency key, if any."""

        def read(db: sqlite3.Connection) -> MigrationRecord | None:
            row = db.execute(f"{_select()} WHERE idempotency_key = ?", (key,)).fetchone()
            return None if row is None else self._record(row)

        return await self._read(read)

    async def list(
        self,
        *,
        outcome: Outcome | None = None,
        phase: str | None = None,
        limit: int | None = 100,
    ) -> builtins.list[MigrationRecord]:
        """Migrations, newest first, filtered by outcome and phase (None: any)."""
        page = await self.page(
            MigrationFilter(outcome=outcome, phase=phase), limit=limit, full=True
        )
        return [entry.record for entry in page.entries if entry.record is not None]

    async def page(
        self,
        where: MigrationFilter | None = None,
        *,
        after: Cursor | None = None,
        limit: int | None = 100,
        full: bool = False,
    ) -> MigrationPage:
        """One page of migrations, newest first: those ``where`` admits after
        ``after`` (None: from the newest), at most ``limit`` (None: every one).

        Filtering and paging happen in the query, so a page costs its own rows
        and not the journal's.  Each entry is a summary; ``full`` adds the whole
        record.  ``next`` is where the next page starts, None after the last.
        """
        where = where or MigrationFilter()
        if limit is not None and limit < 1:
            raise JournalError(f"limit must be at least 1, not {limit}")
        clauses, args = where.sql()
        if after is not None:
            clauses.append("(m.created_at < ? OR (m.created_at = ? AND m.rowid < ?))")
            args += [after.created_at, after.created_at, after.rowid]
        record = f", {_record_columns()}" if full else ""
        sql = f"SELECT {_SUMMARY_COLUMNS}{record} FROM migrations m"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY m.created_at DESC, m.rowid DESC"
        if limit is not None:
            # One more than asked: whether another page follows, without a count.
            sql += f" LIMIT {int(limit) + 1}"

        def read(db: sqlite3.Connection) -> MigrationPage:
            rows = db.execute(sql, args).fetchall()
            more = limit is not None and len(rows) > limit
            entries = [self._listed(row, full) for row in rows[:limit]]
            last = entries[-1].position if more and entries else None
            return MigrationPage(entries, last)

        return await self._read(read)

    async def events(self, migration_id: str, after_seq: int = 0) -> builtins.list[JournalEvent]:
        """The migration's events with seq > ``after_seq``, in order (SSE replay)."""

        def read(db: sqlite3.Connection) -> builtins.list[JournalEvent]:
            rows = db.execute(
                "SELECT seq, time, kind, data_json FROM events "
                "WHERE migration_id = ? AND seq > ? ORDER BY seq",
                (migration_id, after_seq),
            ).fetchall()
            if not rows and not _exists(db, migration_id):
                raise JournalError(f"unknown migration {migration_id!r}", path=self.path)
            return [_event(self.path, migration_id, *row) for row in rows]

        return await self._read(read)

    async def unfinished(self) -> builtins.list[MigrationRecord]:
        """Migrations without an outcome, oldest first: what recovery must resolve.

        Recovery splits them on ``committed``: before the commit point roll
        back, after it complete the destination.
        """

        def read(db: sqlite3.Connection) -> builtins.list[MigrationRecord]:
            rows = db.execute(
                f"{_select()} WHERE outcome IS NULL ORDER BY created_at, rowid"
            ).fetchall()
            return [self._record(row) for row in rows]

        return await self._read(read)

    async def active_devices(self) -> dict[str, str]:
        """Device name -> id of the unfinished migration that holds it.

        Names are the plans' device names: a label within one plan, not a
        host-wide identity, so two VMs whose plans both say "gpu0" appear to
        share it until backends name their devices host-wide.  Should two
        unfinished migrations name the same device, the older one is given.
        """

        def read(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute(
                "SELECT DISTINCT d.device, m.id FROM devices d "
                "JOIN migrations m ON m.id = d.migration_id "
                "WHERE m.outcome IS NULL ORDER BY m.created_at DESC, m.rowid DESC"
            ).fetchall()
            # Newest first, so that the oldest holder is written last and wins.
            return {str(device): str(mid) for device, mid in rows}

        return await self._read(read)

    # -- internals -------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection in a worker thread, one call at a time."""
        if self._db is None:
            raise JournalError("the journal is closed", path=self.path)
        return await trio.to_thread.run_sync(self._in_thread, fn, limiter=self._limiter)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``_run`` for a durable write, timed: the downtime model counts one for
        the commit record (``last_write_s``)."""
        start = time.perf_counter()
        try:
            return await self._run(fn)
        finally:
            self.last_write_s = time.perf_counter() - start

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``fn`` on the reader connection, in a worker thread."""
        if self._reader is None:
            raise JournalError("the journal is closed", path=self.path)
        return await trio.to_thread.run_sync(self._read_in_thread, fn, limiter=self._read_limiter)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._reader
        if db is None:
            raise JournalError("the journal is closed", path=self.path)
        try:
            return fn(db)
        except sqlite3.Error as exc:
            raise JournalError(describe(exc), path=self.path) from None

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:  # closed while this call waited for its turn
            raise JournalError("the journal is closed", path=self.path)
        self._raised = None
        try:
            result = fn(db)
        except sqlite3.Error as exc:
            raise JournalError(describe(exc), path=self.path) from None
        if self._raised is not None:  # committed: the marker follows
            self._generation, self._raised = self._raised, None
            self._write_marker()
        return result

    # -- the generation marker -------------------------------------------------------

    def _bump(self, db: sqlite3.Connection) -> None:
        """Raise the journal's generation in the transaction under way (a write that
        creates, commits, ends or prunes migrations); the marker follows its commit."""
        (generation,) = db.execute("PRAGMA user_version").fetchone()
        self._raised = int(generation) + 1
        db.execute(f"PRAGMA user_version = {self._raised}")

    def _check_generation(self) -> None:
        """Refuse a journal older than its marker says: emptied, replaced by an older
        copy, or copied without its ``-wal`` file (which holds the commits since the
        last checkpoint; SQLite removes it on a clean close, so a journal closed
        cleanly needs none).  No marker: a first start, or a journal from before
        markers: it is taken as it is."""
        assert self._db is not None
        try:
            (generation,) = self._db.execute("PRAGMA user_version").fetchone()
        except sqlite3.Error as exc:
            raise JournalError(describe(exc), path=self.path) from None
        self._generation = int(generation)
        recorded = read_generation(self._marker)
        if recorded is not None and self._generation < recorded:
            state = "is empty" if self._generation == 0 else f"is at generation {self._generation}"
            raise JournalError(
                f"it {state}, but {self._marker.name} beside it says it reached generation "
                f"{recorded}: migrations it held are missing (emptied, an older copy, or "
                f"copied without its -wal file?), and their devices would be stranded.  "
                f"Restore the journal with its -wal file; to start afresh on purpose, move "
                f"{self._marker} away",
                path=self.path,
            )
        if recorded != self._generation:
            self._write_marker()

    def _write_marker(self) -> None:
        """Replace the marker with the generation committed last.  Not fsynced: after
        a power loss it may say less than the journal holds, never more."""
        tmp = self._marker.with_name(self._marker.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{self._generation}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, self._marker)
        except OSError as exc:
            raise JournalError(
                f"cannot write the generation marker {self._marker}: {exc.strerror or exc}",
                path=self.path,
            ) from None

    def _require_unfinished(
        self, db: sqlite3.Connection, migration_id: str, action: str
    ) -> tuple[bool, int]:
        """(committed, last seq) of a known, unfinished migration, else JournalError."""
        row = db.execute(
            "SELECT committed, outcome, "
            "(SELECT COALESCE(MAX(seq), 0) FROM events WHERE migration_id = ?) "
            "FROM migrations WHERE id = ?",
            (migration_id, migration_id),
        ).fetchone()
        if row is None:
            raise JournalError(
                f"cannot {action} unknown migration {migration_id!r}", path=self.path
            )
        if row[1] is not None:
            raise JournalError(
                f"cannot {action} migration {migration_id!r}: it finished ({row[1]})",
                path=self.path,
            )
        return bool(row[0]), int(row[2])

    def _write_phase(
        self,
        db: sqlite3.Connection,
        migration_id: str,
        phase: str,
        now: float,
        event: TraceEvent | None,
    ) -> int:
        if phase not in PHASES:
            raise JournalError(f"unknown phase {phase!r}", path=self.path)
        committed, _ = self._require_unfinished(db, migration_id, f"enter phase {phase} in")
        if committed and Phase(phase) in _NEVER_AFTER_COMMIT:
            raise JournalError(
                f"migration {migration_id!r} is committed: it cannot enter {phase}",
                path=self.path,
            )
        (previous,) = db.execute(
            "SELECT phase FROM migrations WHERE id = ?", (migration_id,)
        ).fetchone()
        db.execute(
            "UPDATE migrations SET phase = ?, updated_at = ? WHERE id = ?",
            (phase, now, migration_id),
        )
        if event is not None:
            data = _trace_data(event)
        else:
            data = {"detail": {"phase": phase, "previous": previous}}
        return _append(db, migration_id, now, "phase", data)

    def _listed(self, row: tuple[Any, ...], full: bool) -> MigrationSummary:
        """A row of ``_SUMMARY_COLUMNS`` (then ``_record_columns()`` if ``full``)."""
        (rowid, mid, vm, role, phase, committed, outcome, created_at, finished_at) = row[:9]
        downtime_ms, devices, error_kind, error_message = row[9:13]
        if outcome is not None and outcome not in OUTCOMES:
            raise JournalError(f"migration {mid!r}: unknown outcome {outcome!r}", path=self.path)
        error = None
        if error_message is not None:
            error = f"{error_kind}: {error_message}" if error_kind else str(error_message)
        return MigrationSummary(
            id=str(mid),
            vm=str(vm),
            role=str(role),
            phase=str(phase),
            committed=bool(committed),
            outcome=outcome,
            created_at=float(created_at),
            finished_at=finished_at,
            downtime_ms=None if downtime_ms is None else float(downtime_ms),
            devices=int(devices),
            error=error,
            position=Cursor(float(created_at), int(rowid)),
            record=self._record(row[13:]) if full else None,
        )

    def _record(self, row: tuple[Any, ...]) -> MigrationRecord:
        (
            mid,
            vm,
            plan_json,
            key,
            created_at,
            updated_at,
            phase,
            committed,
            committed_at,
            outcome,
            finished_at,
            report_json,
            role,
            peer_json,
            control_json,
        ) = row
        try:
            plan = Plan.model_validate_json(plan_json)
            report = MigrationReport.model_validate_json(report_json) if report_json else None
            control = Control.model_validate_json(control_json) if control_json else None
        except ValidationError as exc:
            raise JournalError(
                f"migration {mid!r}: the stored record no longer validates: "
                f"{exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}",
                path=self.path,
            ) from None
        if outcome is not None and outcome not in OUTCOMES:
            raise JournalError(f"migration {mid!r}: unknown outcome {outcome!r}", path=self.path)
        return MigrationRecord(
            id=str(mid),
            vm=str(vm),
            plan=plan,
            idempotency_key=key,
            phase=str(phase),
            committed=bool(committed),
            committed_at=committed_at,
            outcome=outcome,
            report=report,
            created_at=float(created_at),
            updated_at=float(updated_at),
            finished_at=finished_at,
            role=str(role),
            peer=json.loads(peer_json) if peer_json else None,
            control=control,
        )


def _record_columns() -> str:
    """The columns of a MigrationRecord, as ``Journal._record`` reads them and as the
    schema this code writes has them (``peer_json`` since version 4, ``control_json``
    since 5)."""
    peer = "m.peer_json" if SCHEMA_VERSION >= 4 else "NULL"
    control = "m.control_json" if SCHEMA_VERSION >= 5 else "NULL"
    return (
        "m.id, m.vm, m.plan_json, m.idempotency_key, m.created_at, m.updated_at, m.phase, "
        f"m.committed, m.committed_at, m.outcome, m.finished_at, m.report_json, m.role, "
        f"{peer}, {control}"
    )


#: The columns of a MigrationSummary, as ``Journal._listed`` reads them: what a list
#: shows, taken from the stored report without reading it whole.
_SUMMARY_COLUMNS: Final = (
    "m.rowid, m.id, m.vm, m.role, m.phase, m.committed, m.outcome, m.created_at, "
    "m.finished_at, json_extract(m.report_json, '$.downtime_ms'), "
    "(SELECT COUNT(DISTINCT d.device) FROM devices d WHERE d.migration_id = m.id), "
    "json_extract(m.error_json, '$.kind'), json_extract(m.error_json, '$.message')"
)


def _select() -> str:
    """A query of MigrationRecords, to which a WHERE clause may be added."""
    return f"SELECT {_record_columns()} FROM migrations m"


def _exists(db: sqlite3.Connection, migration_id: str) -> bool:
    row = db.execute("SELECT 1 FROM migrations WHERE id = ?", (migration_id,)).fetchone()
    return row is not None


def _append(
    db: sqlite3.Connection, migration_id: str, now: float, kind: str, data: Mapping[str, Any]
) -> int:
    """Append an event after the migration's last one; returns its seq."""
    (seq,) = db.execute(
        "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE migration_id = ?", (migration_id,)
    ).fetchone()
    db.execute(
        "INSERT INTO events (migration_id, seq, time, kind, data_json) VALUES (?, ?, ?, ?, ?)",
        (migration_id, seq, now, kind, json.dumps(data, default=str, separators=(",", ":"))),
    )
    return int(seq)


def _trace_data(event: TraceEvent) -> dict[str, Any]:
    return {
        "side": event.side.value if event.side is not None else None,
        "device": event.device,
        "from": event.from_state.name if event.from_state is not None else None,
        "to": event.to_state.name if event.to_state is not None else None,
        "detail": dict(event.detail),
        "trace_time": event.time,
    }


def _event(
    path: Path, migration_id: str, seq: int, at: float, kind: str, data_json: str
) -> JournalEvent:
    try:
        data = json.loads(data_json)
    except ValueError:
        raise JournalError(
            f"migration {migration_id!r}: event {seq} is not valid JSON", path=path
        ) from None
    return JournalEvent(
        migration_id=migration_id,
        seq=seq,
        time=at,
        kind=kind,
        side=data.get("side"),
        device=data.get("device"),
        from_state=data.get("from"),
        to_state=data.get("to"),
        detail=data.get("detail") or {},
        trace_time=data.get("trace_time"),
    )
