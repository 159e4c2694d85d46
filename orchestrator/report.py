"""The report of one migration: what `orchestrator run --json` prints.

The same model serves the REST API later, so its field names are a contract:
extend it, do not rename.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

#: How a migration ended; ``MigrationReport.outcome`` says what each one promises.
Outcome = Literal["succeeded", "refused", "rolled_back", "failed"]

#: What each outcome promises, for the report's schema, the API and the CLI's help.
OUTCOME_MEANINGS: Final[Mapping[Outcome, str]] = {
    "succeeded": "the VM's devices run on the destination",
    "refused": (
        "it ended before pre-copy began (checks, prepare, a busy or missing device, a "
        "destination that said no or could not be reached, a cancel before pre-copy): "
        "every device is as it was"
    ),
    "rolled_back": "it ended after pre-copy began and the VM runs on the source as before",
    "failed": "an operator is needed, and only then",
}


class ErrorInfo(BaseModel):
    """What went wrong first: the cause, not its consequences."""

    kind: str = Field(
        description=(
            "device_error, device_timeout, peer_error, plan_error, identity_mismatch (a "
            "source and destination device whose identities differ: refused before any "
            "change), device_state (a device "
            "not RUNNING at the start), vmm_error, vmm_timeout, vmm_state (a VMM's vCPUs not "
            "where a migration starts), precopy_not_converged, downtime_unreachable (the "
            "window cannot fit the limit even with nothing to send: refused before any "
            "change), downtime_budget (a strict budget rolled back before the limit passed), "
            "phase_timeout, journal_error, "
            "cancelled, interrupted (the orchestrator stopped; rolled back on restart), "
            "recovery_failed or internal_error"
        )
    )
    message: str
    phase: str | None = Field(None, description="Phase the migration was in.")
    side: Literal["source", "destination"] | None = None
    device: str | None = None
    operation: str | None = Field(
        None,
        description="The device call (or, with no device, the VMM call) that failed, if one did.",
    )


class DeviceReport(BaseModel):
    name: str
    backend: str
    source_state: str = Field(description="Final state of the source device.")
    destination_state: str = Field(description="Final state of the destination device.")
    source_reset: bool = Field(
        False, description="The source device was reset (its state is lost)."
    )
    destination_reset: bool = Field(False, description="The destination device was reset.")
    bytes_precopy: int = 0
    bytes_stopcopy: int = 0
    source_digest: str | None = None
    destination_digest: str | None = None
    barrier: str = Field(
        "held", description='"held", or why the device skipped the P2P grace barriers.'
    )
    barrier_wait_ms: dict[str, float] = Field(
        default_factory=dict, description="Time this device waited at each barrier."
    )
    stop_copy_path_ms: float | None = Field(
        None,
        description=(
            "This device's own calls from its stop to its destination running: "
            "the downtime it would cause alone."
        ),
    )
    backend_timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "The backend's own steps, in ms, by side and step, where the backend reports "
            "them: for vhost_vdpa source_suspend, source_state_read, destination_restore, "
            "destination_start (DRIVER_OK, suspend, ring enable) and destination_resume, "
            "the device's share of the downtime."
        ),
    )
    precopy_reinit: bool = Field(
        False,
        description="The source device opted in to reporting new initial data mid pre-copy "
        "(the pre-copy information's second version); false: not available to it (an older "
        "kernel or driver, or no pre-copy), and its initial data only shrinks.",
    )
    destination_capabilities: dict[str, Any] | None = Field(
        None,
        description=(
            "The destination device's migration capabilities (flags, stop_copy_size, "
            "dirty_logging, precopy_reinit), in a destination daemon's report of a migration "
            "between hosts."
        ),
    )


class InitialReturn(BaseModel):
    """A source device reported new initial data after its first had drained."""

    device: str
    bytes: int = Field(description="The new initial data the device reported, in bytes.")
    round: int = Field(description="The pre-copy round in which it was reported (from 1).")
    reacknowledge: bool = Field(
        description="Its initial data had been announced to the destination: the "
        "switchover acknowledgement was asked for again, and no device stopped before it."
    )


class PrecopyReport(BaseModel):
    rounds: int = 0
    converged: bool = False
    decision: str | None = Field(None, description="switchover or abort, when one was taken.")
    reason: str | None = None
    bandwidth_mib_s: float | None = None
    downtime_limit_ms: float | None = Field(
        None,
        description="The downtime limit in force at the last decision (an operator may "
        "change the plan's while pre-copy runs).",
    )
    bandwidth_limit_mib_s: float | None = Field(
        None, description="The bandwidth cap in force at the last decision (null: none)."
    )
    expected_downtime_ms: float | None = Field(
        None,
        description="The downtime predicted at the last decision: the whole window "
        "(see forecast), not only the stop-copy bytes.",
    )
    forecast: dict[str, Any] | None = Field(
        None,
        description="The last decision's prediction of the window: total_ms, its components "
        "(pause, grace_arcs, stop_arcs, transfer, settle_arcs, commit, control, run_arcs, "
        "resume, overhead) and per device, each figure with its source (measured, declared, "
        "estimated, unknown).",
    )
    initial_returns: list[InitialReturn] = Field(
        default_factory=list,
        description="Each time a source device reported new initial data mid pre-copy.",
    )


class BarrierReport(BaseModel):
    members: int
    wait_ms_max: float
    wait_ms_mean: float


class VmmReport(BaseModel):
    """The VMMs' share of the migration: the vCPU pause and resume."""

    source: str = Field(
        description='How the source VMM was reached: "qmp:PATH" or "command:ARGV0".'
    )
    destination: str = Field(description="How the destination VMM was reached.")
    pause_ms: float | None = Field(
        None, description="The source vCPU pause, stop and check (null: not done or failed)."
    )
    resume_ms: float | None = Field(
        None, description="The destination vCPU resume after the commit, start and check."
    )
    source_resume_ms: float | None = Field(
        None, description="The source vCPU resume of a rollback, start and check."
    )
    source_status: str | None = Field(
        None, description="The source vCPUs as their VMM last reported them (running, paused...)."
    )
    destination_status: str | None = Field(
        None, description="The destination vCPUs as their VMM last reported them."
    )


#: What an operator's control event may change.
ControlField = Literal["downtime_limit_ms", "bandwidth_limit_mib_s", "switchover_forced"]


# -- an operator's live control (orchestrator.control) ------------------------


class ControlChange(BaseModel):
    """One value an operator changed."""

    field: ControlField
    before: float | bool | None = Field(description="The value in force before the change.")
    after: float | bool | None = Field(description="The value in force from the change on.")


class ControlEvent(BaseModel):
    """One accepted control request that changed something."""

    at: float = Field(description="Unix time it was accepted.")
    action: Literal["set", "switchover"]
    phase: str = Field(description="The migration's phase when it was accepted.")
    changes: list[ControlChange]


class Control(BaseModel):
    """The limits in force and how an operator changed them."""

    model_config = ConfigDict(frozen=True)

    downtime_limit_ms: float = Field(description="The downtime limit in force.")
    bandwidth_limit_mib_s: float | None = Field(
        description="The data channel's cap in force, in MiB/s (null: none)."
    )
    switchover_forced: bool = Field(
        False, description="An operator forced the switchover (at the next pre-copy decision)."
    )
    events: list[ControlEvent] = Field(
        default_factory=list, description="Every accepted change, oldest first."
    )

    @property
    def last_event(self) -> ControlEvent | None:
        return self.events[-1] if self.events else None


class CompatibilityReport(BaseModel):
    """The identity check before any device left RUNNING (``orchestrator.compat``)."""

    checked: bool = Field(
        description="The identities were compared (false: the destination daemon predates "
        "them, protocol before 3)."
    )
    identities: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per device, its source and destination identity (backend, model, fields).",
    )
    accepted: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Differences accepted: device, field, both values, and by what (the "
        "plan's accept_differences or a [[compat.rules]] entry).",
    )
    mismatches: list[str] = Field(
        default_factory=list, description="Differences nothing accepted: the refusal's reasons."
    )
    not_compared: list[str] = Field(
        default_factory=list,
        description="Fields only one end could read (a handed-over device its host cannot "
        "trace to sysfs): unknown, so not compared.",
    )
    policy: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The coordinating daemon's [[compat.rules]] in force when it compared.",
    )


class MigrationReport(BaseModel):
    id: str
    vm: str
    outcome: Outcome = Field(
        description="How the migration ended. "
        + "; ".join(f"{name}: {meaning}" for name, meaning in OUTCOME_MEANINGS.items())
        + "."
    )
    downtime_ms: float | None = Field(
        None,
        description=(
            "From the first source device stopping to the last destination device running "
            "(or, after a rollback, to the last source device running again); with a [vmm] "
            "section, from the source vCPU pause to the vCPU resume on either side."
        ),
    )
    duration_ms: float
    phases: dict[str, float] = Field(
        default_factory=dict, description="Phase name -> ms spent in it."
    )
    devices: list[DeviceReport] = Field(default_factory=list)
    precopy: PrecopyReport = Field(default_factory=PrecopyReport)
    barriers: dict[str, BarrierReport] = Field(default_factory=dict)
    committed: bool = Field(False, description="The commit point was reached and recorded.")
    notes: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = None
    vmm: VmmReport | None = Field(
        None, description="The vCPU pause and resume, when the plan has a [vmm] section."
    )
    compatibility: CompatibilityReport | None = Field(
        None,
        description="The device identity check (none: the migration ended before it, or "
        "a recovery, which does not compare).",
    )
    window: dict[str, Any] | None = Field(
        None,
        description="The downtime window predicted (at the switchover decision) against "
        "measured: predicted_ms, measured_ms, per component (predicted_ms, its source, "
        "measured_ms), unattributed_ms (waits and the orchestrator's own work) and per device.",
    )
    budget: dict[str, Any] | None = Field(
        None,
        description="The downtime budget's checks before each step of the switchover until "
        "the commit point: policy, limit_ms, checks (step, elapsed_ms, forward_ms, "
        "fallback_ms, fits), blown_at (the step, or watchdog, that made a strict budget roll "
        "back), over_ms, pause_ms (the pause the VM saw) and destination_share (between hosts, "
        "the destination's share: left_ms until its vote, settle_ms).",
    )
    share: dict[str, Any] | None = Field(
        None,
        description="A destination daemon's report, strict budget: the share the source "
        "granted it (taken: false when it came after a stream had ended; left_ms, settle_ms) "
        "and its checks before each settle and the vote (step, device, elapsed_ms, need_ms, "
        "fits), durations on its clock from the share's receipt.",
    )
    control: Control | None = Field(
        None,
        description="The limits in force at the end and every change an operator made "
        "while the migration was in pre-copy.",
    )
    order: dict[str, list[dict[str, Any]]] | None = Field(
        None,
        description="The order the devices stopped and ran in, per side (source, "
        "destination): stages of step (grace, stop, run) and devices, each stage begun "
        "once the one before it was done; a device without P2P states among P2P peers "
        "has a stage of its own.  None when the devices were never opened together.",
    )
