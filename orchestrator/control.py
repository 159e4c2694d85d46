"""Live control of a migration in pre-copy: what an operator may change, and its record.

While a migration is in pre-copy, or before it (in prepare), an operator may
change its downtime limit and its bandwidth cap (libvirt's
``migrate-setmaxdowntime`` and ``migrate-setspeed``), or force the switchover
now (``migrate ... --force-complete``).  This module is pure: the request's
shape, held to the plan's own bounds; and how the limits in force and the
list of accepted changes (plain data, in ``orchestrator.report``, which the
journal keeps beside the plan and the report shows) follow from a request.
Which phases accept a change is the engine's to say (``Migration.control``).

Invariants:

* A request that changes nothing records nothing: the same request twice is
  one event, and the same answer.
* ``events`` are in the order they were accepted, each with what it changed,
  from what to what.
* The switchover, once forced, stays forced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.errors import OrchestratorError
from orchestrator.plan import BandwidthLimitMibS, DowntimeLimitMs, Plan
from orchestrator.report import Control, ControlChange, ControlEvent

__all__ = [
    "Control",
    "ControlChange",
    "ControlEvent",
    "ControlRefused",
    "ControlRequest",
    "initial",
    "with_limits",
    "with_switchover_forced",
]


class ControlRefused(OrchestratorError):
    """The migration is not where a change can apply (past its pre-copy decision,
    ended, recovering, or another daemon's to control)."""

    status_hint = 409


class ControlRequest(BaseModel):
    """New limits for a migration in pre-copy; a field left out is left as it is."""

    model_config = ConfigDict(extra="forbid")

    downtime_limit_ms: DowntimeLimitMs | None = Field(
        None, description="The new downtime limit, in ms (the plan's bounds; cannot be removed)."
    )
    bandwidth_limit_mib_s: BandwidthLimitMibS | None = Field(
        None, description="The new cap on the data channel, in MiB/s; null removes the cap."
    )

    @field_validator("downtime_limit_ms", mode="before")
    @classmethod
    def _a_limit_stays(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("a migration always has a downtime limit: give a number of ms")
        return value

    @model_validator(mode="after")
    def _something_to_change(self) -> ControlRequest:
        if not self.model_fields_set:
            raise ValueError("give downtime_limit_ms, bandwidth_limit_mib_s or both")
        return self


def initial(plan: Plan) -> Control:
    """The plan's own limits, unchanged."""
    return Control(
        downtime_limit_ms=plan.downtime_limit_ms,
        bandwidth_limit_mib_s=plan.bandwidth_limit_mib_s,
    )


def with_limits(control: Control, request: ControlRequest, *, at: float, phase: str) -> Control:
    """``control`` after ``request``: ``control`` itself when nothing changes."""
    wanted = request.model_dump(include=request.model_fields_set)
    return _changed(control, "set", wanted, at=at, phase=phase)


def with_switchover_forced(control: Control, *, at: float, phase: str) -> Control:
    """``control`` with the switchover forced: ``control`` itself when it already was."""
    return _changed(control, "switchover", {"switchover_forced": True}, at=at, phase=phase)


def _changed(
    control: Control,
    action: Literal["set", "switchover"],
    wanted: dict[str, Any],
    *,
    at: float,
    phase: str,
) -> Control:
    changes = [
        ControlChange(field=name, before=getattr(control, name), after=value)
        for name, value in wanted.items()
        if getattr(control, name) != value
    ]
    if not changes:
        return control
    event = ControlEvent(at=at, action=action, phase=phase, changes=changes)
    return control.model_copy(update={**wanted, "events": [*control.events, event]})
