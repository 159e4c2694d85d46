"""The destination daemon's incoming migrations: prepare, status, messages
over REST, recovery on start, and settling by an operator.

:class:`IncomingRegistry` is the daemon's set of :class:`IncomingMigration`
(see :mod:`orchestrator.peer.server`): a prepare validates the plan against
this daemon's backends, agrees on the protocol version, locks, opens, checks
and journals the devices, then serves the migration until it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import structlog
import trio

from orchestrator.engine import DeviceFailure
from orchestrator.errors import PlanError, Problem, ProtocolViolation
from orchestrator.flow import Phase
from orchestrator.peer import protocol as p
from orchestrator.peer.incoming_models import (
    IncomingConflict,
    IncomingNotFound,
    IncomingReady,
    IncomingReplies,
    IncomingRequest,
    IncomingStatus,
    IncomingUnavailable,
    ProtocolMismatch,
)
from orchestrator.peer.messages import PROTOCOL_VERSIONS, decode, encode, negotiate_version
from orchestrator.peer.server import IncomingMigration, capabilities_to_json
from orchestrator.plan import parse_plan
from orchestrator.resolve import resolve
from orchestrator.transport import ChannelListener, DestinationChannel, new_secret

__all__ = ["IncomingRegistry"]

log = structlog.get_logger("orchestrator.peer.registry")


class IncomingRegistry:
    """The incoming migrations of one daemon.

    ``lock`` and ``unlock`` are the service's device locks, so that a device
    is never part of two migrations, incoming or outgoing.
    """

    def __init__(
        self,
        *,
        journal: Any,
        backends: Any,
        listener: ChannelListener | None,
        advertise: str | None,
        lock: Callable[[list[str], str], None],
        unlock: Callable[[list[str], str], None],
        ca_file: Path | None = None,
        admit: Callable[[], None] = lambda: None,
    ) -> None:
        self.journal = journal
        #: The CA the sources' API certificates are checked against ([tls] ca_file).
        self.ca_file = ca_file
        self.backends = backends
        self.listener = listener
        self.advertise = advertise
        self._lock = lock
        self._unlock = unlock
        #: Raises (TooManyMigrations) when this host may take no more migrations.
        self._admit = admit
        self.migrations: dict[str, IncomingMigration] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover_all()
            task_status.started()
            await trio.sleep_forever()

    def in_doubt(self) -> int:
        return sum(
            1 for m in self.migrations.values() if m.machine.state is p.DestinationState.IN_DOUBT
        )

    async def prepare(self, request: IncomingRequest) -> IncomingReady:
        """Validate, agree a version, lock, open, journal; PlanError, DeviceBusy..."""
        if self.listener is None or self.listener.address is None or self._nursery is None:
            raise IncomingUnavailable(
                "this daemon has no data channel ([data] listen): it cannot be the "
                "destination of a migration from another host"
            )
        try:
            version = negotiate_version(request.protocol, PROTOCOL_VERSIONS)
        except ProtocolViolation as exc:
            raise ProtocolMismatch(str(exc)) from None
        if request.source is None:
            raise PlanError(
                [
                    Problem(
                        "source",
                        "no way to reach the source daemon: this side could never ask it "
                        "for the decision if the two lost each other",
                    )
                ]
            )
        if request.migration_id in self.migrations:
            raise IncomingConflict(f"migration {request.migration_id!r} is already prepared here")
        if self.journal is not None and await self.journal.get(request.migration_id):
            raise IncomingConflict(f"migration {request.migration_id!r} is known here already")
        plan = parse_plan(request.plan)
        if plan.destination is not None:
            raise PlanError(
                [Problem("plan.destination", "a plan sent to its destination has no destination")]
            )
        resolved = resolve(plan, self.backends)
        keys = resolved.device_keys()
        self._admit()
        self._lock(keys, request.migration_id)
        source = request.source.model_dump()
        migration = IncomingMigration(
            resolved,
            request.migration_id,
            self.journal,
            source,
            release=lambda: self._unlock(keys, request.migration_id),
            ca_file=self.ca_file,
        )
        try:
            caps = await migration.open()
            if self.journal is not None:
                await self.journal.create(
                    request.migration_id, plan, role="destination", peer=source
                )
            secret = new_secret()
            channel = self.listener.expect(request.migration_id, secret, migration.names)
        except BaseException:
            self._unlock(keys, request.migration_id)
            raise
        self.migrations[request.migration_id] = migration
        await self._nursery.start(self._serve, migration, channel, None)
        log.info("incoming.prepared", migration=request.migration_id, devices=len(caps))
        return IncomingReady(
            migration_id=request.migration_id,
            protocol=version,
            data={
                "host": self.advertise,
                "port": self.listener.address[1],
                "tls": self.listener.tls is not None,
            },
            secret=secret.hex(),
            devices={
                name: {
                    "capabilities": capabilities_to_json(c),
                    "state": "RUNNING",
                    "arcs_ms": migration.arcs_ms(name),
                    "history_arcs_ms": migration.arcs_ms(name, history=True),
                    "rate_bytes_s": migration.declared_rate_bytes_s(name),
                    **migration.identity_json(name, version),
                }
                for name, c in caps.items()
            },
        )

    async def _serve(
        self,
        migration: IncomingMigration,
        channel: DestinationChannel | None,
        first: p.Step | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await migration.run(channel, first, task_status=task_status)
        except Exception as exc:
            # A bug: end it as failed (an operator is needed), its devices freed,
            # rather than leave a migration no message can reach any more.
            log.exception("incoming.crashed", migration=migration.id)
            with trio.CancelScope(shield=True):
                await migration.end_failed(f"{type(exc).__name__}: {exc}")
        finally:
            if self.listener is not None:
                self.listener.forget(migration.id)
            if migration.journaled:
                # Status and messages are answered from the journal now.
                self.migrations.pop(migration.id, None)

    async def status(self, migration_id: str) -> IncomingStatus:
        """From memory while this daemon runs it, else from the journal."""
        migration = self.migrations.get(migration_id)
        if migration is not None:
            return migration.status()
        record = await self.journal.get(migration_id) if self.journal is not None else None
        if record is None or record.role != "destination":
            raise IncomingNotFound(f"no incoming migration {migration_id!r}")
        devices: dict[str, dict[str, Any]] = {}
        if record.report is not None:
            for d in record.report.devices:
                devices[d.name] = {
                    "state": d.destination_state,
                    "reset": d.destination_reset,
                    "bytes": d.bytes_stopcopy,
                    "digest": d.destination_digest,
                    "capabilities": d.destination_capabilities,
                }
        return IncomingStatus(
            id=record.id,
            vm=record.vm,
            phase="done" if record.outcome is not None else record.phase,
            committed=record.committed,
            outcome=record.outcome,
            devices=devices,
            report=record.report,
        )

    async def deliver(self, migration_id: str, data: dict[str, Any]) -> IncomingReplies:
        """A message from the source over REST; the replies it made."""
        try:
            message = decode(data)
        except ProtocolViolation as exc:
            raise PlanError([Problem("body", str(exc))]) from None
        if message.FROM != "source" or isinstance(message, p.DecisionAnswer):
            # A decision answer only ever comes as the reply to this daemon's own
            # question; an operator decides with settle, which asks the source first.
            raise PlanError(
                [Problem("body.op", f"{message.OP!r} is not a message the source sends here")]
            )
        replies: list[p.Message] = []
        migration = self.migrations.get(migration_id)
        if migration is not None:
            if migration.done.is_set():
                migration.answer_after_end(message, replies)
            else:
                migration.require_serving()
                migration.handle(message, replies)
            return IncomingReplies(status=migration.status(), replies=[encode(r) for r in replies])
        # Ended (and journaled): a machine restarted from the record answers.
        status = await self.status(migration_id)
        machine, _ = p.DestinationMachine.restarted(
            voted=True, committed=status.committed, outcome=status.outcome
        )
        step = machine.handle(message)
        for action in step.actions:
            if isinstance(action, p.Send):
                replies.append(action.message)
        if step.verdict == "refused":
            replies.append(p.Refused(message.OP, step.reason))
        return IncomingReplies(status=status, replies=[encode(r) for r in replies])

    async def settle(self, migration_id: str, decision: str, *, force: bool) -> IncomingStatus:
        """An operator decides for a migration in doubt here (voted, no decision, the
        source out of reach).  Refused (409) while the source can still be asked,
        unless ``force``: its own answer is the one that counts."""
        migration = self.migrations.get(migration_id)
        if migration is None or migration.machine.state is not p.DestinationState.IN_DOUBT:
            await self.status(migration_id)  # IncomingNotFound if unknown
            raise IncomingConflict(
                f"migration {migration_id!r} is not in doubt here: nothing to settle"
            )
        if not force:
            answer = await migration.ask_once()
            if answer is not None:
                raise IncomingConflict(
                    f"the source daemon answers ({answer.OP}): migration {migration_id!r} "
                    "settles by itself (settle --force to overrule it)"
                )
        migration.require_serving()
        migration.log.warning("incoming.settled", decision=decision, force=force)
        verdict: Literal["commit", "abort"] = "commit" if decision == "commit" else "abort"
        migration.handle(p.DecisionAnswer(verdict))
        return migration.status()

    async def _recover_all(self) -> None:
        if self.journal is None:
            return
        for record in await self.journal.unfinished():
            if record.role == "destination":
                await self._recover_one(record)

    async def _recover_one(self, record: Any) -> None:
        """A migration this daemon received when it died: the machine restarts from the
        journal (complete if the commit is recorded, ask the source if it voted, ask
        for the outcome if its devices were reset already, else roll back) and its
        first steps run in the background: readiness never waits on the source."""
        resolved = resolve(record.plan, self.backends)
        keys = resolved.device_keys()
        reset = record.phase == Phase.ROLLBACK.value and not record.committed
        machine, restart = p.DestinationMachine.restarted(
            voted=record.phase == Phase.DESTINATION_GRACE.value or record.committed,
            committed=record.committed,
            outcome=None,
            reset=reset,
        )
        if not reset:
            self._lock(keys, record.id)
        migration = IncomingMigration(
            resolved,
            record.id,
            self.journal,
            record.peer,
            release=(lambda: None) if reset else (lambda: self._unlock(keys, record.id)),
            ca_file=self.ca_file,
        )
        migration.machine = machine
        self.migrations[record.id] = migration
        log.warning("incoming.recover", migration=record.id, state=machine.state.value)
        first: p.Step | None = restart
        if not reset:
            try:
                with trio.fail_after(record.plan.timeouts.rollback_s):
                    await migration.recover()
            except (ProtocolViolation, trio.TooSlowError, DeviceFailure) as exc:
                # Its devices cannot be driven: they stay locked, the record
                # unfinished, for an operator (``orchestrator settle``).
                log.warning(
                    "incoming.recover_failed",
                    migration=record.id,
                    error=str(exc),
                    hint="settle it once its devices answer: orchestrator settle --force",
                )
                first = None
        assert self._nursery is not None
        await self._nursery.start(self._serve, migration, None, first)
