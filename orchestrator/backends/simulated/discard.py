"""A simulated destination that loads its stream and keeps none of it.

``discard = true`` in a simulated device's ``destination`` table: the device
takes every arc a destination takes, loads its stream at ``drain_mib_s``
(through trio's ``write`` or a data channel's thread alike) and keeps no
byte of it: no content, no file, no digest (it answers None, as hardware
does).  What a daemon holds while such a device loads slowly is the daemon's
own: the data channel's buffers, bounded by ``[data] max_buffered_mib``.
Its stream is counted, not checked.
"""

from __future__ import annotations

import errno
import threading
from typing import ClassVar

import trio

from orchestrator.backends import precise_sleep
from orchestrator.backends.base import Device, PrecopyInfo, StreamChunk
from orchestrator.backends.simulated.params import MIB, SimulatedParams
from orchestrator.compat import Identity
from orchestrator.states import Capabilities, DeviceState, Side, arcs

__all__ = ["DiscardDevice"]


class DiscardDevice(Device):
    """A destination endpoint that loads and forgets; see the module docstring."""

    backend: ClassVar[str] = "simulated"

    def __init__(self, name: str, side: Side, params: SimulatedParams) -> None:
        super().__init__(name, side)
        self.params = params
        self._capabilities = params.capabilities
        self._arcs = dict(arcs(self._capabilities.flags))
        self._transition_s = params.transition_ms / 1000
        self._drain_bytes_s = None if params.drain_mib_s is None else params.drain_mib_s * MIB
        self._state = DeviceState.RUNNING
        self._open = False
        self._closed = False
        #: Stream bytes loaded (and forgotten) since the device entered RESUMING.
        self.loaded = 0

    @property
    def state(self) -> DeviceState:
        return self._state

    async def open(self) -> Capabilities:
        await trio.lowlevel.checkpoint()
        self._check_live("open", opening=True)
        self._open = True
        return self._capabilities

    async def device_identity(self) -> Identity:
        """Its model and firmware, as its table gives them (``SimulatedParams.identity``)."""
        await trio.lowlevel.checkpoint()
        return self.params.identity

    async def get_state(self) -> DeviceState:
        await trio.lowlevel.checkpoint()
        self._check_live("get_state")
        return self._state

    async def set_state(self, target: DeviceState) -> None:
        self._check_live("set_state")
        if self._state is DeviceState.ERROR or target not in self._arcs.get(self._state, ()):
            await trio.lowlevel.checkpoint()
            raise self._device_error(
                "set_state",
                f"{self._state.name} -> {target.name} is not one arc of the state model "
                "for this device",
                errno.EINVAL,
                target,
            )
        await precise_sleep.sleep(self._transition_s)
        if target is DeviceState.RESUMING:
            self.loaded = 0
        self._state = target

    async def read(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        raise self._device_error("read", "a discarding device has no stream to save", errno.EINVAL)

    async def write(self, data: StreamChunk) -> None:
        self._check_loading()
        rate = self._drain_bytes_s
        if rate is not None and len(data):
            await precise_sleep.sleep(len(data) / rate)
        else:
            await trio.lowlevel.checkpoint()
        self.loaded += len(data)

    def bulk_writer(self) -> DiscardDevice:
        return self

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        """The blocking side of ``write``, for a data channel's thread."""
        self._check_loading()
        rate = self._drain_bytes_s
        if rate is not None and data.nbytes:
            cancel.wait(data.nbytes / rate)
        self.loaded += data.nbytes

    async def precopy_info(self) -> PrecopyInfo:
        await trio.lowlevel.checkpoint()
        raise self._device_error("precopy_info", "a discarding device saves nothing", errno.EINVAL)

    async def stop_copy_size(self) -> int:
        await trio.lowlevel.checkpoint()
        return 0

    async def reset(self) -> None:
        self._check_live("reset")
        await precise_sleep.sleep(self._transition_s)
        self._state = DeviceState.RUNNING

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True

    def declared_arc_s(self, source: DeviceState, target: DeviceState) -> float | None:
        return self._transition_s

    def declared_rate_bytes_s(self) -> float | None:
        return self._drain_bytes_s

    def _check_live(self, operation: str, *, opening: bool = False) -> None:
        if self._closed or not (self._open or opening):
            message = "the device is closed" if self._closed else "the device is not open"
            raise self._device_error(operation, message, errno.EBADF)

    def _check_loading(self) -> None:
        self._check_live("write")
        if self._state is not DeviceState.RESUMING:
            raise self._device_error(
                "write", f"the device loads only in RESUMING, not {self._state.name}", errno.EINVAL
            )
