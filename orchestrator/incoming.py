"""The destination half of a migration between two hosts.

The source daemon coordinates a cross-host migration (``orchestrator.remote``);
the destination daemon keeps one :class:`IncomingMigration` per migration it
was asked to prepare.  It owns the destination devices and does, on this
host, exactly what the runner does for a local destination:

* ``open``: every destination device opened and found RUNNING (a fresh
  device), its capabilities handed back to the source;
* while the data channel is up: device calls the source asks for (the walk
  to RESUMING, probes, resets), each device's stream written into it in
  order as it arrives, and the moment the stream ends, the device's own
  walk to STOP and on to its grace state (RUNNING_P2P), reported to the
  source as it happens: no round trip per arc inside the downtime window;
* switchover acknowledgements: when the source says a device's initial
  pre-copy data has been sent, the acknowledgement goes back once those
  bytes are loaded into the device;
* the commit: the source's decision, already on its disk.  This side runs
  every device at once and records the commit in its own journal meanwhile,
  acknowledging it once recorded; a restart before the record lands finds
  the vote and waits for the source, which delivers the commit again.

When the channel fails the outcome depends on what this side knows:

* commit recorded: complete, every device to RUNNING (the source will
  stop its devices once it learns, on reconnection or on its restart);
* no commit, and some device not yet reported ready: the source cannot
  have committed; reset every device that moved (rollback);
* no commit, every device reported ready: *in doubt*.  The source may have
  recorded the commit and lost the link before it could say so.  Resetting
  here could leave the VM running nowhere, running here could leave it
  running twice, so the devices are held where they are (nothing runs)
  until the decision arrives (``decide``), from the source over REST.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog
import trio
from pydantic import BaseModel, Field

from orchestrator.backends.base import Device
from orchestrator.errors import (
    DeviceError,
    OrchestratorError,
    PeerError,
    PlanError,
    Problem,
    TransitionError,
)
from orchestrator.flow import Route, destination_route
from orchestrator.plan import parse_plan
from orchestrator.report import DeviceReport, ErrorInfo, MigrationReport, Outcome
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.states import Capabilities, DeviceState, Side, path
from orchestrator.transport.channel import ChannelListener, DestinationChannel, new_secret

log = structlog.get_logger("orchestrator.incoming")

__all__ = [
    "DestinationLink",
    "IncomingJournal",
    "IncomingMigration",
    "capabilities_to_json",
]


class DestinationLink(Protocol):
    """What this side needs of the data channel (``orchestrator.transport``)."""

    def receiver(self, device: str) -> Any: ...

    async def wait_connected(self) -> None: ...

    async def send_control(self, message: dict[str, Any]) -> None: ...

    async def receive_control(self) -> dict[str, Any]: ...

    async def acknowledge(self, device: str) -> None: ...

    async def abort(self, reason: str) -> None: ...

    async def aclose(self) -> None: ...


class IncomingJournal(Protocol):
    async def record_phase(self, migration_id: str, phase: str) -> int: ...

    async def record_commit(self, migration_id: str) -> None: ...

    async def finish(self, migration_id: str, report: MigrationReport) -> int: ...


def capabilities_to_json(caps: Capabilities) -> dict[str, Any]:
    return {
        "flags": int(caps.flags),
        "stop_copy_size": caps.stop_copy_size,
        "dirty_logging": caps.dirty_logging,
    }


@dataclass
class _Endpoint:
    device: Device
    capabilities: Capabilities | None = None
    state: DeviceState = DeviceState.RUNNING
    route: Route | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    written: int = 0
    #: Set when the whole stream is loaded (its end reached and written).
    loaded: bool = False
    #: Reported at its grace state (or settled, without P2P): ready to commit.
    ready: bool = False
    reset: bool = False
    digest: str | None = None
    progress: trio.Event = field(default_factory=trio.Event)
    last_write_s: float = 0.0

    def wake(self) -> None:
        self.progress.set()
        self.progress = trio.Event()


class IncomingMigration:
    """One migration this host receives; see the module docstring."""

    def __init__(
        self,
        resolved: ResolvedPlan,
        migration_id: str,
        journal: IncomingJournal | None = None,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.resolved = resolved
        self.plan = resolved.plan
        self.id = migration_id
        self.journal = journal
        self.on_event = on_event
        self.log = log.bind(vm=self.plan.vm, migration=migration_id, side="destination")
        self.endpoints: dict[str, _Endpoint] = {
            d.name: _Endpoint(d.backend.create(d.name, Side.DESTINATION, d.destination))
            for d in resolved.devices
        }
        self.committed = False
        self.phase = "prepare"
        self.outcome: Outcome | None = None
        self.error: ErrorInfo | None = None
        self.report: MigrationReport | None = None
        self.done = trio.Event()
        #: The report is in the journal (status can be read from there).
        self.journaled = False
        self._decision: str | None = None
        self._decided = trio.Event()
        self._connecting: trio.CancelScope | None = None
        self._serve_nursery: trio.Nursery | None = None
        self._vote_started = False
        self._vote_recorded = trio.Event()
        self._vote_error: str | None = None
        self._link: DestinationLink | None = None
        self._started = time.monotonic()
        self._errors: list[ErrorInfo] = []
        self._finish_outcome: Outcome | None = None

    # -- preparing -------------------------------------------------------------

    async def open(self) -> dict[str, dict[str, Any]]:
        """Open every destination device; its capabilities and state, for the source.

        Raises DeviceError (the first device that could not be opened, or
        one not RUNNING: it may belong to another migration); every device
        opened so far is closed again then.
        """
        timeout = self.plan.timeouts.device_call_s
        out: dict[str, dict[str, Any]] = {}
        try:
            for name, e in self.endpoints.items():
                with trio.fail_after(timeout):
                    caps = e.capabilities = await e.device.open()
                    e.state = await e.device.get_state()
                _require_running(name, e.state)
                e.route = destination_route(caps)
                out[name] = {"capabilities": capabilities_to_json(caps), "state": e.state.name}
        except trio.TooSlowError:
            with trio.CancelScope(shield=True):
                await self.close()
            raise DeviceError(
                f"no answer within {timeout:g} s while opening", operation="open"
            ) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        return out

    def status(self) -> IncomingStatus:
        return IncomingStatus(
            id=self.id,
            vm=self.plan.vm,
            phase=self.phase,
            committed=self.committed,
            outcome=self.outcome if self.done.is_set() else None,
            devices={
                name: {
                    "state": e.state.name,
                    "reset": e.reset,
                    "bytes": e.written,
                    "ready": e.ready,
                    "digest": e.digest,
                    "capabilities": (
                        capabilities_to_json(e.capabilities) if e.capabilities else None
                    ),
                }
                for name, e in self.endpoints.items()
            },
            report=self.report,
        )

    async def recover(self, *, committed: bool, voted: bool) -> MigrationReport:
        """After this daemon restarted: complete if the commit is recorded here; wait
        for the source's decision if this side had voted (every device ready); else
        roll back."""
        self.committed = committed
        self.log.warning("incoming.recover", committed=committed, voted=voted)
        try:
            for e in self.endpoints.values():
                with trio.move_on_after(self.plan.timeouts.device_call_s):
                    with contextlib.suppress(DeviceError):
                        e.capabilities = await e.device.open()
                await self._probe(e)
                e.loaded = e.ready = voted or committed
            if committed:
                await self._complete()
            elif voted:
                self.phase = "in_doubt"
                await self._decided.wait()
                if self._decision == "commit":
                    await self._commit_recorded()
                    await self._complete()
                else:
                    await self._roll_back()
            else:
                self._set_error(
                    "interrupted",
                    "the destination daemon stopped before it voted; rolled back on restart",
                )
                await self._roll_back()
        finally:
            with trio.CancelScope(shield=True):
                await self._end()
        assert self.report is not None
        return self.report

    # -- serving ---------------------------------------------------------------

    async def serve(self, link: DestinationLink) -> MigrationReport:
        """Run the destination half over ``link`` until the migration ends.

        A cancel from outside (the daemon shutting down) leaves the devices
        where they are and the journal record unfinished: the daemon's
        recovery decides on restart, as after a crash.
        """
        self._link = link
        self.phase = "transfer"
        timeout = self.plan.timeouts.prepare_s
        with trio.move_on_after(timeout) as waiting:
            self._connecting = waiting
            try:
                await link.wait_connected()
            except PeerError as exc:
                self._set_error("peer_error", f"the data channel failed to open: {exc}")
                waiting.cancel()
        self._connecting = None
        if waiting.cancelled_caught:
            # The source never came (it failed, or died, after preparing us),
            # or it said so (an abort decision).
            self._set_error(
                "peer_error", f"the source did not open the data channel within {timeout:g} s"
            )
            with trio.CancelScope(shield=True):
                await self._roll_back()
                await self._end()
            assert self.report is not None
            return self.report
        try:
            async with trio.open_nursery() as nursery:
                self._serve_nursery = nursery
                nursery.start_soon(self._control_loop, nursery)
                for name in self.endpoints:
                    nursery.start_soon(self._load, name)
        except BaseException as exc:
            if not _is_peer_failure(exc):
                with trio.CancelScope(shield=True):
                    await self._abandon()
                raise
            reason = _first_message(exc)
            self._set_error("peer_error", reason)
            try:
                await self._after_link_lost(reason)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._abandon()
                raise
        else:
            with trio.CancelScope(shield=True):
                await self._after_finish()
        with trio.CancelScope(shield=True):
            await self._end()
        assert self.report is not None
        return self.report

    async def _abandon(self) -> None:
        """Stop serving without deciding: close what is open, record nothing."""
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.aclose()
        await self.close()
        self.done.set()

    async def _after_finish(self) -> None:
        """The source said how the migration ended: make the devices agree."""
        if self._finish_outcome == "succeeded" or self.committed:
            await self._complete()
        else:
            await self._roll_back()

    async def decide(self, decision: str) -> None:
        """The source's decision, delivered over REST after the channel was lost."""
        if decision not in ("commit", "abort"):
            raise ValueError(f"a decision is commit or abort, not {decision!r}")
        if decision == "abort" and self.committed:
            raise TransitionError(
                f"migration {self.id!r} is committed on the destination; it cannot be aborted"
            )
        if decision == "abort" and self.done.is_set():
            return
        if decision == "commit" and self.outcome == "rolled_back":
            raise TransitionError(
                f"migration {self.id!r} was already rolled back on the destination"
            )
        if self._decision is None:
            self._decision = decision
            self._decided.set()
        if decision == "abort" and self._connecting is not None:
            self.error = ErrorInfo(
                kind="peer_error",
                message="the source aborted before it opened the data channel",
                phase=self.phase,
                side="destination",
            )
            self._connecting.cancel()

    async def _control_loop(self, nursery: trio.Nursery) -> None:
        assert self._link is not None
        while True:
            message = await self._link.receive_control()
            op = message.get("op")
            if op == "call":
                nursery.start_soon(self._serve_call, message)
            elif op == "initial_sent":
                nursery.start_soon(self._acknowledge_initial, message)
            elif op == "commit":
                # The decision is the source's, recorded there: act on it at once.
                # Every device runs now, on this side's own initiative and
                # reported as it happens (no request per device in the downtime),
                # while the commit is written to this side's journal too.  A
                # crash before that record lands finds the vote recorded and
                # waits for the source, which re-delivers the commit.
                first = not self.committed
                self.committed = True
                self.phase = "resume"
                if first:
                    nursery.start_soon(self._commit)
                    for name in self.endpoints:
                        nursery.start_soon(self._run_after_commit, name)
            elif op == "finish":
                outcome = message.get("outcome")
                self._finish_outcome = outcome if outcome in _OUTCOMES else "failed"
                if isinstance(message.get("error"), dict) and self.error is None:
                    with contextlib.suppress(ValueError):
                        self.error = ErrorInfo.model_validate(message["error"])
                nursery.cancel_scope.cancel()
                return
            else:
                raise PeerError(f"the source sent an unknown control message {op!r}")

    async def _commit(self) -> None:
        if self.journal is not None:
            with trio.CancelScope(shield=True):
                await self.journal.record_commit(self.id)
        self._event("commit", {})
        self.log.info("incoming.commit")
        assert self._link is not None
        await self._link.send_control({"op": "committed"})

    async def _run_after_commit(self, name: str) -> None:
        e = self.endpoints[name]
        assert e.capabilities is not None
        async with e.lock:
            if e.state is DeviceState.RUNNING:
                await self._send_arc(name, e.state, e.state, ok=True)
                return
            try:
                for target in path(e.capabilities.flags, e.state, DeviceState.RUNNING):
                    await self._arc(name, e, target, report=True)
            except (DeviceError, TransitionError) as exc:
                self._errors.append(_error_info(exc, name, self.phase))
                if not isinstance(exc, DeviceError):
                    await self._send_arc(name, e.state, DeviceState.RUNNING, ok=False, error=exc)

    async def _serve_call(self, message: dict[str, Any]) -> None:
        assert self._link is not None
        call_id = message.get("id")
        name = message.get("device")
        call = message.get("call")
        reply: dict[str, Any] = {"op": "result", "id": call_id}
        try:
            reply["state"] = (await self._do_call(name, call, message.get("target"))).name
            reply["ok"] = True
        except (DeviceError, TransitionError, KeyError) as exc:
            reply["ok"] = False
            reply["error"] = _error_json(exc, name if isinstance(name, str) else None)
            if isinstance(name, str) and name in self.endpoints:
                reply["state"] = (await self._probe(self.endpoints[name])).name
        await self._link.send_control(reply)

    async def _do_call(self, name: Any, call: Any, target: Any) -> DeviceState:
        if not isinstance(name, str) or name not in self.endpoints:
            raise DeviceError(f"no destination device {name!r} in this migration")
        e = self.endpoints[name]
        if call == "get_state":
            state: DeviceState = await self._device_call(e, "get_state")
            return state
        if call == "set_state":
            async with e.lock:
                await self._set_state(name, e, DeviceState[str(target)])
            return e.state
        if call == "reset":
            async with e.lock:
                await self._reset(name, e)
            return e.state
        raise DeviceError(f"unknown device call {call!r}", device=name)

    async def _set_state(self, name: str, e: _Endpoint, target: DeviceState) -> None:
        """One arc the source asked for; refuses to run a loaded device before the commit."""
        if target is DeviceState.RUNNING and e.loaded and not self.committed:
            raise TransitionError(
                f"destination device {name!r} holds the migrated state and no commit is "
                "recorded on this host: it does not run"
            )
        assert e.capabilities is not None
        steps = path(e.capabilities.flags, e.state, target)
        if len(steps) > 1:
            raise TransitionError(
                f"{e.state.name} -> {target.name} is not one arc for destination device {name!r}"
            )
        await self._arc(name, e, target, report=False)

    async def _arc(self, name: str, e: _Endpoint, target: DeviceState, *, report: bool) -> None:
        before = e.state
        start = trio.current_time()
        try:
            await self._device_call(e, "set_state", target)
        except DeviceError as exc:
            e.state = await self._probe(e)
            if report:
                await self._send_arc(name, before, target, ok=False, error=exc)
            raise
        e.state = target
        e.wake()
        duration = trio.current_time() - start
        self._event(
            "arc", {"device": name, "from": before.name, "to": target.name, "duration_s": duration}
        )
        if report:
            await self._send_arc(name, before, target, ok=True, duration=duration)

    async def _send_arc(
        self,
        name: str,
        before: DeviceState,
        target: DeviceState,
        *,
        ok: bool,
        duration: float = 0.0,
        error: Exception | None = None,
    ) -> None:
        assert self._link is not None
        message: dict[str, Any] = {
            "op": "arc",
            "device": name,
            "from": before.name,
            "to": target.name,
            "ok": ok,
            "state": self.endpoints[name].state.name,
            "duration_s": duration,
        }
        if error is not None:
            message["error"] = _error_json(error, name)
        await self._link.send_control(message)

    async def _reset(self, name: str, e: _Endpoint) -> None:
        await self._device_call(e, "reset")
        before = e.state
        e.state = DeviceState.RUNNING
        e.reset = True
        e.loaded = False
        e.ready = False
        e.wake()
        self._event("reset", {"device": name, "from": before.name})

    async def _device_call(self, e: _Endpoint, call: str, *args: Any) -> Any:
        timeout = self.plan.timeouts.device_call_s
        try:
            with trio.fail_after(timeout):
                return await getattr(e.device, call)(*args)
        except trio.TooSlowError:
            raise DeviceError(
                f"no answer within {timeout:g} s",
                device=e.device.name,
                operation=call,
                target=args[0].name if args and isinstance(args[0], DeviceState) else None,
            ) from None

    async def _probe(self, e: _Endpoint) -> DeviceState:
        with trio.CancelScope(shield=True), trio.move_on_after(self.plan.timeouts.device_call_s):
            try:
                e.state = await e.device.get_state()
            except DeviceError:
                e.state = DeviceState.ERROR
            return e.state
        e.state = DeviceState.ERROR
        return e.state

    async def _load(self, name: str) -> None:
        """Write the device's stream as it arrives; at its end, walk to the grace state."""
        assert self._link is not None
        e = self.endpoints[name]
        receiver = self._link.receiver(name)
        while True:
            chunk = await receiver.receive_lent()
            if chunk is None:
                break
            failure: DeviceError | None = None
            async with e.lock:
                if e.state is not DeviceState.RESUMING:
                    raise PeerError(
                        f"stream data for destination device {name!r}, which is in "
                        f"{e.state.name}, not RESUMING"
                    )
                start = trio.current_time()
                try:
                    await self._device_call(e, "write", chunk)
                except DeviceError as exc:
                    failure = exc
                    await self._probe(e)
            if failure is not None:
                await self._load_failed(name, e, receiver, failure)
                return
            e.last_write_s = trio.current_time() - start
            e.written += len(chunk)
            e.wake()
        assert e.route is not None
        self._start_vote_record()
        async with e.lock:
            e.loaded = True
            self._event("loaded", {"device": name, "bytes": e.written})
            await self._link.send_control(
                {"op": "loaded", "device": name, "bytes": e.written, "last_write_s": e.last_write_s}
            )
            steps = [t for t in (e.route.settle, e.route.grace) if t is not None]
            try:
                for target in steps[:-1]:
                    await self._arc(name, e, target, report=True)
                last = steps[-1]
                before = e.state
                await self._arc(name, e, last, report=False)
            except DeviceError:
                # Reported to the source, which rolls back; the channel stays.
                return
            e.ready = True
            if all(x.ready for x in self.endpoints.values()):
                # The last device's report is this side's vote to commit: once it is
                # sent the source may record the commit, so a restart of this
                # daemon must know it voted (it then waits for the decision).
                await self._vote_recorded.wait()
                if self._vote_error is not None:
                    failure = DeviceError(
                        f"the destination's journal cannot record its vote: {self._vote_error}",
                        device=name,
                        operation="journal",
                    )
                    await self._send_arc(name, before, last, ok=False, error=failure)
                    return
            await self._send_arc(name, before, last, ok=True)

    async def _load_failed(self, name: str, e: _Endpoint, receiver: Any, exc: DeviceError) -> None:
        """The device refused its stream: tell the source (which rolls back), and
        drain what is still on its way so the device's connection keeps moving."""
        assert self._link is not None
        self.log.warning("incoming.load_failed", device=name, error=str(exc))
        await self._link.send_control(
            {
                "op": "load_failed",
                "device": name,
                "state": e.state.name,
                "error": _error_json(exc, name),
            }
        )
        with contextlib.suppress(PeerError):
            while await receiver.receive_lent() is not None:
                pass

    def _start_vote_record(self) -> None:
        """Write the vote record while the rest of the stop-copy data is on the
        wire: it is the first stream to end, so every source device has stopped,
        and the fsync overlaps the transfer instead of lengthening the downtime.
        Written early it only makes a restart wait for the source's decision
        where it could have rolled back alone."""
        if self._vote_started:
            return
        self._vote_started = True
        assert self._serve_nursery is not None
        self._serve_nursery.start_soon(self._record_vote)

    async def _record_vote(self) -> None:
        try:
            await self._record_ready()
        except Exception as exc:
            self._vote_error = str(exc)
        finally:
            self._vote_recorded.set()

    async def _record_ready(self) -> None:
        self.phase = "destination_grace"
        if self.journal is not None:
            with trio.CancelScope(shield=True):
                await self.journal.record_phase(self.id, "destination_grace")

    async def _acknowledge_initial(self, message: dict[str, Any]) -> None:
        """Switchover acknowledgement: the initial data the source sent is loaded."""
        assert self._link is not None
        name = message.get("device")
        sent = message.get("bytes")
        if not isinstance(name, str) or name not in self.endpoints or not isinstance(sent, int):
            raise PeerError(f"a malformed initial_sent message: {message!r}")
        e = self.endpoints[name]
        while e.written < sent and not e.loaded:
            await e.progress.wait()
        await self._link.acknowledge(name)

    # -- endings ---------------------------------------------------------------

    async def _after_link_lost(self, reason: str) -> None:
        """The channel failed: complete, roll back, or wait for the decision."""
        if self._finish_outcome is not None:
            with trio.CancelScope(shield=True):
                await self._after_finish()
            return
        if self.committed:
            self.log.warning("incoming.link_lost_after_commit", reason=reason)
            with trio.CancelScope(shield=True):
                await self._complete()
            return
        if not all(e.ready for e in self.endpoints.values()):
            self.log.warning("incoming.link_lost", reason=reason)
            with trio.CancelScope(shield=True):
                await self._roll_back()
            return
        self.phase = "in_doubt"
        self.log.warning(
            "incoming.in_doubt",
            reason=reason,
            hint="every device is ready and no decision arrived: holding them stopped until "
            "the source daemon delivers commit or abort",
        )
        await self._decided.wait()
        with trio.CancelScope(shield=True):
            if self._decision == "commit":
                await self._commit_recorded()
                await self._complete()
            else:
                await self._roll_back()

    async def _commit_recorded(self) -> None:
        if not self.committed and self.journal is not None:
            await self.journal.record_commit(self.id)
        self.committed = True

    async def _complete(self) -> None:
        self.phase = "resume"
        with trio.move_on_after(self.plan.timeouts.rollback_s):
            async with trio.open_nursery() as nursery:
                for name in self.endpoints:
                    nursery.start_soon(self._complete_one, name)
        self.outcome = "succeeded" if not self._errors else "failed"

    async def _complete_one(self, name: str) -> None:
        e = self.endpoints[name]
        async with e.lock:
            if e.state is DeviceState.RUNNING:
                return
            try:
                assert e.capabilities is not None
                for target in path(e.capabilities.flags, e.state, DeviceState.RUNNING):
                    await self._arc(name, e, target, report=False)
            except (DeviceError, TransitionError) as exc:
                self._errors.append(_error_info(exc, name, self.phase))

    async def _roll_back(self) -> None:
        self.phase = "rollback"
        with trio.move_on_after(self.plan.timeouts.rollback_s):
            async with trio.open_nursery() as nursery:
                for name, e in self.endpoints.items():
                    if e.state is not DeviceState.RUNNING or e.loaded:
                        nursery.start_soon(self._reset_one, name)
        self.outcome = "rolled_back" if not self._errors else "failed"

    async def _reset_one(self, name: str) -> None:
        e = self.endpoints[name]
        async with e.lock:
            try:
                await self._reset(name, e)
            except DeviceError as exc:
                self._errors.append(_error_info(exc, name, self.phase))

    async def _end(self) -> None:
        if self.outcome is None:
            # Ended without a decision to act on (cancelled while serving).
            self.outcome = "failed"
        if self._finish_outcome == "rolled_back" and self.outcome == "succeeded":
            self.outcome = "failed"
        self.phase = "done"
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.aclose()
        for e in self.endpoints.values():
            with trio.move_on_after(self.plan.timeouts.device_call_s):
                with contextlib.suppress(DeviceError):
                    e.digest = await e.device.state_digest()
        await self.close()
        self.report = self._build_report()
        if self.journal is not None:
            try:
                await self.journal.finish(self.id, self.report)
                self.journaled = True
            except Exception as exc:  # journal trouble is logged, never loses the VM
                self.log.exception("incoming.journal_finish_failed", error=str(exc))
        self.done.set()
        self.log.info("incoming.end", outcome=self.outcome)

    async def close(self) -> None:
        async def close_one(device: Device) -> None:
            with trio.move_on_after(self.plan.timeouts.device_call_s):
                with contextlib.suppress(DeviceError):
                    await device.close()

        async with trio.open_nursery() as nursery:
            for e in self.endpoints.values():
                nursery.start_soon(close_one, e.device)

    def _set_error(self, kind: str, message: str) -> None:
        if self.error is None:
            self.error = ErrorInfo(kind=kind, message=message, phase=self.phase, side="destination")

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)

    def _build_report(self) -> MigrationReport:
        assert self.outcome is not None
        notes = [
            "destination side of a migration between two hosts; the source daemon's "
            "report holds the downtime and the pre-copy figures"
        ]
        notes += [f"{err.device}: {err.message}" for err in self._errors]
        return MigrationReport(
            id=self.id,
            vm=self.plan.vm,
            outcome=self.outcome,
            duration_ms=round((time.monotonic() - self._started) * 1000, 3),
            committed=self.committed,
            devices=[
                DeviceReport(
                    name=name,
                    backend=e.device.backend,
                    source_state="unknown",
                    destination_state=e.state.name,
                    destination_reset=e.reset,
                    bytes_precopy=0,
                    bytes_stopcopy=e.written,
                    destination_digest=e.digest,
                    destination_capabilities=(
                        capabilities_to_json(e.capabilities) if e.capabilities else None
                    ),
                )
                for name, e in self.endpoints.items()
            ],
            error=self.error if self.outcome != "succeeded" else None,
            notes=notes,
        )


_OUTCOMES: frozenset[str] = frozenset({"succeeded", "rolled_back", "failed"})


def _is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_peer_failure(e) for e in exc.exceptions)
    return isinstance(exc, PeerError | DeviceError | OrchestratorError)


def _first_message(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _require_running(name: str, state: DeviceState) -> None:
    if state is not DeviceState.RUNNING:
        raise DeviceError(
            f"destination device {name!r} is in {state.name}, not RUNNING: it may still "
            "belong to an earlier migration; nothing was changed",
            device=name,
            operation="get_state",
        )


def _error_json(exc: Exception, device: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"message": str(exc), "device": device}
    for attr in ("operation", "target", "errno"):
        value = getattr(exc, attr, None)
        if value is not None:
            out[attr] = value
    return out


def _error_info(exc: Exception, device: str, phase: str) -> ErrorInfo:
    return ErrorInfo(
        kind="device_error",
        message=str(exc),
        phase=phase,
        side="destination",
        device=device,
        operation=getattr(exc, "operation", None),
    )


# -- the daemon's registry of incoming migrations ------------------------------


class IncomingStatus(BaseModel):
    """What the destination daemon says of an incoming migration (``GET /v1/incoming/{id}``)."""

    id: str
    vm: str
    phase: str = Field(
        description=(
            "prepare, transfer, destination_grace (every device ready: this side voted to "
            "commit), in_doubt (the channel was lost after the vote: waiting for the "
            "source's decision), resume, rollback or done"
        )
    )
    committed: bool
    outcome: Outcome | None = None
    devices: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per device: state, reset, bytes loaded, capabilities.",
    )
    report: MigrationReport | None = None


class IncomingReady(BaseModel):
    """The answer to a prepare call: where to send the data, and how to prove who sends it."""

    migration_id: str
    data: dict[str, Any] = Field(description="host (may be null: use the API's host) and port.")
    secret: str = Field(description="Hex secret of this migration's data channel.")
    devices: dict[str, dict[str, Any]]


class IncomingRequest(BaseModel):
    """``POST /v1/incoming``: prepare the destination half of a migration."""

    migration_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    plan: dict[str, Any]


class IncomingDecision(BaseModel):
    """``POST /v1/incoming/{id}/decision``."""

    decision: Literal["commit", "abort"]


class IncomingNotFound(OrchestratorError):
    status_hint = 404


class IncomingUnavailable(OrchestratorError):
    """This daemon has no data channel listener: it cannot receive migrations."""

    status_hint = 503


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
    ) -> None:
        self.journal = journal
        self.backends = backends
        self.listener = listener
        self.advertise = advertise
        self._lock = lock
        self._unlock = unlock
        self.migrations: dict[str, IncomingMigration] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover_all()
            task_status.started()
            await trio.sleep_forever()

    async def prepare(self, request: IncomingRequest) -> IncomingReady:
        """Validate, lock, journal and open; raises PlanError, DeviceBusy, DeviceError."""
        if self.listener is None or self.listener.address is None or self._nursery is None:
            raise IncomingUnavailable(
                "this daemon has no data channel ([data] listen): it cannot be the "
                "destination of a migration from another host"
            )
        if request.migration_id in self.migrations:
            raise TransitionError(f"migration {request.migration_id!r} is already prepared here")
        plan = parse_plan(request.plan)
        if plan.destination is not None:
            raise PlanError(
                [Problem("plan.destination", "a plan sent to its destination has no destination")]
            )
        resolved = resolve(plan, self.backends)
        keys = resolved.device_keys()
        self._lock(keys, request.migration_id)
        try:
            migration = IncomingMigration(resolved, request.migration_id, self.journal)
            devices = await migration.open()
            if self.journal is not None:
                await self.journal.create(request.migration_id, plan, role="destination")
            secret = new_secret()
            channel = self.listener.expect(request.migration_id, secret, list(migration.endpoints))
        except BaseException:
            self._unlock(keys, request.migration_id)
            raise
        self.migrations[request.migration_id] = migration
        self._nursery.start_soon(self._serve, migration, channel, keys)
        log.info("incoming.prepared", migration=request.migration_id, devices=len(devices))
        return IncomingReady(
            migration_id=request.migration_id,
            data={"host": self.advertise, "port": self.listener.address[1]},
            secret=secret.hex(),
            devices=devices,
        )

    async def _serve(
        self, migration: IncomingMigration, channel: DestinationChannel, keys: list[str]
    ) -> None:
        try:
            await migration.serve(channel)
        except Exception:
            log.exception("incoming.crashed", migration=migration.id)
        finally:
            self._unlock(keys, migration.id)
            if migration.journaled:
                # Status and decisions are answered from the journal now.
                self.migrations.pop(migration.id, None)

    async def status(self, migration_id: str) -> IncomingStatus:
        """From memory while this daemon runs it, else from the journal (it ended,
        possibly before a restart of this daemon)."""
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
            phase=record.phase,
            committed=record.committed,
            outcome=record.outcome,
            devices=devices,
            report=record.report,
        )

    async def decide(self, migration_id: str, decision: str) -> IncomingStatus:
        """Idempotent: a decision agreeing with how the migration ended is accepted."""
        migration = self.migrations.get(migration_id)
        if migration is None:
            status = await self.status(migration_id)
            ended = {"commit": status.committed, "abort": not status.committed}
            if status.outcome is not None and ended[decision]:
                return status
            raise TransitionError(
                f"migration {migration_id!r} ended here ({status.outcome}, "
                f"{'committed' if status.committed else 'not committed'}): {decision} refused"
            )
        await migration.decide(decision)
        return migration.status()

    async def _recover_all(self) -> None:
        if self.journal is None:
            return
        for record in await self.journal.unfinished():
            if record.role == "destination":
                await self._recover_one(record)

    async def _recover_one(self, record: Any) -> None:
        """A migration this daemon received when it died: complete it if the commit
        is recorded, wait for the source's decision if it had voted, else roll back."""
        resolved = resolve(record.plan, self.backends)
        keys = resolved.device_keys()
        self._lock(keys, record.id)
        migration = IncomingMigration(resolved, record.id, self.journal)
        self.migrations[record.id] = migration
        assert self._nursery is not None
        self._nursery.start_soon(self._recover_serve, migration, record, keys)

    async def _recover_serve(
        self, migration: IncomingMigration, record: Any, keys: list[str]
    ) -> None:
        try:
            await migration.recover(
                committed=record.committed, voted=record.phase == "destination_grace"
            )
        except Exception:
            log.exception("incoming.recovery_crashed", migration=migration.id)
        finally:
            self._unlock(keys, migration.id)
