"""Every call the engine makes to a device, and what a failed one becomes.

Both halves of a migration drive their devices through one
:class:`DeviceDriver`: the source endpoints in the coordinator, the
destination endpoints in the destination engine, on this host or on the
destination daemon's.  It keeps, once, what every device call needs:

* a deadline (``timeouts.device_call_s``) on every call, so that a device
  that never answers fails the migration instead of hanging it;
* the flow's check before every arc (``MigrationFlow.begin_arc``), so that
  no arc the barriers or the commit forbid is ever asked of a device;
* a probe after a failed arc: the device says where it stands (its old
  state, or ERROR, which only a reset leaves), or ERROR if it cannot;
* the trace: every arc begun, ended or failed, and every reset;
* the turn of a backend's ``DeviceError`` into a migration failure
  (:class:`DeviceFailure`, tagged with side, device, phase and operation).
  This module is the only place that happens (``tests/test_layers.py``).

:class:`EngineContext` is what the parts of one migration's engine share:
its plan, trace, log, phase and first error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
import trio

from orchestrator.backends.base import Device
from orchestrator.compat import Identity
from orchestrator.engine.trace import Trace
from orchestrator.errors import DeviceError, DeviceTimeout, PeerError
from orchestrator.flow import MigrationFlow
from orchestrator.plan import Plan
from orchestrator.report import ErrorInfo
from orchestrator.states import Capabilities, DeviceState, Side
from orchestrator.transport.streams import Transfer

__all__ = [
    "DeviceDriver",
    "DeviceFailure",
    "EngineContext",
    "MigrationAborted",
    "VmmFailure",
]

T = TypeVar("T")

#: How often a bulk transfer's watcher looks at it (at most; a quarter of the deadline
#: where that is shorter): a device call past its deadline, the bytes moved for reports.
TRANSFER_TICK_S = 0.25


class MigrationAborted(Exception):
    """Stops the forward path; the cause is in ``EngineContext.error``."""


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


@dataclass
class EngineContext:
    """What the parts of one migration's engine share."""

    plan: Plan
    log: Any
    trace: Trace = field(default_factory=Trace)
    #: The phase the migration is in, as reports and errors name it.
    phase: str = "prepare"
    #: The first failure in time: the cause, not its consequences.
    error: ErrorInfo | None = None

    @classmethod
    def create(cls, plan: Plan, migration_id: str, trace: Trace, **bind: Any) -> EngineContext:
        log = structlog.get_logger("orchestrator").bind(vm=plan.vm, migration=migration_id, **bind)
        return cls(plan, log, trace)

    def info(
        self,
        kind: str,
        message: str,
        *,
        side: Side | None = None,
        device: str | None = None,
        operation: str | None = None,
    ) -> ErrorInfo:
        """An ErrorInfo of the current phase."""
        return ErrorInfo(
            kind=kind,
            message=message,
            phase=self.phase,
            side=side.value if side is not None else None,
            device=device,
            operation=operation,
        )

    def keep(self, info: ErrorInfo) -> ErrorInfo:
        """Keep ``info`` as the cause if nothing failed before it."""
        if self.error is None:
            self.error = info
        return info

    def set_error(self, kind: str, message: str) -> None:
        self.keep(self.info(kind, message))

    def abort(self, kind: str, message: str) -> MigrationAborted:
        self.set_error(kind, message)
        return MigrationAborted(message)


class DeviceDriver:
    """Drives the device endpoints of one migration; see the module docstring."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.devices: dict[tuple[Side, str], Device] = {}
        #: Set once every device is open and the capabilities are known.
        self.flow: MigrationFlow | None = None
        #: Time each endpoint spent inside device calls, in seconds.
        self.busy: dict[tuple[Side, str], float] = {}
        #: The endpoints whose ``open`` succeeded.
        self.opened: set[tuple[Side, str]] = set()
        # Transition events are the hot path of a 256-device switchover: build
        # their log fields only when they will be written.
        self._log_arcs = ctx.log.is_enabled_for(logging.INFO)

    def add(self, side: Side, name: str, device: Device) -> None:
        self.devices[(side, name)] = device

    def device(self, side: Side, name: str) -> Device:
        return self.devices[(side, name)]

    def _flow(self) -> MigrationFlow:
        assert self.flow is not None, "the flow is built once every device is open"
        return self.flow

    # -- calls -----------------------------------------------------------------

    async def call(
        self,
        side: Side,
        name: str,
        operation: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        target: DeviceState | None = None,
    ) -> T:
        """One device call under its deadline; DeviceError becomes DeviceFailure here."""
        deadline = self.ctx.plan.timeouts.device_call_s
        start = trio.current_time()
        # A bare cancel scope, not trio.fail_after: this runs for every arc of every
        # device inside the switchover window, and fail_after's generator-based
        # context manager costs several times the scope itself.
        scope = trio.CancelScope(deadline=start + deadline)
        try:
            with scope:
                return await fn(*args)
            err: DeviceError = DeviceTimeout(
                f"no answer within {deadline:g} s",
                device=name,
                operation=operation,
                target=target.name if target else None,
            )
            raise self.fail(side, name, operation, err)
        except DeviceError as exc:
            raise self.fail(side, name, operation, exc) from exc
        finally:
            key = (side, name)
            self.busy[key] = self.busy.get(key, 0.0) + trio.current_time() - start

    async def transfer(
        self,
        side: Side,
        name: str,
        operation: str,
        transfer: Transfer,
        *,
        cut: trio.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Watch a bulk transfer the data channel's threads run for a device, to its end.

        Its device calls keep the deadline of every call: one under way for longer
        abandons the transfer (the thread finishes or fails alone) and fails the
        device with DeviceTimeout; a cancelled caller abandons it too.  ``cut``
        stops it after the piece under way (a round cut short).  ``progress(n)``
        hears of the bytes moved since it last heard, now and then and at the end.
        Its device error (``operation``) or its stream's error becomes the failure.
        """
        deadline = self.ctx.plan.timeouts.device_call_s
        tick = min(deadline / 4, TRANSFER_TICK_S)
        counted = 0

        def count() -> None:
            nonlocal counted
            moved = transfer.bytes
            if progress is not None and moved > counted:
                progress(moved - counted)
            counted = moved

        async def stop_at_cut(cut: trio.Event) -> None:
            await cut.wait()
            transfer.stop()

        async def watch() -> bool:
            """Until the transfer is done; True if a device call overran its deadline.
            (Nothing raised here: inside a nursery it would be an ExceptionGroup.)"""
            while not transfer.done.is_set():
                with trio.move_on_after(tick):
                    await transfer.done.wait()
                count()
                stuck = transfer.in_call_s()
                if stuck is not None and stuck > deadline and not transfer.done.is_set():
                    return True
            return False

        try:
            if cut is None:  # a stop-copy drain, inside the window: no task for it
                timed_out = await watch()
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stop_at_cut, cut)
                    timed_out = await watch()
                    nursery.cancel_scope.cancel()
        finally:
            if not transfer.done.is_set():
                transfer.abandon()
            key = (side, name)
            self.busy[key] = self.busy.get(key, 0.0) + transfer.device_s
        if timed_out:
            err = DeviceTimeout(
                f"no answer within {deadline:g} s", device=name, operation=operation
            )
            raise self.fail(side, name, operation, err)
        count()
        error = transfer.error
        if error is None:
            return
        if isinstance(error, PeerError):
            raise self.fail(side, name, "send" if side is Side.SOURCE else "receive", error)
        if isinstance(error, DeviceError):
            raise self.fail(side, name, operation, error)
        raise error

    def fail(self, side: Side, name: str, operation: str, exc: Exception) -> DeviceFailure:
        """The migration failure a device's (or its stream's) error is."""
        kind = (
            "device_timeout"
            if isinstance(exc, DeviceTimeout)
            else ("peer_error" if isinstance(exc, PeerError) else "device_error")
        )
        info = self.ctx.keep(
            self.ctx.info(kind, str(exc), side=side, device=name, operation=operation)
        )
        self.ctx.log.warning("device.failure", **info.model_dump(exclude_none=True))
        return DeviceFailure(info)

    async def open(self, side: Side, name: str) -> Capabilities:
        device = self.device(side, name)
        caps = await self.call(side, name, "open", device.open)
        self.opened.add((side, name))
        return caps

    async def identity(self, side: Side, name: str) -> Identity | None:
        """What must match for the device's stream to load (``orchestrator.compat``)."""
        device = self.device(side, name)
        return await self.call(side, name, "identity", device.device_identity)

    async def state(self, side: Side, name: str) -> DeviceState:
        device = self.device(side, name)
        return await self.call(side, name, "get_state", device.get_state)

    async def require_running(self, side: Side, name: str) -> None:
        """Refuse, before any change, a device that is not where a migration starts.

        A device left in another state (stopped by an earlier migration, or
        half-way through one that was never recovered) must not be driven
        from an assumed RUNNING: a rollback would then start the wrong side.
        """
        state = await self.state(side, name)
        if state is not DeviceState.RUNNING:
            raise self.ctx.abort(
                "device_state",
                f"{side.value} device {name!r} is in {state.name}, not RUNNING: it may "
                "still belong to an earlier migration; nothing was changed",
            )

    # -- arcs ------------------------------------------------------------------

    async def walk(self, side: Side, name: str, target: DeviceState) -> None:
        for step in self._flow().plan_arcs(side, name, target):
            await self.arc(side, name, step)

    async def arc(self, side: Side, name: str, target: DeviceState) -> None:
        """One arc: checked by the flow first, probed if it fails, traced either way."""
        flow = self._flow()
        trace = self.ctx.trace
        before = flow.endpoint(side, name).state
        flow.begin_arc(side, name, target)
        start = trace.emit("arc_begin", side, name, before, target).time
        device = self.device(side, name)
        try:
            await self.call(side, name, "set_state", device.set_state, target, target=target)
        except DeviceFailure as failure:
            now = await self.probe(side, name)
            flow.arc_failed(side, name, now)
            detail = {"target": target.name, "error": failure.info.message}
            trace.emit("arc_failed", side, name, before, now, detail)
            raise
        flow.end_arc(side, name)
        end = trio.current_time()
        trace.emit("arc_end", side, name, before, target, {"duration_s": end - start}, time=end)
        if self._log_arcs:
            self.ctx.log.info(
                "device.transition",
                device=name,
                side=side.value,
                **{"from": before.name, "to": target.name},
                duration_ms=round((end - start) * 1000, 3),
            )

    def reported_arc(
        self,
        side: Side,
        name: str,
        before: DeviceState,
        target: DeviceState,
        *,
        ok: bool,
        now: DeviceState,
        duration_s: float,
    ) -> None:
        """An arc a device took under another daemon's driver, as that daemon reported it.

        The flow checks it as if this driver had asked for it (a report the
        invariants forbid raises ProtocolViolation), and the trace gets it
        when it arrives: that is when this host learns of it.
        """
        flow = self._flow()
        trace = self.ctx.trace
        flow.begin_arc(side, name, target)
        trace.emit("arc_begin", side, name, before, target, {"reported": True})
        if ok:
            flow.end_arc(side, name)
            trace.emit("arc_end", side, name, before, target, {"duration_s": duration_s})
        else:
            flow.arc_failed(side, name, now)
            trace.emit("arc_failed", side, name, before, now, {"target": target.name})

    async def probe(self, side: Side, name: str) -> DeviceState:
        """Where a device stands after a failed arc; ERROR if it cannot tell."""
        deadline = self.ctx.plan.timeouts.device_call_s
        with trio.CancelScope(shield=True), trio.move_on_after(deadline):
            try:
                return await self.device(side, name).get_state()
            except DeviceError:
                return DeviceState.ERROR
        return DeviceState.ERROR

    async def settle_pending(self) -> None:
        """An arc in flight when the forward path was cancelled may or may not have
        happened: ask the devices where they stand."""
        flow = self._flow()

        async def settle(side: Side, name: str) -> None:
            e = flow.endpoint(side, name)
            before, target = e.state, e.pending
            now = await self.probe(side, name)
            flow.arc_failed(side, name, now)
            # Whether it happened or not, the trace says where the device stands.
            detail = {"target": target.name if target is not None else None}
            self.ctx.trace.emit("arc_settled", side, name, before, now, detail)

        # Side by side: a rollback's pause waits for the slowest probe, not their sum.
        async with trio.open_nursery() as nursery:
            for (side, name), e in list(flow.endpoints.items()):
                if e.pending is not None and (side, name) in self.devices:
                    nursery.start_soon(settle, side, name)

    async def reset(self, side: Side, name: str) -> ErrorInfo | None:
        """Reset a device (its state is lost, it reads RUNNING); the failure, if any.
        ProtocolViolation (nothing done) if the flow forbids it now."""
        flow = self._flow()
        before = flow.endpoint(side, name).state
        flow.check_reset(side, name)
        device = self.device(side, name)
        try:
            await self.call(side, name, "reset", device.reset)
        except DeviceFailure as failure:
            return failure.info
        flow.record_reset(side, name)
        self.ctx.trace.emit("reset", side, name, before, DeviceState.RUNNING)
        self.ctx.log.info("device.reset", device=name, side=side.value, **{"from": before.name})
        return None

    def arc_samples(self) -> list[tuple[str, str, str, str, float]]:
        """Every arc this driver's devices took, as the host's arc history keeps
        them: (model, side, from, to, seconds), for the devices that have a model."""
        samples = []
        for event in self.ctx.trace.events:
            if event.kind != "arc_end" or event.side is None or event.device is None:
                continue
            device = self.devices.get((event.side, event.device))
            model = device.model_key() if device is not None else None
            if model is not None and event.from_state is not None and event.to_state is not None:
                seconds = float(event.detail.get("duration_s", 0.0))
                samples.append(
                    (model, event.side.value, event.from_state.name, event.to_state.name, seconds)
                )
        return samples

    def needs_reset(self, side: Side, name: str) -> bool:
        return self._flow().endpoint(side, name).state is DeviceState.ERROR

    async def close(self) -> None:
        """Release every device, each under the deadline; errors are not news here."""

        async def close(device: Device) -> None:
            with trio.move_on_after(self.ctx.plan.timeouts.device_call_s):
                try:
                    await device.close()
                except DeviceError as exc:
                    self.ctx.log.debug("device.close_failed", device=device.name, error=str(exc))

        async with trio.open_nursery() as nursery:
            for device in self.devices.values():
                nursery.start_soon(close, device)

    async def digest(self, side: Side, name: str) -> str | None:
        """The device's state digest, where the backend can tell (the simulator can)."""
        device = self.devices.get((side, name))
        if device is None:
            return None
        with trio.move_on_after(self.ctx.plan.timeouts.device_call_s):
            try:
                return await device.state_digest()
            except DeviceError:
                return None  # a device that cannot tell (closed, real hardware)
        return None
