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
  decision: the commit is recorded at once, whatever the writer does.  A
  journal that refuses writes makes the daemon unready (saying why) while the
  writer keeps what it could not write and tries again; ready again once the
  journal takes it (``orchestrator.journal_writer``);
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
from typing import Any, Literal

import structlog
import trio

from orchestrator.backends import Backend
from orchestrator.backends.handles import handle_key
from orchestrator.backends.simulated.backend import SimulatedBackend
from orchestrator.compat import CompatSettings
from orchestrator.control import Control, ControlRefused, ControlRequest
from orchestrator.engine import DeviceDriver, LeftInDoubt, Migration
from orchestrator.errors import OrchestratorError, PlanError, Problem
from orchestrator.handover import HandleRegistry
from orchestrator.journal import (
    Cursor,
    Journal,
    JournalEvent,
    MigrationFilter,
    MigrationRecord,
)
from orchestrator.journal_writer import FINISH, Entry, JournalWriter
from orchestrator.metrics import Metrics
from orchestrator.peer.acks import peer_holds_outcome
from orchestrator.peer.messages import DecisionAnswer
from orchestrator.peer.registry import IncomingRegistry
from orchestrator.peer.remote import RemoteDestination, SourceContact, Unsettled
from orchestrator.plan import Plan
from orchestrator.report import Outcome
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.status import (
    DEFAULT_PAGE_SIZE,
    DeviceStatus,
    MigrationList,
    MigrationStatus,
    MigrationSummary,
    Progress,
    status_of_record,
    summary_of,
)
from orchestrator.transport import RateLimiter
from orchestrator.transport.channel import ChannelListener, TlsIdentity

log = structlog.get_logger("orchestrator.service")

#: How often retention prunes the journal (``journal_retention_days``), after its
#: pass at start.
RETENTION_INTERVAL_S = 3600.0


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


class TooManyMigrations(OrchestratorError):
    """This host runs as many migrations as its settings allow (``max_migrations``)."""

    status_hint = 429


def device_keys(resolved: ResolvedPlan) -> list[str]:
    """How the service names the devices of a plan, for locking (``Backend.device_keys``)."""
    return resolved.device_keys()


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
        max_migrations: int = 0,
        retention_days: float | None = None,
        compat: CompatSettings | None = None,
    ) -> None:
        self.journal = journal
        #: Most migrations at once, outgoing and incoming together (0: no limit).
        self.max_migrations = max_migrations
        #: Prune migrations finished this many days ago (None: keep everything).
        self.retention_days = retention_days
        #: Set once retention's pass at start is done.
        self.retention_started = trio.Event()
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
        self.accepting = True
        #: The URL other hosts' daemons reach this daemon's API on (``[api] advertise``,
        #: or the TCP listener's own address); None: no migration to another host.
        self.source_api: str | None = None
        # Each migration's decision credential is derived from it: nothing to store.
        self._decision_key = decision_key or secrets.token_bytes(32)
        self._entries: dict[str, Entry] = {}
        self._locks: dict[str, str] = {}
        self._known: dict[str, DeviceStatus] = {}
        self._nursery: trio.Nursery | None = None
        self._writer = JournalWriter(
            journal, lambda: builtins.list(self._entries.values()), self._journal_written
        )
        #: Recovery is done (``run``): with ``accepting`` and a journal that takes
        #: writes, the daemon is ready.
        self.recovered = False
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
            admit=self._check_capacity,
            ca_file=tls.ca_file if tls is not None else None,
        )
        if metrics is not None:
            metrics.count_in_doubt = self.in_doubt

    # -- life cycle ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[MigrationService] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Recover what the journal holds unfinished, report ready, then serve
        until cancelled.  Use with ``await nursery.start(service.run)``."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer.run)
            await self._recover_all()
            if self.retention_days is not None:
                nursery.start_soon(self._retain, self.retention_days)
            await nursery.start(self.incoming.run)
            self.recovered = True
            task_status.started(self)
            await trio.sleep_forever()

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new migrations, let running ones finish for ``grace_s``, roll back the rest."""
        self.accepting = False
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
        await self._writer.close()

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
        self._check_capacity()
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
        live = self._live_status(migration_id)
        if live is not None:
            return live
        record = await self.journal.get(migration_id)
        if record is None:
            raise MigrationNotFound(f"no migration {migration_id!r}")
        return status_of_record(record)

    async def list(
        self, outcome: Outcome | None = None, phase: str | None = None
    ) -> builtins.list[MigrationStatus]:
        """Every migration, newest first, in full (``page`` for a page of them)."""
        page = await self.page(MigrationFilter(outcome=outcome, phase=phase), limit=None)
        return [m for m in page.migrations if isinstance(m, MigrationStatus)]

    async def page(
        self,
        where: MigrationFilter | None = None,
        *,
        cursor: str | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
        full: bool = True,
    ) -> MigrationList:
        """A page of migrations, newest first, from ``cursor`` (the previous page's
        ``next_cursor``; None: the newest); summaries, or each in full.  The journal
        filters and pages; a migration running here shows its live phase.  Raises
        ValueError for a cursor this service never gave."""
        after = None if cursor is None else Cursor.decode(cursor)
        page = await self.journal.page(where, after=after, limit=limit, full=full)
        next_cursor = None if page.next is None else page.next.encode()
        if full:
            statuses = []
            for entry in page.entries:
                assert entry.record is not None
                statuses.append(self._live_status(entry.id) or status_of_record(entry.record))
            return MigrationList(migrations=statuses, next_cursor=next_cursor)
        summaries: builtins.list[MigrationSummary] = []
        for entry in page.entries:
            summary = summary_of(entry)
            live = self._live_status(entry.id)
            if live is not None:
                summary = summary.model_copy(
                    update={
                        "phase": live.phase,
                        "committed": live.committed,
                        "in_doubt": live.in_doubt,
                        "outcome": live.outcome,
                        "finished_at": live.finished_at,
                    }
                )
            summaries.append(summary)
        return MigrationList(migrations=summaries, next_cursor=next_cursor)

    def _live_status(self, migration_id: str) -> MigrationStatus | None:
        """The status of a migration running here, or ended here while the journal
        refused its report (None: the journal has the last word)."""
        entry = self._entries.get(migration_id)
        if entry is None or (entry.done.is_set() and entry.finish_written):
            return None
        return self._status_of(entry)

    @property
    def journal_failure(self) -> str | None:
        """Why the journal refused the last write; None while it takes writes."""
        return self._writer.failure

    @property
    def journal_tried(self) -> trio.Event:
        """Set after the journal writer's next pass (which, after a failure, retries)."""
        return self._writer.tried

    @property
    def ready(self) -> bool:
        """Recovered, accepting migrations, and the journal takes writes."""
        return self.recovered and self.accepting and self.journal_failure is None

    def unready_reason(self) -> str | None:
        """Why the daemon is not ready, in words for /readyz (None: it is)."""
        if not self.accepting:
            return "the orchestrator is shutting down"
        if not self.recovered:
            return "the orchestrator is recovering unfinished migrations"
        if self.journal_failure is not None:
            return (
                f"the journal refuses writes ({self.journal_failure}); the daemon tries "
                "again every second and is ready once it takes them"
            )
        return None

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
                    self._writer.failed(exc)
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
        """The devices this daemon knows, by lock key (see ``DeviceStatus``): read
        only, from the locks, the handle registry and the simulated devices' files."""
        found = {key: status.model_copy(deep=True) for key, status in self._known.items()}
        for key in self._locks:
            if key not in found:  # an incoming migration's, or one recovered
                backend, _, name = key.partition(":")
                found[key] = DeviceStatus(device=key, backend=backend, name=name, migration=None)
        for handed in self.handles.handed_over() if self.handles is not None else []:
            key = handle_key(handed.kind, handed.handle)
            status = found.setdefault(
                key,
                DeviceStatus(device=key, backend=handed.kind, name=handed.device, migration=None),
            )
            status.handle = handed.handle
        simulated = (self.backends or {}).get("simulated")
        if isinstance(simulated, SimulatedBackend):
            for stored in simulated.stored_devices():
                key = f"{simulated.name}:{stored.name}"
                status = found.setdefault(
                    key,
                    DeviceStatus(
                        device=key, backend=simulated.name, name=stored.name, migration=None
                    ),
                )
                status.files.append(str(stored.path))
                status.file_bytes += stored.bytes
        for key, status in found.items():
            status.migration = self._locks.get(key)
        return [found[key] for key in sorted(found)]

    # -- internals ---------------------------------------------------------------

    def _check_free(self, keys: builtins.list[str]) -> None:
        busy = [(key, self._locks[key]) for key in keys if key in self._locks]
        if busy:
            held = ", ".join(f"{key} (migration {mid})" for key, mid in busy)
            raise DeviceBusy(f"devices already part of an active migration: {held}")

    def running(self) -> int:
        """Migrations holding devices here now, outgoing and incoming (recovered ones too)."""
        return len(set(self._locks.values()))

    def _check_capacity(self) -> None:
        """Refuse one more migration past ``max_migrations``: nothing is queued, the
        management layer decides when to try again (a recovery is never refused)."""
        if self.max_migrations and self.running() >= self.max_migrations:
            raise TooManyMigrations(
                f"this host runs {self.running()} migration(s), as many as its settings allow "
                f"(max_migrations = {self.max_migrations}, outgoing and incoming together): "
                "try again once one has ended"
            )

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

    def _start(self, resolved: ResolvedPlan, migration_id: str, keys: builtins.list[str]) -> Entry:
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
    ) -> Entry:
        """Track a migration: its entry, its devices, its events on their way to the journal."""
        entry = Entry(migration=migration, created_at=created_at, keys=keys)
        self._entries[migration.id] = entry
        for device in resolved.devices:
            for key in device.keys:
                self._known[key] = DeviceStatus(
                    device=key, backend=device.backend.name, name=device.name, migration=None
                )
        migration.observers.append(lambda event: self._writer.send(entry, event))
        return entry

    async def _run_one(self, entry: Entry) -> None:
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

    async def _finish(self, entry: Entry) -> None:
        """Journal the report after every event of the migration, then free its devices."""
        migration = entry.migration
        with trio.CancelScope(shield=True):
            if migration.report is not None:
                self._writer.send(entry, FINISH)
                await entry.journaled.wait()
                if entry.finish_written:
                    await self._acknowledge_peer(migration)
            self._unlock(entry.keys, migration.id)
            entry.finished_at = time.time()
            entry.done.set()
            entry.notify()
            # The journal holds it from now on; a long-running daemon must not keep
            # every migration (and its trace) it ever ran in memory.  One whose report
            # the journal refused stays until the writer gets it in.
            if entry.finish_written or migration.report is None:
                self._forget(entry)
            outcome = migration.report.outcome if migration.report else None
            log.info("service.finished", migration=migration.id, outcome=outcome)

    def _journal_written(self, entry: Entry) -> None:
        """The writer got a migration's report into the journal."""
        if entry.done.is_set():  # it ended while the journal refused the report
            self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        if self._entries.get(entry.migration.id) is entry:
            del self._entries[entry.migration.id]

    async def _acknowledge_peer(self, migration: Migration) -> None:
        """Record, for retention, that the destination daemon of a migration between two
        hosts holds its outcome: it reported its devices ran after the commit, which it
        had recorded (it never asks the source again).  An outcome an operator settled,
        or a migration rolled back (the destination may still ask how it ended), is kept
        until acknowledged otherwise."""
        destination = migration.destination
        report = migration.report
        if not isinstance(destination, RemoteDestination) or report is None:
            return
        if report.committed and destination.completed_outcome is not None:
            try:
                await self.journal.acknowledge(migration.id)
            except Exception as exc:  # retention keeps it: nothing is lost
                log.warning("service.acknowledge_failed", migration=migration.id, error=str(exc))

    async def _retain(self, days: float) -> None:
        """Prune what the journal may forget, now and every ``RETENTION_INTERVAL_S``;
        a failure is logged and tried again next time."""
        while True:
            try:
                pruned = await self.retain(time.time() - days * 86400)
            except Exception as exc:
                log.warning("service.retention_failed", error=str(exc))
            else:
                if pruned:
                    log.info("service.retention", pruned=len(pruned), days=days)
            self.retention_started.set()
            await trio.sleep(RETENTION_INTERVAL_S)

    async def retain(self, finished_before: float) -> builtins.list[str]:
        """One retention pass: ask the peers of the finished migrations between two
        hosts that ended before ``finished_before`` whether they hold the outcome
        (``peer.acks``), record each that does, then prune (``Journal.prune``)."""
        ca_file = self.tls.ca_file if self.tls is not None else None
        for record in await self.journal.unacknowledged(finished_before):
            if await peer_holds_outcome(record, ca_file):
                await self.journal.acknowledge(record.id)
        return await self.journal.prune(finished_before)

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
        entry: Entry,
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

    def _status_of(self, entry: Entry) -> MigrationStatus:
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
            started_at=entry.created_at,
            finished_at=entry.finished_at if report else None,
            progress=None if report else Progress(**progress),
            control=m.live.state,
            report=report,
        )
