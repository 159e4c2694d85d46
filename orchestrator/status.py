"""How the service shows migrations and devices: the models the API answers with.

``MigrationStatus`` is one migration in full (``GET /v1/migrations/{id}``);
``MigrationSummary`` is one line of a list (``GET /v1/migrations``), which
``MigrationList`` pages; ``DeviceStatus`` is one device of ``GET /v1/devices``.
Times are Unix seconds, as the journal keeps them.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel, Field, model_validator

from orchestrator.control import initial
from orchestrator.journal import MigrationRecord
from orchestrator.journal import MigrationSummary as JournalSummary
from orchestrator.report import Control, MigrationReport, Outcome

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "DeviceStatus",
    "MigrationList",
    "MigrationStatus",
    "MigrationSummary",
    "Progress",
    "status_of_record",
    "summary_of",
]

#: Migrations in a page of a list when the request does not say.
DEFAULT_PAGE_SIZE: Final = 100
#: The most a request may ask for in one page (more is refused, never cut silently).
MAX_PAGE_SIZE: Final = 1000


class Progress(BaseModel):
    """Live progress of a migration in flight."""

    precopy_round: int = Field(description="The pre-copy round under way, or the rounds done.")
    bytes_sent: dict[str, int] = Field(description="Device name -> bytes sent so far.")
    remaining_bytes: int | None = Field(
        description="Estimated bytes still to send (once every device has reported)."
    )
    expected_downtime_ms: float | None = Field(
        description="Downtime the stop-copy would take at the measured bandwidth."
    )


class MigrationStatus(BaseModel):
    """A migration as the API shows it: its report when it has ended, progress while it runs."""

    id: str
    vm: str
    phase: str
    outcome: Outcome | None = Field(description="None while the migration runs.")
    committed: bool
    in_doubt: bool = Field(
        False,
        description="Committed, and the destination's daemon cannot be reached to say how "
        "it ended: the outcome waits on it (or on an operator: orchestrator settle).",
    )
    created_at: float = Field(description="Unix time the migration was accepted.")
    started_at: float = Field(
        description="Unix time the migration started (it starts as it is accepted)."
    )
    finished_at: float | None = Field(
        None, description="Unix time its outcome was journaled; None while it runs."
    )
    progress: Progress | None = None
    control: Control | None = Field(
        None,
        description="The downtime limit and bandwidth cap in force, and every change an "
        "operator made (PATCH /v1/migrations/{id}, POST .../switchover).",
    )
    report: MigrationReport | None = Field(
        None, description="The same report as `orchestrator run --json`, once it has ended."
    )

    @model_validator(mode="before")
    @classmethod
    def _started_when_created(cls, data: Any) -> Any:
        """A migration starts as it is accepted (and a daemon before started_at said
        only created_at)."""
        if isinstance(data, dict) and "started_at" not in data and "created_at" in data:
            return {**data, "started_at": data["created_at"]}
        return data


class MigrationSummary(BaseModel):
    """A migration in a list: what an operator scans (its full report: GET by id)."""

    id: str
    vm: str
    role: str = Field(
        description="source: this daemon runs it; destination: another host's daemon "
        "runs it and this one holds its destination devices."
    )
    phase: str
    outcome: Outcome | None = Field(description="None while the migration runs.")
    committed: bool
    in_doubt: bool = Field(False, description="As in the full status.")
    started_at: float = Field(description="Unix time the migration was accepted and started.")
    finished_at: float | None = Field(description="Unix time it ended; None while it runs.")
    downtime_ms: float | None = Field(
        description="The report's downtime; None while it runs or when it had no window."
    )
    devices: int = Field(description="How many devices its plan names.")
    error: str | None = Field(description="The report's error as `kind: message`, if any.")


class MigrationList(BaseModel):
    """A page of migrations, newest first, and where the next page starts."""

    migrations: list[MigrationSummary] | list[MigrationStatus] = Field(
        description="Summaries (`view=summary`, the default), or each migration's full "
        "status with its report (`view=full`, as `GET /v1/migrations/{id}` shows it)."
    )
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; None: this is the last page."
    )


class DeviceStatus(BaseModel):
    """A device this daemon knows: one a migration used since it started, one an
    unfinished migration holds (its journal's, after a restart too), one a VMM handed
    over, or a simulated device whose file is in the state directory."""

    device: str = Field(
        description="The device's lock key: its backend and name (simulated), or its backend "
        "and host-wide identity (vfio: its sysfs path, or handle:<vm>/<device>)."
    )
    backend: str
    name: str
    migration: str | None = Field(description="The unfinished migration holding it, if any.")
    handle: str | None = Field(
        None, description="The handle (VM/NAME) a VMM handed it over as, while it holds it."
    )
    files: list[str] = Field(
        default_factory=list,
        description="A simulated device's files in the state directory, one per side it "
        "has been on (source, destination), which outlive migrations: "
        "`simulated/<side>/<name>.sim`.",
    )
    file_bytes: int = Field(0, description="The size of those files together.")


def status_of_record(record: MigrationRecord) -> MigrationStatus:
    """A migration not running here, as the journal holds it."""
    return MigrationStatus(
        id=record.id,
        vm=record.vm,
        phase=record.phase,
        outcome=record.outcome,
        committed=record.committed,
        created_at=record.created_at,
        started_at=record.created_at,
        finished_at=record.finished_at,
        control=record.control or initial(record.plan),
        report=record.report,
    )


def summary_of(entry: JournalSummary) -> MigrationSummary:
    """A journal's list entry as the API shows it."""
    return MigrationSummary(
        id=entry.id,
        vm=entry.vm,
        role=entry.role,
        phase=entry.phase,
        outcome=entry.outcome,
        committed=entry.committed,
        started_at=entry.created_at,
        finished_at=entry.finished_at,
        downtime_ms=entry.downtime_ms,
        devices=entry.devices,
        error=entry.error,
    )
