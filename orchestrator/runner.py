"""Runs one VM's migration with trio: the only place where I/O meets the flow.

The runner executes what ``orchestrator.flow`` decides.  It owns:

* one task per device endpoint, inside one nursery, so that every device
  moves in parallel and any failure cancels the rest;
* the barriers: the pre-copy rounds, the source P2P grace barrier and the
  destination barrier whose release is the commit point;
* a deadline on every single device call (``timeouts.device_call_s``) and
  on the phases that must not drag on, so that a device that never answers
  fails the migration instead of hanging it;
* cancellation: an operator's cancel, a timeout or any failure before the
  commit point rolls back, shielded from further cancellation and under its
  own deadline; after the commit point the only way is forward;
* the measurements: downtime from the first source device stopping to the
  last destination device running, per-phase times, barrier waits;
* the VMMs of the plan's ``[vmm]`` section, if any: the source vCPUs pause
  after pre-copy converged and before the P2P grace barrier, the destination
  vCPUs resume once every destination device runs (after the commit), a
  rollback resumes the source ones; the downtime then runs from the pause to
  the resume.

It is also the only place where a backend's ``DeviceError`` becomes a
migration failure (``DeviceFailure``), tagged with the side, device, phase
and operation, and a VMM's ``VmmError`` one (``VmmFailure``), and where the
first failure in time is kept as the cause.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import structlog
import trio

from orchestrator.backends.base import Device
from orchestrator.errors import (
    DeviceError,
    DeviceTimeout,
    PeerError,
    PlanError,
    ProtocolViolation,
)
from orchestrator.flow import MigrationFlow, Phase, PrecopyDecision, Remaining, decide_precopy
from orchestrator.remote import RemoteDestination
from orchestrator.report import (
    BarrierReport,
    DeviceReport,
    ErrorInfo,
    MigrationReport,
    Outcome,
    PrecopyReport,
    VmmReport,
)
from orchestrator.resolve import ResolvedPlan
from orchestrator.states import RUNNING_STATES, Capabilities, DeviceState, Side
from orchestrator.transport import RateLimiter, StreamReceiver, StreamSender, local_stream
from orchestrator.vmm import VcpuStatus, Vmm, VmmError, VmmTimeout, open_vmm

T = TypeVar("T")

MIB = 1 << 20

#: Phases after which an operator's cancel is refused: the decision is being
#: or has been recorded, so the destination must win.
NO_CANCEL_PHASES = frozenset({Phase.COMMIT, Phase.RESUME, Phase.RELEASE, Phase.DONE})

#: The downtime window: from the source grace barrier (where a VMM's vCPUs
#: pause) until the destination runs.  Work that nothing in the window waits
#: for (journaling the trace) is held back while a migration is inside it.
DOWNTIME_WINDOW = frozenset(
    {Phase.SOURCE_GRACE, Phase.STOP_COPY, Phase.DESTINATION_GRACE, Phase.COMMIT, Phase.RESUME}
)


class MigrationAborted(Exception):
    """Stops the forward path; the cause is in ``Migration.error``."""


class DeviceFailure(MigrationAborted):
    """A device call failed during the migration; ``info`` says where and how."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


class VmmFailure(MigrationAborted):
    """A VMM call failed during the migration; ``info`` says which side and call."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


class CommitJournal(Protocol):
    """Where the commit decision is made durable before anyone acts on it."""

    async def record_commit(self, migration_id: str) -> None: ...


_NO_DETAIL: Mapping[str, Any] = MappingProxyType({})


@dataclass(slots=True)
class TraceEvent:
    """One thing that happened, in order.  Tests check invariants on the trace."""

    seq: int
    time: float
    # arc_begin, arc_end, arc_failed, reset, phase, barrier, commit, decision,
    # vmm_begin, vmm_end, vmm_failed (detail: action)
    kind: str
    side: Side | None
    device: str | None
    from_state: DeviceState | None
    to_state: DeviceState | None
    detail: Mapping[str, Any]


@dataclass
class DeviceStats:
    bytes_precopy: int = 0
    bytes_stopcopy: int = 0
    barrier_wait_s: dict[str, float] = field(default_factory=dict)
    # This device's own busy time from its stop to its destination running.
    stop_path_s: float = 0.0
    source_digest: str | None = None
    destination_digest: str | None = None
    remaining: Remaining | None = None


class Barrier:
    """``parties`` tasks meet; the last to arrive runs ``on_release`` before anyone goes on."""

    def __init__(self, name: str, parties: int, on_release: Callable[[], None]) -> None:
        self.name = name
        self.parties = parties
        self._on_release = on_release
        self._arrived = 0
        self.released = trio.Event()

    async def arrive(self) -> float:
        """Wait for every party; returns how long this one waited, in seconds."""
        start = trio.current_time()
        self._arrived += 1
        if self._arrived == self.parties:
            self._on_release()
            self.released.set()
        await self.released.wait()
        return trio.current_time() - start


class RoundGate:
    """A cyclic barrier for pre-copy rounds: the last report of a round decides for all."""

    def __init__(self, parties: int, decide: Callable[[dict[str, Remaining]], PrecopyDecision]):
        self.parties = parties
        self._decide = decide
        self._reports: dict[str, Remaining] = {}
        self._round_done = trio.Event()
        self.decision: PrecopyDecision | None = None
        #: Set once a round decides anything but "continue".
        self.final = trio.Event()

    async def arrive(self, name: str, remaining: Remaining) -> PrecopyDecision:
        self._reports[name] = remaining
        done = self._round_done
        if len(self._reports) == self.parties:
            reports, self._reports = self._reports, {}
            self._round_done = trio.Event()
            self.decision = self._decide(reports)
            if self.decision.action != "continue":
                self.final.set()
            done.set()
        await done.wait()
        assert self.decision is not None
        return self.decision


class Migration:
    """One VM's migration: build it from a resolved plan, then ``await run()``."""

    def __init__(
        self,
        resolved: ResolvedPlan,
        *,
        migration_id: str | None = None,
        journal: CommitJournal | None = None,
        sequential_switchover: bool = False,
        read_chunk_bytes: int = MIB,
        observers: list[Callable[[TraceEvent], None]] | None = None,
    ) -> None:
        self.resolved = resolved
        self.plan = resolved.plan
        self.id = migration_id or uuid.uuid4().hex
        self.journal = journal
        # QEMU before 10.0 stopped and drained devices one after another; kept
        # as a baseline for the benchmark, not for production use.
        self.sequential_switchover = sequential_switchover
        self.read_chunk_bytes = read_chunk_bytes
        self.observers = list(observers or [])
        self.log = structlog.get_logger("orchestrator").bind(vm=self.plan.vm, migration=self.id)
        # Transition events are the hot path of a 256-device switchover: build
        # their fields only when they will be written.
        self._log_arcs = self.log.is_enabled_for(logging.INFO)

        self.trace: list[TraceEvent] = []
        self.error: ErrorInfo | None = None
        self.report: MigrationReport | None = None
        self.flow: MigrationFlow | None = None
        self.sources: dict[str, Device] = {}
        self.destinations: dict[str, Device] = {}
        self.stats: dict[str, DeviceStats] = {d.name: DeviceStats() for d in resolved.devices}
        self.precopy = PrecopyReport()
        self.phase = Phase.PREPARE

        self._t0: float | None = None
        # When each phase was first entered, and the phase whose clock runs.
        self._phase_started: dict[Phase, float] = {}
        self._timed_phase: Phase | None = None
        self._timed_since = 0.0
        self._phase_ms: dict[str, float] = {}
        self._downtime_start: float | None = None
        self._downtime_end: float | None = None
        self._window_closed = trio.Event()
        self._window_closed.set()
        self._scope: trio.CancelScope | None = None
        self._cancel_reason: str | None = None
        self._post_commit_errors: list[ErrorInfo] = []
        self._release_errors: list[ErrorInfo] = []
        self._recovery_note: str | None = None
        self._rollback_errors: list[ErrorInfo] = []
        self._barrier_waits: dict[str, list[float]] = {}
        self._barrier_members: dict[str, int] = {}
        self._precopy_bytes = 0
        self._precopy_busy_s = 0.0
        # Time each endpoint spent inside device calls.
        self._busy: dict[tuple[Side, str], float] = {}
        # The destination daemon, for a migration to another host.
        self.remote: RemoteDestination | None = (
            RemoteDestination(self.plan.destination, self.plan, self.id)
            if self.plan.destination is not None
            else None
        )
        self._limiter: RateLimiter | None = (
            RateLimiter(self.plan.bandwidth_limit_mib_s * MIB)
            if self.plan.bandwidth_limit_mib_s is not None
            else None
        )
        # The VMMs of the plan's [vmm] section (none: the devices alone).
        vmm = self.plan.vmm
        self.vmms: dict[Side, Vmm] = (
            {Side.SOURCE: open_vmm(vmm.source), Side.DESTINATION: open_vmm(vmm.destination)}
            if vmm is not None
            else {}
        )
        # Set before the source pause is sent: from then on a rollback resumes.
        self._vcpus_paused = False
        self._destination_resumed = False
        self._vmm_ms: dict[str, float] = {}
        self._vcpu_status: dict[Side, str] = {}

    # -- public --------------------------------------------------------------

    @property
    def committed(self) -> bool:
        return self.flow is not None and self.flow.committed

    def cancel(self, reason: str = "cancelled by the operator") -> bool:
        """Roll the migration back if the commit point is not reached; False if too late."""
        if self.phase in NO_CANCEL_PHASES or self.committed or self.report is not None:
            return False
        reached = self.flow is not None and self.flow.commit_point_reached()
        if self.phase is Phase.DESTINATION_GRACE and reached:
            # The decision is about to be recorded: the destination wins.
            return False
        if self._cancel_reason is None:
            self._cancel_reason = reason
        if self._scope is not None:
            self._scope.cancel()
        return True

    def progress(self) -> dict[str, Any]:
        """A snapshot for progress displays and the API; cheap, never blocks."""
        remaining = [s.remaining for s in self.stats.values()]
        known = [r for r in remaining if r is not None]
        in_precopy = self.phase is Phase.PRECOPY
        return {
            "phase": self.phase.value,
            # The round under way during pre-copy; the rounds done after it.
            "precopy_round": self.precopy.rounds + (1 if in_precopy else 0),
            "bytes_sent": {
                name: s.bytes_precopy + s.bytes_stopcopy for name, s in self.stats.items()
            },
            # Only once every device has said what it still has to send.
            "remaining_bytes": (
                sum(r.stop_copy_bytes for r in known) if len(known) == len(remaining) else None
            ),
            "expected_downtime_ms": self.precopy.expected_downtime_ms,
        }

    async def run(self) -> MigrationReport:
        """Migrate; returns the report (also in ``self.report``).  Never raises for a
        failed migration: the report says what happened.  Re-raises cancellation
        from outside (after rolling back) and bugs."""
        self._t0 = trio.current_time()
        self._enter_phase_timing(Phase.PREPARE)
        self.log.info("migration.start", devices=len(self.resolved.devices))
        if self.remote is not None:
            return await self._run_with_destination_daemon(self.remote)
        return await self._run()

    async def _run_with_destination_daemon(self, remote: RemoteDestination) -> MigrationReport:
        """Prepare the destination daemon, then run over the data channel to it."""
        try:
            with trio.fail_after(self.plan.timeouts.prepare_s):
                await remote.prepare()
        except (PlanError, PeerError, trio.TooSlowError) as exc:
            message = (
                f"the destination daemon did not prepare within {self.plan.timeouts.prepare_s:g} s"
                if isinstance(exc, trio.TooSlowError)
                else f"the destination daemon refused to prepare: {exc}"
            )
            self._set_error("plan_error" if isinstance(exc, PlanError) else "peer_error", message)
            self._finish_phase_timing()
            report = self.report = await self._build_report()
            return report
        try:
            async with remote.session(self._limiter, self.plan.parallel_connections):
                report = await self._run()
                with trio.CancelScope(shield=True):
                    await remote.finish(
                        report.outcome,
                        report.error.model_dump(mode="json") if report.error else None,
                    )
        except PeerError as exc:
            if self.report is not None:
                return self.report
            self._set_error("peer_error", f"cannot open the data channel: {exc}")
            with trio.CancelScope(shield=True), contextlib.suppress(PeerError):
                # Nothing moved: the destination may let go of its devices now.
                await remote.decide("abort")
            self._finish_phase_timing()
            report = self.report = await self._build_report()
        return report

    async def _run(self) -> MigrationReport:
        try:
            with trio.CancelScope() as self._scope:
                if self._cancel_reason is not None:
                    # cancel() came before run() had a scope to cancel.
                    self._scope.cancel()
                await self._forward()
        except BaseException as exc:
            await self._after_forward_failure(exc)
        else:
            if self._scope.cancelled_caught:
                self._set_error("cancelled", self._cancel_reason or "cancelled")
                await self._settle()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_all()
                self._finish_phase_timing()
                report = self.report = await self._build_report()
                self.log.info(
                    "migration.end",
                    outcome=report.outcome,
                    downtime_ms=report.downtime_ms,
                    duration_ms=report.duration_ms,
                )
        return report

    async def recover(
        self, *, committed: bool, interrupted_phase: str | None = None
    ) -> MigrationReport:
        """Finish a migration that a previous run left unfinished (the daemon died).

        Opens every device again and asks each where it stands.  If the
        commit decision was never recorded, rolls back exactly as after a
        failure.  If it was, completes the destination: every destination
        device to RUNNING (the barrier still holds), every source device to
        STOP, never running again.  Returns the report, as ``run`` does.
        """
        self._t0 = trio.current_time()
        self._enter_phase_timing(Phase.PREPARE)
        if self.remote is not None:
            # Without a channel every destination call goes over REST, and a
            # recorded commit is delivered there first.
            self.remote.commit_sent = committed
        where = f" in phase {interrupted_phase}" if interrupted_phase else ""
        self.log.warning("migration.recover", committed=committed, interrupted=interrupted_phase)
        try:
            with trio.CancelScope(shield=True), trio.fail_after(self.plan.timeouts.rollback_s):
                flow = self.flow = await self._open_all()
                await self._for_each_device(self._adopt_source_and_destination)
                # Unknown after a crash; resuming running vCPUs changes nothing.
                self._vcpus_paused = bool(self.vmms)
                if committed:
                    self._recovery_note = (
                        f"completed on restart: the orchestrator stopped{where} after the "
                        "commit decision was recorded"
                    )
                    flow.adopt_commit()
                    self.phase = Phase.COMMIT
                    self._enter_phase_timing(Phase.COMMIT)
                    await self._complete_after_commit()
                else:
                    self._set_error(
                        "interrupted",
                        f"the orchestrator stopped{where} before the commit point; "
                        "rolled back on restart",
                    )
                    await self._rollback()
        except Exception as exc:
            # Device failures come out of the nurseries wrapped in groups;
            # anything else is a bug and goes on up once the report is built.
            failures, unexpected = _split(exc, (MigrationAborted, trio.TooSlowError))
            self._set_error("recovery_failed", f"recovery did not finish: {failures or exc}")
            if unexpected is not None:
                raise
        finally:
            with trio.CancelScope(shield=True):
                await self._close_all()
                self._finish_phase_timing()
                report = self.report = await self._build_report()
                self.log.warning("migration.recovered", outcome=report.outcome)
        return report

    async def _adopt_source_and_destination(self, name: str) -> None:
        assert self.flow is not None
        for side in Side:
            device = self._device(side, name)
            state = await self._call(side, name, "get_state", device.get_state)
            self.flow.adopt_state(side, name, state)

    async def _complete_destination(self, name: str) -> None:
        assert self.flow is not None
        final = self.flow.endpoint(Side.DESTINATION, name).route.final
        assert final is not None
        await self._drive_after_commit(Side.DESTINATION, name, final, self._post_commit_errors)

    async def _release_source(self, name: str) -> None:
        assert self.flow is not None
        settle = self.flow.endpoint(Side.SOURCE, name).route.settle
        await self._drive_after_commit(Side.SOURCE, name, settle, self._release_errors)

    async def _drive_after_commit(
        self, side: Side, name: str, target: DeviceState, errors: list[ErrorInfo]
    ) -> None:
        """Walk one endpoint to ``target`` after the commit; failures go to ``errors``.

        A device in ERROR is reported, never reset: after the commit a reset
        destination loses the VM's state, and a reset source reads RUNNING
        beside a running destination.
        """
        assert self.flow is not None
        if self.flow.endpoint(side, name).state is DeviceState.ERROR:
            errors.append(self._stuck(side, name, target))
            return
        try:
            await self._walk(side, name, target)
        except DeviceFailure as failure:
            errors.append(failure.info)

    def _stuck(self, side: Side, name: str, target: DeviceState) -> ErrorInfo:
        return ErrorInfo(
            kind="device_error",
            message=f"{side.value} device {name!r} is in ERROR and cannot go to {target.name}",
            phase=self.phase.value,
            side=side.value,
            device=name,
        )

    async def _complete_after_commit(self) -> None:
        """Finish the forward path after the commit point, whatever interrupted it.

        Every destination device goes to RUNNING (the barrier still holds)
        and every source device to STOP; the VM must end up running somewhere.
        """
        assert self.flow is not None
        flow = self.flow
        with trio.move_on_after(self.plan.timeouts.rollback_s) as scope:
            for (side, name), e in list(flow.endpoints.items()):
                if e.pending is not None:
                    flow.arc_failed(side, name, await self._probe_state(side, name))
            if flow.phase is Phase.COMMIT:
                self._enter(Phase.RESUME)
            # A destination already RUNNING is left as it is.
            await self._for_each_device(self._complete_destination)
            await self._resume_destination_vcpus()
            if flow.phase is Phase.RESUME:
                self._enter(Phase.RELEASE)
            await self._for_each_device(self._release_source)
            self._enter(Phase.DONE)
        if scope.cancelled_caught:
            self._post_commit_errors.append(
                ErrorInfo(
                    kind="phase_timeout",
                    message="completing the destination after the commit point took over "
                    f"{self.plan.timeouts.rollback_s:g} s",
                    phase=self.phase.value,
                )
            )

    # -- the forward path ----------------------------------------------------

    async def _forward(self) -> None:
        timeout = self.plan.timeouts.prepare_s
        try:
            with trio.fail_after(timeout):
                await self._require_vmms_ready()
                flow = self.flow = await self._open_all()
                await self._for_each_device(self._require_running)
                await self._for_each_device(self._prepare_destination)
        except trio.TooSlowError:
            raise self._abort("phase_timeout", f"prepare took over {timeout:g} s") from None
        self._enter(Phase.PRECOPY)
        names = [d.name for d in self.resolved.devices]
        self._rounds = RoundGate(len(names), self._decide_round)
        self._round_started = trio.current_time()
        self._grace_signal = trio.Event()
        self._source_barrier = Barrier("source_p2p", len(names), self._source_barrier_released)
        self._destination_barrier = Barrier("destination_p2p", len(names), lambda: None)
        self._drained = 0
        self._all_drained = trio.Event()
        self._committed = trio.Event()
        self._resumed_count = 0
        self._resumed = trio.Event()
        self._sequential = trio.Lock()
        self._loaded = {name: trio.Event() for name in names}
        self._barrier_members = {
            "source_p2p": len(flow.barrier_members(Side.SOURCE)),
            "destination_p2p": len(flow.barrier_members(Side.DESTINATION)),
        }
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._coordinate)
            for name in names:
                sender, receiver = self._stream(name)
                nursery.start_soon(self._source_task, name, sender)
                nursery.start_soon(self._destination_task, name, receiver)
        self._enter(Phase.DONE)

    def _stream(self, name: str) -> tuple[StreamSender, StreamReceiver]:
        """The stream of one device: in memory, or over the data channel to the
        destination daemon (which writes its device itself: this side only
        learns when the stream is loaded)."""
        if self.remote is None:
            return local_stream(self._limiter)
        assert self.remote.channel is not None
        return _KeepChannel(self.remote.channel.sender(name)), _RemoteLoaded(self, name)

    async def _open_all(self) -> MigrationFlow:
        for d in self.resolved.devices:
            self.sources[d.name] = d.backend.create(d.name, Side.SOURCE, d.source)
            self.destinations[d.name] = (
                self.remote.device(d.name)
                if self.remote is not None
                else d.backend.create(d.name, Side.DESTINATION, d.destination)
            )
        caps: dict[tuple[Side, str], Capabilities] = {}

        async def open_one(side: Side, name: str) -> None:
            device = self._device(side, name)
            caps[(side, name)] = await self._call(side, name, "open", device.open)

        async with trio.open_nursery() as nursery:
            for name in self.sources:
                for side in Side:
                    nursery.start_soon(open_one, side, name)
        try:
            return MigrationFlow.create(
                self.plan,
                {n: (caps[(Side.SOURCE, n)], caps[(Side.DESTINATION, n)]) for n in self.sources},
            )
        except PlanError as exc:
            raise self._abort("plan_error", f"the devices cannot migrate together: {exc}") from None

    async def _require_running(self, name: str) -> None:
        """Refuse, before any change, a device that is not where a migration starts.

        A device left in another state (stopped by an earlier migration, or
        half-way through one that was never recovered) must not be driven
        from an assumed RUNNING: a rollback would then start the wrong side.
        """
        for side in Side:
            device = self._device(side, name)
            state = await self._call(side, name, "get_state", device.get_state)
            if state is not DeviceState.RUNNING:
                raise self._abort(
                    "device_state",
                    f"{side.value} device {name!r} is in {state.name}, not RUNNING: it may "
                    "still belong to an earlier migration; nothing was changed",
                )

    async def _prepare_destination(self, name: str) -> None:
        assert self.flow is not None
        await self._walk(
            Side.DESTINATION, name, self.flow.endpoint(Side.DESTINATION, name).route.transfer
        )

    async def _require_vmms_ready(self) -> None:
        """Refuse, before any change, VMMs that are not where a migration starts:
        the source's vCPUs running, the destination's not (never both sides)."""
        for side, vmm in self.vmms.items():
            status = await self._vmm_call(side, "status")
            if status.running is not (side is Side.SOURCE):
                want = "running" if side is Side.SOURCE else "stopped, waiting for the VM"
                message = (
                    f"the {side.value} VMM ({vmm.description}) reports its vCPUs "
                    f"{status.status!r}; they must be {want} when a migration starts; "
                    "nothing was changed"
                )
                if self.error is None:
                    self.error = ErrorInfo(
                        kind="vmm_state",
                        message=message,
                        phase=self.phase.value,
                        side=side.value,
                        operation="status",
                    )
                raise MigrationAborted(message)

    async def _resume_destination_vcpus(self) -> None:
        """After the commit, once every destination device runs.  A failure is
        reported, never answered by resuming the source: the VM is the destination's."""
        if not self.vmms or self._destination_resumed:
            return
        assert self.flow is not None
        stuck = [
            n
            for n in self.destinations
            if self.flow.endpoint(Side.DESTINATION, n).state is not DeviceState.RUNNING
        ]
        if stuck:
            self._destination_resumed = True
            self._post_commit_errors.append(
                ErrorInfo(
                    kind="vmm_error",
                    message="destination vCPUs left paused: device(s) "
                    f"{', '.join(stuck)} not RUNNING",
                    phase=self.phase.value,
                    side=Side.DESTINATION.value,
                    operation="resume",
                )
            )
            return
        try:
            await self._vmm_call(Side.DESTINATION, "resume", record="resume")
        except VmmFailure as failure:
            self._post_commit_errors.append(failure.info)
        self._destination_resumed = True

    async def _vmm_call(self, side: Side, action: str, record: str | None = None) -> VcpuStatus:
        """One VMM call under its deadline, traced; a VmmError becomes a VmmFailure here."""
        vmm = self.vmms[side]
        deadline = self.plan.timeouts.vmm_call_s
        start = self._emit("vmm_begin", side, detail={"action": action}).time
        if record == "pause":
            self._downtime_start = start  # with a VMM, the downtime starts with the vCPUs
        try:
            with trio.fail_after(deadline):
                status: VcpuStatus = await getattr(vmm, action)()
        except trio.TooSlowError:
            exc: VmmError = VmmTimeout(f"no answer within {deadline:g} s from {vmm.description}")
        except VmmError as caught:
            exc = caught
        else:
            end = self._emit("vmm_end", side, detail={"action": action, "status": status.status})
            took = end.time - start
            if record is not None:
                self._vmm_ms[record] = round(took * 1000, 3)
            if record == "resume":
                self._downtime_end = end.time  # ... and ends with them
            self._vcpu_status[side] = status.status
            self.log.info(
                "vmm.call", side=side.value, action=action, status=status.status,
                duration_ms=round(took * 1000, 3),
            )  # fmt: skip
            return status
        self._emit("vmm_failed", side, detail={"action": action, "error": str(exc)})
        info = ErrorInfo(
            kind="vmm_timeout" if isinstance(exc, VmmTimeout) else "vmm_error",
            message=f"{side.value} VMM {action}: {exc}",
            phase=self.phase.value,
            side=side.value,
            operation=action,
        )
        if self.error is None:
            self.error = info
        self.log.warning("vmm.failure", **info.model_dump(exclude_none=True))
        raise VmmFailure(info)

    async def _coordinate(self) -> None:
        await self._rounds.final.wait()
        decision = self._rounds.decision
        assert decision is not None
        if decision.action == "abort":
            raise self._abort("precopy_not_converged", decision.reason)
        await self._switchover_acknowledged()
        self._enter(Phase.SOURCE_GRACE)
        if self.vmms:
            # The VMM hook: the vCPUs stop before any device leaves PRE_COPY.
            self._vcpus_paused = True
            await self._vmm_call(Side.SOURCE, "pause", record="pause")
        self._grace_signal.set()
        await self._source_barrier.released.wait()
        timeout = self.plan.timeouts.switchover_s
        try:
            with trio.fail_after(timeout):
                await self._all_drained.wait()
                self._enter(Phase.DESTINATION_GRACE)
                await self._destination_barrier.released.wait()
        except trio.TooSlowError:
            raise self._abort(
                "phase_timeout",
                f"the switchover did not reach the commit point within {timeout:g} s",
            ) from None
        self._enter(Phase.COMMIT)
        if self.journal is not None:
            try:
                with trio.CancelScope(shield=True):
                    await self.journal.record_commit(self.id)
            except Exception as exc:
                # Not on disk, not decided: the migration must roll back.
                raise self._abort(
                    "journal_error", f"the commit decision could not be recorded: {exc}"
                ) from exc
        assert self.flow is not None
        self.flow.record_commit()
        self._emit("commit")
        self.log.info("migration.commit")
        if self.remote is not None:
            # Shielded: once recorded here, the destination must hear of it.
            with trio.CancelScope(shield=True):
                await self.remote.commit()
        self._committed.set()
        self._enter(Phase.RESUME)
        await self._resumed.wait()
        self._enter(Phase.RELEASE)

    def _decide_round(self, reports: dict[str, Remaining]) -> PrecopyDecision:
        now = trio.current_time()
        self._precopy_busy_s += now - self._round_started
        self._round_started = now
        self.precopy.rounds += 1
        # What crossed, not what was handed over: on a deep link queue the kernel
        # holds megabytes that a flushed round has "sent" and not delivered.
        delivered = self._precopy_bytes
        if self.remote is not None:
            delivered = max(0, delivered - self.remote.in_flight_bytes())
        measured = delivered / self._precopy_busy_s if self._precopy_busy_s > 0 else 0.0
        if self.plan.bandwidth_limit_mib_s is not None:
            limit = self.plan.bandwidth_limit_mib_s * MIB
            measured = min(measured, limit) if measured > 0 else limit
        decision = decide_precopy(
            self.plan,
            round_number=self.precopy.rounds,
            remaining=reports,
            bandwidth_bytes_s=measured,
            elapsed_s=now - self._phase_started[Phase.PRECOPY],
        )
        self.precopy.bandwidth_mib_s = round(measured / MIB, 3) if measured > 0 else None
        self.precopy.expected_downtime_ms = (
            round(decision.expected_downtime_ms, 3)
            if math.isfinite(decision.expected_downtime_ms)
            else None
        )
        self.precopy.reason = decision.reason
        self.precopy.converged = decision.converged
        if decision.action != "continue":
            self.precopy.decision = decision.action
            self.log.info(
                "migration.precopy_decision", action=decision.action, reason=decision.reason
            )
        self._emit("decision", detail={"action": decision.action, "round": self.precopy.rounds})
        return decision

    async def _announce_initial(self, name: str) -> bool:
        """Tell the destination daemon this device's initial data is all sent;
        it acknowledges once that much is loaded (switchover-ack)."""
        if self.remote is not None:
            try:
                await self.remote.initial_sent(name, self.stats[name].bytes_precopy)
            except PeerError as exc:
                raise self._fail(Side.DESTINATION, name, "switchover_ack", exc) from None
        return True

    async def _switchover_acknowledged(self) -> None:
        """No device stops before the destination acknowledged every device's
        initial data (QEMU's switchover-ack)."""
        if self.remote is None:
            return
        timeout = self.plan.timeouts.switchover_s
        try:
            with trio.fail_after(timeout):
                await self.remote.all_acknowledged()
        except trio.TooSlowError:
            raise self._abort(
                "phase_timeout",
                f"the destination did not acknowledge the initial data within {timeout:g} s",
            ) from None
        except PeerError as exc:
            raise self._abort(
                "peer_error", f"waiting for the switchover acknowledgement: {exc}"
            ) from None
        self._emit("switchover_ack")

    def _source_barrier_released(self) -> None:
        self._enter(Phase.STOP_COPY)
        self._emit("barrier", detail={"barrier": "source_p2p"})

    # -- per-device tasks ----------------------------------------------------

    async def _source_task(self, name: str, sender: StreamSender) -> None:
        assert self.flow is not None
        route = self.flow.endpoint(Side.SOURCE, name).route
        device = self.sources[name]
        stats = self.stats[name]
        initial_announced = False
        async with _closing(sender):
            if route.precopy is not None:
                await self._walk(Side.SOURCE, name, route.precopy)
            while True:
                if route.precopy is not None:
                    # A round sends what was pending when it began, no more: a
                    # device that dirties faster than it drains must still end
                    # its round so that the convergence decision is taken.
                    info = await self._call(Side.SOURCE, name, "precopy_info", device.precopy_info)
                    pending = info.initial_bytes + info.dirty_bytes
                    await self._drain(name, sender, precopy=True, limit=max(pending, 1))
                    try:
                        await sender.flush()
                    except PeerError as exc:
                        raise self._fail(Side.SOURCE, name, "send", exc) from None
                    info = await self._call(Side.SOURCE, name, "precopy_info", device.precopy_info)
                    size = await self._call(
                        Side.SOURCE, name, "stop_copy_size", device.stop_copy_size
                    )
                    stats.remaining = Remaining(info.initial_bytes, info.dirty_bytes, size)
                elif stats.remaining is None:
                    size = await self._call(
                        Side.SOURCE, name, "stop_copy_size", device.stop_copy_size
                    )
                    stats.remaining = Remaining(0, 0, size, pre_copy=False)
                if not initial_announced and stats.remaining.initial_bytes == 0:
                    initial_announced = await self._announce_initial(name)
                decision = await self._rounds.arrive(name, stats.remaining)
                if decision.action != "continue":
                    break
            if not initial_announced:
                await self._announce_initial(name)
            await self._grace_signal.wait()
            if route.grace is not None:
                await self._walk(Side.SOURCE, name, route.grace)
            stats.barrier_wait_s["source_p2p"] = await self._source_barrier.arrive()
            self._barrier_waits.setdefault("source_p2p", []).append(
                stats.barrier_wait_s["source_p2p"]
            )
            if self.sequential_switchover:
                async with self._sequential:
                    await self._stop_and_drain(name, sender)
                    await self._loaded[name].wait()
            else:
                await self._stop_and_drain(name, sender)
        self._drained += 1
        if self._drained == len(self.sources):
            self._all_drained.set()
        await self._resumed.wait()
        # Release: outside the downtime window, after the commit point.  A
        # source that cannot be released needs an operator, but the VM runs
        # on the destination: the migration has succeeded.
        await self._release_source(name)

    async def _stop_and_drain(self, name: str, sender: StreamSender) -> None:
        busy_before = self._busy.get((Side.SOURCE, name), 0.0)
        await self._walk(Side.SOURCE, name, DeviceState.STOP_COPY)
        await self._drain(name, sender, precopy=False)
        try:
            await sender.end()
        except PeerError as exc:
            raise self._fail(Side.SOURCE, name, "send", exc) from None
        self.stats[name].stop_path_s += self._busy.get((Side.SOURCE, name), 0.0) - busy_before

    async def _drain(
        self, name: str, sender: StreamSender, *, precopy: bool, limit: int | None = None
    ) -> None:
        """Read and send until the device has nothing more now (or ``limit`` bytes)."""
        device = self.sources[name]
        stats = self.stats[name]
        sent = 0
        while limit is None or sent < limit:
            chunk = await self._call(Side.SOURCE, name, "read", device.read, self.read_chunk_bytes)
            if not chunk:
                return
            sent += len(chunk)
            if precopy:
                stats.bytes_precopy += len(chunk)
                self._precopy_bytes += len(chunk)
            else:
                stats.bytes_stopcopy += len(chunk)
            try:
                await sender.send(chunk)
            except PeerError as exc:
                raise self._fail(Side.SOURCE, name, "send", exc) from None

    async def _destination_task(self, name: str, receiver: StreamReceiver) -> None:
        assert self.flow is not None
        route = self.flow.endpoint(Side.DESTINATION, name).route
        device = self.destinations[name]
        stats = self.stats[name]
        last_write_s = 0.0
        try:
            while True:
                try:
                    chunk = await receiver.receive_lent()
                except PeerError as exc:
                    raise self._fail(Side.DESTINATION, name, "receive", exc) from None
                if chunk is None:
                    break
                start = trio.current_time()
                await self._call(Side.DESTINATION, name, "write", device.write, chunk)
                last_write_s = trio.current_time() - start
        finally:
            with trio.CancelScope(shield=True):
                await receiver.aclose()
        busy_before = self._busy.get((Side.DESTINATION, name), 0.0)
        await self._walk(Side.DESTINATION, name, route.settle)
        if route.grace is not None:
            await self._walk(Side.DESTINATION, name, route.grace)
        self._loaded[name].set()
        stats.barrier_wait_s["destination_p2p"] = await self._destination_barrier.arrive()
        self._barrier_waits.setdefault("destination_p2p", []).append(
            stats.barrier_wait_s["destination_p2p"]
        )
        await self._committed.wait()
        await self._complete_destination(name)
        stats.stop_path_s += (
            last_write_s + self._busy.get((Side.DESTINATION, name), 0.0) - busy_before
        )
        self._resumed_count += 1
        if self._resumed_count == len(self.destinations):
            await self._resume_destination_vcpus()
            self._resumed.set()

    # -- arcs and calls ------------------------------------------------------

    async def _walk(self, side: Side, name: str, target: DeviceState) -> None:
        assert self.flow is not None
        for step in self.flow.plan_arcs(side, name, target):
            await self._arc(side, name, step)

    async def _arc(self, side: Side, name: str, target: DeviceState) -> None:
        assert self.flow is not None
        before = self.flow.endpoint(side, name).state
        self.flow.begin_arc(side, name, target)
        start = trio.current_time()
        if (
            side is Side.SOURCE
            and target not in RUNNING_STATES
            and self._downtime_start is None
            and self.phase is Phase.STOP_COPY
        ):
            self._downtime_start = start
        self._emit("arc_begin", side, name, before, target)
        try:
            await self._call(
                side, name, "set_state", self._device(side, name).set_state, target, target=target
            )
        except DeviceFailure:
            now = await self._probe_state(side, name)
            self.flow.arc_failed(side, name, now)
            self._emit("arc_failed", side, name, before, now, detail={"target": target.name})
            raise
        self.flow.end_arc(side, name)
        end = trio.current_time()
        if (
            side is Side.DESTINATION
            and target is DeviceState.RUNNING
            and self.flow.committed
            and not self.vmms  # with a VMM the downtime ends when the vCPUs resume
        ):
            self._downtime_end = end
        self._emit("arc_end", side, name, before, target, {"duration_s": end - start})
        if self._log_arcs:
            self.log.info(
                "device.transition",
                device=name,
                side=side.value,
                **{"from": before.name, "to": target.name},
                duration_ms=round((end - start) * 1000, 3),
            )

    async def _probe_state(self, side: Side, name: str) -> DeviceState:
        """Where a device stands after a failed arc; ERROR if it cannot tell."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.plan.timeouts.device_call_s):
            try:
                return await self._device(side, name).get_state()
            except DeviceError:
                pass
        return DeviceState.ERROR

    async def _call(
        self,
        side: Side,
        name: str,
        operation: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        target: DeviceState | None = None,
    ) -> T:
        """One device call under its deadline; DeviceError becomes DeviceFailure here."""
        deadline = self.plan.timeouts.device_call_s
        start = trio.current_time()
        try:
            with trio.fail_after(deadline):
                return await fn(*args)
        except trio.TooSlowError:
            err: DeviceError = DeviceTimeout(
                f"no answer within {deadline:g} s",
                device=name,
                operation=operation,
                target=target.name if target else None,
            )
            raise self._fail(side, name, operation, err) from None
        except DeviceError as exc:
            raise self._fail(side, name, operation, exc) from exc
        finally:
            key = (side, name)
            self._busy[key] = self._busy.get(key, 0.0) + trio.current_time() - start

    def _device(self, side: Side, name: str) -> Device:
        return self.sources[name] if side is Side.SOURCE else self.destinations[name]

    async def _for_each_device(self, fn: Callable[[str], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            for name in self.sources:
                nursery.start_soon(fn, name)

    # -- failures and recovery -----------------------------------------------

    def _fail(self, side: Side, name: str, operation: str, exc: Exception) -> DeviceFailure:
        kind = (
            "device_timeout"
            if isinstance(exc, DeviceTimeout)
            else ("peer_error" if isinstance(exc, PeerError) else "device_error")
        )
        info = ErrorInfo(
            kind=kind,
            message=str(exc),
            phase=self.phase.value,
            side=side.value,
            device=name,
            operation=operation,
        )
        if self.error is None:
            self.error = info
        self.log.warning("device.failure", **info.model_dump(exclude_none=True))
        return DeviceFailure(info)

    def _abort(self, kind: str, message: str) -> MigrationAborted:
        self._set_error(kind, message)
        return MigrationAborted(message)

    def _set_error(self, kind: str, message: str) -> None:
        if self.error is None:
            self.error = ErrorInfo(kind=kind, message=message, phase=self.phase.value)

    async def _after_forward_failure(self, exc: BaseException) -> None:
        cancelled, rest = _split(exc, trio.Cancelled)
        _, unexpected = _split(rest, MigrationAborted)
        if unexpected is not None:
            self._set_error("internal_error", f"{type(unexpected).__name__}: {unexpected}")
        if cancelled is not None:
            self._set_error("cancelled", self._cancel_reason or "the migration was cancelled")
        await self._settle()
        if unexpected is not None or cancelled is not None:
            raise exc

    async def _settle(self) -> None:
        """After the forward path stopped early: roll back if the commit was not
        recorded, complete the destination if it was.  Shielded: a migration
        interrupted by a cancel still ends with the VM running on one side."""
        if self.flow is None:
            return
        with trio.CancelScope(shield=True):
            if self.committed:
                if self.phase is not Phase.DONE:
                    await self._complete_after_commit()
            else:
                await self._rollback()

    async def _rollback(self) -> None:
        assert self.flow is not None
        flow = self.flow
        self._enter(Phase.ROLLBACK)
        self.log.warning("migration.rollback", cause=self.error.message if self.error else None)
        deadline = self.plan.timeouts.rollback_s
        with trio.move_on_after(deadline) as scope:
            # An arc that was in flight when the forward path was cancelled may
            # or may not have happened: ask the device.
            for (side, name), e in list(flow.endpoints.items()):
                if e.pending is not None:
                    flow.arc_failed(side, name, await self._probe_state(side, name))
            plan = flow.rollback_plan()
            async with trio.open_nursery() as nursery:
                for step in plan.steps:
                    nursery.start_soon(
                        self._rollback_quiesce, step.side, step.name, step.reset, step.quiesce
                    )
            async with trio.open_nursery() as nursery:
                for step in plan.for_side(Side.SOURCE):
                    if step.final is not None and not flow.endpoint(Side.SOURCE, step.name).reset:
                        nursery.start_soon(self._rollback_final, step.name, step.final)
            if self._vcpus_paused:
                # The devices first, as the destination does: the guest finds
                # them running when its vCPUs do.
                try:
                    await self._vmm_call(Side.SOURCE, "resume", record="source_resume")
                except VmmFailure as failure:
                    self._rollback_errors.append(failure.info)
        if scope.cancelled_caught:
            self._rollback_errors.append(
                ErrorInfo(
                    kind="phase_timeout",
                    message=f"rollback took over {deadline:g} s",
                    phase="rollback",
                )
            )
        self._enter(Phase.DONE)

    async def _rollback_quiesce(
        self, side: Side, name: str, reset: bool, quiesce: DeviceState | None
    ) -> None:
        try:
            if not reset and quiesce is not None:
                await self._walk(side, name, quiesce)
                return
        except DeviceFailure as failure:
            assert self.flow is not None
            if self.flow.endpoint(side, name).state is not DeviceState.ERROR:
                self._rollback_errors.append(failure.info)
                return
        if reset or self._needs_reset(side, name):
            await self._reset(side, name)

    async def _rollback_final(self, name: str, final: DeviceState) -> None:
        try:
            await self._walk(Side.SOURCE, name, final)
        except DeviceFailure as failure:
            if self._needs_reset(Side.SOURCE, name):
                await self._reset(Side.SOURCE, name)
            else:
                self._rollback_errors.append(failure.info)
        except ProtocolViolation as exc:
            # A peer could not leave a stopped state: running this device
            # fully would expose it to that peer.  It waits for an operator.
            self._rollback_errors.append(
                ErrorInfo(
                    kind="device_error",
                    message=f"left in its grace state: {exc}",
                    phase=self.phase.value,
                    side=Side.SOURCE.value,
                    device=name,
                )
            )

    def _needs_reset(self, side: Side, name: str) -> bool:
        assert self.flow is not None
        return self.flow.endpoint(side, name).state is DeviceState.ERROR

    async def _reset(self, side: Side, name: str) -> None:
        assert self.flow is not None
        before = self.flow.endpoint(side, name).state
        try:
            await self._call(side, name, "reset", self._device(side, name).reset)
        except DeviceFailure as failure:
            self._rollback_errors.append(failure.info)
            return
        self.flow.record_reset(side, name)
        self._emit("reset", side, name, before, DeviceState.RUNNING)
        self.log.info("device.reset", device=name, side=side.value, **{"from": before.name})

    async def _close_all(self) -> None:
        async def close(device: Device) -> None:
            with trio.move_on_after(self.plan.timeouts.device_call_s):
                with contextlib.suppress(DeviceError):
                    await device.close()

        async with trio.open_nursery() as nursery:
            for device in [*self.sources.values(), *self.destinations.values()]:
                nursery.start_soon(close, device)
            for vmm in self.vmms.values():
                nursery.start_soon(vmm.aclose)

    # -- bookkeeping ---------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        if self.flow is not None:
            self.flow.enter_phase(phase)
        previous = self.phase
        self.phase = phase
        duration = self._enter_phase_timing(phase)
        self._emit("phase", detail={"phase": phase.value, "previous": previous.value})
        self.log.info(
            "migration.phase",
            phase=phase.value,
            previous=previous.value,
            previous_ms=round(duration * 1000, 3),
        )

    def _enter_phase_timing(self, phase: Phase) -> float:
        """Stop the clock of the phase being timed and start ``phase``'s.

        Returns the seconds the stopped phase took.  DONE stops every clock,
        so calling this with DONE again changes nothing.
        """
        if phase in DOWNTIME_WINDOW:
            if self._window_closed.is_set():
                self._window_closed = trio.Event()
        else:
            self._window_closed.set()
        now = trio.current_time()
        duration = 0.0
        if self._timed_phase is not None:
            duration = now - self._timed_since
            key = self._timed_phase.value
            self._phase_ms[key] = self._phase_ms.get(key, 0.0) + duration * 1000
        self._timed_phase = None if phase is Phase.DONE else phase
        self._timed_since = now
        self._phase_started.setdefault(phase, now)
        return duration

    def _finish_phase_timing(self) -> None:
        self._enter_phase_timing(Phase.DONE)

    @property
    def in_downtime_window(self) -> bool:
        """Whether the migration is inside its downtime window (``DOWNTIME_WINDOW``)."""
        return not self._window_closed.is_set()

    async def downtime_window_closed(self) -> None:
        """Return once the migration is outside its downtime window: at once if it is.

        The window closes when the migration leaves it by any path (the
        destination resumed, a rollback, a failure): every path out of the
        runner stops its phase clock, and that closes it.
        """
        await self._window_closed.wait()

    def _emit(
        self,
        kind: str,
        side: Side | None = None,
        device: str | None = None,
        from_state: DeviceState | None = None,
        to_state: DeviceState | None = None,
        detail: dict[str, Any] | None = None,
    ) -> TraceEvent:
        event = TraceEvent(
            seq=len(self.trace),
            time=trio.current_time(),
            kind=kind,
            side=side,
            device=device,
            from_state=from_state,
            to_state=to_state,
            detail=detail or _NO_DETAIL,
        )
        self.trace.append(event)
        for observer in self.observers:
            observer(event)
        return event

    # -- report --------------------------------------------------------------

    def _outcome(self) -> Outcome:
        if self.committed:
            failed = self._post_commit_errors or self.phase is not Phase.DONE
            return "failed" if failed else "succeeded"
        if self.flow is None:
            # Nothing was touched: a cancel leaves the VM as it was; anything
            # else (a device that would not open) needs an operator's look.
            cancelled = self.error is not None and self.error.kind == "cancelled"
            return "rolled_back" if cancelled else "failed"
        if self._rollback_errors:
            return "failed"
        if self.error is not None and self.error.kind in ("plan_error", "device_state"):
            # Refused before any change: the devices need an operator's look.
            return "failed"
        return "rolled_back"

    async def _build_report(self) -> MigrationReport:
        now = trio.current_time()
        assert self._t0 is not None
        outcome = self._outcome()
        error = self.error
        if error is None and (self._post_commit_errors or self._rollback_errors):
            error = (self._post_commit_errors or self._rollback_errors)[0]
        if outcome == "succeeded":
            error = None
        devices = []
        for spec in self.resolved.devices:
            devices.append(await self._device_report(spec.name, spec.backend.name))
        downtime = None
        if self._downtime_start is not None:
            end = self._downtime_end
            if not self.committed:
                end = self._last_source_running()
            if end is not None:
                downtime = round((end - self._downtime_start) * 1000, 3)
        barriers = {}
        for name, waits in self._barrier_waits.items():
            barriers[name] = BarrierReport(
                members=self._barrier_members.get(name, 0),
                wait_ms_max=round(max(waits) * 1000, 3),
                wait_ms_mean=round(sum(waits) / len(waits) * 1000, 3),
            )
        notes = list(self.flow.notes) if self.flow else []
        if self._recovery_note:
            notes.append(self._recovery_note)
        if downtime is not None and downtime > self.plan.downtime_limit_ms:
            notes.append(
                f"downtime {downtime:.1f} ms exceeded the plan's limit of "
                f"{self.plan.downtime_limit_ms:g} ms"
            )
        for info in self._rollback_errors + self._post_commit_errors:
            if info is not error:
                notes.append(f"also failed: {info.message}")
        for info in self._release_errors:
            notes.append(f"source device {info.device!r} could not be released: {info.message}")
        if self.remote is not None:
            notes.extend(self.remote.notes)
        for spec in self.resolved.devices:
            if self.flow is not None and self.flow.endpoint(Side.SOURCE, spec.name).reset:
                notes.append(
                    f"source device {spec.name!r} fell into ERROR and was reset: its state is lost"
                )
        return MigrationReport(
            id=self.id,
            vm=self.plan.vm,
            outcome=outcome,
            downtime_ms=downtime,
            duration_ms=round((now - self._t0) * 1000, 3),
            phases={k: round(v, 3) for k, v in self._phase_ms.items()},
            devices=devices,
            precopy=self.precopy,
            barriers=barriers,
            committed=self.committed,
            notes=notes,
            error=error,
            vmm=self._vmm_report(),
        )

    def _vmm_report(self) -> VmmReport | None:
        vmm = self.plan.vmm
        if vmm is None:
            return None
        return VmmReport(
            source=vmm.source.describe(),
            destination=vmm.destination.describe(),
            pause_ms=self._vmm_ms.get("pause"),
            resume_ms=self._vmm_ms.get("resume"),
            source_resume_ms=self._vmm_ms.get("source_resume"),
            source_status=self._vcpu_status.get(Side.SOURCE),
            destination_status=self._vcpu_status.get(Side.DESTINATION),
        )

    def _last_source_running(self) -> float | None:
        if self._vcpus_paused:
            # The VM runs again when its vCPUs do (None: they never did).
            resumed = [
                e.time
                for e in self.trace
                if e.kind == "vmm_end" and e.side is Side.SOURCE and e.detail["action"] == "resume"
            ]
            return max(resumed) if resumed else None
        times = [
            e.time
            for e in self.trace
            if e.side is Side.SOURCE
            and e.kind in ("arc_end", "reset")
            and e.to_state is DeviceState.RUNNING
        ]
        return max(times) if times else None

    async def _device_report(self, name: str, backend: str) -> DeviceReport:
        stats = self.stats[name]
        src_state = dst_state = "unknown"
        src_reset = dst_reset = False
        barrier = "held"
        if self.flow is not None:
            src = self.flow.endpoint(Side.SOURCE, name)
            dst = self.flow.endpoint(Side.DESTINATION, name)
            src_state, dst_state = src.state.name, dst.state.name
            src_reset, dst_reset = src.reset, dst.reset
            if not src.barrier:
                barrier = "skipped: no P2P states on this device"
        with trio.move_on_after(self.plan.timeouts.device_call_s):
            with contextlib.suppress(DeviceError):
                if name in self.sources:
                    stats.source_digest = await self.sources[name].state_digest()
                if name in self.destinations:
                    stats.destination_digest = await self.destinations[name].state_digest()
        timings: dict[str, float] = {}
        for side, devices in ((Side.SOURCE, self.sources), (Side.DESTINATION, self.destinations)):
            if name in devices:
                for step, ms in devices[name].timings().items():
                    timings[f"{side.value}_{step}"] = ms
        return DeviceReport(
            name=name,
            backend=backend,
            source_state=src_state,
            destination_state=dst_state,
            source_reset=src_reset,
            destination_reset=dst_reset,
            bytes_precopy=stats.bytes_precopy,
            bytes_stopcopy=stats.bytes_stopcopy,
            backend_timings_ms=timings,
            source_digest=stats.source_digest,
            destination_digest=stats.destination_digest,
            barrier=barrier,
            barrier_wait_ms={k: round(v * 1000, 3) for k, v in stats.barrier_wait_s.items()},
            stop_copy_path_ms=round(stats.stop_path_s * 1000, 3) if stats.stop_path_s else None,
        )


def _split(
    exc: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    """Split an exception (or group) into the part of ``kind`` and the rest."""
    if exc is None:
        return None, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)
    return (exc, None) if isinstance(exc, kind) else (None, exc)


class _KeepChannel(StreamSender):
    """A device's stream to the destination daemon whose early close leaves the
    channel up: a rollback still needs it to reset the destination devices."""

    def __init__(self, sender: StreamSender) -> None:
        self._sender = sender

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self._sender.bytes_sent

    async def send(self, chunk: bytes) -> None:
        await self._sender.send(chunk)

    async def flush(self) -> None:
        await self._sender.flush()

    async def end(self) -> None:
        await self._sender.end()

    async def aclose(self) -> None:
        return None


class _RemoteLoaded(StreamReceiver):
    """The source's view of a stream the destination daemon loads itself: it
    ends when the destination reports the device loaded."""

    def __init__(self, migration: Migration, name: str) -> None:
        self._migration = migration
        self.name = name
        self.bytes_received = 0

    async def receive(self) -> bytes | None:
        migration = self._migration
        remote = migration.remote
        assert remote is not None and migration.flow is not None
        route = migration.flow.endpoint(Side.DESTINATION, self.name).route
        remote.expect_autonomous(
            self.name, [s for s in (route.settle, route.grace) if s is not None]
        )
        try:
            await remote.loaded(self.name)
        except DeviceError as exc:
            raise migration._fail(Side.DESTINATION, self.name, "write", exc) from None
        return None

    async def aclose(self) -> None:
        return None


@contextlib.asynccontextmanager
async def _closing(sender: StreamSender) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await sender.aclose()


async def run_plan(resolved: ResolvedPlan, **kwargs: Any) -> MigrationReport:
    """Run a resolved plan to its end and return the report."""
    return await Migration(resolved, **kwargs).run()
