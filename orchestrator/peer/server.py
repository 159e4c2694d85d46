"""The destination daemon's side of migrations from other hosts: a thin server.

Each :class:`IncomingMigration` hosts the same destination engine as a
migration on one host (``orchestrator.engine.DestinationEngine``) behind
the destination's protocol machine (``peer.protocol.DestinationMachine``):
every message from the source (over the data channel or REST) and every
event of its own is fed to the machine, and this module carries out its
actions.  Nothing here decides anything the machine does not.

What the machine asks for, and what carries it out:

* ``BEGIN_TRANSFER``: every device walks to RESUMING; each stream is loaded
  as it arrives and the device walks on to its grace state; every arc is
  reported to the source as it ends (the engine's trace, forwarded);
* ``RECORD_VOTE`` then ``Vote``: the vote is journaled before it is sent.
  The write starts when the first stream ends, so that its fsync overlaps the
  rest of the transfer (a restart after it finds the vote and asks);
* ``RUN_DEVICES`` and ``RECORD_COMMIT_HERE``: after the commit every device
  runs, then the vCPUs of the plan's ``[vmm.destination]``, which this
  daemon drives itself; the commit is journaled meanwhile;
* ``RESET_DEVICES``: every device that moved is reset;
* ``QUERY``: ask the source daemon for the decision (or, after a rollback,
  the outcome) with backoff, until it answers;
* ``RecordOutcome``: the migration ends here, its report journaled.

:class:`~orchestrator.peer.registry.IncomingRegistry` is the daemon's set
of them (prepare, status, messages over REST, recovery, settling).
"""

from __future__ import annotations

import contextlib
import math
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from orchestrator.engine import (
    ArcHistory,
    DestinationEngine,
    DeviceDriver,
    DeviceFailure,
    EngineContext,
    OverBudget,
    Share,
    Trace,
    TraceEvent,
)
from orchestrator.errors import PeerError, ProtocolViolation
from orchestrator.flow import MigrationFlow, Phase
from orchestrator.peer import protocol as p
from orchestrator.peer.backoff import backoff
from orchestrator.peer.incoming_models import IncomingNotServing, IncomingStatus
from orchestrator.peer.messages import IDENTITIES_VERSION, decode, encode
from orchestrator.report import DeviceReport, ErrorInfo, MigrationReport, Outcome
from orchestrator.resolve import ResolvedPlan
from orchestrator.states import Capabilities, DeviceState, Side
from orchestrator.transport import DestinationChannel

log = structlog.get_logger("orchestrator.peer.server")

__all__ = ["POST_LOAD_ARCS", "IncomingMigration", "capabilities_to_json"]

DESTINATION = Side.DESTINATION
_D = DeviceState
#: The destination's arcs from its loaded state to RUNNING, whichever route it takes.
POST_LOAD_ARCS = (
    (_D.RESUMING, _D.STOP),
    (_D.STOP, _D.RUNNING_P2P),
    (_D.RUNNING_P2P, _D.RUNNING),
    (_D.STOP, _D.RUNNING),
)


def capabilities_to_json(caps: Capabilities) -> dict[str, Any]:
    return {
        "flags": int(caps.flags),
        "stop_copy_size": caps.stop_copy_size,
        "dirty_logging": caps.dirty_logging,
        "precopy_reinit": caps.precopy_reinit,
    }


class IncomingMigration:
    """One migration this host receives; see the module docstring."""

    def __init__(
        self,
        resolved: ResolvedPlan,
        migration_id: str,
        journal: Any,
        source: dict[str, Any] | None,
        *,
        release: Callable[[], None],
        ca_file: Path | None = None,
    ) -> None:
        self.resolved = resolved
        #: The CA the source's API certificate is checked against ([tls] ca_file).
        self._ca_file = ca_file
        self.plan = resolved.plan
        self.id = migration_id
        self.journal = journal
        #: How to reach the source daemon: ``api`` and ``token``.
        self.source = source
        self._release_locks = release
        self.ctx = EngineContext.create(
            self.plan, migration_id, Trace([self._report]), side="destination"
        )
        self.log = self.ctx.log
        self.driver = DeviceDriver(self.ctx)
        vmm = self.plan.vmm
        self.engine = DestinationEngine(
            resolved, self.driver, vmm.destination if vmm is not None else None
        )
        self.names = self.engine.names
        self.machine = p.DestinationMachine()
        self.channel: DestinationChannel | None = None
        self.capabilities: dict[str, Capabilities] = {}
        self.report: MigrationReport | None = None
        self.done = trio.Event()
        #: The report is in the journal (status can be read from there).
        self.journaled = False
        self._nursery: trio.Nursery | None = None
        self._started = time.monotonic()
        self._ready: set[str] = set()
        self._vote_write: trio.Event | None = None
        self._vote_error: str | None = None
        self._commit_recorded: trio.Event | None = None
        self._querying = False
        self._transfer_scope = trio.CancelScope()
        self._transfer_started = False
        self._transfer_done = trio.Event()
        self._vmm_began = 0.0
        self._released = False
        #: This host's arc history for the devices' models (see _load_history).
        self._history: dict[tuple[str, str, str, str], float] = {}
        self._errors: list[ErrorInfo] = []
        # One sender, so that the source gets every report in the order it happened.
        self._outbox_send, self._outbox = trio.open_memory_channel[p.Message](math.inf)

    # -- preparing -------------------------------------------------------------------

    async def open(self) -> dict[str, Capabilities]:
        """Open and check every device (MigrationAborted or DeviceFailure: nothing changed)."""
        try:
            caps = await self.engine.open()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.engine.close()
            raise
        self._adopt_flow(caps)
        await self._load_history()
        return caps

    async def _load_history(self) -> None:
        """This host's arc history for its devices' models: the figures of the
        prepare answer where a backend declares none."""
        models = {m for d in self.driver.devices.values() if (m := d.model_key()) is not None}
        if models and isinstance(self.journal, ArcHistory):
            try:
                self._history = await self.journal.arc_history(models)
            except Exception as exc:  # a figure less, never a failed migration
                self.log.warning("incoming.history_unreadable", error=str(exc))

    async def _record_history(self) -> None:
        """The arcs this host's devices took, into its history."""
        samples = self.driver.arc_samples()
        if samples and isinstance(self.journal, ArcHistory):
            try:
                await self.journal.record_arcs(samples)
            except Exception as exc:
                self.log.warning("incoming.history_not_recorded", error=str(exc))

    def arcs_ms(self, name: str, *, history: bool = False) -> dict[str, float]:
        """The arcs after the load, as this device's backend declares them, or
        (``history``) as this host's history has those its backend does not (the
        source's downtime model has no other figure for arcs not yet walked)."""
        device = self.driver.devices.get((DESTINATION, name))
        if device is None:
            return {}
        figures = {}
        model = device.model_key()
        for source, target in POST_LOAD_ARCS:
            seconds = device.declared_arc_s(source, target)
            if history:
                if seconds is not None or model is None:
                    continue
                seconds = self._history.get((model, "destination", source.name, target.name))
            if seconds is not None:
                figures[f"{source.name}->{target.name}"] = round(seconds * 1000, 3)
        return figures

    def identity_json(self, name: str, version: int) -> dict[str, Any]:
        """The device's identity for the prepare answer, from the protocol version
        that carries it (``{"identity": ...}``; null where its backend reports none)."""
        if version < IDENTITIES_VERSION:
            return {}
        identity = self.engine.identities.get(name)
        return {"identity": identity.as_json() if identity is not None else None}

    def declared_rate_bytes_s(self, name: str) -> float | None:
        """How fast this device loads its stream, as its backend declares it."""
        device = self.driver.devices.get((DESTINATION, name))
        return device.declared_rate_bytes_s() if device is not None else None

    def _adopt_flow(self, caps: dict[str, Capabilities]) -> None:
        self.capabilities = caps
        self.driver.flow = MigrationFlow.for_destination(self.plan, caps)

    async def run(
        self,
        channel: DestinationChannel | None,
        first: p.Step | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> MigrationReport:
        """Serve the migration until it ends: the channel if there is one, the
        machine's actions, the questions to the source.  A cancel from outside (the
        daemon shutting down) leaves the devices and the journal as they are: the
        restart recovers as after a crash."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if first is not None:
                self._execute(first, None)
            sent = trio.Event()
            if channel is not None:
                self.channel = channel
                nursery.start_soon(self._serve_channel, channel)
                nursery.start_soon(self._send_in_order, channel, sent)
            else:
                sent.set()
            await self.done.wait()
            # The last messages (the Completed of 64 devices' run arcs) leave
            # before the tasks end: cancelled in the outbox, the source would
            # wait for them on a channel still open.  Bounded: a source that
            # reads nothing asks over REST.
            self._outbox_send.close()
            with trio.move_on_after(self.plan.timeouts.device_call_s):
                await sent.wait()
            nursery.cancel_scope.cancel()
        assert self.report is not None
        return self.report

    async def recover(self) -> None:
        """After this daemon restarted: open the devices and take their states."""
        caps: dict[str, Capabilities] = {}
        for name in self.names:
            try:
                caps[name] = await self.driver.open(DESTINATION, name)
            except DeviceFailure as failure:
                self._errors.append(failure.info)
        if len(caps) < len(self.names):
            raise ProtocolViolation("recovery could not open every device")
        self._adopt_flow(caps)
        await self.engine.adopt()

    # -- the channel ---------------------------------------------------------------------

    async def _serve_channel(self, channel: DestinationChannel) -> None:
        try:
            with trio.fail_after(self.plan.timeouts.prepare_s):
                await channel.wait_connected()
        except (trio.TooSlowError, PeerError) as exc:
            reason = str(exc) or "the source did not open the data channel in time"
            self.handle(p.LinkLost(reason))
            return
        while True:
            try:
                data = await channel.receive_control()
            except PeerError as exc:
                self.handle(p.LinkLost(str(exc)))
                return
            try:
                message = decode(data)
            except ProtocolViolation as exc:
                self.handle(p.LinkLost(f"a malformed message: {exc}"))
                with contextlib.suppress(PeerError):
                    await channel.abort(str(exc))
                return
            self.handle(message)

    def _channel_up(self) -> bool:
        return self.channel is not None and self.channel.failure is None

    async def _send_in_order(self, channel: DestinationChannel, sent: trio.Event) -> None:
        """Send the outbox in order until it is closed (the migration ended) and empty."""
        async for message in self._outbox:
            if channel.failure is not None:
                continue  # the source asks (REST) for what it needs to know
            try:
                await channel.send_control(encode(message))
            except PeerError as exc:
                if not self.done.is_set():
                    self.handle(p.LinkLost(str(exc)))
        sent.set()

    def _report(self, event: TraceEvent) -> None:
        """Every arc of a device, and the vCPUs' resume, to the source as each ends
        (the trace's observer): the source keeps the clock and the flow of both."""
        if event.kind == "vmm_begin":
            self._vmm_began = event.time
            return
        if event.kind in ("vmm_end", "vmm_failed"):
            ok, action = event.kind == "vmm_end", str(event.detail["action"])
            error = None
            if not ok:
                message = str(event.detail.get("error", "failed"))
                error = self.ctx.info("vmm_error", message, side=DESTINATION, operation=action)
            duration = event.time - self._vmm_began
            self._emit(p.VcpusReport(action, ok, event.detail.get("status"), duration, error))
            return
        if event.kind not in ("arc_end", "arc_failed") or event.device is None:
            return
        assert event.from_state is not None and event.to_state is not None
        if event.kind == "arc_end":
            report = p.ArcReport(
                event.device,
                event.from_state,
                event.to_state,
                True,
                event.to_state,
                float(event.detail.get("duration_s", 0.0)),
            )
        else:
            target = DeviceState[str(event.detail["target"])]
            error = ErrorInfo(
                kind="device_error",
                message=str(event.detail.get("error", "the arc failed")),
                phase=self.machine.state.value,
                side="destination",
                device=event.device,
                operation="set_state",
            )
            report = p.ArcReport(
                event.device, event.from_state, target, False, event.to_state, 0.0, error
            )
        self._emit(report)

    def _emit(self, message: p.Message, replies: list[p.Message] | None = None) -> None:
        if replies is not None:
            replies.append(message)
        elif self._channel_up() and not self.done.is_set():
            self._outbox_send.send_nowait(message)
        # Otherwise dropped: the source asks (REST) for what it needs to know.

    # -- the machine -------------------------------------------------------------------------

    def require_serving(self) -> None:
        """Refuse (503) an outside message while no task carries out the machine's
        steps: a migration being recovered (or ending after a crash of its own)."""
        if self._nursery is None and not self.done.is_set():
            raise IncomingNotServing(
                f"incoming migration {self.id!r} is "
                + ("ending" if self.report else "being recovered")
                + ": ask again shortly"
            )

    def answer_after_end(self, event: p.Message, replies: list[p.Message]) -> None:
        """A message once this migration ended (its record maybe not journaled):
        the finished machine answers it (a repeated commit: how it ended), and
        nothing is carried out any more."""
        step = self.machine.handle(event)
        if step.verdict == "refused":
            replies.append(p.Refused(event.OP, step.reason))
        for action in step.actions:
            if isinstance(action, p.Send | p.Reply):
                replies.append(action.message)

    def handle(self, event: p.Event, replies: list[p.Message] | None = None) -> p.Step:
        """Feed one event; carry out what the machine says."""
        step = self.machine.handle(event)
        if step.verdict == "refused":
            self.log.warning("incoming.refused", received=type(event).__name__, reason=step.reason)
            if isinstance(event, p.Message):
                self._emit(p.Refused(event.OP, step.reason), replies)
        self._execute(step, replies)
        return step

    def _execute(self, step: p.Step, replies: list[p.Message] | None) -> None:
        nursery = self._nursery
        assert nursery is not None
        for action in step.actions:
            if isinstance(action, p.Send | p.Reply):
                self._emit(action.message, replies)
            elif isinstance(action, p.Deliver):
                if isinstance(action.message, p.InitialSent):
                    nursery.start_soon(self._acknowledge, action.message)
                elif isinstance(action.message, p.Budget):
                    self.engine.take_share(Share(action.message.left_s, action.message.settle_s))
            elif isinstance(action, p.RecordOutcome):
                nursery.start_soon(self._finish, action.outcome)
            elif action is p.Do.BEGIN_TRANSFER:
                nursery.start_soon(self._transfer)
            elif action is p.Do.RECORD_VOTE:
                nursery.start_soon(self._record_vote)
            elif action is p.Do.RECORD_COMMIT_HERE:
                self._commit_recorded = trio.Event()
                nursery.start_soon(self._record_commit, self._commit_recorded)
            elif action is p.Do.RUN_DEVICES:
                nursery.start_soon(self._run_devices)
            elif action is p.Do.RESET_DEVICES:
                nursery.start_soon(self._reset_devices)
            elif action is p.Do.RELEASE:
                nursery.start_soon(self._release)
            elif action is p.Do.QUERY and not self._querying:
                self._querying = True
                nursery.start_soon(self._ask_the_source)

    # -- the actions ------------------------------------------------------------------------

    async def _transfer(self) -> None:
        """Every device to RESUMING, then each stream loaded and its device walked to
        its grace state.  A reset (an abort) cancels it and waits for it to end first."""
        self.ctx.phase = "transfer"
        self._transfer_started = True
        try:
            with self._transfer_scope:
                try:
                    await self.engine.begin()
                except DeviceFailure:
                    return  # reported (the arc failed); the source aborts
                assert self.channel is not None
                async with trio.open_nursery() as nursery:
                    for name in self.names:
                        nursery.start_soon(self._load, name, self.channel)
        finally:
            self._transfer_done.set()

    async def _load(self, name: str, channel: DestinationChannel) -> None:
        receiver = channel.receiver(name)
        try:
            last_write_s = await self.engine.receive(name, receiver)
        except DeviceFailure as failure:
            if failure.info.operation == "receive":
                return  # the channel failed: the machine hears of it there
            # Tell the source (which aborts), and drain what is still on its way
            # so that the connection the device shares keeps moving.
            state = await self.driver.probe(DESTINATION, name)
            self._emit(p.LoadFailed(name, state, failure.info))
            # (With a sink, which gives back what follows itself, this waits for the
            # source's abort: closing the stream first would abort before it hears why.)
            with contextlib.suppress(PeerError):
                while await receiver.receive_lent() is not None:
                    pass
            return
        finally:
            with trio.CancelScope(shield=True):
                await receiver.aclose()
        self._start_vote_write()
        self._emit(p.Loaded(name, self.engine.written[name], last_write_s))
        try:
            await self.engine.settle(name, last_write_s)
            self._ready.add(name)
            if len(self._ready) == len(self.names):
                self.engine.allowance.check("vote")
                self.handle(p.AllReady())
        except DeviceFailure:
            return  # the arc report says it failed; the source aborts
        except OverBudget as over:
            # Not begun: the source hears why, in durations, and aborts.
            self._emit(
                p.OverBudget(
                    step=over.step,
                    elapsed_s=over.elapsed_s,
                    need_s=over.need_s,
                    left_s=over.left_s,
                    device=over.device,
                )
            )

    def _start_vote_write(self) -> None:
        """Journal the vote as soon as the first stream ends (every source device has
        stopped): its fsync overlaps the rest of the transfer.  Written early it only
        makes a restart ask the source where it could have rolled back alone."""
        if self._vote_write is not None or self._nursery is None:
            return
        self._vote_write = trio.Event()
        self._nursery.start_soon(self._write_vote, self._vote_write)

    async def _write_vote(self, written: trio.Event) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self.journal.record_phase(self.id, "destination_grace")
        except Exception as exc:
            self._vote_error = str(exc)
        finally:
            written.set()

    async def _record_vote(self) -> None:
        self._start_vote_write()
        assert self._vote_write is not None
        await self._vote_write.wait()
        if self._vote_error is not None:
            self.handle(p.VoteRecordFailed(self._vote_error))
        else:
            self.ctx.phase = "destination_grace"
            self.handle(p.VoteRecorded())

    async def _record_commit(self, recorded: trio.Event) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self.journal.record_commit(self.id)
        except Exception as exc:  # the source's record decides; this one is a copy
            self.log.exception("incoming.commit_record_failed", error=str(exc))
        finally:
            recorded.set()

    async def _run_devices(self) -> None:
        self.ctx.phase = "resume"
        start = trio.current_time()
        completion = await self.engine.commit()
        self._errors.extend(completion.errors)
        self.log.info("incoming.commit", outcome=completion.outcome)
        self.handle(
            p.DevicesRan(completion.outcome, tuple(completion.errors), trio.current_time() - start)
        )

    async def _reset_devices(self) -> None:
        """Stop the transfer, ask the devices where they stand, reset what moved;
        then journal that the reset is done, before the devices' locks are freed: a
        restart must not reset devices another migration may have taken since."""
        self.ctx.phase = "rollback"
        self._transfer_scope.cancel()
        if self._transfer_started:
            await self._transfer_done.wait()
        errors: list[ErrorInfo] = []
        with trio.move_on_after(self.plan.timeouts.rollback_s) as deadline:
            if self.driver.flow is not None:
                await self.driver.settle_pending()
            errors = await self.engine.roll_back()
        if deadline.cancelled_caught:
            message = f"the reset took over {self.plan.timeouts.rollback_s:g} s"
            errors.append(self.ctx.info("phase_timeout", message, side=DESTINATION))
        self._errors.extend(errors)
        if not errors:
            try:
                with trio.CancelScope(shield=True):
                    await self.journal.record_phase(self.id, Phase.ROLLBACK.value)
            except Exception as exc:  # the restart then resets again: harmless, logged
                self.log.exception("incoming.reset_record_failed", error=str(exc))
        self.handle(p.DevicesReset(tuple(errors)))

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        with trio.CancelScope(shield=True):
            await self.engine.close()
        self._release_locks()

    async def _acknowledge(self, message: p.InitialSent) -> None:
        """Switchover acknowledgement: the initial data the source sent is loaded."""
        if message.device not in self.engine.written or self.channel is None:
            return
        if await self.engine.written_at_least(message.device, message.nbytes):
            # What the device is known to have loaded, not what was handed to its
            # load: the source compares it with its latest announcement (initial
            # data that came back is announced again, for more bytes).
            loaded = max(message.nbytes, self.engine.written[message.device])
            with contextlib.suppress(PeerError):
                await self.channel.acknowledge(message.device, loaded)

    async def _ask_the_source(self) -> None:
        """Ask the source daemon for the decision (or the outcome), with backoff."""
        delays = backoff()
        try:
            while self.machine.state in (p.DestinationState.IN_DOUBT, p.DestinationState.ABORTED):
                answer = await self._query()
                if answer is not None:
                    self.handle(answer)
                if self.machine.state not in (
                    p.DestinationState.IN_DOUBT,
                    p.DestinationState.ABORTED,
                ):
                    break
                await trio.sleep(next(delays))
        finally:
            self._querying = False

    async def ask_once(self) -> p.Message | None:
        """One question to the source; its answer, or None if it cannot be asked."""
        return await self._query()

    async def _query(self) -> p.Message | None:
        if not self.source:
            self.log.warning("incoming.no_source_contact", migration=self.id)
            return None
        url = f"{str(self.source['api']).rstrip('/')}/v1/migrations/{self.id}/decision"
        try:
            verify: ssl.SSLContext | bool = True
            if self._ca_file is not None:
                verify = ssl.create_default_context(cafile=str(self._ca_file))
            async with httpx.AsyncClient(
                timeout=self.plan.timeouts.device_call_s / 3, verify=verify
            ) as client:
                response = await client.get(
                    url, headers={"Authorization": f"Bearer {self.source['token']}"}
                )
            if response.status_code != 200:
                self.log.info("incoming.query_refused", status=response.status_code)
                return None
            return decode(response.json())
        except (httpx.HTTPError, ValueError, ProtocolViolation, OSError) as exc:
            self.log.info("incoming.query_failed", error=str(exc))
            return None

    async def _finish(self, outcome: Outcome) -> None:
        if self._commit_recorded is not None:
            await self._commit_recorded.wait()
        await self._release()
        for name in self.names:
            self.engine.digests.setdefault(name, await self.driver.digest(DESTINATION, name))
        self.report = self._build_report(outcome)
        try:
            with trio.CancelScope(shield=True):
                await self.journal.finish(self.id, self.report)
                await self._record_history()
            self.journaled = True
        except Exception as exc:  # journal trouble is logged, never loses the VM
            self.log.exception("incoming.journal_finish_failed", error=str(exc))
        if self.journaled and not self.machine.committed:
            # Not committed, it ended with the outcome the source journaled (its
            # FinalOutcome, or its answer to a query): the source will not ask again,
            # so retention may prune this record.  Failing that, it is only kept.
            try:
                with trio.CancelScope(shield=True):
                    await self.journal.acknowledge(self.id)
            except Exception as exc:
                self.log.warning("incoming.acknowledge_failed", error=str(exc))
        self.log.info("incoming.end", outcome=outcome)
        self.done.set()

    async def end_failed(self, reason: str) -> None:
        """End here as failed after a crash of this migration's own task."""
        if self.done.is_set():
            return
        self.ctx.set_error("internal_error", reason)
        self._nursery = None
        with contextlib.suppress(Exception):
            await self.engine.close()
        self._release_locks()
        self.report = self._build_report("failed")
        try:
            await self.journal.finish(self.id, self.report)
            self.journaled = True
        except Exception as exc:
            self.log.exception("incoming.journal_finish_failed", error=str(exc))
        self.done.set()

    # -- what it says -------------------------------------------------------------------------

    def status(self) -> IncomingStatus:
        flow = self.driver.flow
        devices = {}
        for name in self.names:
            endpoint = flow.endpoint(DESTINATION, name) if flow is not None else None
            caps = self.capabilities.get(name)
            devices[name] = {
                "state": endpoint.state.name if endpoint else "unknown",
                "reset": endpoint.reset if endpoint else False,
                "bytes": self.engine.written[name],
                "ready": name in self._ready,
                "digest": self.engine.digests.get(name),
                "capabilities": capabilities_to_json(caps) if caps else None,
            }
        return IncomingStatus(
            id=self.id,
            vm=self.plan.vm,
            phase=self.machine.state.value,
            committed=self.machine.committed,
            outcome=self.machine.outcome if self.done.is_set() else None,
            in_doubt=self.machine.state is p.DestinationState.IN_DOUBT,
            devices=devices,
            report=self.report,
        )

    def _build_report(self, outcome: Outcome) -> MigrationReport:
        flow = self.driver.flow
        notes = [
            "destination side of a migration between two hosts; the source daemon's "
            "report holds the downtime and the pre-copy figures"
        ]
        notes += [f"{err.device}: {err.message}" for err in self._errors if err.device]
        devices = []
        for name in self.names:
            endpoint = flow.endpoint(DESTINATION, name) if flow is not None else None
            caps = self.capabilities.get(name)
            devices.append(
                DeviceReport(
                    name=name,
                    backend=self.driver.device(DESTINATION, name).backend,
                    source_state="unknown",
                    destination_state=endpoint.state.name if endpoint else "unknown",
                    destination_reset=endpoint.reset if endpoint else False,
                    bytes_precopy=0,
                    bytes_stopcopy=self.engine.written[name],
                    destination_digest=self.engine.digests.get(name),
                    destination_capabilities=capabilities_to_json(caps) if caps else None,
                )
            )
        error = self.ctx.error or (self._errors[0] if self._errors else None)
        return MigrationReport(
            id=self.id,
            vm=self.plan.vm,
            outcome=outcome,
            duration_ms=round((time.monotonic() - self._started) * 1000, 3),
            committed=self.machine.committed,
            devices=devices,
            error=error if outcome != "succeeded" else None,
            notes=notes,
            share=self.engine.allowance.as_report(),
        )


# -- the REST shapes ------------------------------------------------------------------------
