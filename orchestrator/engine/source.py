"""The source devices of one migration: pre-copy, stop and drain, release, return.

:class:`SourceHalf` is what the coordinator runs for each source device: the
walk to PRE_COPY and the pre-copy rounds (each sends what was pending when it
began, then reports what is left to the round gate), the grace state and the
source P2P barrier, the stop and the drain of the stream to its end, and,
after the commit, the release to STOP.  On a rollback it brings every source
device back to RUNNING through the reverse barrier (a device in ERROR is
reset), then the source vCPUs.

Errors after the commit (a source that cannot be released) and during a
rollback are kept, never raised: the migration's outcome is decided from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from orchestrator.backends.base import PrecopyInfo
from orchestrator.convergence import Remaining
from orchestrator.engine.destination import Destination
from orchestrator.engine.devices import DeviceDriver, DeviceFailure
from orchestrator.engine.gates import Switchover
from orchestrator.engine.recorder import Recorder
from orchestrator.engine.vcpus import Vcpus
from orchestrator.errors import PeerError, ProtocolViolation
from orchestrator.flow import RollbackPlan
from orchestrator.report import ErrorInfo
from orchestrator.states import DeviceState, Side
from orchestrator.transport import StreamSender

__all__ = ["SourceHalf"]

SOURCE = Side.SOURCE


class SourceHalf:
    """The source devices of one migration; see the module docstring."""

    def __init__(
        self,
        driver: DeviceDriver,
        recorder: Recorder,
        destination: Destination,
        *,
        read_chunk_bytes: int,
        sequential: bool,
    ) -> None:
        self.driver = driver
        self.ctx = driver.ctx
        self.recorder = recorder
        self.destination = destination
        self.read_chunk_bytes = read_chunk_bytes
        self.sequential = sequential
        #: Sources that could not be released after the commit (the VM runs on the
        #: destination: reported, the migration still succeeded).
        self.release_errors: list[ErrorInfo] = []
        #: What a rollback could not do.
        self.rollback_errors: list[ErrorInfo] = []

    # -- the forward path ------------------------------------------------------------

    async def run(self, name: str, sender: StreamSender, sw: Switchover) -> None:
        """One source device from RUNNING to its stream's end, then released once
        ``resumed`` says the destination runs."""
        flow = self.driver.flow
        assert flow is not None
        driver = self.driver
        route = flow.endpoint(SOURCE, name).route
        device = driver.device(SOURCE, name)
        stats = self.recorder.stats[name]
        initial_announced = False
        async with _closing(sender):
            if route.precopy is not None:
                await driver.walk(SOURCE, name, route.precopy)
            sw.precopy.ready_to_send()
            while True:
                back: int | None = None  # new initial data reported this round
                if route.precopy is not None:
                    # A round sends what was pending when it began, no more: a
                    # device that dirties faster than it drains must still end
                    # its round so that the convergence decision is taken.
                    info = await driver.call(SOURCE, name, "precopy_info", device.precopy_info)
                    back = _came_back(info, initial_announced, back)
                    pending = info.initial_bytes + info.dirty_bytes
                    await self._drain(
                        name, sender, precopy=True, limit=max(pending, 1), cut=sw.precopy.cut
                    )
                    try:
                        await sender.flush()
                    except PeerError as exc:
                        raise driver.fail(SOURCE, name, "send", exc) from None
                    info = await driver.call(SOURCE, name, "precopy_info", device.precopy_info)
                    back = _came_back(info, initial_announced, back)
                    size = await driver.call(SOURCE, name, "stop_copy_size", device.stop_copy_size)
                    stats.remaining = Remaining(
                        info.initial_bytes, info.dirty_bytes, size, initial_back=back is not None
                    )
                elif stats.remaining is None:
                    size = await driver.call(SOURCE, name, "stop_copy_size", device.stop_copy_size)
                    stats.remaining = Remaining(0, 0, size, pre_copy=False)
                if back is not None:
                    # The acknowledgement the destination gave (or owes) covers
                    # the old initial data only: it must be asked for again,
                    # once the new data is sent, and no device stops before.
                    self.recorder.initial_back(name, back, reacknowledge=initial_announced)
                    if initial_announced:
                        self.destination.initial_back(name)
                        initial_announced = False
                if not initial_announced and stats.remaining.initial_bytes == 0:
                    initial_announced = await self._announce_initial(name)
                decision = await sw.rounds.arrive(name, stats.remaining)
                if decision.action != "continue":
                    break
            if not initial_announced:
                await self._announce_initial(name)
            await sw.grace.wait()
            if route.grace is not None:
                await driver.walk(SOURCE, name, route.grace)
            busy_before = None
            if sw.peers_graced is not None:
                if name == flow.ordered:
                    # Its peers start no DMA any more: it may stop, and must before they do.
                    await sw.peers_graced.released.wait()
                    busy_before = driver.busy.get((SOURCE, name), 0.0)
                    await driver.walk(SOURCE, name, DeviceState.STOP_COPY)
                else:
                    await sw.peers_graced.arrive()
            self.recorder.barrier_wait(name, "source_p2p", await sw.source_barrier.arrive())
            if self.sequential:
                async with sw.sequential:
                    await self._stop_and_drain(name, sender, busy_before)
                    await sw.loaded[name].wait()
            else:
                await self._stop_and_drain(name, sender, busy_before)
        sw.drained_one()

    async def _announce_initial(self, name: str) -> bool:
        """Tell the destination this device's initial data is all sent; it
        acknowledges once that much is loaded (switchover-ack)."""
        try:
            await self.destination.initial_sent(name, self.recorder.stats[name].bytes_precopy)
        except PeerError as exc:
            raise self.driver.fail(Side.DESTINATION, name, "switchover_ack", exc) from None
        return True

    async def _stop_and_drain(
        self, name: str, sender: StreamSender, busy_before: float | None = None
    ) -> None:
        """Stop the device (``busy_before``: it stopped already, its calls counted from
        there) and drain its stream to the end."""
        if busy_before is None:
            busy_before = self.driver.busy.get((SOURCE, name), 0.0)
        await self.driver.walk(SOURCE, name, DeviceState.STOP_COPY)
        await self._drain(name, sender, precopy=False)
        try:
            if not sender.ended:  # a bulk transfer's thread may have ended it
                await sender.end()
        except PeerError as exc:
            raise self.driver.fail(SOURCE, name, "send", exc) from None
        busy = self.driver.busy.get((SOURCE, name), 0.0) - busy_before
        self.recorder.stats[name].stop_path_s += busy

    async def _drain(
        self,
        name: str,
        sender: StreamSender,
        *,
        precopy: bool,
        limit: int | None = None,
        cut: trio.Event | None = None,
    ) -> None:
        """Read and send until the device has nothing more now (or ``limit`` bytes,
        or ``cut`` is set: the pre-copy deadline ends the round where it is)."""
        driver = self.driver
        device = driver.device(SOURCE, name)
        stats = self.recorder.stats[name]
        recorder = self.recorder

        def count(nbytes: int) -> None:
            if precopy:
                stats.bytes_precopy += nbytes
                recorder.precopy_bytes += nbytes
            else:
                stats.bytes_stopcopy += nbytes

        reader = device.bulk_reader() if sender.pumps else None
        if reader is not None:
            # The channel's thread reads the device and sends: trio hears of the end.
            if cut is not None and cut.is_set():
                return
            try:
                # The stop-copy drain reads to the stream's end: the thread sends
                # its END at once.
                transfer = sender.start_pump(reader, limit=limit, end=not precopy)
            except PeerError as exc:
                raise driver.fail(SOURCE, name, "send", exc) from None
            await driver.transfer(SOURCE, name, "read", transfer, cut=cut, progress=count)
            if transfer.exhausted or not transfer.stopping:
                return
            # Stopped short: the round's cut (the loop below sees it), or a rate set
            # meanwhile, which the rest of the round keeps through trio.
            sent = transfer.bytes
        else:
            sent = 0
        while (limit is None or sent < limit) and not (cut is not None and cut.is_set()):
            chunk = await driver.call(SOURCE, name, "read", device.read, self.read_chunk_bytes)
            if not chunk:
                return
            sent += len(chunk)
            count(len(chunk))
            try:
                await sender.send(chunk)
            except PeerError as exc:
                raise driver.fail(SOURCE, name, "send", exc) from None

    # -- after the commit ----------------------------------------------------------------

    async def release(self, name: str) -> None:
        """Stop a source device after the commit; a failure is reported, never reset:
        a reset source reads RUNNING beside a running destination."""
        flow = self.driver.flow
        assert flow is not None
        settle = flow.endpoint(SOURCE, name).route.settle
        if flow.endpoint(SOURCE, name).state is DeviceState.ERROR:
            message = f"source device {name!r} is in ERROR and cannot go to {settle.name}"
            self.release_errors.append(
                self.ctx.info("device_error", message, side=SOURCE, device=name)
            )
            return
        try:
            await self.driver.walk(SOURCE, name, settle)
        except DeviceFailure as failure:
            self.release_errors.append(failure.info)

    # -- a rollback ------------------------------------------------------------------------

    async def roll_back(self, plan: RollbackPlan, vcpus: Vcpus | None) -> None:
        """Every source device back to RUNNING through the reverse barrier, then the
        vCPUs (``vcpus``: paused ones to resume).

        First every device that can leaves its stopped state for its grace state
        (it accepts DMA again, starts none); then the ordered device, which has
        none, runs fully; then the devices in ERROR are reset (their state is
        lost; a reset device reads RUNNING, so never while a peer is still
        stopped); then the others run fully.  The vCPUs resume only if
        every source device runs again: a guest must not run beside a device
        that cannot.
        """
        flow = self.driver.flow
        assert flow is not None
        broken: list[str] = []
        async with trio.open_nursery() as nursery:
            for step in plan.for_side(SOURCE):
                nursery.start_soon(self._quiesce, step.name, step.reset, step.quiesce, broken)
        finals = {s.name: s.final for s in plan.for_side(SOURCE) if s.final is not None}
        ordered = flow.ordered
        if ordered in finals and ordered not in broken:
            # The ordered device has no grace state: it runs again before any peer
            # leaves its grace state (or is reset, reading RUNNING).
            await self._final(ordered, finals.pop(ordered))
        async with trio.open_nursery() as nursery:
            for name in broken:
                nursery.start_soon(self._reset, name)
        async with trio.open_nursery() as nursery:
            for name, final in finals.items():
                if name not in broken:
                    nursery.start_soon(self._final, name, final)
        if vcpus is not None:
            stuck = [e.name for e in flow.side(SOURCE) if e.state is not DeviceState.RUNNING]
            failed = await vcpus.resume_once_running(stuck, record="source_resume")
            if failed is not None:
                self.rollback_errors.append(failed)

    async def _quiesce(
        self, name: str, reset: bool, quiesce: DeviceState | None, broken: list[str]
    ) -> None:
        """Out of its stopped state, to its grace state; ``broken`` collects the
        devices in ERROR, for a reset once no peer is stopped."""
        try:
            if not reset and quiesce is not None:
                await self.driver.walk(SOURCE, name, quiesce)
                return
        except DeviceFailure as failure:
            if not self.driver.needs_reset(SOURCE, name):
                self.rollback_errors.append(failure.info)
                return
        if reset or self.driver.needs_reset(SOURCE, name):
            broken.append(name)

    async def _final(self, name: str, final: DeviceState) -> None:
        try:
            await self.driver.walk(SOURCE, name, final)
        except DeviceFailure as failure:
            if self.driver.needs_reset(SOURCE, name):
                await self._reset(name)
            else:
                self.rollback_errors.append(failure.info)
        except ProtocolViolation as exc:
            # A peer could not leave a stopped state: running this device
            # fully would expose it to that peer.  It waits for an operator.
            flow = self.driver.flow
            ordered = flow is not None and flow.ordered == name
            message = f"left in {'its stopped' if ordered else 'its grace'} state: {exc}"
            self.rollback_errors.append(
                self.ctx.info("device_error", message, side=SOURCE, device=name)
            )

    async def _reset(self, name: str) -> None:
        try:
            failed = await self.driver.reset(SOURCE, name)
        except ProtocolViolation as exc:
            # A peer is still stopped: a reset device reads RUNNING and could
            # DMA into it.  It stays in ERROR, for an operator.
            message = f"left in ERROR: {exc}"
            failed = self.ctx.info("device_error", message, side=SOURCE, device=name)
        if failed is not None:
            self.rollback_errors.append(failed)


def _came_back(info: PrecopyInfo, announced: bool, back: int | None) -> int | None:
    """The new initial data a pre-copy report shows (None: none), with ``back``, what
    the round showed before: the device says so (``reinit``), or its initial data
    grew again after it was announced drained."""
    if info.reinit or (announced and info.initial_bytes > 0):
        return max(back or 0, info.initial_bytes)
    return back


@contextlib.asynccontextmanager
async def _closing(sender: StreamSender) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await sender.aclose()
