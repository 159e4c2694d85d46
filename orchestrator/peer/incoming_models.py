"""What the destination daemon's incoming routes take and answer, and refuse.

Plain data (pydantic models and errors with their HTTP status): the API
serves them, :mod:`orchestrator.peer.server` and :mod:`orchestrator.peer.registry`
fill them in.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from orchestrator.errors import OrchestratorError
from orchestrator.report import MigrationReport, Outcome

__all__ = [
    "IncomingConflict",
    "IncomingNotFound",
    "IncomingNotServing",
    "IncomingReady",
    "IncomingReplies",
    "IncomingRequest",
    "IncomingStatus",
    "IncomingUnavailable",
    "ProtocolMismatch",
    "SourceContactModel",
]


class IncomingStatus(BaseModel):
    """What the destination daemon says of an incoming migration (``GET /v1/incoming/{id}``)."""

    id: str
    vm: str
    phase: str = Field(
        description=(
            "The destination's protocol state: prepared, transfer, voting, voted (every "
            "device ready: this side voted to commit), in_doubt (voted, and the source "
            "could not be asked yet), committed, aborting, aborted (reset; the outcome is "
            "asked of the source) or done"
        )
    )
    committed: bool
    outcome: Outcome | None = None
    in_doubt: bool = Field(
        False, description="Voted, with no decision, and the source could not be asked yet."
    )
    devices: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per device: state, reset, bytes loaded, capabilities.",
    )
    report: MigrationReport | None = None


class IncomingReady(BaseModel):
    """The answer to a prepare call: where to send the data, and how to prove who sends it."""

    migration_id: str
    protocol: int = Field(description="The protocol version both daemons speak.")
    data: dict[str, Any] = Field(description="host (may be null: use the API's host) and port.")
    secret: str = Field(description="Hex secret of this migration's data channel.")
    devices: dict[str, dict[str, Any]]


class SourceContactModel(BaseModel):
    """How the destination asks the source daemon for this migration's decision."""

    api: str = Field(description="The source daemon's API base URL ([api] advertise).")
    token: str = Field(min_length=32, description="Answers for this migration's decision only.")


class IncomingRequest(BaseModel):
    """``POST /v1/incoming``: prepare the destination half of a migration."""

    migration_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    plan: dict[str, Any]
    protocol: tuple[int, int] | None = Field(
        None, description="The protocol versions the source speaks: [lowest, highest]."
    )
    source: SourceContactModel | None = None


class IncomingReplies(BaseModel):
    """What a message delivered over REST made this side answer."""

    status: IncomingStatus
    replies: list[dict[str, Any]]


class IncomingNotFound(OrchestratorError):
    status_hint = 404


class IncomingUnavailable(OrchestratorError):
    """This daemon has no data channel listener: it cannot receive migrations."""

    status_hint = 503


class ProtocolMismatch(OrchestratorError):
    """The source speaks no protocol version this daemon does."""

    status_hint = 409


class IncomingConflict(OrchestratorError):
    status_hint = 409


class IncomingNotServing(OrchestratorError):
    """The incoming migration is being recovered, or is ending: ask again shortly.

    A message fed to its machine now would change its state with no task to
    carry out what the machine then says (a recovery not yet serving, a
    migration whose tasks have ended): the message is refused, unread."""

    status_hint = 503
