"""The daemon's migration service: every migration of this host, in one nursery.

The REST layer (``orchestrator.api``) is a thin shell over this class; the
migration logic itself stays in the flow and the runner.  The service owns:

* the migrations in flight, each a ``runner.Migration`` running as a task in
  the service's nursery;
* the device locks: a device belongs to at most one unfinished migration, so
  a second plan naming it is refused (409).  A device is locked by the keys
  its backend gives (``Backend.device_keys``): its backend and plan name for
  a simulated device, its host-wide identity for a real one (a VFIO device's
  sysfs directory or handle), so that two plans naming one real device under
  two names are kept apart too.  A device a VMM handed over (its handle,
  ``orchestrator.handover``) is also claimed in the handle registry: its VMM
  cannot take it back until that migration ends;
* the journal: every migration is recorded before it starts, its commit
  decision is on disk before any destination device runs, its events and
  phases follow in order, and its report when it ends.  Phase changes and
  device transitions are written by a background writer in the order they
  happened, not awaited on the hot path: only the commit decision decides
  what recovery does, and an fsync per phase inside the downtime window
  would lengthen it.  While any migration is inside its downtime window the
  writer holds back (at most ``TRACE_HOLD_MAX_S``): its transactions take
  the GIL and the disk from the switchover, whose every step is on the
  critical path.  A crash meanwhile loses the trace of that window, never a
  decision: the commit is recorded at once, whatever the writer does;
* live control: an operator's new limits or forced switchover go to the
  running migration (``Migration.control``, ``force_switchover``), which says
  whether its phase accepts them; each accepted change is on disk
  (``Journal.record_control``) before the answer, so the record shows the
  limits in force, restarts included;
* recovery: on start, every migration the journal holds unfinished (the
  daemon died under it) is rolled back if its commit decision was never
  recorded, or completed on the destination if it was, before the service
  reports ready;
* graceful shutdown: new migrations are refused, running ones get a grace
  period to finish, the rest are rolled back.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import trio
from pydantic import BaseModel, Field

from orchestrator.backends import Backend
from orchestrator.compat import CompatSettings
from orchestrator.control import Control, ControlRefused, ControlRequest, initial
from orchestrator.engine import DeviceDriver, LeftInDoubt, Migration, TraceEvent
from orchestrator.errors import OrchestratorError, PlanError, Problem
from orchestrator.handover import HandleRegistry
from orchestrator.journal import Journal, JournalEvent, MigrationRecord
from orchestrator.metrics import Metrics
from orchestrator.peer.messages import DecisionAnswer
from orchestrator.peer.registry import IncomingRegistry
from orchestrator.peer.remote import RemoteDestination, SourceContact, Unsettled
from orchestrator.plan import Plan
from orchestrator.report import MigrationReport, Outcome
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.transport import RateLimiter
from orchestrator.transport.channel import ChannelListener, TlsIdentity

log = structlog.get_logger("orchestrator.service")

#: The longest the journal writer holds the trace back for migrations inside
#: their downtime window.  bench/downtime_netem.py measured the downtime 7-10%
#: shorter with the writer held (1, 8 and 64 devices, two rounds alternated).
TRACE_HOLD_MAX_S = 1.0


class MigrationNotFound(OrchestratorError):
    status_hint = 404


class DeviceBusy(OrchestratorError):
    """A device of the plan belongs to another unfinished migration."""

    status_hint = 409


class PastCommitPoint(OrchestratorError):
    """Too late to cancel: the destination has won, or the migration is over."""

    status_hint = 409


class ShuttingDown(OrchestratorError):
    status_hint = 503


class Progress(BaseModel):
    """Live progress of a migration in flight."""

    precopy_round: int = Field(description="The pre-copy round under way, or the rounds done.")
    bytes_sent: dict[str, int] = Field(description="Device name -> bytes sent so far.")
    remaining_bytes: int | None = Field(
        description="Estimated bytes still to send (once every device has reported)."
    )
    expected_downtime_ms: float | None = Field(
        description="Downtime the stop-copy would take at the measured bandwidth."
    )


class MigrationStatus(BaseModel):
    """A migration as the API shows it: its report when it has ended, progress while it runs."""

    id: str
    vm: str
    phase: str
    outcome: Outcome | None = Field(description="None while the migration runs.")
    committed: bool
    in_doubt: bool = Field(
        False,
        description="Committed, and the destination's daemon cannot be reached to say how "
        "it ended: the outcome waits on it (or on an operator: orchestrator settle).",
    )
    created_at: float = Field(description="Unix time the migration was accepted.")
    progress: Progress | None = None
    control: Control | None = Field(
        None,
        description="The downtime limit and bandwidth cap in force, and every change an "
        "operator made (PATCH /v1/migrations/{id}, POST .../switchover).",
    )
    report: MigrationReport | None = Field(
        None, description="The same report as `orchestrator run --json`, once it has ended."
    )


class DeviceStatus(BaseModel):
    device: str = Field(
        description="The device's lock key: its backend and name (simulated), or its backend "
        "and host-wide identity (vfio: its sysfs path, or handle:<vm>/<device>)."
    )
    backend: str
    name: str
    migration: str | None = Field(description="The unfinished migration holding it, if any.")


def device_keys(resolved: ResolvedPlan) -> list[str]:
    """How the service names the devices of a plan, for locking (``Backend.device_keys``)."""
    return resolved.device_keys()


#: Queued after a migration's last event: the writer then journals its report.
_FINISH = object()


@dataclass
class _Entry:
    """A migration this service runs (or recovers)."""

    migration: Migration
    created_at: float
    keys: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    # Set once the journal holds the report.
    journaled: trio.Event = field(default_factory=trio.Event)
    # Set and replaced whenever new events reach the journal: wakes followers.
    changed: trio.Event = field(default_factory=trio.Event)
    # One control change at a time: each is journaled in the order it applied.
    control_lock: trio.Lock = field(default_factory=trio.Lock)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class MigrationService:
    """Runs migrations for the API; see the module docstring."""

    def __init__(
        self,
        journal: Journal,
        metrics: Metrics | None = None,
        backends: Mapping[str, Backend] | None = None,
        handles: HandleRegistry | None = None,
        listener: ChannelListener | None = None,
        advertise: str | None = None,
        decision_key: bytes | None = None,
        tls: TlsIdentity | None = None,
        compat: CompatSettings | None = None,
    ) -> None:
        self.journal = journal
        #: The ``[compat]`` policy every migration it coordinates compares identities by.
        self.compat = compat or CompatSettings()
        #: This host's TLS identity for migration traffic (``[tls]``), if any.
        self.tls = tls
        self.metrics = metrics
        #: The backends plans resolve against (the daemon's own: persistent
        #: simulated devices under its state directory).
        self.backends = backends
        #: The devices VMMs handed over, which plans name by handle.
        self.handles = handles
        self.ready = False
        self.accepting = True
        #: The URL other hosts' daemons reach this daemon's API on (``[api] advertise``,
        #: or the TCP listener's own address); None: no migration to another host.
        self.source_api: str | None = None
        # Each migration's decision credential is derived from it: nothing to store.
        self._decision_key = decision_key or secrets.token_bytes(32)
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, str] = {}
        self._known: dict[str, DeviceStatus] = {}
        self._nursery: trio.Nursery | None = None
        self._writer_done = trio.Event()
        #: Set when a journal write failed: the daemon reports itself not ready.
        self.journal_failure: str | None = None
        self._submitting = 0
        #: Idempotency keys being submitted now: a retry with one waits for it.
        self._submitting_keys: dict[str, trio.Event] = {}
        self._submits_idle = trio.Event()
        #: Migrations other hosts' daemons send here (this daemon is their destination).
        self.incoming = IncomingRegistry(
            journal=journal,
            backends=backends,
            listener=listener,
            advertise=advertise,
            lock=self._lock_keys,
            unlock=self._unlock,
            ca_file=tls.ca_file if tls is not None else None,
        )
        if metrics is not None:
            metrics.count_in_doubt = self.in_doubt
        self._journal_send, self._journal_receive = trio.open_memory_channel[
            tuple[_Entry, TraceEvent | object]
        ](math.inf)

    # -- life cycle ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[MigrationService] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Recover what the journal holds unfinished, report ready, then serve
        until cancelled.  Use with ``await nursery.start(service.run)``."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._journal_writer)
            await self._recover_all()
            await nursery.start(self.incoming.run)
            self.ready = True
            task_status.started(self)
            await trio.sleep_forever()

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new migrations, let running ones finish for ``grace_s``, roll back the rest."""
        self.accepting = False
        self.ready = False
        # A submit already past its check finishes starting its migration
        # first, so that the migration is counted below.
        while self._submitting:
            await self._submits_idle.wait()
        active = [e for e in self._entries.values() if not e.done.is_set()]
        log.info("service.shutdown", active=len(active), grace_s=grace_s)
        with trio.move_on_after(grace_s):
            for entry in active:
                await entry.done.wait()
        for entry in active:
            if entry.done.is_set():
                continue
            if entry.migration.cancel("the orchestrator is shutting down"):
                log.warning("service.shutdown_rollback", migration=entry.migration.id)
            else:
                # Committed: it completes by itself, or (its destination another host's
                # daemon, out of reach) stops waiting: the restart finishes it.
                entry.migration.abandon()
        for entry in active:
            await entry.done.wait()
        # Nothing runs any more: let the writer flush what is queued, and end.
        self._journal_send.close()
        await self._writer_done.wait()

    # -- requests ----------------------------------------------------------------

    async def submit(
        self, plan: Plan, idempotency_key: str | None = None
    ) -> tuple[MigrationStatus, bool]:
        """Start a migration; returns its status and whether it is new.

        A repeated ``idempotency_key`` returns the first migration instead of
        starting another.  Raises PlanError (the plan cannot succeed),
        DeviceBusy or ShuttingDown; nothing is recorded then.
        """
        if not self.accepting or self._nursery is None:
            raise ShuttingDown("the orchestrator is shutting down and accepts no new migration")
        self._submitting += 1
        try:
            return await self._submit(plan, idempotency_key)
        finally:
            self._submitting -= 1
            if not self._submitting:
                self._submits_idle.set()
                self._submits_idle = trio.Event()

    async def _submit(
        self, plan: Plan, idempotency_key: str | None
    ) -> tuple[MigrationStatus, bool]:
        if idempotency_key is None:
            return await self._submit_new(plan, None)
        # Retries with one key, concurrent ones included, get the first migration:
        # one submission of a key at a time, the others wait for it, then look.
        while (pending := self._submitting_keys.get(idempotency_key)) is not None:
            await pending.wait()
        done = self._submitting_keys[idempotency_key] = trio.Event()
        try:
            first = await self.journal.find_by_idempotency_key(idempotency_key)
            if first is not None:
                return await self.status(first.id), False
            return await self._submit_new(plan, idempotency_key)
        finally:
            del self._submitting_keys[idempotency_key]
            done.set()

    async def _submit_new(
        self, plan: Plan, idempotency_key: str | None
    ) -> tuple[MigrationStatus, bool]:
        if plan.destination is not None and self.source_api is None:
            raise PlanError(
                [
                    Problem(
                        "destination",
                        "this daemon has no TCP API listener the destination daemon could ask "
                        "for the decision when the two lose each other: set [api] tcp (and "
                        "[api] advertise where its address is not the one other hosts reach)",
                    )
                ]
            )
        resolved = resolve(plan, self.backends, self.handles)
        keys = device_keys(resolved)
        self._check_free(keys)
        migration_id = uuid.uuid4().hex
        if self.handles is not None:
            self.handles.claim(migration_id, resolved.handles())  # HandleBusy: nothing taken
        for key in keys:
            self._locks[key] = migration_id
        try:
            recorded_id, created = await self.journal.create(migration_id, plan, idempotency_key)
        except BaseException:
            self._unlock(keys, migration_id)
            raise
        if not created:
            # Another request with the same key won the race.
            self._unlock(keys, migration_id)
            return await self.status(recorded_id), False
        entry = self._start(resolved, migration_id, keys)
        log.info("service.accepted", migration=migration_id, vm=plan.vm, devices=len(keys))
        return self._status_of(entry), True

    async def status(self, migration_id: str) -> MigrationStatus:
        entry = self._entries.get(migration_id)
        if entry is not None and not entry.done.is_set():
            return self._status_of(entry)
        record = await self.journal.get(migration_id)
        if record is None:
            raise MigrationNotFound(f"no migration {migration_id!r}")
        return _status_of_record(record)

    async def list(
        self, outcome: Outcome | None = None, phase: str | None = None, limit: int = 1000
    ) -> builtins.list[MigrationStatus]:
        """Migrations, newest first, at most ``limit`` of them."""
        records = await self.journal.list(outcome=outcome, phase=phase, limit=limit)
        out = []
        for record in records:
            entry = self._entries.get(record.id)
            live = entry is not None and not entry.done.is_set()
            status = self._status_of(entry) if live and entry else _status_of_record(record)
            if phase is None or status.phase == phase:
                out.append(status)
        return out

    async def cancel(self, migration_id: str) -> MigrationStatus:
        """Roll a migration back; PastCommitPoint once the destination has won or it ended."""
        entry = self._entries.get(migration_id)
        if entry is None or entry.done.is_set():
            status = await self.status(migration_id)  # MigrationNotFound if unknown
            raise PastCommitPoint(
                f"migration {migration_id!r} has already ended ({status.outcome})"
            )
        if not entry.migration.cancel("cancelled through the API"):
            raise PastCommitPoint(
                f"migration {migration_id!r} is past its commit point: the destination completes"
            )
        return self._status_of(entry)

    async def control(self, migration_id: str, request: ControlRequest) -> MigrationStatus:
        """Change a migration's downtime limit and bandwidth cap, before its pre-copy
        decision; ControlRefused after it (or for a migration not run here)."""
        return await self._control(migration_id, lambda m: m.control(request, at=time.time()))

    async def force_switchover(self, migration_id: str) -> MigrationStatus:
        """Make a migration's pre-copy decision a switchover now (in prepare: at its
        first decision); the same answer when asked again while it goes on."""
        return await self._control(migration_id, lambda m: m.force_switchover(at=time.time()))

    async def _control(
        self, migration_id: str, change: Callable[[Migration], Control]
    ) -> MigrationStatus:
        entry = self._entries.get(migration_id)
        if entry is None or entry.done.is_set():
            status = await self.status(migration_id)  # MigrationNotFound if unknown
            record = await self.journal.get(migration_id)
            if record is not None and record.role == "destination":
                source = (record.peer or {}).get("api", "its source daemon")
                raise ControlRefused(
                    f"migration {migration_id!r} comes from another host, whose daemon keeps "
                    f"its pre-copy decision: ask the source ({source})"
                )
            raise ControlRefused(f"migration {migration_id!r} has ended ({status.outcome})")
        async with entry.control_lock:
            before = entry.migration.live.state
            after = change(entry.migration)  # ControlRefused: nothing changed
            if after is not before:
                # Applied at once (a round may decide any moment), on disk before the
                # answer; a journal that fails makes the daemon unready, as for events.
                try:
                    with trio.CancelScope(shield=True):
                        await self.journal.record_control(migration_id, after)
                except Exception as exc:
                    self.ready = False
                    self.journal_failure = str(exc)
                    raise
                entry.notify()
                log.info("service.control", migration=migration_id, change=after.last_event)
        return self._status_of(entry)

    async def follow(self, migration_id: str, after_seq: int = 0) -> AsyncIterator[JournalEvent]:
        """The journaled events of a migration after ``after_seq``, then live ones until it ends."""
        async for event in self.follow_alive(migration_id, after_seq):
            assert event is not None  # no quiet ticks without ``quiet_s``
            yield event

    async def follow_alive(
        self, migration_id: str, after_seq: int = 0, quiet_s: float | None = None
    ) -> AsyncIterator[JournalEvent | None]:
        """As ``follow``, and None after each ``quiet_s`` without an event: what an
        event stream sends as a keep-alive through a long quiet pre-copy."""
        await self.status(migration_id)  # MigrationNotFound if unknown
        seq = after_seq
        while True:
            entry = self._entries.get(migration_id)
            changed = entry.changed if entry is not None else None
            finished = entry is None or entry.done.is_set()
            for event in await self.journal.events(migration_id, after_seq=seq):
                seq = event.seq
                yield event
            if finished:
                return
            assert changed is not None
            with trio.move_on_after(math.inf if quiet_s is None else quiet_s) as quiet:
                await changed.wait()
            if quiet.cancelled_caught:
                yield None

    def devices(self) -> builtins.list[DeviceStatus]:
        return [
            status.model_copy(update={"migration": self._locks.get(key)})
            for key, status in sorted(self._known.items())
        ]

    # -- internals ---------------------------------------------------------------

    def _check_free(self, keys: builtins.list[str]) -> None:
        busy = [(key, self._locks[key]) for key in keys if key in self._locks]
        if busy:
            held = ", ".join(f"{key} (migration {mid})" for key, mid in busy)
            raise DeviceBusy(f"devices already part of an active migration: {held}")

    def _lock_keys(self, keys: builtins.list[str], migration_id: str) -> None:
        self._check_free(keys)
        for key in keys:
            self._locks[key] = migration_id

    def _unlock(self, keys: builtins.list[str], migration_id: str) -> None:
        for key in keys:
            if self._locks.get(key) == migration_id:
                del self._locks[key]
        if self.handles is not None:
            self.handles.release(migration_id)

    def decision_token(self, migration_id: str) -> str:
        """The credential that answers for one migration's decision, and nothing else."""
        digest = hmac.new(self._decision_key, migration_id.encode(), hashlib.sha256)
        return digest.hexdigest()

    def _migration(
        self,
        resolved: ResolvedPlan,
        migration_id: str,
        *,
        recovering: bool = False,
        committed: bool = False,
    ) -> Migration:
        spec = resolved.plan.destination
        if spec is None:
            return Migration(
                resolved, migration_id=migration_id, journal=self.journal, compat=self.compat
            )
        contact = SourceContact(self.source_api or "", self.decision_token(migration_id))

        def remote(driver: DeviceDriver, limiter: RateLimiter | None) -> RemoteDestination:
            assert spec is not None
            return RemoteDestination(
                spec,
                resolved.plan,
                migration_id,
                driver,
                limiter,
                contact,
                recovering=recovering,
                committed=committed,
                tls=self.tls,
            )

        return Migration(
            resolved,
            migration_id=migration_id,
            journal=self.journal,
            destination=remote,
            compat=self.compat,
        )

    async def decision(self, migration_id: str, token: str) -> DecisionAnswer | None:
        """The destination daemon asks for a migration's decision (None: wrong token).

        Answered from the migration while it runs, else from the journal; an id
        the journal does not know was never committed (it journals every
        migration before its first call to the destination): abort.
        """
        if not hmac.compare_digest(token, self.decision_token(migration_id)):
            return None
        entry = self._entries.get(migration_id)
        if entry is not None and not entry.done.is_set():
            destination = entry.migration.destination
            if isinstance(destination, RemoteDestination):
                return destination.answer_query()
        record = await self.journal.get(migration_id)
        if record is None or record.role != "source":
            return DecisionAnswer("abort")
        # Not running here and not committed: it can never be committed any more
        # (its recovery aborts it), so the answer is abort (presumed abort).
        decision: Literal["commit", "abort"] = "commit" if record.committed else "abort"
        return DecisionAnswer(decision, record.outcome)

    async def settle(self, migration_id: str, outcome: Outcome, *, force: bool) -> MigrationStatus:
        """An operator says how the destination of a migration in doubt ended."""
        entry = self._entries.get(migration_id)
        destination = entry.migration.destination if entry is not None else None
        if entry is None or entry.done.is_set() or not isinstance(destination, RemoteDestination):
            await self.status(migration_id)  # MigrationNotFound if unknown
            raise Unsettled(f"migration {migration_id!r} is not in doubt: nothing to settle")
        await destination.settle(outcome, force=force)
        return self._status_of(entry)

    def in_doubt(self) -> int:
        """Migrations whose end waits on a peer that cannot be reached."""
        outgoing = sum(1 for e in self._entries.values() if e.migration.destination.in_doubt)
        return outgoing + self.incoming.in_doubt()

    def _start(self, resolved: ResolvedPlan, migration_id: str, keys: builtins.list[str]) -> _Entry:
        assert self._nursery is not None
        migration = self._migration(resolved, migration_id)
        entry = self._register(migration, resolved, time.time(), keys)
        self._nursery.start_soon(self._run_one, entry)
        return entry

    def _register(
        self,
        migration: Migration,
        resolved: ResolvedPlan,
        created_at: float,
        keys: builtins.list[str],
    ) -> _Entry:
        """Track a migration: its entry, its devices, its events on their way to the journal."""
        entry = _Entry(migration=migration, created_at=created_at, keys=keys)
        self._entries[migration.id] = entry
        for device in resolved.devices:
            for key in device.keys:
                self._known[key] = DeviceStatus(
                    device=key, backend=device.backend.name, name=device.name, migration=None
                )
        migration.observers.append(lambda event: self._journal_send.send_nowait((entry, event)))
        return entry

    async def _run_one(self, entry: _Entry) -> None:
        migration = entry.migration
        try:
            if self.metrics is not None:
                with self.metrics.track(migration):
                    await migration.run()
            else:
                await migration.run()
        except LeftInDoubt as exc:
            log.warning("service.left_in_doubt", migration=migration.id, reason=str(exc))
        except Exception:
            # A bug in one migration (its report says internal_error) must not
            # cancel every other migration of the host.
            log.exception("service.migration_crashed", migration=migration.id)
        finally:
            await self._finish(entry)

    async def _finish(self, entry: _Entry) -> None:
        """Journal the report after every event of the migration, then free its devices."""
        migration = entry.migration
        with trio.CancelScope(shield=True):
            if migration.report is not None:
                self._journal_send.send_nowait((entry, _FINISH))
                await entry.journaled.wait()
            self._unlock(entry.keys, migration.id)
            entry.done.set()
            entry.notify()
            # The journal holds it from now on; a long-running daemon must not
            # keep every migration (and its trace) it ever ran in memory.
            if self._entries.get(migration.id) is entry:
                del self._entries[migration.id]
            outcome = migration.report.outcome if migration.report else None
            log.info("service.finished", migration=migration.id, outcome=outcome)

    async def _journal_writer(self) -> None:
        """Writes each migration's events, then its report, to the journal, in order."""
        try:
            async for item in self._journal_receive:
                await self._hold_during_downtime()
                items = [item]
                # Whatever is queued already goes in the same pass, in batches.
                while True:
                    try:
                        items.append(self._journal_receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._write_in_order_or_log(items)
        finally:
            self._writer_done.set()

    async def _hold_during_downtime(self) -> None:
        """Wait until no migration is inside its downtime window, or ``TRACE_HOLD_MAX_S``."""
        with trio.move_on_after(TRACE_HOLD_MAX_S):
            while True:
                for entry in list(self._entries.values()):
                    await entry.migration.downtime_window_closed()
                # Each wait is a checkpoint, in which another migration's window
                # may have opened (its first events already queued): the writer
                # takes the queue only once none is open, with no await between.
                if not any(e.migration.in_downtime_window for e in self._entries.values()):
                    return

    async def _write_in_order_or_log(
        self, items: builtins.list[tuple[_Entry, TraceEvent | object]]
    ) -> None:
        """Like ``_write_in_order``; a journal that fails makes the daemon unready
        (the operator must see it) but never stalls the migrations waiting on it."""
        try:
            await self._write_in_order(items)
        except Exception as exc:
            self.ready = False
            self.journal_failure = str(exc)
            log.exception("service.journal_failed")
            for entry, item in items:
                if item is _FINISH:
                    entry.journaled.set()

    async def _write_in_order(
        self, items: builtins.list[tuple[_Entry, TraceEvent | object]]
    ) -> None:
        batch: builtins.list[TraceEvent] = []
        batch_entry: _Entry | None = None
        with trio.CancelScope(shield=True):
            for entry, item in items:
                if batch and (entry is not batch_entry or item is _FINISH):
                    assert batch_entry is not None
                    await self._write_events(batch_entry, batch)
                    batch = []
                if item is _FINISH:
                    report = entry.migration.report
                    assert report is not None
                    await self.journal.finish(entry.migration.id, report)
                    entry.journaled.set()
                else:
                    assert isinstance(item, TraceEvent)
                    batch_entry = entry
                    batch.append(item)
            if batch:
                assert batch_entry is not None
                await self._write_events(batch_entry, batch)

    async def _write_events(self, entry: _Entry, events: builtins.list[TraceEvent]) -> None:
        await self.journal.record_events(entry.migration.id, events)
        entry.notify()

    async def _recover_all(self) -> None:
        # Incoming migrations (this daemon was their destination) recover in
        # the incoming registry.
        unfinished = [r for r in await self.journal.unfinished() if r.role == "source"]
        if not unfinished:
            return
        log.warning("service.recovering", migrations=len(unfinished))
        # One after another: two unfinished migrations may name the same
        # device, which must never be driven by both at once.
        for record in unfinished:
            await self._recover_one(record)

    async def _recover_one(self, record: MigrationRecord) -> None:
        """Recover one migration; return once this host did what it can alone (its own
        devices settled): the rest (a peer to reach) goes on in the background."""
        resolved = resolve(record.plan, self.backends)
        keys = device_keys(resolved)
        for key in keys:
            self._locks[key] = record.id
        migration = self._migration(
            resolved, record.id, recovering=True, committed=record.committed
        )
        if record.control is not None:
            # The limits it ran under, for its report: an operator changed them.
            migration.live.apply(record.control)
        entry = self._register(migration, resolved, record.created_at, keys)
        assert self._nursery is not None
        await self._nursery.start(self._recover_task, entry, record)

    async def _recover_task(
        self,
        entry: _Entry,
        record: MigrationRecord,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        migration = entry.migration
        report = None
        try:
            report = await migration.recover(
                committed=record.committed,
                interrupted_phase=record.phase,
                task_status=task_status,
            )
        except LeftInDoubt as exc:
            log.warning("service.left_in_doubt", migration=migration.id, reason=str(exc))
        finally:
            await self._finish(entry)
        if self.metrics is not None and report is not None:
            self.metrics.record_report(report)

    def _status_of(self, entry: _Entry) -> MigrationStatus:
        m = entry.migration
        # The outcome shows once the report is journaled and the devices are
        # free, so whoever sees it can act on it at once.
        report = m.report if entry.done.is_set() else None
        progress: dict[str, Any] = m.progress()
        progress.pop("phase", None)
        return MigrationStatus(
            id=m.id,
            vm=m.plan.vm,
            phase=m.phase.value,
            outcome=report.outcome if report else None,
            committed=m.committed,
            in_doubt=m.destination.in_doubt,
            created_at=entry.created_at,
            progress=None if report else Progress(**progress),
            control=m.live.state,
            report=report,
        )


def _status_of_record(record: MigrationRecord) -> MigrationStatus:
    return MigrationStatus(
        id=record.id,
        vm=record.vm,
        phase=record.phase,
        outcome=record.outcome,
        committed=record.committed,
        created_at=record.created_at,
        control=record.control or initial(record.plan),
        report=record.report,
    )
