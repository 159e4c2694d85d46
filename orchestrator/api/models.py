"""The API's own wire models: its error body, its events, its probes.

Migrations themselves travel as the service's models (``Plan`` in,
``MigrationStatus`` and ``DeviceStatus`` out), so that a plan file, a POST
body and ``orchestrator validate`` share one schema and one set of field paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.errors import Problem
from orchestrator.journal import JournalEvent


class ProblemItem(BaseModel):
    """One thing wrong with a request, located by its field path."""

    path: str = Field(
        description=(
            'Field path, as `orchestrator validate` prints it ("devices[0].source.state_mib"); '
            "empty when the problem is the request as a whole."
        )
    )
    message: str


class ErrorDetail(BaseModel):
    kind: str = Field(
        description=(
            "Machine-readable cause: plan_error, invalid_request, device_busy, "
            "past_commit_point, migration_not_found, shutting_down, not_ready, unauthorized, "
            "forbidden, not_found, method_not_allowed, body_too_large, internal_error, ..."
        )
    )
    message: str = Field(description="What went wrong, in words.")
    problems: list[ProblemItem] = Field(
        default_factory=list, description="Every problem found, when there are several."
    )


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


def error_body(kind: str, message: str, problems: Sequence[Problem] = ()) -> dict[str, Any]:
    """An error body as plain data, ready for a JSON response."""
    return {
        "error": {
            "kind": kind,
            "message": message,
            "problems": [{"path": p.path, "message": p.message} for p in problems],
        }
    }


class MigrationEvent(BaseModel):
    """The data of one Server-Sent Event: one journaled event of a migration."""

    migration_id: str
    seq: int = Field(description="Counts from 1 per migration; also the SSE id.")
    time: float = Field(description="Unix time it was journaled.")
    kind: str = Field(
        description=(
            "phase, arc_begin, arc_end, arc_failed, arc_settled (an arc cut short by a "
            "rollback: to_state is where the device was found), reset, barrier, decision, "
            "commit, finished, ... (also the SSE event name)"
        )
    )
    side: str | None = None
    device: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, event: JournalEvent) -> MigrationEvent:
        return cls(
            migration_id=event.migration_id,
            seq=event.seq,
            time=event.time,
            kind=event.kind,
            side=event.side,
            device=event.device,
            from_state=event.from_state,
            to_state=event.to_state,
            detail=dict(event.detail),
        )


class Health(BaseModel):
    status: str = Field(description='Always "ok": the process answers.')


class Readiness(BaseModel):
    ready: bool = Field(description="The service recovered the journal and accepts migrations.")
