"""The journal's SQLite file: its schema, the steps that upgrade an older one,
and how a connection to it is opened and written.

:mod:`orchestrator.journal` reads and writes migrations through these; what
a version added, and why, is told beside its step in ``SCHEMA_UPGRADES``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final, get_args

from orchestrator.errors import OrchestratorError
from orchestrator.flow import Phase
from orchestrator.report import Outcome

__all__ = [
    "OUTCOMES",
    "PHASES",
    "SCHEMA_UPGRADES",
    "SCHEMA_VERSION",
    "JournalError",
    "connect",
    "connect_reader",
    "describe",
    "transaction",
]


#: The schema this code reads and writes.
SCHEMA_VERSION: Final = 7

OUTCOMES: Final = frozenset(get_args(Outcome))
PHASES: Final = frozenset(p.value for p in Phase)


def _create_migrations(table: str, outcomes: Iterable[str], *extra_columns: str) -> str:
    """The ``migrations`` table as a schema version creates it, named ``table``.

    Versions differ in the outcomes the CHECK admits and in the columns added
    since version 1; each version passes its own, fixed for ever.
    """
    admitted = ", ".join(f"'{outcome}'" for outcome in outcomes)
    extra = "".join(f",\n        {column}" for column in extra_columns)
    return f"""
    CREATE TABLE {table} (
        id              TEXT PRIMARY KEY NOT NULL,
        vm              TEXT NOT NULL,
        plan_json       TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        phase           TEXT NOT NULL,
        committed       INTEGER NOT NULL DEFAULT 0 CHECK (committed IN (0, 1)),
        committed_at    REAL,
        outcome         TEXT CHECK (outcome IN ({admitted})),
        finished_at     REAL,
        report_json     TEXT,
        error_json      TEXT{extra}
    )
    """


#: The indexes and triggers of ``migrations``: dropped with it, so a version
#: that rebuilds the table makes them again.
_MIGRATIONS_INDEXES_AND_TRIGGERS: Final = (
    "CREATE INDEX migrations_by_created ON migrations (created_at)",
    "CREATE INDEX migrations_unfinished ON migrations (created_at) WHERE outcome IS NULL",
    # The invariants, kept by the database itself and not only by this module.
    """
    CREATE TRIGGER migrations_no_delete BEFORE DELETE ON migrations
    BEGIN SELECT RAISE(ABORT, 'the journal deletes nothing'); END
    """,
    """
    CREATE TRIGGER migrations_finished_frozen BEFORE UPDATE ON migrations
    WHEN OLD.outcome IS NOT NULL
    BEGIN SELECT RAISE(ABORT, 'a finished migration is frozen'); END
    """,
    """
    CREATE TRIGGER migrations_commit_final BEFORE UPDATE OF committed ON migrations
    WHEN OLD.committed = 1 AND NEW.committed = 0
    BEGIN SELECT RAISE(ABORT, 'a commit cannot be undone'); END
    """,
)

_SCHEMA_V1: Final = (
    _create_migrations("migrations", ("succeeded", "rolled_back", "failed")),
    *_MIGRATIONS_INDEXES_AND_TRIGGERS,
    """
    CREATE TABLE events (
        migration_id TEXT NOT NULL REFERENCES migrations (id),
        seq          INTEGER NOT NULL CHECK (seq > 0),
        time         REAL NOT NULL,
        kind         TEXT NOT NULL,
        data_json    TEXT NOT NULL,
        PRIMARY KEY (migration_id, seq)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE devices (
        migration_id TEXT NOT NULL REFERENCES migrations (id),
        device       TEXT NOT NULL,
        side         TEXT NOT NULL CHECK (side IN ('source', 'destination')),
        PRIMARY KEY (migration_id, device, side)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX devices_by_device ON devices (device)",
    """
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'journal events are append-only'); END
    """,
    """
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'journal events are append-only'); END
    """,
    """
    CREATE TRIGGER devices_no_delete BEFORE DELETE ON devices
    BEGIN SELECT RAISE(ABORT, 'the journal deletes nothing'); END
    """,
)

#: ``SCHEMA_UPGRADES[n]`` takes a database from version ``n - 1`` to ``n``
#: (version 0: an empty file).  Each step runs in one transaction, with
#: foreign keys checked at its end (``_upgrade_schema``).
#: Version 2: which side of the migration this daemon plays.  ``source``: it
#: runs the migration (both ends on this host, or the destination on another
#: host's daemon); ``destination``: another host's daemon runs it and this
#: one holds the destination devices (``orchestrator.incoming``).
_ROLE_COLUMN: Final = (
    "role TEXT NOT NULL DEFAULT 'source' CHECK (role IN ('source', 'destination'))"
)
_SCHEMA_V2: Final = (f"ALTER TABLE migrations ADD COLUMN {_ROLE_COLUMN}",)

#: Version 3: the outcome ``refused`` (the migration ended before pre-copy
#: began, every device as it was).  SQLite cannot alter a CHECK, so the table
#: is rebuilt as SQLite's documentation says (lang_altertable.html, "other
#: kinds of table schema changes"): a new table, every row copied with its
#: rowid (which orders migrations created in the same instant), the old one
#: dropped, the new one renamed, its indexes and triggers made again.  The
#: events and devices tables refer to ``migrations`` by name and keep their rows.
_MIGRATIONS_V3_COLUMNS: Final = (
    "rowid, id, vm, plan_json, idempotency_key, created_at, updated_at, phase, committed, "
    "committed_at, outcome, finished_at, report_json, error_json, role"
)
_SCHEMA_V3: Final = (
    _create_migrations(
        "migrations_v3", ("succeeded", "refused", "rolled_back", "failed"), _ROLE_COLUMN
    ),
    f"INSERT INTO migrations_v3 ({_MIGRATIONS_V3_COLUMNS}) "
    f"SELECT {_MIGRATIONS_V3_COLUMNS} FROM migrations",
    "DROP TABLE migrations",
    "ALTER TABLE migrations_v3 RENAME TO migrations",
    *_MIGRATIONS_INDEXES_AND_TRIGGERS,
)

#: Version 4: how a destination daemon reaches the source of a migration it
#: receives (``peer_json``: the source's API address and the credential that
#: answers for this migration's decision), so that after a restart it can ask.
_SCHEMA_V4: Final = ("ALTER TABLE migrations ADD COLUMN peer_json TEXT",)

#: Version 5: an operator's live control of a migration in pre-copy
#: (``control_json``: the limits in force and every change, from what to what),
#: so that the record shows the limits the migration ran under, restarts included.
_SCHEMA_V5: Final = ("ALTER TABLE migrations ADD COLUMN control_json TEXT",)

#: Version 6: how long each arc took, per device model, side and arc, over this
#: host's migrations: the downtime model's figure for an arc a device has not
#: walked yet in a migration and whose backend declares none.  Not a record of
#: any one migration: a running mean, updated in place.
_SCHEMA_V6: Final = (
    """CREATE TABLE arc_history (
        model       TEXT NOT NULL,
        side        TEXT NOT NULL CHECK (side IN ('source', 'destination')),
        from_state  TEXT NOT NULL,
        to_state    TEXT NOT NULL,
        count       INTEGER NOT NULL CHECK (count >= 1),
        mean_s      REAL NOT NULL CHECK (mean_s >= 0),
        updated_at  REAL NOT NULL,
        PRIMARY KEY (model, side, from_state, to_state))""",
)

#: Version 7: retention (``journal_retention_days``).  The journal still deletes
#: nothing by itself; one deliberate path prunes a finished migration whole (its
#: row, events, devices and acknowledgement): ``Journal.prune`` names it in
#: ``pruning`` inside the pruning transaction, and only a migration named there
#: and finished passes the no-delete triggers, which are made again with that
#: condition.  ``peer_acks``: the other host's daemon has its outcome too (a
#: migration between two hosts is pruned only then: the peer may still ask).
_PRUNABLE: Final = (
    "(SELECT 1 FROM migrations m JOIN pruning p ON p.migration_id = m.id "
    "WHERE m.id = {id} AND m.outcome IS NOT NULL)"
)
_SCHEMA_V7: Final = (
    """CREATE TABLE peer_acks (
        migration_id TEXT PRIMARY KEY NOT NULL REFERENCES migrations (id),
        at           REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE TABLE pruning (migration_id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID",
    """CREATE TRIGGER pruning_only_finished BEFORE INSERT ON pruning
    WHEN NOT EXISTS (SELECT 1 FROM migrations WHERE id = NEW.migration_id AND outcome IS NOT NULL)
    BEGIN SELECT RAISE(ABORT, 'only a finished migration is pruned'); END""",
    "DROP TRIGGER migrations_no_delete",
    f"""CREATE TRIGGER migrations_no_delete BEFORE DELETE ON migrations
    WHEN NOT EXISTS {_PRUNABLE.format(id="OLD.id")}
    BEGIN SELECT RAISE(ABORT, 'the journal deletes nothing'); END""",
    "DROP TRIGGER events_no_delete",
    f"""CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    WHEN NOT EXISTS {_PRUNABLE.format(id="OLD.migration_id")}
    BEGIN SELECT RAISE(ABORT, 'journal events are append-only'); END""",
    "DROP TRIGGER devices_no_delete",
    f"""CREATE TRIGGER devices_no_delete BEFORE DELETE ON devices
    WHEN NOT EXISTS {_PRUNABLE.format(id="OLD.migration_id")}
    BEGIN SELECT RAISE(ABORT, 'the journal deletes nothing'); END""",
    f"""CREATE TRIGGER peer_acks_no_delete BEFORE DELETE ON peer_acks
    WHEN NOT EXISTS {_PRUNABLE.format(id="OLD.migration_id")}
    BEGIN SELECT RAISE(ABORT, 'the journal deletes nothing'); END""",
    """CREATE TRIGGER peer_acks_no_update BEFORE UPDATE ON peer_acks
    BEGIN SELECT RAISE(ABORT, 'the journal deletes nothing'); END""",
)

SCHEMA_UPGRADES: Final[Mapping[int, tuple[str, ...]]] = {
    1: _SCHEMA_V1,
    2: _SCHEMA_V2,
    3: _SCHEMA_V3,
    4: _SCHEMA_V4,
    5: _SCHEMA_V5,
    6: _SCHEMA_V6,
    7: _SCHEMA_V7,
}


class JournalError(OrchestratorError):
    """The journal was misused, or its database cannot be read or written.

    ``path`` names the database file.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        super().__init__(f"journal {str(path)!r}: {message}" if path else message)


def connect(state_dir: Path, path: Path) -> sqlite3.Connection:
    """Open the database file, set it up for durability and bring its schema up to date."""
    try:
        if not state_dir.is_dir():
            state_dir.mkdir(mode=0o700, parents=True)
            state_dir.chmod(0o700)  # mkdir's mode is filtered by the umask
        # Create the file ourselves so it is never readable by others; SQLite
        # gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise JournalError(f"cannot create: {exc.strerror or exc}", path=path) from None
    try:
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(describe(exc), path=path) from None
    try:
        _configure(db, path)
    except sqlite3.Error as exc:
        db.close()
        raise JournalError(describe(exc), path=path) from None
    except JournalError:
        db.close()
        raise
    return db


def connect_reader(path: Path) -> sqlite3.Connection:
    """A second, read-only connection (the writer has set the file up)."""
    try:
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        raise JournalError(describe(exc), path=path) from None
    return db


def _configure(db: sqlite3.Connection, path: Path) -> None:
    (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise JournalError(
            f"the file system does not support SQLite's WAL mode (got {mode})", path=path
        )
    # FULL: every commit is fsynced, so a recorded decision survives power loss.
    db.execute("PRAGMA synchronous = FULL")
    # An upgrade may rebuild a table the others refer to, which SQLite allows
    # only with foreign keys off; the pragma cannot change inside a
    # transaction, so they are turned on after it (it checks them itself).
    db.execute("PRAGMA foreign_keys = OFF")
    _upgrade_schema(db, path)
    db.execute("PRAGMA foreign_keys = ON")


def _upgrade_schema(db: sqlite3.Connection, path: Path) -> None:
    with transaction(db):
        has_table = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if has_table:
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
        else:
            others = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            if others:
                raise JournalError("an SQLite database, but not a journal", path=path)
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            version = 0
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"schema version {version} was written by a newer orchestrator "
                f"(this one reads up to {SCHEMA_VERSION})",
                path=path,
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in SCHEMA_UPGRADES[step]:
                db.execute(statement)
        if version < SCHEMA_VERSION:
            dangling = db.execute("PRAGMA foreign_key_check").fetchall()
            if dangling:
                table, _, parent, _ = dangling[0]
                raise JournalError(
                    f"cannot upgrade the schema from version {version}: {len(dangling)} "
                    f"row(s) refer to rows that do not exist (first: in {table}, a row "
                    f"without its {parent} row)",
                    path=path,
                )
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    # IMMEDIATE takes the write lock up front, so a read-then-write cannot be
    # interleaved with another process's write.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def describe(exc: sqlite3.Error) -> str:
    """SQLite's complaint, in words an operator can act on."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.OperationalError | sqlite3.IntegrityError
    ):
        return f"the database is unreadable or corrupt: {text}"
    return text
