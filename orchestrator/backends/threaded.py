"""Devices whose system calls block: each call in a worker thread, descriptors closed safely.

The real backends (VFIO, vhost-vdpa) share this core.  Every system call
that can block (opens, ioctls, reads and writes, and the close, which on a
PCI function may reset it) runs in a trio worker thread, so the devices of a
migration move in parallel.  Worker threads are *abandoned* on cancellation
(``abandon_on_cancel=True``): a driver stuck in an ioctl must not hang the
runner past its deadline.  Abandoning is made safe by never closing a
descriptor under a thread that may still use it:

* each worker registers itself with its device while it runs
  (``_in_thread``), and is refused once the device is closed;
* what the device gives up is released only when no worker of it is
  running: the last one out takes it (``_collect_locked``, under the
  device's lock) and releases it (outside the lock).  So a descriptor number
  is never reused under a worker that is about to pass it to the kernel;
* ``close`` marks the device closed at once and releases everything in a
  worker thread of its own if no worker is running, else leaves that to the
  last one out.

A worker is told of its caller's cancellation through the
``threading.Event`` it is given, for loops that can look (a ``poll`` that
wakes now and then); a blocked ioctl simply finishes late, and its thread
then only updates the device's bookkeeping.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

from orchestrator.backends.base import Device
from orchestrator.errors import DeviceError
from orchestrator.states import DeviceState, Side

__all__ = ["ThreadedDevice"]

T = TypeVar("T")


class ThreadedDevice(Device):
    """A ``Device`` whose blocking work runs in worker threads (see the module docstring).

    Subclasses set ``identity`` (how messages name the device on this host)
    and implement ``_collect_locked``.
    """

    identity: str

    def __init__(self, name: str, side: Side) -> None:
        super().__init__(name, side)
        self._lock = threading.Lock()
        self._workers = 0
        self._closed = False

    @abc.abstractmethod
    def _collect_locked(self) -> Callable[[], None] | None:
        """Under the lock, with no worker running: take what is to be released now
        (everything, once ``_closed``); the call returned releases it, outside the lock."""

    def _closing_locked(self) -> None:
        """Under the lock, as ``close`` marks the device closed: a last word before release."""

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                release = False
            else:
                self._closed = True
                self._closing_locked()
                release = self._workers == 0
                if release:
                    # This close is the last one out: it releases, in a thread of its own.
                    self._workers += 1
        if not release:
            await trio.lowlevel.checkpoint()
            return
        # Closing a device fd may reset a PCI function: a worker thread, abandoned on
        # cancel, which finishes the release on its own.
        await trio.to_thread.run_sync(self._leave, abandon_on_cancel=True)

    async def _in_thread(self, operation: str, fn: Callable[[threading.Event], T]) -> T:
        """``fn(cancelled)`` in a worker thread registered with this device."""
        cancelled = threading.Event()

        def work() -> T:
            with self._as_worker(operation):
                return fn(cancelled)

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except trio.Cancelled:
            cancelled.set()
            raise

    @contextlib.contextmanager
    def _as_worker(self, operation: str) -> Iterator[None]:
        """The calling thread (a worker, or a data channel's I/O thread) registered
        with this device while it runs; refused once the device is closed."""
        with self._lock:
            if self._closed:
                raise self._error(operation, errno.EBADF, "the device is closed")
            self._workers += 1
        try:
            yield
        finally:
            self._leave()

    def _leave(self) -> None:
        """A worker is done: the last one out releases what was given up."""
        with self._lock:
            self._workers -= 1
            if self._workers:
                return
            release = self._collect_locked()
        if release is not None:
            release()

    def _error(
        self, operation: str, err: int, detail: str = "", target: DeviceState | None = None
    ) -> DeviceError:
        message = f"{self.identity}: {os.strerror(err)}"
        if detail:
            message += f"; {detail}"
        return self._device_error(operation, message, err, target)
