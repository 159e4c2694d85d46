"""One side's VMM as the engine drives it: the vCPU pause, resume and status.

Each call is under ``timeouts.vmm_call_s``, traced (``vmm_begin``,
``vmm_end`` or ``vmm_failed``, with the side and action), timed, and its
``VmmError`` turned into a migration failure (:class:`VmmFailure`) here and
nowhere else.  The coordinator holds the source's; the destination engine,
on whichever host holds the destination devices, the destination's.
"""

from __future__ import annotations

import trio

from orchestrator.engine.devices import EngineContext, VmmFailure
from orchestrator.plan import VmmEndpoint
from orchestrator.report import ErrorInfo
from orchestrator.states import Side
from orchestrator.vmm import VcpuStatus, Vmm, VmmError, VmmTimeout, open_vmm

__all__ = ["Vcpus"]


class Vcpus:
    """The vCPUs of one side's VMM (``[vmm.source]`` or ``[vmm.destination]``)."""

    def __init__(self, ctx: EngineContext, side: Side, endpoint: VmmEndpoint) -> None:
        self.ctx = ctx
        self.side = side
        self.endpoint = endpoint
        self.vmm: Vmm = open_vmm(endpoint)
        #: Milliseconds each recorded call took (pause, resume, source_resume).
        self.ms: dict[str, float] = {}
        #: The vCPUs as the VMM last reported them (running, paused...).
        self.status: str | None = None

    @property
    def description(self) -> str:
        return self.vmm.description

    async def call(self, action: str, record: str | None = None) -> VcpuStatus:
        """``pause``, ``resume`` or ``status`` under its deadline; VmmFailure if it fails."""
        deadline = self.ctx.plan.timeouts.vmm_call_s
        trace = self.ctx.trace
        start = trace.emit("vmm_begin", self.side, detail={"action": action}).time
        try:
            with trio.fail_after(deadline):
                status: VcpuStatus = await getattr(self.vmm, action)()
        except trio.TooSlowError:
            exc: VmmError = VmmTimeout(
                f"no answer within {deadline:g} s from {self.vmm.description}"
            )
        except VmmError as caught:
            exc = caught
        else:
            end = trace.emit(
                "vmm_end", self.side, detail={"action": action, "status": status.status}
            )
            took = end.time - start
            if record is not None:
                self.ms[record] = round(took * 1000, 3)
            self.status = status.status
            self.ctx.log.info(
                "vmm.call", side=self.side.value, action=action, status=status.status,
                duration_ms=round(took * 1000, 3),
            )  # fmt: skip
            return status
        trace.emit("vmm_failed", self.side, detail={"action": action, "error": str(exc)})
        kind = "vmm_timeout" if isinstance(exc, VmmTimeout) else "vmm_error"
        message = f"{self.side.value} VMM {action}: {exc}"
        info = self.ctx.keep(self.ctx.info(kind, message, side=self.side, operation=action))
        self.ctx.log.warning("vmm.failure", **info.model_dump(exclude_none=True))
        raise VmmFailure(info)

    async def resume_once_running(self, stuck: list[str], record: str) -> ErrorInfo | None:
        """Resume the vCPUs once every device of this side runs: the devices first,
        so that the guest finds them running when its vCPUs do.  ``stuck`` names
        the devices that do not run (the vCPUs then stay paused: a guest must not
        run beside a device that cannot).  What failed, if anything."""
        if stuck:
            message = (
                f"{self.side.value} vCPUs left paused: device(s) {', '.join(stuck)} not RUNNING"
            )
            return self.ctx.info("vmm_error", message, side=self.side, operation="resume")
        try:
            await self.call("resume", record=record)
        except VmmFailure as failure:
            return failure.info
        return None

    async def require_ready(self) -> None:
        """Refuse, before any change, vCPUs that are not where a migration starts:
        running on the source, stopped (waiting for the VM) on the destination."""
        status = await self.call("status", record="status")
        if status.running is not (self.side is Side.SOURCE):
            want = "running" if self.side is Side.SOURCE else "stopped, waiting for the VM"
            message = (
                f"the {self.side.value} VMM ({self.vmm.description}) reports its vCPUs "
                f"{status.status!r}; they must be {want} when a migration starts; "
                "nothing was changed"
            )
            info = self.ctx.keep(
                self.ctx.info("vmm_state", message, side=self.side, operation="status")
            )
            raise VmmFailure(info)

    async def aclose(self) -> None:
        await self.vmm.aclose()
