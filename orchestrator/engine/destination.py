"""The destination half of a migration: the interface the coordinator drives, and its engine.

:class:`Destination` is everything the coordinator (``engine.migration``)
needs of the destination half: open and check its devices, walk them to
RESUMING, load each device's stream, wait for every device to stand loaded
in its grace state (the vote), then run everything after the commit or reset
everything on an abort.  Two implementations, as httpx has one client and
many transports:

* :class:`LocalDestination`: both ends on this host; the coordinator's own
  driver, flow and trace drive the destination devices through a
  :class:`DestinationEngine`;
* ``orchestrator.peer.remote.RemoteDestination``: the destination daemon of
  another host, which runs the same :class:`DestinationEngine` behind its
  server (``orchestrator.peer.server``) and reports every arc back.

:class:`DestinationEngine` is the one place that drives destination devices:
the refusal of a device not RUNNING, the walk to RESUMING, the load (each
chunk written in order under the device call deadline), the walk to the
grace state, completing after the commit (never a reset then: a reset
destination loses the VM's state), resetting every device that moved on a
rollback, and the destination's vCPUs.  A new transport implements
:class:`Destination` and hosts this engine; the flow does not change.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from orchestrator.compat import Identity
from orchestrator.engine.allowance import Allowance, Share
from orchestrator.engine.devices import DeviceDriver, DeviceFailure
from orchestrator.engine.gates import each_to_its_end
from orchestrator.engine.vcpus import Vcpus
from orchestrator.errors import PeerError, ProtocolViolation
from orchestrator.plan import VmmEndpoint
from orchestrator.report import ErrorInfo, Outcome
from orchestrator.resolve import ResolvedPlan
from orchestrator.states import Capabilities, DeviceState, Side
from orchestrator.transport import (
    BlockingWriter,
    LocalStreamSender,
    RateLimiter,
    StreamReceiver,
    StreamSender,
    Transfer,
    local_stream,
)

__all__ = ["Completion", "Destination", "DestinationEngine", "LeftInDoubt", "LocalDestination"]


class LeftInDoubt(Exception):
    """The destination half stopped waiting for a peer out of reach, after the commit
    (the daemon shuts down): the migration ends here without an outcome, its journal
    record unfinished, and the restart finishes it."""


DESTINATION = Side.DESTINATION

#: The progress event of a stream that ended: set for good.
_ENDED = trio.Event()
_ENDED.set()


@dataclass
class Completion:
    """How the destination ended after the commit."""

    errors: list[ErrorInfo] = field(default_factory=list)

    @property
    def outcome(self) -> Outcome:
        return "failed" if self.errors else "succeeded"


class Destination(abc.ABC):
    """The destination half of one migration, as the coordinator drives it."""

    #: Notes for the migration's report (what could not be confirmed there...).
    notes: list[str]
    #: Every step of it runs on this host (nothing waits on another daemon).
    on_this_host: bool = True
    #: After the commit, the destination cannot be reached to say how it ended.
    in_doubt: bool = False
    #: The round trip to the destination's host (None: this host, or not measured).
    rtt_s: float | None = None

    def declared_arc_s(self, name: str, source: DeviceState, target: DeviceState) -> float | None:
        """How long a destination device's arc takes, where its backend declares it."""
        return None

    def declared_rate_bytes_s(self, name: str) -> float | None:
        """How fast a destination device loads its stream, where its backend declares it."""
        return None

    def history_arc_s(self, name: str, source: DeviceState, target: DeviceState) -> float | None:
        """A destination device's arc as its host's history has it (another host's)."""
        return None

    #: How the destination said it ended after the commit, where it says so itself
    #: (another host's daemon, the authority then): the migration's outcome.
    completed_outcome: Outcome | None = None

    @abc.abstractmethod
    async def open(self, *, check: bool = True) -> Mapping[str, Capabilities]:
        """Open every destination device and (unless recovering: ``check`` false)
        check it and the vCPUs are where a migration starts, and read its identity;
        their capabilities.  Raises MigrationAborted (nothing changed here) or a
        failure naming the device."""

    @abc.abstractmethod
    def identities(self) -> Mapping[str, Identity] | None:
        """Each destination device's identity, read by ``open`` (a device whose backend
        reports none is left out); None: the destination's daemon predates identities."""

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Hold what the transfer needs (the data channel) for the forward path."""
        yield

    @abc.abstractmethod
    async def begin(self) -> None:
        """Walk every destination device to RESUMING."""

    def orders_devices(self) -> bool:
        """Whether the destination runs the ordered device (one without P2P among P2P
        peers) before its peers leave their grace states (every daemon since protocol 3)."""
        return True

    def grant(self, share: Share) -> bool:
        """Strict, between hosts: hand the destination its share of the budget, so
        that it begins no step before its vote that cannot fit (``OverBudget``).
        False where it takes none (one host: the source's checks run on its clock)."""
        return False

    @abc.abstractmethod
    def stream(self, name: str) -> StreamSender:
        """Where the source sends one device's stream."""

    @abc.abstractmethod
    async def loaded(self, name: str) -> None:
        """Return once the device's whole stream is loaded and the device stands in
        its grace state (STOP without P2P); a failure names the device."""

    async def initial_sent(self, name: str, nbytes: int) -> None:  # noqa: B027 - local: nothing to say
        """The device's initial pre-copy data (``nbytes``) is all sent."""

    def initial_back(self, name: str) -> None:  # noqa: B027 - nothing announced, nothing to undo
        """The device's initial data came back after it was announced: the
        acknowledgement waits for its next announcement (``initial_sent``)."""

    async def acknowledged(self) -> None:  # noqa: B027
        """Return once every device's initial data is loaded (switchover-ack)."""

    def in_flight_bytes(self) -> int:
        """Bytes sent and not yet taken by the destination host."""
        return 0

    def unacknowledged_bytes(self) -> Mapping[str, int]:
        """Per device, where this side can tell: initial data sent and not yet loaded
        (the switchover-ack waits for it)."""
        return {}

    def backlog_bytes(self) -> Mapping[str, int]:
        """Per device, where this side can tell: bytes sent that will still be
        unloaded once the switchover-ack passes (its destination loads them in
        the window, before it settles)."""
        return {}

    async def vote(self) -> None:  # noqa: B027
        """Return once the destination may commit, durably where it must be."""

    def deciding(self) -> bool:
        """The coordinator is about to record the commit.  False if the destination's
        side already had the migration decided otherwise (then it must abort)."""
        return True

    def committed(self) -> None:  # noqa: B027
        """The commit decision is recorded (the coordinator's journal has it)."""

    def commit_failed(self, reason: str) -> None:  # noqa: B027
        """The commit decision could not be recorded: it was not taken."""

    @abc.abstractmethod
    async def commit(self) -> Completion:
        """After the commit: run every device, then the vCPUs; never raises."""

    @abc.abstractmethod
    async def abort(self, reason: str) -> list[ErrorInfo]:
        """Before the commit: reset every device that moved; what failed."""

    async def finish(self, outcome: Outcome) -> None:  # noqa: B027
        """The migration ended with ``outcome`` (both journals must say it)."""

    def give_up(self) -> None:  # noqa: B027 - on this host nothing waits on a peer
        """Stop waiting on a peer out of reach: ``commit`` raises LeftInDoubt then."""

    @abc.abstractmethod
    async def adopt(self) -> None:
        """Recovery: open every device again and adopt the state it reports."""

    async def digest(self, name: str) -> str | None:
        """The device's state digest, where it can be known."""
        return None

    def timings(self, name: str) -> Mapping[str, float]:
        """The backend's own timings of the device, in ms, by step."""
        return {}

    def vcpus_report(self) -> Mapping[str, Any]:
        """The destination vCPUs' resume time (``resume_ms``) and last ``status``."""
        return {}

    def stop_path_s(self, name: str) -> float:
        """The device's own destination calls from its last write to running."""
        return 0.0

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything; safe to call more than once."""


class DestinationEngine:
    """Drives the destination devices of one migration on this host; see the module docstring."""

    def __init__(
        self, resolved: ResolvedPlan, driver: DeviceDriver, vmm: VmmEndpoint | None = None
    ) -> None:
        self.resolved = resolved
        self.driver = driver
        self.ctx = driver.ctx
        self.names = [d.name for d in resolved.devices]
        for d in resolved.devices:
            driver.add(DESTINATION, d.name, d.backend.create(d.name, DESTINATION, d.destination))
        self.vcpus: Vcpus | None = Vcpus(self.ctx, DESTINATION, vmm) if vmm is not None else None
        #: Bytes of each device's stream written into it.
        self.written: dict[str, int] = dict.fromkeys(self.names, 0)
        #: When the write in progress on a device began.
        self.writing_since: dict[str, float] = {}
        # Set (and replaced) on each write, and at the stream's end or failure.
        self._progress = {name: trio.Event() for name in self.names}
        #: The devices a channel's thread loads now: the transfer, and the bytes
        #: written before it began.
        self._sinks: dict[str, tuple[Transfer, int]] = {}
        self.digests: dict[str, str | None] = {}
        self._path_s: dict[str, float] = dict.fromkeys(self.names, 0.0)
        self._vcpus_resumed = False
        #: The strict budget's share, where the source granted one (between hosts).
        self.allowance = Allowance()
        #: Each device's identity, read by ``open`` (where its backend reports one).
        self.identities: dict[str, Identity] = {}

    # -- before anything changes -------------------------------------------------

    async def open(self, *, check: bool = True) -> dict[str, Capabilities]:
        caps: dict[str, Capabilities] = {}

        async def open_one(name: str) -> None:
            caps[name] = await self.driver.open(DESTINATION, name)
            if check and (identity := await self.driver.identity(DESTINATION, name)) is not None:
                self.identities[name] = identity

        await each_to_its_end([functools.partial(open_one, name) for name in self.names])
        if check:
            for name in self.names:
                await self.driver.require_running(DESTINATION, name)
            if self.vcpus is not None:
                await self.vcpus.require_ready()
        return caps

    async def adopt(self) -> None:
        """Recovery: open every device and take its reported state into the flow."""
        flow = self.driver.flow
        assert flow is not None

        async def adopt_one(name: str) -> None:
            state = await self.driver.state(DESTINATION, name)
            flow.adopt_state(DESTINATION, name, state)

        async with trio.open_nursery() as nursery:
            for name in self.names:
                nursery.start_soon(adopt_one, name)

    # -- the transfer ----------------------------------------------------------------

    async def begin(self) -> None:
        flow = self.driver.flow
        assert flow is not None

        async def walk(name: str) -> None:
            route = flow.endpoint(DESTINATION, name).route
            await self.driver.walk(DESTINATION, name, route.transfer)

        async with trio.open_nursery() as nursery:
            for name in self.names:
                nursery.start_soon(walk, name)

    async def written_at_least(self, name: str, nbytes: int) -> bool:
        """Wait until ``nbytes`` of the device's stream are written into it; False if
        its stream ended (or failed) short of them."""
        while self.written[name] < nbytes:
            if self._ended(name):
                return False
            sink = self._sinks.get(name)
            if sink is None:
                await self._progress[name].wait()
                continue
            transfer, before = sink
            await transfer.reached(nbytes - before)
            if before + transfer.bytes >= nbytes:
                return True
        return True

    def _ended(self, name: str) -> bool:
        return self._progress[name] is _ENDED

    def take_share(self, share: Share) -> None:
        """The source's share of a strict budget: taken unless a stream already
        ended (the share's clock would start too late to guard its settle)."""
        self.allowance.grant(share, late=any(self._ended(name) for name in self.names))

    def _wake(self, name: str, *, end: bool = False) -> None:
        event = self._progress[name]
        self._progress[name] = _ENDED if end else trio.Event()
        event.set()

    async def receive(self, name: str, receiver: StreamReceiver) -> float:
        """Write the stream into the device as it arrives, in order, to its end; the
        last write's seconds.  A DeviceFailure names the device; a stream cut on its
        way fails its ``receive`` (operation ``receive``: the peer's failure).  The
        receiver stays open: the caller closes it (or first drains what is on its way)."""
        device = self.driver.device(DESTINATION, name)
        last_write_s = 0.0
        writer = device.bulk_writer() if receiver.sinks else None
        if writer is not None:
            return await self._sink(name, receiver, writer)
        try:
            while True:
                try:
                    chunk = await receiver.receive_lent()
                except PeerError as exc:
                    raise self.driver.fail(DESTINATION, name, "receive", exc) from None
                if chunk is None:
                    return last_write_s
                start = self.writing_since[name] = trio.current_time()
                await self.driver.call(DESTINATION, name, "write", device.write, chunk)
                del self.writing_since[name]
                last_write_s = trio.current_time() - start
                self.written[name] += len(chunk)
                self._wake(name)
        finally:
            self._wake(name, end=True)

    async def _sink(self, name: str, receiver: StreamReceiver, writer: BlockingWriter) -> float:
        """``receive`` by the channel's thread: it loads the device, trio hears of the end."""
        try:
            transfer = receiver.start_sink(writer)
        except PeerError as exc:
            raise self.driver.fail(DESTINATION, name, "receive", exc) from None
        before = self.written[name]
        self._sinks[name] = (transfer, before)
        self._wake(name)  # waiters for a byte count wait on the transfer from now on

        def count(nbytes: int) -> None:
            self.written[name] += nbytes

        try:
            await self.driver.transfer(DESTINATION, name, "write", transfer, progress=count)
        finally:
            del self._sinks[name]
            self._wake(name, end=True)
        return transfer.last_call_s

    async def settle(self, name: str, last_write_s: float = 0.0) -> None:
        """The stream is loaded: walk the device to STOP, then to its grace state.
        Not begun (OverBudget) when it cannot end within the budget's share."""
        flow = self.driver.flow
        assert flow is not None
        self.allowance.check("settle_arcs", name)
        busy_before = self.driver.busy.get((DESTINATION, name), 0.0)
        route = flow.endpoint(DESTINATION, name).route
        await self.driver.walk(DESTINATION, name, route.settle)
        if route.grace is not None:
            await self.driver.walk(DESTINATION, name, route.grace)
        busy = self.driver.busy.get((DESTINATION, name), 0.0) - busy_before
        self._path_s[name] += last_write_s + busy

    # -- the ends ------------------------------------------------------------------------

    async def commit(self) -> Completion:
        """Every device to RUNNING (all stand in their grace states: the barrier holds),
        then the vCPUs.  A device in ERROR is reported, never reset: after the commit a
        reset destination loses the VM's state."""
        flow = self.driver.flow
        completion = Completion()
        if flow is None:
            message = "the destination devices could not be opened: none runs"
            completion.errors.append(self.ctx.info("device_error", message, side=DESTINATION))
            return completion
        flow.learn_commit()

        async def run(name: str) -> None:
            busy_before = self.driver.busy.get((DESTINATION, name), 0.0)
            e = flow.endpoint(DESTINATION, name)
            final = e.route.final
            assert final is not None
            if e.state is DeviceState.ERROR:
                completion.errors.append(self._stuck(name, final))
                return
            try:
                await self.driver.walk(DESTINATION, name, final)
            except DeviceFailure as failure:
                completion.errors.append(failure.info)
            except ProtocolViolation as exc:
                # The ordered device stands stopped: running this one fully could
                # DMA into it.  It waits in its grace state, for an operator.
                message = f"left in its grace state: {exc}"
                completion.errors.append(
                    self.ctx.info("device_error", message, side=DESTINATION, device=name)
                )
            self._path_s[name] += self.driver.busy.get((DESTINATION, name), 0.0) - busy_before

        # The ordered device (no grace state) runs before any peer leaves its grace state.
        if flow.ordered is not None:
            await run(flow.ordered)
        async with trio.open_nursery() as nursery:
            for name in self.names:
                if name != flow.ordered:
                    nursery.start_soon(run, name)
        await self._resume_vcpus(completion)
        return completion

    def _stuck(self, name: str, target: DeviceState) -> ErrorInfo:
        message = f"destination device {name!r} is in ERROR and cannot go to {target.name}"
        return self.ctx.info("device_error", message, side=DESTINATION, device=name)

    async def _resume_vcpus(self, completion: Completion) -> None:
        """Once every destination device runs.  A failure is reported, never answered
        by resuming the source: the VM is the destination's."""
        if self.vcpus is None or self._vcpus_resumed:
            return
        flow = self.driver.flow
        assert flow is not None
        self._vcpus_resumed = True
        stuck = [
            n for n in self.names if flow.endpoint(DESTINATION, n).state is not DeviceState.RUNNING
        ]
        failed = await self.vcpus.resume_once_running(stuck, record="resume")
        if failed is not None:
            completion.errors.append(failed)

    async def roll_back(self) -> list[ErrorInfo]:
        """Reset every device the migration moved (or that is not RUNNING)."""
        flow = self.driver.flow
        errors: list[ErrorInfo] = []
        if flow is None:
            return errors  # never opened together: nothing moved

        async def reset(name: str) -> None:
            failed = await self.driver.reset(DESTINATION, name)
            if failed is not None:
                errors.append(failed)

        async with trio.open_nursery() as nursery:
            for step in flow.rollback_plan().for_side(DESTINATION):
                nursery.start_soon(reset, step.name)
        return errors

    async def close(self, *, devices: bool = True) -> None:
        """Release the VMM and (unless the coordinator's driver shares them) the
        devices, then read their digests: a device still answers that once closed."""
        if self.vcpus is not None:
            await self.vcpus.aclose()
        if devices:
            await self.driver.close()
            for name in self.names:
                self.digests[name] = await self.driver.digest(DESTINATION, name)

    def stop_path_s(self, name: str) -> float:
        return self._path_s.get(name, 0.0)


class LocalDestination(Destination):
    """Both ends on this host: the coordinator's driver drives the destination devices."""

    def __init__(
        self,
        resolved: ResolvedPlan,
        driver: DeviceDriver,
        limiter: RateLimiter | None,
        vmm: VmmEndpoint | None = None,
    ) -> None:
        self.engine = DestinationEngine(resolved, driver, vmm)
        self.notes = []
        self._limiter = limiter
        self._receivers: dict[str, StreamReceiver] = {}
        self._senders: dict[str, LocalStreamSender] = {}
        #: Each device's initial pre-copy data, in bytes, once all sent.
        self._initial: dict[str, int] = {}
        self._announced = {name: trio.Event() for name in self.engine.names}

    async def open(self, *, check: bool = True) -> Mapping[str, Capabilities]:
        return await self.engine.open(check=check)

    def identities(self) -> Mapping[str, Identity]:
        return self.engine.identities

    async def begin(self) -> None:
        await self.engine.begin()

    def stream(self, name: str) -> StreamSender:
        sender, receiver = local_stream(self._limiter)
        self._receivers[name] = receiver
        self._senders[name] = sender
        return sender

    async def initial_sent(self, name: str, nbytes: int) -> None:
        self._initial[name] = nbytes
        self._announced[name].set()

    def initial_back(self, name: str) -> None:
        if self._announced[name].is_set():
            self._announced[name] = trio.Event()

    async def acknowledged(self) -> None:
        # As between hosts (QEMU's switchover-ack): no device stops while its
        # destination still loads its initial data, which would then load in
        # the downtime window at the destination's pace.  Every device announces
        # it, some only once the decision is taken (a round cut short), and
        # again when new initial data came back.
        for name in self.engine.names:
            await self._announced[name].wait()
            await self.engine.written_at_least(name, self._initial[name])

    def in_flight_bytes(self) -> int:
        written = self.engine.written
        return sum(max(0, s.bytes_sent - written[n]) for n, s in self._senders.items())

    def unacknowledged_bytes(self) -> dict[str, int]:
        engine, now = self.engine, trio.current_time()
        left = {}
        for name, nbytes in self._initial.items():
            unloaded = max(0, nbytes - engine.written[name])
            # Less what the write in progress has done, at the device's pace.
            since = engine.writing_since.get(name)
            rate = engine.driver.device(DESTINATION, name).declared_rate_bytes_s()
            if unloaded and since is not None and rate:
                unloaded = max(0, unloaded - int((now - since) * rate))
            left[name] = unloaded
        return left

    def backlog_bytes(self) -> dict[str, int]:
        written = self.engine.written
        return {
            name: max(0, sender.bytes_sent - max(written[name], self._initial.get(name, 0)))
            for name, sender in self._senders.items()
        }

    async def loaded(self, name: str) -> None:
        # On one host the coordinator's task for the device does the loading.
        receiver = self._receivers.pop(name)
        try:
            last_write_s = await self.engine.receive(name, receiver)
        finally:
            with trio.CancelScope(shield=True):
                await receiver.aclose()
        await self.engine.settle(name, last_write_s)

    async def commit(self) -> Completion:
        return await self.engine.commit()

    async def abort(self, reason: str) -> list[ErrorInfo]:
        return await self.engine.roll_back()

    async def adopt(self) -> None:
        await self.engine.adopt()

    async def digest(self, name: str) -> str | None:
        return await self.engine.driver.digest(DESTINATION, name)

    def timings(self, name: str) -> Mapping[str, float]:
        return self.engine.driver.device(DESTINATION, name).timings()

    def vcpus_report(self) -> Mapping[str, Any]:
        vcpus = self.engine.vcpus
        if vcpus is None:
            return {}
        return {"resume_ms": vcpus.ms.get("resume"), "status": vcpus.status}

    def stop_path_s(self, name: str) -> float:
        return self.engine.stop_path_s(name)

    async def close(self) -> None:
        # The devices are the coordinator's driver's to close.
        await self.engine.close(devices=False)
