"""The report of a migration the coordinator ran: its outcome, and the numbers.

One contract for every outcome (``orchestrator.report.Outcome``):

* ``succeeded``: committed, and the destination runs every device;
* ``refused``: it ended before pre-copy began (a check, the prepare, a busy or
  missing device, a destination that said no or could not be reached, a
  cancel), every device as it was;
* ``rolled_back``: it ended after pre-copy began and the VM runs on the
  source as before;
* ``failed``: an operator is needed (a rollback or completion that could not
  finish), and only then.

Device states in the report are the devices' own: from the flow where it
drove them, else asked of the device, else ``unknown``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.engine.window import window_report
from orchestrator.flow import Phase
from orchestrator.report import DeviceReport, ErrorInfo, MigrationReport, Outcome, VmmReport
from orchestrator.states import Side

if TYPE_CHECKING:
    from orchestrator.engine.migration import Migration

__all__ = ["build_report", "outcome_of"]


def outcome_of(m: Migration) -> Outcome:
    """What happened, by the contract in the module docstring."""
    if m.committed:
        if m.destination.completed_outcome is not None:
            # Another host's daemon completed it and said how: both journals agree.
            return m.destination.completed_outcome
        failed = m.post_commit_errors or m.phase is not Phase.DONE
        return "failed" if failed else "succeeded"
    if m.rollback_errors:
        return "failed"
    if m.flow is not None and any(e.reset for e in m.flow.side(Side.SOURCE)):
        # Reset: its state is lost, so the VM does not run on the source "as before".
        return "failed"
    if m.recovery_failed:
        return "failed"
    if not m.precopy_began:
        return "refused"
    return "rolled_back"


async def build_report(m: Migration) -> MigrationReport:
    outcome = outcome_of(m)
    error: ErrorInfo | None = m.error
    if error is None and (m.post_commit_errors or m.rollback_errors):
        error = (m.post_commit_errors or m.rollback_errors)[0]
    if outcome == "succeeded":
        error = None
    recorder = m.recorder
    devices = [await _device_report(m, spec.name, spec.backend.name) for spec in m.resolved.devices]
    downtime = recorder.downtime_ms(m.committed, m.trace, vcpus_paused=m.vcpus_paused)
    notes = list(m.flow.notes) if m.flow else []
    if m.recovery_note:
        notes.append(m.recovery_note)
    # Judged against the limit the pre-copy decision was taken under.
    limit = recorder.precopy.downtime_limit_ms or m.plan.downtime_limit_ms
    if downtime is not None and downtime > limit:
        whose = (
            "the plan's limit"
            if limit == m.plan.downtime_limit_ms
            else "the limit in force at the pre-copy decision"
        )
        notes.append(f"downtime {downtime:.1f} ms exceeded {whose} of {limit:g} ms")
    for info in m.rollback_errors + m.post_commit_errors:
        if info is not error:
            notes.append(f"also failed: {info.message}")
    for info in m.release_errors:
        notes.append(f"source device {info.device!r} could not be released: {info.message}")
    notes.extend(m.destination.notes)
    if m.flow is not None:
        for spec in m.resolved.devices:
            if m.flow.endpoint(Side.SOURCE, spec.name).reset:
                notes.append(
                    f"source device {spec.name!r} fell into ERROR and was reset: its state is lost"
                )
    return MigrationReport(
        id=m.id,
        vm=m.plan.vm,
        outcome=outcome,
        downtime_ms=downtime,
        duration_ms=recorder.duration_ms(),
        phases={k: round(v, 3) for k, v in recorder.phase_ms.items()},
        devices=devices,
        precopy=recorder.precopy,
        barriers=recorder.barriers(),
        committed=m.committed,
        notes=notes,
        error=error,
        vmm=_vmm_report(m),
        window=window_report(m.trace, m.budget.forecast, downtime),
        budget=m.budget.as_report(downtime) if m.budget.checks else None,
        control=m.live.state,
        compatibility=m.compatibility,
        order=m.flow.order().as_dict() if m.flow else None,
    )


def _vmm_report(m: Migration) -> VmmReport | None:
    vmm = m.plan.vmm
    if vmm is None:
        return None
    source = m.vcpus
    destination = m.destination.vcpus_report()
    return VmmReport(
        source=vmm.source.describe(),
        destination=vmm.destination.describe(),
        pause_ms=source.ms.get("pause") if source else None,
        resume_ms=destination.get("resume_ms"),
        source_resume_ms=source.ms.get("source_resume") if source else None,
        source_status=source.status if source else None,
        destination_status=destination.get("status"),
    )


async def _device_report(m: Migration, name: str, backend: str) -> DeviceReport:
    stats = m.recorder.stats[name]
    driver = m.driver
    states = {Side.SOURCE: "unknown", Side.DESTINATION: "unknown"}
    resets = {Side.SOURCE: False, Side.DESTINATION: False}
    barrier = "held"
    precopy_reinit = False
    if m.flow is not None:
        for side in Side:
            endpoint = m.flow.endpoint(side, name)
            states[side], resets[side] = endpoint.state.name, endpoint.reset
        if not m.flow.endpoint(Side.SOURCE, name).barrier:
            barrier = "skipped: no P2P states on this device"
        precopy_reinit = m.flow.endpoint(Side.SOURCE, name).capabilities.precopy_reinit
    for side in Side:
        # Never moved by the migration: the device's own word, not the flow's.
        if (side, name) in m.observed_states:
            states[side] = m.observed_states[(side, name)].name
    source_digest = await driver.digest(Side.SOURCE, name)
    destination_digest = await m.destination.digest(name)
    timings: dict[str, float] = {}
    for step, ms in driver.device(Side.SOURCE, name).timings().items():
        timings[f"source_{step}"] = ms
    for step, ms in m.destination.timings(name).items():
        timings[f"destination_{step}"] = ms
    stop_path_s = stats.stop_path_s + m.destination.stop_path_s(name)
    return DeviceReport(
        name=name,
        backend=backend,
        source_state=states[Side.SOURCE],
        destination_state=states[Side.DESTINATION],
        source_reset=resets[Side.SOURCE],
        destination_reset=resets[Side.DESTINATION],
        bytes_precopy=stats.bytes_precopy,
        bytes_stopcopy=stats.bytes_stopcopy,
        backend_timings_ms=timings,
        source_digest=source_digest,
        destination_digest=destination_digest,
        barrier=barrier,
        precopy_reinit=precopy_reinit,
        barrier_wait_ms={k: round(v * 1000, 3) for k, v in stats.barrier_wait_s.items()},
        stop_copy_path_ms=round(stop_path_s * 1000, 3) if stop_path_s else None,
    )
