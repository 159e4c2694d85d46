"""One VM's migration, coordinated from the source: the engine's one switchover.

The coordinator executes what ``orchestrator.flow`` decides, on one host or
two alike: it drives the source devices itself and the destination half
through a :class:`~orchestrator.engine.destination.Destination` (a local
one, or the destination daemon of another host).  It owns:

* one task per source device and one per destination stream, in one nursery,
  so that every device moves in parallel and any failure cancels the rest;
* the barriers: the pre-copy rounds, the source P2P grace barrier and the
  destination barrier, after which the destination votes;
* the commit decision: recorded in the journal before anyone acts on it,
  then handed to the destination; after it the only way is forward;
* cancellation: an operator's cancel, a timeout or any failure before the
  commit point rolls back, shielded from further cancellation and under its
  own deadline;
* the source VMM (``[vmm.source]``): the vCPUs pause after pre-copy
  converged and before the P2P grace barrier, and a rollback resumes them;
  the destination's are the destination engine's;
* the outcome: ``succeeded``, ``refused`` (it ended before pre-copy began,
  every device as it was), ``rolled_back`` (after pre-copy began; the VM runs
  on the source as before) or ``failed`` (an operator is needed).

Device calls, deadlines, probes and resets are the driver's
(``engine.devices``); timings and the report are the recorder's
(``engine.recorder``).
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import trio

from orchestrator.backends.base import Device
from orchestrator.engine.destination import Destination, LocalDestination
from orchestrator.engine.devices import (
    DeviceDriver,
    DeviceFailure,
    EngineContext,
    MigrationAborted,
    VmmFailure,
)
from orchestrator.engine.recorder import Recorder
from orchestrator.engine.report import build_report
from orchestrator.engine.trace import Observer, Trace, TraceEvent
from orchestrator.engine.vcpus import Vcpus
from orchestrator.errors import PeerError, PlanError, ProtocolViolation
from orchestrator.flow import (
    MigrationFlow,
    Phase,
    PrecopyDecision,
    Remaining,
    RollbackPlan,
    decide_precopy,
)
from orchestrator.report import ErrorInfo, MigrationReport
from orchestrator.resolve import ResolvedPlan
from orchestrator.states import Capabilities, DeviceState, Side
from orchestrator.transport import RateLimiter, StreamSender

__all__ = ["NO_CANCEL_PHASES", "CommitJournal", "DestinationFactory", "Migration"]

MIB = 1 << 20
SOURCE = Side.SOURCE

#: Phases after which an operator's cancel is refused: the decision is being
#: or has been recorded, so the destination must win.
NO_CANCEL_PHASES = frozenset({Phase.COMMIT, Phase.RESUME, Phase.RELEASE, Phase.DONE})


class CommitJournal(Protocol):
    """Where the commit decision is made durable before anyone acts on it."""

    async def record_commit(self, migration_id: str) -> None: ...


#: Builds the destination half from the coordinator's driver and rate limiter.
DestinationFactory = Callable[[DeviceDriver, RateLimiter | None], Destination]


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
        observers: list[Observer] | None = None,
        destination: DestinationFactory | None = None,
    ) -> None:
        self.resolved = resolved
        self.plan = resolved.plan
        self.id = migration_id or uuid.uuid4().hex
        self.journal = journal
        # QEMU before 10.0 stopped and drained devices one after another; kept
        # as a baseline for the benchmark, not for production use.
        self.sequential_switchover = sequential_switchover
        self.read_chunk_bytes = read_chunk_bytes
        self._trace = Trace(observers)
        self.ctx = EngineContext.create(self.plan, self.id, self._trace)
        self.log = self.ctx.log
        self.names = [d.name for d in resolved.devices]
        self.driver = DeviceDriver(self.ctx)
        for d in resolved.devices:
            self.driver.add(SOURCE, d.name, d.backend.create(d.name, SOURCE, d.source))
        self.recorder = Recorder(self.ctx, self.names, vcpus=self.plan.vmm is not None)
        self._trace.observers.insert(0, self.recorder.observe)
        self._limiter: RateLimiter | None = (
            RateLimiter(self.plan.bandwidth_limit_mib_s * MIB)
            if self.plan.bandwidth_limit_mib_s is not None
            else None
        )
        vmm = self.plan.vmm
        # The source's VMM; the destination's is the destination engine's, on
        # whichever host holds the destination devices.
        self.vcpus: Vcpus | None = Vcpus(self.ctx, SOURCE, vmm.source) if vmm else None
        if destination is None:
            destination = self._local_destination
        self.destination = destination(self.driver, self._limiter)

        self.report: MigrationReport | None = None
        self.phase = Phase.PREPARE
        self._scope: trio.CancelScope | None = None
        self._cancel_reason: str | None = None
        self._post_commit_errors: list[ErrorInfo] = []
        self._release_errors: list[ErrorInfo] = []
        self._rollback_errors: list[ErrorInfo] = []
        self._recovery_note: str | None = None
        # Set before the source pause is sent: from then on a rollback resumes.
        self._vcpus_paused = False
        # A recovered migration whose previous run had begun pre-copy.
        self._began_before = False
        # Set once the destination ran after the commit: the sources may be released.
        self._resumed = trio.Event()
        self._recovering = False
        self._task_status: trio.TaskStatus[None] | None = None
        #: A recovery that could not finish: the devices need an operator.
        self.recovery_failed = False
        #: Where each opened device the migration never moved stood at its end.
        self.observed_states: dict[tuple[Side, str], DeviceState] = {}

    def _local_destination(self, driver: DeviceDriver, limiter: RateLimiter | None) -> Destination:
        vmm = self.plan.vmm
        return LocalDestination(
            self.resolved, driver, limiter, vmm.destination if vmm is not None else None
        )

    # -- public --------------------------------------------------------------

    @property
    def flow(self) -> MigrationFlow | None:
        return self.driver.flow

    @property
    def trace(self) -> list[TraceEvent]:
        return self._trace.events

    @property
    def observers(self) -> list[Observer]:
        return self._trace.observers

    @property
    def error(self) -> ErrorInfo | None:
        return self.ctx.error

    @property
    def sources(self) -> dict[str, Device]:
        return {n: self.driver.device(SOURCE, n) for n in self.names}

    @property
    def destinations(self) -> dict[str, Device]:
        """The destination devices, where this host drives them."""
        return {n: d for (side, n), d in self.driver.devices.items() if side is Side.DESTINATION}

    @property
    def committed(self) -> bool:
        return self.flow is not None and self.flow.committed

    @property
    def in_downtime_window(self) -> bool:
        """Whether the migration is inside its downtime window (``DOWNTIME_WINDOW``)."""
        return self.recorder.in_downtime_window

    async def downtime_window_closed(self) -> None:
        """Return once the migration is outside its downtime window: at once if it is.

        The window closes when the migration leaves it by any path (the
        destination resumed, a rollback, a failure): every path out of the
        coordinator stops its phase clock, and that closes it.
        """
        await self.recorder.downtime_window_closed()

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
        stats = self.recorder.stats
        remaining = [s.remaining for s in stats.values()]
        known = [r for r in remaining if r is not None]
        in_precopy = self.phase is Phase.PRECOPY
        precopy = self.recorder.precopy
        return {
            "phase": self.phase.value,
            # The round under way during pre-copy; the rounds done after it.
            "precopy_round": precopy.rounds + (1 if in_precopy else 0),
            "bytes_sent": {name: s.bytes_precopy + s.bytes_stopcopy for name, s in stats.items()},
            # Only once every device has said what it still has to send.
            "remaining_bytes": (
                sum(r.stop_copy_bytes for r in known) if len(known) == len(remaining) else None
            ),
            "expected_downtime_ms": precopy.expected_downtime_ms,
        }

    async def run(self) -> MigrationReport:
        """Migrate; returns the report (also in ``self.report``).  Never raises for a
        failed migration: the report says what happened.  Re-raises cancellation
        from outside (after rolling back) and bugs."""
        self.recorder.start()
        self.log.info("migration.start", devices=len(self.names))
        # The destination's session (a data channel) spans the rollback and the
        # end too: both still talk to the destination.
        async with self.destination.session():
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
                    self.ctx.set_error("cancelled", self._cancel_reason or "cancelled")
                    await self._settle()
            finally:
                with trio.CancelScope(shield=True):
                    await self._end()
        assert self.report is not None
        return self.report

    async def recover(
        self,
        *,
        committed: bool,
        interrupted_phase: str | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> MigrationReport:
        """Finish a migration that a previous run left unfinished (the daemon died).

        Opens every device again and asks each where it stands.  If the
        commit decision was never recorded, rolls back exactly as after a
        failure.  If it was, completes the destination: every destination
        device to RUNNING (the barrier still holds), every source device to
        STOP, never running again.  Returns the report, as ``run`` does.

        ``task_status`` is told once this host's own devices are settled: what
        remains then waits on the destination's daemon (readiness never does).
        """
        self._task_status = task_status
        self._recovering = True
        self.recorder.start()
        self._began_before = interrupted_phase not in (None, Phase.PREPARE.value)
        where = f" in phase {interrupted_phase}" if interrupted_phase else ""
        self.log.warning("migration.recover", committed=committed, interrupted=interrupted_phase)
        try:
            with trio.CancelScope(shield=True):
                with trio.fail_after(self.plan.timeouts.rollback_s):
                    flow = await self._open_all(check=False)
                    await self._adopt_states()
                # Unknown after a crash; resuming running vCPUs changes nothing.
                self._vcpus_paused = self.vcpus is not None
                # Both ends bound their own work (a peer out of reach leaves the
                # committed one in doubt, asking, as long as it takes).
                if committed:
                    self._recovery_note = (
                        f"completed on restart: the orchestrator stopped{where} after the "
                        "commit decision was recorded"
                    )
                    flow.adopt_commit()
                    self.phase = Phase.COMMIT
                    self.recorder.enter(Phase.COMMIT)
                    await self._complete_after_commit()
                else:
                    self.ctx.set_error(
                        "interrupted",
                        f"the orchestrator stopped{where} before the commit point; "
                        "rolled back on restart",
                    )
                    await self._rollback()
        except Exception as exc:
            # Device failures come out of the nurseries wrapped in groups;
            # anything else is a bug and goes on up once the report is built.
            failures, unexpected = _split(exc, (MigrationAborted, trio.TooSlowError))
            self.recovery_failed = True
            self.ctx.set_error("recovery_failed", f"recovery did not finish: {failures or exc}")
            if unexpected is not None:
                raise
        finally:
            with trio.CancelScope(shield=True):
                await self._end(event="migration.recovered")
            self._settled_here()
        assert self.report is not None
        return self.report

    def _settled_here(self, *, early: bool = False) -> None:
        """A recovery did what this host can alone: its own devices are settled (and,
        with a destination on this host too, everything: ``early`` calls wait then)."""
        if early and self.destination.on_this_host:
            return
        if self._task_status is not None:
            status, self._task_status = self._task_status, None
            status.started()

    async def _end(self, event: str = "migration.end") -> None:
        # A device the migration never moved is where it was: the report says
        # where that is, asked of the device before it is closed.
        for side, name in sorted(self.driver.opened):
            if self.flow is None or not self.flow.endpoint(side, name).touched:
                self.observed_states[(side, name)] = await self.driver.probe(side, name)
        await self._close_all()
        self.recorder.stop()
        report = await build_report(self)
        with trio.move_on_after(self.plan.timeouts.rollback_s):
            # Both journals must hold one outcome: the destination's is told
            # (it keeps asking for it if this does not reach it).
            await self.destination.finish(report.outcome)
        await self.destination.close()
        self.report = report
        self.log.info(
            event,
            outcome=report.outcome,
            downtime_ms=report.downtime_ms,
            duration_ms=report.duration_ms,
        )

    async def _adopt_states(self) -> None:
        flow = self.flow
        assert flow is not None

        async def adopt(name: str) -> None:
            flow.adopt_state(SOURCE, name, await self.driver.state(SOURCE, name))

        async with trio.open_nursery() as nursery:
            for name in self.names:
                nursery.start_soon(adopt, name)
            nursery.start_soon(self.destination.adopt)

    # -- the forward path ----------------------------------------------------

    async def _forward(self) -> None:
        timeout = self.plan.timeouts.prepare_s
        try:
            with trio.fail_after(timeout):
                if self.vcpus is not None:
                    await self.vcpus.require_ready()
                await self._open_all()
                await self._for_each_device(self._require_running)
        except trio.TooSlowError:
            raise self.ctx.abort("phase_timeout", f"prepare took over {timeout:g} s") from None
        try:
            with trio.fail_after(timeout):
                await self.destination.begin()
        except trio.TooSlowError:
            raise self.ctx.abort(
                "phase_timeout", f"the destination did not reach RESUMING within {timeout:g} s"
            ) from None
        await self._transfer()
        self._enter(Phase.DONE)

    async def _transfer(self) -> None:
        flow = self.flow
        assert flow is not None
        self._enter(Phase.PRECOPY)
        names = self.names
        self._rounds = RoundGate(len(names), self._decide_round)
        self._round_started = trio.current_time()
        self._grace_signal = trio.Event()
        self._source_barrier = Barrier("source_p2p", len(names), self._source_barrier_released)
        self._destination_barrier = Barrier("destination_p2p", len(names), lambda: None)
        self._drained = 0
        self._all_drained = trio.Event()
        self._sequential = trio.Lock()
        self._loaded = {name: trio.Event() for name in names}
        self.recorder.barrier_members = {
            "source_p2p": len(flow.barrier_members(SOURCE)),
            "destination_p2p": len(flow.barrier_members(Side.DESTINATION)),
        }
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._coordinate)
            for name in names:
                sender = self.destination.stream(name)
                nursery.start_soon(self._source_task, name, sender)
                nursery.start_soon(self._destination_task, name)

    async def _open_all(self, *, check: bool = True) -> MigrationFlow:
        caps: dict[str, Capabilities] = {}
        destination_caps: dict[str, Capabilities] = {}

        async def open_source(name: str) -> None:
            caps[name] = await self.driver.open(SOURCE, name)

        async def open_destination() -> None:
            destination_caps.update(await self.destination.open(check=check))

        async with trio.open_nursery() as nursery:
            for name in self.names:
                nursery.start_soon(open_source, name)
            nursery.start_soon(open_destination)
        try:
            # Recovering from a destination that cannot be asked: its devices'
            # capabilities are the source's (the P2P states must agree anyway).
            flow = MigrationFlow.create(
                self.plan, {n: (caps[n], destination_caps.get(n, caps[n])) for n in self.names}
            )
        except PlanError as exc:
            raise self.ctx.abort(
                "plan_error", f"the devices cannot migrate together: {exc}"
            ) from None
        self.driver.flow = flow
        return flow

    async def _require_running(self, name: str) -> None:
        await self.driver.require_running(SOURCE, name)

    async def _coordinate(self) -> None:
        await self._rounds.final.wait()
        decision = self._rounds.decision
        assert decision is not None
        if decision.action == "abort":
            raise self.ctx.abort("precopy_not_converged", decision.reason)
        await self._switchover_acknowledged()
        self._enter(Phase.SOURCE_GRACE)
        if self.vcpus is not None:
            # The VMM hook: the vCPUs stop before any device leaves PRE_COPY.
            self._vcpus_paused = True
            await self.vcpus.call("pause", record="pause")
        self._grace_signal.set()
        await self._source_barrier.released.wait()
        timeout = self.plan.timeouts.switchover_s
        try:
            with trio.fail_after(timeout):
                await self._all_drained.wait()
                self._enter(Phase.DESTINATION_GRACE)
                await self._destination_barrier.released.wait()
                await self.destination.vote()
        except trio.TooSlowError:
            raise self.ctx.abort(
                "phase_timeout",
                f"the switchover did not reach the commit point within {timeout:g} s",
            ) from None
        await self._decide_commit()
        self._enter(Phase.RESUME)
        completion = await self.destination.commit()
        self._post_commit_errors.extend(completion.errors)
        self._resumed.set()
        self._enter(Phase.RELEASE)

    async def _decide_commit(self) -> None:
        self._enter(Phase.COMMIT)
        if not self.destination.deciding():
            raise self.ctx.abort(
                "peer_error", "the destination had the migration aborted before the commit"
            )
        if self.journal is not None:
            try:
                with trio.CancelScope(shield=True):
                    await self.journal.record_commit(self.id)
            except Exception as exc:
                # Not on disk, not decided: the migration must roll back.
                self.destination.commit_failed(str(exc))
                raise self.ctx.abort(
                    "journal_error", f"the commit decision could not be recorded: {exc}"
                ) from exc
        assert self.flow is not None
        self.flow.record_commit()
        self.destination.committed()
        self._trace.emit("commit")
        self.log.info("migration.commit")

    def _decide_round(self, reports: dict[str, Remaining]) -> PrecopyDecision:
        recorder = self.recorder
        precopy = recorder.precopy
        now = trio.current_time()
        recorder.precopy_busy_s += now - self._round_started
        self._round_started = now
        precopy.rounds += 1
        # What crossed, not what was handed over: on a deep link queue the kernel
        # holds megabytes that a flushed round has "sent" and not delivered.
        delivered = max(0, recorder.precopy_bytes - self.destination.in_flight_bytes())
        busy = recorder.precopy_busy_s
        measured = delivered / busy if busy > 0 else 0.0
        if self.plan.bandwidth_limit_mib_s is not None:
            limit = self.plan.bandwidth_limit_mib_s * MIB
            measured = min(measured, limit) if measured > 0 else limit
        decision = decide_precopy(
            self.plan,
            round_number=precopy.rounds,
            remaining=reports,
            bandwidth_bytes_s=measured,
            elapsed_s=now - recorder.phase_started[Phase.PRECOPY],
        )
        precopy.bandwidth_mib_s = round(measured / MIB, 3) if measured > 0 else None
        precopy.expected_downtime_ms = (
            round(decision.expected_downtime_ms, 3)
            if math.isfinite(decision.expected_downtime_ms)
            else None
        )
        precopy.reason = decision.reason
        precopy.converged = decision.converged
        if decision.action != "continue":
            precopy.decision = decision.action
            self.log.info(
                "migration.precopy_decision", action=decision.action, reason=decision.reason
            )
        self._trace.emit("decision", detail={"action": decision.action, "round": precopy.rounds})
        return decision

    async def _announce_initial(self, name: str) -> bool:
        """Tell the destination this device's initial data is all sent; it
        acknowledges once that much is loaded (switchover-ack)."""
        try:
            await self.destination.initial_sent(name, self.recorder.stats[name].bytes_precopy)
        except PeerError as exc:
            raise self.driver.fail(Side.DESTINATION, name, "switchover_ack", exc) from None
        return True

    async def _switchover_acknowledged(self) -> None:
        """No device stops before the destination acknowledged every device's
        initial data (QEMU's switchover-ack)."""
        timeout = self.plan.timeouts.switchover_s
        try:
            with trio.fail_after(timeout):
                await self.destination.acknowledged()
        except trio.TooSlowError:
            raise self.ctx.abort(
                "phase_timeout",
                f"the destination did not acknowledge the initial data within {timeout:g} s",
            ) from None
        except PeerError as exc:
            raise self.ctx.abort(
                "peer_error", f"waiting for the switchover acknowledgement: {exc}"
            ) from None

    def _source_barrier_released(self) -> None:
        self._enter(Phase.STOP_COPY)
        self._trace.emit("barrier", detail={"barrier": "source_p2p"})

    # -- per-device tasks ----------------------------------------------------

    async def _source_task(self, name: str, sender: StreamSender) -> None:
        assert self.flow is not None
        driver = self.driver
        route = self.flow.endpoint(SOURCE, name).route
        device = driver.device(SOURCE, name)
        stats = self.recorder.stats[name]
        initial_announced = False
        async with _closing(sender):
            if route.precopy is not None:
                await driver.walk(SOURCE, name, route.precopy)
            while True:
                if route.precopy is not None:
                    # A round sends what was pending when it began, no more: a
                    # device that dirties faster than it drains must still end
                    # its round so that the convergence decision is taken.
                    info = await driver.call(SOURCE, name, "precopy_info", device.precopy_info)
                    pending = info.initial_bytes + info.dirty_bytes
                    await self._drain(name, sender, precopy=True, limit=max(pending, 1))
                    try:
                        await sender.flush()
                    except PeerError as exc:
                        raise driver.fail(SOURCE, name, "send", exc) from None
                    info = await driver.call(SOURCE, name, "precopy_info", device.precopy_info)
                    size = await driver.call(SOURCE, name, "stop_copy_size", device.stop_copy_size)
                    stats.remaining = Remaining(info.initial_bytes, info.dirty_bytes, size)
                elif stats.remaining is None:
                    size = await driver.call(SOURCE, name, "stop_copy_size", device.stop_copy_size)
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
                await driver.walk(SOURCE, name, route.grace)
            self.recorder.barrier_wait(name, "source_p2p", await self._source_barrier.arrive())
            if self.sequential_switchover:
                async with self._sequential:
                    await self._stop_and_drain(name, sender)
                    await self._loaded[name].wait()
            else:
                await self._stop_and_drain(name, sender)
        self._drained += 1
        if self._drained == len(self.names):
            self._all_drained.set()
        await self._resumed.wait()
        # Release: outside the downtime window, after the commit point.  A
        # source that cannot be released needs an operator, but the VM runs
        # on the destination: the migration has succeeded.
        await self._release_source(name)

    async def _stop_and_drain(self, name: str, sender: StreamSender) -> None:
        busy_before = self.driver.busy.get((SOURCE, name), 0.0)
        await self.driver.walk(SOURCE, name, DeviceState.STOP_COPY)
        await self._drain(name, sender, precopy=False)
        try:
            await sender.end()
        except PeerError as exc:
            raise self.driver.fail(SOURCE, name, "send", exc) from None
        busy = self.driver.busy.get((SOURCE, name), 0.0) - busy_before
        self.recorder.stats[name].stop_path_s += busy

    async def _drain(
        self, name: str, sender: StreamSender, *, precopy: bool, limit: int | None = None
    ) -> None:
        """Read and send until the device has nothing more now (or ``limit`` bytes)."""
        driver = self.driver
        device = driver.device(SOURCE, name)
        stats = self.recorder.stats[name]
        sent = 0
        while limit is None or sent < limit:
            chunk = await driver.call(SOURCE, name, "read", device.read, self.read_chunk_bytes)
            if not chunk:
                return
            sent += len(chunk)
            if precopy:
                stats.bytes_precopy += len(chunk)
                self.recorder.precopy_bytes += len(chunk)
            else:
                stats.bytes_stopcopy += len(chunk)
            try:
                await sender.send(chunk)
            except PeerError as exc:
                raise driver.fail(SOURCE, name, "send", exc) from None

    async def _destination_task(self, name: str) -> None:
        await self.destination.loaded(name)
        self._loaded[name].set()
        wait = await self._destination_barrier.arrive()
        self.recorder.barrier_wait(name, "destination_p2p", wait)

    # -- after the commit ----------------------------------------------------

    async def _release_source(self, name: str) -> None:
        """Stop a source device after the commit; a failure is reported, never reset:
        a reset source reads RUNNING beside a running destination."""
        assert self.flow is not None
        settle = self.flow.endpoint(SOURCE, name).route.settle
        if self.flow.endpoint(SOURCE, name).state is DeviceState.ERROR:
            message = f"source device {name!r} is in ERROR and cannot go to {settle.name}"
            self._release_errors.append(
                self.ctx.info("device_error", message, side=SOURCE, device=name)
            )
            return
        try:
            await self.driver.walk(SOURCE, name, settle)
        except DeviceFailure as failure:
            self._release_errors.append(failure.info)

    async def _complete_after_commit(self) -> None:
        """Finish the forward path after the commit point, whatever interrupted it.

        Every destination device goes to RUNNING (the barrier still holds)
        and every source device to STOP; the VM must end up running somewhere.
        """
        assert self.flow is not None
        flow = self.flow
        with trio.move_on_after(self.plan.timeouts.rollback_s) as scope:
            await self.driver.settle_pending()
            if self._recovering:
                # This host's part first: the destination may be another host's,
                # out of reach for a while; the sources stop whatever it says.
                await self._for_each_device(self._release_source)
        self._settled_here(early=True)
        if flow.phase is Phase.COMMIT:
            self._enter(Phase.RESUME)
        if not self._resumed.is_set():
            # Bounded by the destination itself: every device call has its
            # deadline, and a peer it cannot reach leaves it in doubt, asking.
            completion = await self.destination.commit()
            self._post_commit_errors.extend(completion.errors)
            self._resumed.set()
        with trio.move_on_after(self.plan.timeouts.rollback_s) as release:
            if flow.phase is Phase.RESUME:
                self._enter(Phase.RELEASE)
            if not self._recovering:
                await self._for_each_device(self._release_source)
            self._enter(Phase.DONE)
        if scope.cancelled_caught or release.cancelled_caught:
            self._post_commit_errors.append(
                ErrorInfo(
                    kind="phase_timeout",
                    message="completing the destination after the commit point took over "
                    f"{self.plan.timeouts.rollback_s:g} s",
                    phase=self.phase.value,
                )
            )

    # -- failures and rollback ---------------------------------------------------

    async def _after_forward_failure(self, exc: BaseException) -> None:
        cancelled, rest = _split(exc, trio.Cancelled)
        _, unexpected = _split(rest, MigrationAborted)
        if unexpected is not None:
            self.ctx.set_error("internal_error", f"{type(unexpected).__name__}: {unexpected}")
        if cancelled is not None:
            self.ctx.set_error("cancelled", self._cancel_reason or "the migration was cancelled")
        await self._settle()
        if unexpected is not None or cancelled is not None:
            raise exc

    async def _settle(self) -> None:
        """After the forward path stopped early: roll back if the commit was not
        recorded, complete the destination if it was.  Shielded: a migration
        interrupted by a cancel still ends with the VM running on one side."""
        with trio.CancelScope(shield=True):
            if self.flow is None:
                # Nothing moved on this side; the destination may hold prepared devices.
                await self._abort_destination_quietly()
            elif self.committed:
                if self.phase is not Phase.DONE:
                    await self._complete_after_commit()
            else:
                await self._rollback()

    async def _abort_destination_quietly(self) -> None:
        with trio.move_on_after(self.plan.timeouts.rollback_s):
            reason = self.error.message if self.error else "refused"
            self._rollback_errors.extend(await self.destination.abort(reason))

    async def _rollback(self) -> None:
        assert self.flow is not None
        flow = self.flow
        self._enter(Phase.ROLLBACK)
        cause = self.error.message if self.error else None
        self.log.warning("migration.rollback", cause=cause)
        deadline = self.plan.timeouts.rollback_s
        with trio.move_on_after(deadline) as scope:
            await self.driver.settle_pending()
            plan = flow.rollback_plan()
            async with trio.open_nursery() as nursery:
                # The destination resets beside the source's return: nothing
                # there runs before a commit, so neither waits for the other.
                nursery.start_soon(self._roll_back_destination, cause or "rolled back")
                await self._roll_back_source(plan)
        if scope.cancelled_caught:
            self._rollback_errors.append(
                ErrorInfo(
                    kind="phase_timeout",
                    message=f"rollback took over {deadline:g} s",
                    phase="rollback",
                )
            )
        self._enter(Phase.DONE)

    async def _roll_back_source(self, plan: RollbackPlan) -> None:
        """Every source device back to RUNNING through the reverse barrier, then the vCPUs."""
        flow = self.flow
        assert flow is not None
        async with trio.open_nursery() as nursery:
            for step in plan.for_side(SOURCE):
                nursery.start_soon(self._rollback_quiesce, step.name, step.reset, step.quiesce)
        async with trio.open_nursery() as nursery:
            for step in plan.for_side(SOURCE):
                if step.final is not None and not flow.endpoint(SOURCE, step.name).reset:
                    nursery.start_soon(self._rollback_final, step.name, step.final)
        if self._vcpus_paused and self.vcpus is not None:
            # The devices first, as the destination does: the guest finds
            # them running when its vCPUs do.
            try:
                await self.vcpus.call("resume", record="source_resume")
            except VmmFailure as failure:
                self._rollback_errors.append(failure.info)
        self._settled_here(early=True)

    async def _roll_back_destination(self, reason: str) -> None:
        self._rollback_errors.extend(await self.destination.abort(reason))

    async def _rollback_quiesce(self, name: str, reset: bool, quiesce: DeviceState | None) -> None:
        try:
            if not reset and quiesce is not None:
                await self.driver.walk(SOURCE, name, quiesce)
                return
        except DeviceFailure as failure:
            if not self.driver.needs_reset(SOURCE, name):
                self._rollback_errors.append(failure.info)
                return
        if reset or self.driver.needs_reset(SOURCE, name):
            await self._reset(name)

    async def _rollback_final(self, name: str, final: DeviceState) -> None:
        try:
            await self.driver.walk(SOURCE, name, final)
        except DeviceFailure as failure:
            if self.driver.needs_reset(SOURCE, name):
                await self._reset(name)
            else:
                self._rollback_errors.append(failure.info)
        except ProtocolViolation as exc:
            # A peer could not leave a stopped state: running this device
            # fully would expose it to that peer.  It waits for an operator.
            message = f"left in its grace state: {exc}"
            self._rollback_errors.append(
                self.ctx.info("device_error", message, side=SOURCE, device=name)
            )

    async def _reset(self, name: str) -> None:
        failed = await self.driver.reset(SOURCE, name)
        if failed is not None:
            self._rollback_errors.append(failed)

    async def _close_all(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.driver.close)
            if self.vcpus is not None:
                nursery.start_soon(self.vcpus.aclose)

    # -- bookkeeping ---------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        if self.flow is not None:
            self.flow.enter_phase(phase)
        previous = self.phase
        self.phase = phase
        self.ctx.phase = phase.value
        duration = self.recorder.enter(phase)
        self._trace.emit("phase", detail={"phase": phase.value, "previous": previous.value})
        self.log.info(
            "migration.phase",
            phase=phase.value,
            previous=previous.value,
            previous_ms=round(duration * 1000, 3),
        )

    async def _for_each_device(self, fn: Callable[[str], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            for name in self.names:
                nursery.start_soon(fn, name)

    # -- what the report reads -------------------------------------------------

    @property
    def post_commit_errors(self) -> list[ErrorInfo]:
        return self._post_commit_errors

    @property
    def rollback_errors(self) -> list[ErrorInfo]:
        return self._rollback_errors

    @property
    def release_errors(self) -> list[ErrorInfo]:
        return self._release_errors

    @property
    def recovery_note(self) -> str | None:
        return self._recovery_note

    @property
    def vcpus_paused(self) -> bool:
        return self._vcpus_paused

    @property
    def precopy_began(self) -> bool:
        """Whether pre-copy began (in this run, or in the one a recovery finishes)."""
        return self._began_before or Phase.PRECOPY in self.recorder.phase_started


def _split(
    exc: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    """Split an exception (or group) into the part of ``kind`` and the rest."""
    if exc is None:
        return None, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)
    return (exc, None) if isinstance(exc, kind) else (None, exc)


@contextlib.asynccontextmanager
async def _closing(sender: StreamSender) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await sender.aclose()
