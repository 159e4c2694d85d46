"""The worker-thread core of the real backends: nothing released under a running worker."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest
import trio

from orchestrator.backends.base import PrecopyInfo, StreamChunk
from orchestrator.backends.threaded import ThreadedDevice
from orchestrator.errors import DeviceError
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side


class Held(ThreadedDevice):
    """A device holding one "descriptor"; only the thread-core hooks are real."""

    backend = "held"

    def __init__(self) -> None:
        super().__init__("dev0", Side.SOURCE)
        self.identity = "held device 0"
        self.fd_open = True
        self.released_in: list[str] = []
        self.closing_calls = 0

    def _closing_locked(self) -> None:
        self.closing_calls += 1

    def _collect_locked(self) -> Callable[[], None] | None:
        if not self._closed or not self.fd_open:
            return None
        self.fd_open = False

        def release() -> None:
            # Outside the lock: a release that takes it does not deadlock.
            with self._lock:
                self.released_in.append(threading.current_thread().name)

        return release

    async def block(self, gate: threading.Event, seen: list[bool]) -> None:
        def work(cancelled: threading.Event) -> None:
            while not gate.wait(0.01):
                if cancelled.is_set():
                    seen.append(True)

        await self._in_thread("block", work)

    async def open(self) -> Capabilities:
        return Capabilities(MigrationFlags.STOP_COPY)

    async def get_state(self) -> DeviceState:
        return await self._in_thread("get_state", lambda _: DeviceState.RUNNING)

    async def set_state(self, target: DeviceState) -> None:
        raise NotImplementedError

    async def read(self, max_bytes: int) -> bytes:
        raise NotImplementedError

    async def write(self, data: StreamChunk) -> None:
        raise NotImplementedError

    async def precopy_info(self) -> PrecopyInfo:
        raise NotImplementedError

    async def stop_copy_size(self) -> int:
        raise NotImplementedError

    async def reset(self) -> None:
        raise NotImplementedError

    async def state_digest(self) -> str | None:
        return None


async def test_close_with_no_worker_releases_in_a_thread_of_its_own() -> None:
    device = Held()
    assert await device.get_state() is DeviceState.RUNNING
    assert device.fd_open
    await device.close()
    assert not device.fd_open
    assert device.released_in and device.released_in[0] != threading.main_thread().name
    await device.close()  # twice: nothing more
    assert device.closing_calls == 1 and len(device.released_in) == 1


async def test_the_last_worker_out_releases_and_later_calls_are_refused() -> None:
    device = Held()
    gate = threading.Event()
    seen: list[bool] = []
    with trio.move_on_after(0.05) as scope:
        await device.block(gate, seen)
    assert scope.cancelled_caught
    # Abandoned but still running: the worker is told, and close releases nothing yet.
    for _ in range(100):
        if seen:
            break
        await trio.sleep(0.01)
    assert seen
    await device.close()
    assert device.fd_open and not device.released_in
    gate.set()
    for _ in range(500):
        if device.released_in:
            break
        await trio.sleep(0.01)
    assert not device.fd_open and len(device.released_in) == 1
    with pytest.raises(DeviceError, match=r"held device 0: .*; the device is closed") as info:
        await device.get_state()
    assert info.value.errno == errno.EBADF
    assert info.value.operation == "get_state"
