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
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import PlanError, Problem

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"

#: The two limits an operator may change while pre-copy runs, too (``orchestrator.control``):
#: one definition, so that a change is held to the plan's own bounds.
DowntimeLimitMs = Annotated[
    float,
    Field(
        gt=0, le=3_600_000, description="Longest acceptable downtime; drives the pre-copy decision."
    ),
]
BandwidthLimitMibS = Annotated[
    float,
    Field(
        gt=0,
        le=1_048_576,
        allow_inf_nan=False,
        description="Cap on the device-state data channel, in MiB/s (at most 1 TiB/s).",
    ),
]

#: The longest path a Unix socket address holds (``sun_path`` less its NUL).
UNIX_PATH_MAX = 107


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
    vmm_call_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "Deadline on every call to a VMM named in [vmm]: connecting, one QMP command "
            "and its check, or one run of the VMM's command."
        ),
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
    accept_differences: list[str] = Field(
        default_factory=list,
        description=(
            "Identity fields of this device whose values may differ between source and "
            'destination (for example ["firmware"]); the names are the backend\'s own.'
        ),
    )


class RemoteDestination(BaseModel):
    """The destination daemon of a migration between two hosts (the ``[destination]`` table).

    The daemon that runs the plan is the source; it asks this one to prepare
    the destination devices, streams their state to it and drives the
    commit.  The token never leaves the source host: the destination gets a
    secret of its own for each migration.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        pattern=r"^https?://[^/\s]+/?$",
        description=(
            'Base URL of the destination daemon\'s REST API, for example "http://10.0.0.2:7800" '
            '(use "https://" off a trusted network: the token travels in every request).'
        ),
    )
    token_file: Path = Field(
        description="File holding the bearer token the destination daemon accepts (mode 0600)."
    )
    ca_file: Path | None = Field(
        None,
        description="Deprecated: the daemon's [tls] ca_file replaces it.  PEM CA bundle to "
        "verify an https destination with (default: system), where the daemon has no [tls].",
    )


class VmmEndpoint(BaseModel):
    """How to reach the VMM of one side, to pause or resume the VM's vCPUs.

    Exactly one of ``qmp`` and ``command``.  The command convention: the
    orchestrator runs ``command + [verb]`` with verb ``pause``, ``resume`` or
    ``status``; exit status 0 means done.  ``status`` prints the vCPUs' state
    on stdout: a word (``running``, ``paused``, ...) or a JSON object with a
    ``state`` or ``status`` member (``ch-remote info`` style); ``running``
    (any case) means the vCPUs run.  Each run is under ``timeouts.vmm_call_s``.
    """

    model_config = ConfigDict(extra="forbid")

    qmp: Path | None = Field(
        None,
        description=(
            "Absolute path of a QMP Unix socket of the VM's QEMU (-qmp unix:PATH,server=on,"
            "wait=off), one the orchestrator may use for the whole migration: QEMU serves one "
            "client per QMP socket, so give it its own, not the management layer's."
        ),
    )
    command: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            'Any other VMM: an argv the verb "pause", "resume" or "status" is appended to '
            '(for example ["ch-remote", "--api-socket", "/run/ch/vm1.sock"] with a wrapper '
            'for "status").'
        ),
    )

    @field_validator("qmp")
    @classmethod
    def _socket_path(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not path.is_absolute():
            raise ValueError(f"{str(path)!r} is not an absolute path")
        size = len(str(path).encode("utf-8", "surrogateescape"))
        if size > UNIX_PATH_MAX:
            raise ValueError(
                f"{str(path)!r} is {size} bytes long; a Unix socket path holds at most "
                f"{UNIX_PATH_MAX}"
            )
        return path

    @field_validator("command")
    @classmethod
    def _argv(cls, argv: list[str] | None) -> list[str] | None:
        if argv is None:
            return None
        for index, arg in enumerate(argv):
            if not arg or "\0" in arg:
                raise ValueError(f"argument {index} is empty or holds a NUL character")
        return argv

    @model_validator(mode="after")
    def _exactly_one(self) -> VmmEndpoint:
        if (self.qmp is None) == (self.command is None):
            raise ValueError('give exactly one of qmp = "<socket path>" or command = [...]')
        return self

    def describe(self) -> str:
        """``qmp:/path`` or ``command:argv0``, for reports and logs."""
        if self.qmp is not None:
            return f"qmp:{self.qmp}"
        assert self.command is not None
        return f"command:{self.command[0]}"


class VmmSpec(BaseModel):
    """The VMMs that hold the VM on each side: the source's vCPUs are paused before
    the P2P barrier, the destination's resumed once every destination device runs."""

    model_config = ConfigDict(extra="forbid")

    source: VmmEndpoint = Field(description="The VMM running the VM on this host.")
    destination: VmmEndpoint = Field(description="The VMM waiting for the VM on the destination.")


class Plan(BaseModel):
    """A migration of one VM's passthrough devices."""

    model_config = ConfigDict(extra="forbid")

    vm: str = Field(pattern=NAME_PATTERN, description="Name of the VM whose devices migrate.")
    downtime_limit_ms: DowntimeLimitMs
    bandwidth_limit_mib_s: BandwidthLimitMibS | None = Field(
        None, description="Cap on the device-state data channel, in MiB/s (none: unlimited)."
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
    downtime_policy: Literal["best_effort", "strict"] = Field(
        "best_effort",
        description=(
            "What governs the switchover once decided: best_effort goes on whatever the "
            "clock says; strict checks, before every step until the commit point, the pause "
            "so far plus the predicted rest (and what a rollback from there would cost) "
            "against downtime_limit_ms, and rolls back at once when it would be exceeded."
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
    destination: RemoteDestination | None = Field(
        None,
        description=(
            "The destination daemon, for a migration to another host (none: both ends of "
            "every device are on this host)."
        ),
    )
    parallel_connections: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "Data-channel connections to the destination daemon, devices spread over them "
            "(default: one per device, at most 4); a control connection comes on top."
        ),
    )
    devices: list[DeviceSpec] = Field(
        min_length=1, max_length=4096, description="The devices that migrate together."
    )
    vmm: VmmSpec | None = Field(
        None,
        description=(
            "The VMMs of both sides, to pause the source vCPUs and resume the destination "
            "ones; without it the orchestrator drives the devices alone."
        ),
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
