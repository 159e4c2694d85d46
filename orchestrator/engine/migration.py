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

import functools
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import trio

from orchestrator.backends.base import Device
from orchestrator.compat import CompatSettings
from orchestrator.control import (
    Control,
    ControlRefused,
    ControlRequest,
    with_limits,
    with_switchover_forced,
)
from orchestrator.convergence import Remaining
from orchestrator.engine.allowance import OverBudget
from orchestrator.engine.budget import DowntimeBudget
from orchestrator.engine.control import LiveControl
from orchestrator.engine.destination import Destination, LeftInDoubt, LocalDestination
from orchestrator.engine.devices import (
    DeviceDriver,
    EngineContext,
    MigrationAborted,
)
from orchestrator.engine.gates import Barrier, RoundGate, Switchover, each_to_its_end
from orchestrator.engine.identities import IdentityCheck
from orchestrator.engine.model import DowntimeModel
from orchestrator.engine.precopy import PrecopyRounds
from orchestrator.engine.recorder import Recorder
from orchestrator.engine.report import build_report
from orchestrator.engine.source import SourceHalf
from orchestrator.engine.trace import Observer, Trace, TraceEvent
from orchestrator.engine.vcpus import Vcpus
from orchestrator.errors import PeerError, PlanError
from orchestrator.flow import MigrationFlow, Phase
from orchestrator.report import CompatibilityReport, ErrorInfo, MigrationReport
from orchestrator.resolve import ResolvedPlan
from orchestrator.states import Capabilities, DeviceState, Side
from orchestrator.transport import RateLimiter

__all__ = ["NO_CANCEL_PHASES", "CommitJournal", "DestinationFactory", "Migration"]

MIB = 1 << 20
SOURCE = Side.SOURCE

#: Phases after which an operator's cancel is refused: the decision is being
#: or has been recorded, so the destination must win.
NO_CANCEL_PHASES = frozenset({Phase.COMMIT, Phase.RESUME, Phase.RELEASE, Phase.DONE})


class CommitJournal(Protocol):
    """Where the commit decision is made durable before anyone acts on it."""

    async def record_commit(self, migration_id: str) -> None: ...


_ArcKey = tuple[str, str, str, str]


@runtime_checkable
class ArcHistory(Protocol):
    """A journal that keeps this host's arc history (the daemon's does)."""

    async def arc_history(self, models: Iterable[str]) -> dict[_ArcKey, float]: ...

    async def record_arcs(self, samples: Iterable[tuple[str, str, str, str, float]]) -> None: ...


#: Builds the destination half from the coordinator's driver and rate limiter.
DestinationFactory = Callable[[DeviceDriver, RateLimiter | None], Destination]


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
        compat: CompatSettings | None = None,
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
        #: Source identities as the devices open, then the check (``engine.identities``).
        self.identities = IdentityCheck(self.ctx, compat)
        self.log = self.ctx.log
        self.names = [d.name for d in resolved.devices]
        self.driver = DeviceDriver(self.ctx)
        for d in resolved.devices:
            self.driver.add(SOURCE, d.name, d.backend.create(d.name, SOURCE, d.source))
        self.recorder = Recorder(self.ctx, self.names, vcpus=self.plan.vmm is not None)
        self._trace.observers.insert(0, self.recorder.observe)
        # Always one, uncapped without a plan's limit: an operator may set one live.
        cap = self.plan.bandwidth_limit_mib_s
        self._limiter = RateLimiter(cap * MIB if cap is not None else None)
        self.live = LiveControl(self.plan, self._limiter)
        vmm = self.plan.vmm
        # The source's VMM; the destination's is the destination engine's, on
        # whichever host holds the destination devices.
        self.vcpus: Vcpus | None = Vcpus(self.ctx, SOURCE, vmm.source) if vmm else None
        if destination is None:
            destination = self._local_destination
        self.destination = destination(self.driver, self._limiter)
        self.model = DowntimeModel(
            self.driver,
            vcpus=vmm is not None,
            remote=not self.destination.on_this_host,
            destination=self.destination,
            read_chunk_bytes=read_chunk_bytes,
        )
        self._trace.observers.insert(1, self.model.observe)
        self.budget = DowntimeBudget(
            self.ctx,
            self.model,
            self.recorder,
            strict=self.plan.downtime_policy == "strict",
            limit_ms=lambda: self.live.state.downtime_limit_ms,
        )
        self._trace.observers.insert(2, self.budget.observe)
        self.source = SourceHalf(
            self.driver,
            self.recorder,
            self.destination,
            read_chunk_bytes=read_chunk_bytes,
            sequential=sequential_switchover,
        )

        self.report: MigrationReport | None = None
        self.phase = Phase.PREPARE
        self._scope: trio.CancelScope | None = None
        self._cancel_reason: str | None = None
        self._post_commit_errors: list[ErrorInfo] = []
        self._rollback_errors = self.source.rollback_errors
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
    def compatibility(self) -> CompatibilityReport | None:
        """The identity check's record (None until it ran)."""
        return self.identities.report

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
        return self.recorder.progress(self.phase)

    async def run(self) -> MigrationReport:
        """Migrate; returns the report (also in ``self.report``).  Never raises for a
        failed migration: the report says what happened.  Re-raises cancellation
        from outside (after rolling back) and bugs."""
        self.recorder.start()
        self.log.info("migration.start", devices=len(self.names))
        # The destination's session (a data channel) spans the rollback and the
        # end too: both still talk to the destination.
        left: LeftInDoubt | None = None
        async with self.destination.session():
            try:
                with trio.CancelScope() as self._scope:
                    if self._cancel_reason is not None:
                        # cancel() came before run() had a scope to cancel.
                        self._scope.cancel()
                    await self._forward()
            except BaseException as exc:
                left = _left_in_doubt(exc)
                if left is None:
                    await self._after_forward_failure(exc)
            else:
                if self._scope.cancelled_caught:
                    self.ctx.set_error("cancelled", self._cancel_reason or "cancelled")
                    await self._settle()
            finally:
                with trio.CancelScope(shield=True):
                    if left is None:
                        await self._end()
                    else:
                        await self._leave(left)
        if left is not None:
            raise left
        assert self.report is not None
        return self.report

    def abandon(self) -> None:
        """The daemon shuts down: a committed migration whose destination (another
        host's daemon) cannot be reached stops waiting for it, without an outcome;
        its journal keeps the commit and the restart finishes it."""
        if self.committed:
            self.destination.give_up()

    async def _leave(self, left: LeftInDoubt) -> None:
        """End here without an outcome: the devices closed, nothing journaled."""
        await self._close_all()
        await self.destination.close()
        self.recorder.stop()
        self.log.warning("migration.left_in_doubt", reason=str(left))

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
        left: LeftInDoubt | None = None
        self.recorder.start()
        self._began_before = interrupted_phase not in (None, Phase.PREPARE.value)
        where = f" in phase {interrupted_phase}" if interrupted_phase else ""
        self.log.warning("migration.recover", committed=committed, interrupted=interrupted_phase)
        try:
            with trio.CancelScope(shield=True):
                with trio.fail_after(self.plan.timeouts.rollback_s):
                    flow = await self._open_all(check=False)
                    await self._adopt_states()
                # The journal's phase may lag the devices (its writer batches): a source
                # device that left RUNNING had begun pre-copy, whatever it says.
                if any(e.state is not DeviceState.RUNNING for e in flow.side(SOURCE)):
                    self._began_before = True
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
            left = _left_in_doubt(exc)
            if left is None:
                # Device failures come out of the nurseries wrapped in groups;
                # anything else is a bug and goes on up once the report is built.
                failures, unexpected = _split(exc, (MigrationAborted, trio.TooSlowError))
                self.recovery_failed = True
                message = f"recovery did not finish: {failures or exc}"
                self.ctx.set_error("recovery_failed", message)
                if unexpected is not None:
                    raise
        finally:
            with trio.CancelScope(shield=True):
                if left is None:
                    await self._end(event="migration.recovered")
                else:
                    await self._leave(left)
            self._settled_here()
        if left is not None:
            raise left
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
        with trio.CancelScope(shield=True):
            await self._record_history()
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
        assert self.flow is not None
        self.identities.check(self.flow, self.names, self.destination)
        # What is known before any change (declared arcs, the commit): a history
        # figure does not refuse, since a refused migration never corrects it.
        self._check_reachable()
        await self._load_history()
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
        self._model_inputs()
        rounds = PrecopyRounds(
            self.ctx, self.recorder, self.destination, len(names), self.model, flow, self.live
        )
        sw = self._switchover = Switchover(
            rounds=RoundGate(len(names), rounds.decide),
            precopy=rounds,
            source_barrier=Barrier("source_p2p", len(names), self._source_barrier_released),
            destination_barrier=Barrier("destination_p2p", len(names), lambda: None),
            names=names,
        )
        if flow.ordered is not None:
            sw.peers_graced = Barrier("peers_graced", len(names) - 1, self._peers_graced)
        self.recorder.barrier_members = {
            "source_p2p": len(flow.barrier_members(SOURCE)),
            "destination_p2p": len(flow.barrier_members(Side.DESTINATION)),
        }
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._coordinate, sw)
            nursery.start_soon(self.budget.watch, flow)
            for name in names:
                sender = self.destination.stream(name)
                nursery.start_soon(self.source.run, name, sender, sw)
                nursery.start_soon(self._destination_task, name, sw)

    async def _open_all(self, *, check: bool = True) -> MigrationFlow:
        caps: dict[str, Capabilities] = {}
        destination_caps: dict[str, Capabilities] = {}

        async def open_source(name: str) -> None:
            caps[name] = await self.driver.open(SOURCE, name)
            if check and (identity := await self.driver.identity(SOURCE, name)) is not None:
                self.identities.source[name] = identity

        async def open_destination() -> None:
            destination_caps.update(await self.destination.open(check=check))

        # Every open runs to its end even when another fails: the report then
        # says where each device stands, not "unknown" for an open that a
        # sibling's failure happened to cancel.
        await each_to_its_end(
            [functools.partial(open_source, name) for name in self.names] + [open_destination]
        )
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
        if flow.ordered is not None and not self.destination.orders_devices():
            raise self.ctx.abort(
                "plan_error",
                f"device {flow.ordered!r} has no P2P states and must run on the destination "
                "before its peers leave their grace states, which the destination daemon "
                "(an older version) does not do: upgrade it, or declare p2p = false if "
                "the VM uses no peer-to-peer DMA",
            )
        self.driver.flow = flow
        return flow

    async def _require_running(self, name: str) -> None:
        await self.driver.require_running(SOURCE, name)

    async def _load_history(self) -> None:
        """This host's arc history for the devices' models, for the downtime model."""
        journal = self.journal
        models = self.model.history_models()
        if isinstance(journal, ArcHistory) and models:
            try:
                self.model.history = await journal.arc_history(models)
            except Exception as exc:  # a figure less, never a failed migration
                self.log.warning("migration.history_unreadable", error=str(exc))

    async def _record_history(self) -> None:
        journal = self.journal
        if isinstance(journal, ArcHistory):
            try:
                await journal.record_arcs(self.driver.arc_samples())
            except Exception as exc:
                self.log.warning("migration.history_not_recorded", error=str(exc))

    def _check_reachable(self) -> None:
        """Before anything changes: a plan whose window cannot fit its limit even
        with nothing left to send (its arcs, as the backends declare them, the
        commit) is refused, when its policies would not switch over past the limit."""
        plan, flow = self.plan, self.flow
        assert flow is not None
        if plan.precopy_policy != "abort" and plan.downtime_policy != "strict":
            return
        self._model_inputs()
        limits = self.live.state
        cap = limits.bandwidth_limit_mib_s
        bandwidth = cap * MIB if cap is not None else 0.0
        nothing = {
            name: Remaining(0, 0, 0, pre_copy=flow.endpoint(SOURCE, name).route.precopy is not None)
            for name in self.names
        }
        forecast = self.model.forecast(flow, nothing, bandwidth, {})
        # Abort converges only on a window that fits with its margin; strict
        # (switching over whatever the rounds say) checks the window itself.
        margin = plan.precopy_policy == "abort"
        floor = self.model.floor_ms(forecast, set(), bandwidth, margin=margin)
        if floor <= limits.downtime_limit_ms:
            return
        reason = (
            f"cannot meet the limit: the window takes at least {floor:.0f} ms"
            f"{' (with its margin)' if margin else ''} with nothing left to send (its arcs, "
            f"the commit), over the {limits.downtime_limit_ms:g} ms limit; precopy_policy "
            f"{plan.precopy_policy}, downtime_policy {plan.downtime_policy}"
        )
        precopy = self.recorder.precopy
        precopy.forecast = forecast.as_report()
        precopy.expected_downtime_ms = round(floor, 3)
        precopy.decision, precopy.reason, precopy.converged = "abort", reason, False
        raise self.ctx.abort("downtime_unreachable", reason)

    def _model_inputs(self) -> None:
        """What the downtime model reads from what this migration measured so far."""
        inputs = self.model.inputs
        if self.vcpus is not None and "status" in self.vcpus.ms:
            inputs.vmm_s[SOURCE] = self.vcpus.ms["status"] / 1000
        commit_s = getattr(self.journal, "last_write_s", None)
        inputs.commit_s = commit_s if isinstance(commit_s, float) else None
        inputs.rtt_s = self.destination.rtt_s

    async def _coordinate(self, sw: Switchover) -> None:
        # The pre-copy deadline holds inside a round too: when it passes, every
        # device ends the round it is in, and the policy decides.
        with trio.move_on_after(self.plan.timeouts.precopy_s):
            await sw.rounds.final.wait()
        if not sw.rounds.final.is_set():
            self.log.info("migration.precopy_deadline", precopy_s=self.plan.timeouts.precopy_s)
            sw.precopy.cut.set()
            await sw.rounds.final.wait()
        decision = sw.rounds.decision
        assert decision is not None
        if decision.action == "abort":
            raise self.ctx.abort("precopy_not_converged", decision.reason)
        await self._switchover_acknowledged()
        flow = self.flow
        assert flow is not None
        budget = self.budget
        # The strict budget's first check: never switch over into a window
        # predicted over the limit, whatever the pre-copy decided.
        budget.forecast = sw.precopy.forecast
        budget.check("pause", flow)
        self._enter(Phase.SOURCE_GRACE)
        if self.vcpus is not None:
            # The VMM hook: the vCPUs stop before any device leaves PRE_COPY.
            self._vcpus_paused = True
            await self.vcpus.call("pause", record="pause")
            budget.check("grace_arcs", flow)
        sw.grace.set()
        await sw.source_barrier.released.wait()
        timeout = self.plan.timeouts.switchover_s
        try:
            with trio.fail_after(timeout):
                await sw.all_drained.wait()
                budget.check("settle_arcs", flow)
                self._enter(Phase.DESTINATION_GRACE)
                await sw.destination_barrier.released.wait()
                budget.check("vote", flow)
                try:
                    await self.destination.vote()
                except OverBudget as over:
                    raise budget.refused_by_destination(over) from None
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
        # Release: outside the downtime window, after the commit point.  A
        # source that cannot be released needs an operator, but the VM runs
        # on the destination: the migration has succeeded.
        await self._for_each_device(self.source.release)

    async def _decide_commit(self) -> None:
        assert self.flow is not None
        self.budget.check("commit", self.flow)
        # A watchdog that fired in the same batch has cancelled us: let it land
        # before the commit point, from which the migration completes whatever
        # the clock says.
        await trio.lowlevel.checkpoint_if_cancelled()
        self.budget.disarm()
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

    async def _switchover_acknowledged(self) -> None:
        """No device stops before the destination acknowledged every device's
        initial data (QEMU's switchover-ack), as last announced: initial data
        that came back mid pre-copy is announced again and acknowledged anew."""
        timeout = self.plan.timeouts.switchover_s
        try:
            with trio.fail_after(timeout):
                await self.destination.acknowledged()
            self._trace.emit("switchover_ack")
        except trio.TooSlowError:
            raise self.ctx.abort(
                "phase_timeout",
                f"the destination did not acknowledge the initial data within {timeout:g} s",
            ) from None
        except PeerError as exc:
            raise self.ctx.abort(
                "peer_error", f"waiting for the switchover acknowledgement: {exc}"
            ) from None

    def _peers_graced(self) -> None:
        assert self.flow is not None
        # Run by the last peer to reach its grace state: the ordered device's stop is
        # the window's first, so the strict budget is checked before it, as before
        # any stop without one.
        self.budget.check("stop_arcs", self.flow)

    def _source_barrier_released(self) -> None:
        assert self.flow is not None
        # Run by the last device to arrive, before any may leave its grace state.
        self.budget.check("stop_arcs", self.flow)
        if not self.destination.on_this_host:
            share = self.budget.share(self.flow, self.destination.rtt_s or 0.0)
            if share is not None and self.destination.grant(share):
                self.budget.granted = share
        self._enter(Phase.STOP_COPY)
        self._trace.emit("barrier", detail={"barrier": "source_p2p"})

    # -- per-device tasks ----------------------------------------------------

    async def _destination_task(self, name: str, sw: Switchover) -> None:
        try:
            await self.destination.loaded(name)
        except OverBudget as over:
            raise self.budget.refused_by_destination(over) from None
        sw.loaded[name].set()
        wait = await sw.destination_barrier.arrive()
        self.recorder.barrier_wait(name, "destination_p2p", wait)

    # -- after the commit ----------------------------------------------------

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
                await self._for_each_device(self.source.release)
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
                await self._for_each_device(self.source.release)
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
            vcpus = self.vcpus if self._vcpus_paused else None
            if self.destination.on_this_host:
                # One thread drives both: the sources' return first, so that the
                # VM's pause does not wait for the destinations' resets (nothing
                # there runs before a commit, so the resets can wait).
                await self.source.roll_back(plan, vcpus)
                await self._roll_back_destination(cause or "rolled back")
            else:
                async with trio.open_nursery() as nursery:
                    # Another host resets its devices beside the sources' return.
                    nursery.start_soon(self._roll_back_destination, cause or "rolled back")
                    await self.source.roll_back(plan, vcpus)
                    self._settled_here(early=True)
        if scope.cancelled_caught:
            self._rollback_errors.append(
                ErrorInfo(
                    kind="phase_timeout",
                    message=f"rollback took over {deadline:g} s",
                    phase="rollback",
                )
            )
        self._enter(Phase.DONE)

    async def _roll_back_destination(self, reason: str) -> None:
        self._rollback_errors.extend(await self.destination.abort(reason))

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

    # -- live control: an operator's, until the pre-copy decision --------------
    # Apart from the forward path: these only read where the migration stands,
    # and LiveControl applies what they accept.

    def control(self, request: ControlRequest, *, at: float) -> Control:
        """Change the downtime limit and bandwidth cap; the control now in force.

        Accepted in prepare (the first round uses them) and in pre-copy until
        its decision; ControlRefused after it.  ``at``: the wall-clock time.
        """
        self._require_controllable("change the limits of")
        self.live.apply(with_limits(self.live.state, request, at=at, phase=self.phase.value))
        return self.live.state

    def force_switchover(self, *, at: float) -> Control:
        """Make the pre-copy decision a switchover now: the round in flight ends, and
        its decision is the switchover (in prepare: the first round's).  Asked again
        while the migration goes on to its switchover, the same answer (a retry must
        not fail); ControlRefused after a decision the operator did not force, and
        once it rolls back or ended."""
        going_on = self.report is None and self.phase not in (Phase.ROLLBACK, Phase.DONE)
        if not (self.live.state.switchover_forced and going_on):
            self._require_controllable("force the switchover of")
            phase = self.phase.value
            self.live.apply(with_switchover_forced(self.live.state, at=at, phase=phase))
        return self.live.state

    def _require_controllable(self, what: str) -> None:
        refusal = f"cannot {what} migration {self.id!r}"
        decided = self.recorder.precopy.decision
        if self.report is not None:
            raise ControlRefused(f"{refusal}: it has ended ({self.report.outcome})")
        if self._recovering:
            raise ControlRefused(f"{refusal}: it is being recovered after a restart")
        if self._cancel_reason is not None:
            raise ControlRefused(f"{refusal}: it is being cancelled")
        if self.phase not in (Phase.PREPARE, Phase.PRECOPY) or decided is not None:
            past = f", past its pre-copy decision ({decided})" if decided else ""
            raise ControlRefused(
                f"{refusal}: it is in phase {self.phase.value}{past}; limits and the "
                "switchover apply in prepare and pre-copy only"
            )

    # -- what the report reads -------------------------------------------------

    @property
    def post_commit_errors(self) -> list[ErrorInfo]:
        return self._post_commit_errors

    @property
    def rollback_errors(self) -> list[ErrorInfo]:
        return self._rollback_errors

    @property
    def release_errors(self) -> list[ErrorInfo]:
        return self.source.release_errors

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


def _left_in_doubt(exc: BaseException) -> LeftInDoubt | None:
    """The LeftInDoubt in ``exc`` (alone or in a group), if there is one."""
    found, _ = _split(exc, LeftInDoubt)
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found if isinstance(found, LeftInDoubt) else None


def _split(
    exc: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[BaseException | None, BaseException | None]:
    """Split an exception (or group) into the part of ``kind`` and the rest."""
    if exc is None:
        return None, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kind)
    return (exc, None) if isinstance(exc, kind) else (None, exc)
