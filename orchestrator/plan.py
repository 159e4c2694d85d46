"""Migration plans: the one model plan files and the REST API share.

A plan names a VM, its downtime budget and its devices; each device names a
backend and two tables of backend parameters, ``source`` and
``destination``.  Validation runs in two stages, and both report *every*
problem with its field path, never just the first:

1. ``Plan.model_validate``: the shape of the plan itself (pydantic).
2. ``orchestrator.resolve``: each device's tables against its backend's
   own parameter model, and the cross-device rules of the flow.

This module is pure (pydantic only) so that the flow can use the plan
without importing a backend.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import PlanError, Problem

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"


class Timeouts(BaseModel):
    """Deadlines, so that a device that never answers fails a migration instead of hanging it."""

    model_config = ConfigDict(extra="forbid")

    device_call_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Deadline on every single device call (one state arc, one read or write).",
    )
    prepare_s: float = Field(
        120.0,
        gt=0,
        le=86400,
        description="Opening every device and bringing the destination to RESUMING.",
    )
    precopy_s: float = Field(
        600.0, gt=0, le=86400, description="The whole pre-copy phase, all rounds together."
    )
    switchover_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="From the P2P grace barrier to the commit point: stop-copy, drain and load.",
    )
    rollback_s: float = Field(
        120.0,
        gt=0,
        le=86400,
        description="Returning every device to where it started after a failure.",
    )


class DeviceSpec(BaseModel):
    """One passthrough device of the VM: the same device on both hosts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN, description="Unique name of the device within the plan."
    )
    backend: str = Field(description='Backend that drives the device, for example "simulated".')
    source: dict[str, Any] = Field(
        default_factory=dict, description="Backend parameters of the source device."
    )
    destination: dict[str, Any] = Field(
        default_factory=dict, description="Backend parameters of the destination device."
    )


class Plan(BaseModel):
    """A migration of one VM's passthrough devices."""

    model_config = ConfigDict(extra="forbid")

    vm: str = Field(pattern=NAME_PATTERN, description="Name of the VM whose devices migrate.")
    downtime_limit_ms: float = Field(
        gt=0, le=3_600_000, description="Longest acceptable downtime; drives the pre-copy decision."
    )
    bandwidth_limit_mib_s: float | None = Field(
        None, gt=0, description="Cap on the device-state data channel, in MiB/s (none: unlimited)."
    )
    precopy_max_rounds: int = Field(
        30, ge=1, le=100_000, description="Pre-copy rounds after which the policy decides."
    )
    precopy_policy: Literal["abort", "switchover"] = Field(
        "abort",
        description=(
            "What happens when pre-copy has not converged after precopy_max_rounds or the "
            "pre-copy deadline: roll back, or switch over anyway and exceed the downtime limit."
        ),
    )
    p2p: bool = Field(
        True,
        description=(
            "False declares that the VM uses no peer-to-peer DMA between its devices, so a "
            "device without the P2P states may skip the grace barrier."
        ),
    )
    timeouts: Timeouts = Field(
        default_factory=Timeouts, description="Deadlines per phase and per call."
    )
    devices: list[DeviceSpec] = Field(
        min_length=1, max_length=4096, description="The devices that migrate together."
    )

    @field_validator("devices")
    @classmethod
    def _unique_names(cls, devices: list[DeviceSpec]) -> list[DeviceSpec]:
        seen: set[str] = set()
        for device in devices:
            if device.name in seen:
                raise ValueError(f"device name {device.name!r} is used more than once")
            seen.add(device.name)
        return devices


def _location(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problems_from_validation(exc: ValidationError, prefix: str = "") -> list[Problem]:
    """Turn pydantic's errors into problems located by their field path."""
    return problems_from_errors(exc.errors(include_url=False), prefix)


def problems_from_errors(errors: Iterable[Mapping[str, Any]], prefix: str = "") -> list[Problem]:
    """The same for error dicts in pydantic's shape (``loc``, ``msg``, ``type``),
    such as those a web framework collects while validating a request."""
    problems = []
    for error in errors:
        loc = _location(error["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else prefix or loc
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(Problem(path, message))
    return problems


def parse_plan(data: Any) -> Plan:
    """Stage 1: the plan's own shape.  Raises PlanError listing every problem."""
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(problems_from_validation(exc)) from None


def read_plan_data(path: Path) -> Any:
    """Read a TOML or JSON plan file; every failure is a PlanError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"cannot read plan {str(path)!r}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(raw)
        if suffix == ".toml":
            return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: invalid TOML: {exc}") from None
    raise PlanError(f"{path}: plan files end in .toml or .json, not {suffix or 'nothing'!r}")
