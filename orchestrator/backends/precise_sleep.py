"""Sleeps that end when they should: the simulated devices' clock.

``trio.sleep`` ends late by up to a millisecond, and not by chance: trio
waits in ``epoll_wait``, whose timeout counts whole milliseconds, and
CPython rounds the remaining time *up* to the next one.  So a 60 us sleep
takes a millisecond, and a 1 ms sleep that anything wakes the loop during
(a reader thread posting a frame, a journal write finishing) ends a whole
millisecond after that wake-up, not when it was due.  bench/downtime_netem.py
traced simulated 1 ms device transitions taking 1.13 to 1.78 ms inside the
switchover, where a real device's ioctl returns from its worker thread the
moment the kernel is done.  The simulator models device latencies; this
makes it keep them.

``sleep(seconds)`` puts the deadline in a heap and one ``timerfd``
(CLOCK_MONOTONIC, absolute, nanoseconds) armed for the earliest deadline;
a system task of the trio run waits for it to fire, wakes every sleeper
whose deadline has passed and arms it for the next.  So a sleep costs no
system call of its own unless it is the new earliest (one
``timerfd_settime``), and 64 devices sleeping at once share the wake-ups.

Invariants:

* a sleep never ends before its deadline (``time.monotonic()``, which is
  the clock trio's own ``SystemClock`` reads);
* under any clock other than trio's system clock (the tests' ``MockClock``,
  whose time is virtual), and where ``timerfd`` is missing, ``sleep`` *is*
  ``trio.sleep``, so virtual time still jumps and runs stay deterministic;
* the timer belongs to one trio run (a ``RunVar``) and its descriptor is
  closed when the run ends;
* a cancelled sleep leaves its heap entry behind, harmlessly: waking an
  event nobody waits for does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import itertools
import os
import time
from collections.abc import Callable

import trio

__all__ = ["sleep"]

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc_timerfd() -> tuple[Callable[[], int], Callable[[int, int], None]] | None:
    """``create()`` and ``arm(fd, deadline_ns)`` from the C library, or None.

    Python 3.13 has ``os.timerfd_create``; before it, ctypes reaches the same
    two system call wrappers.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create_fn = libc.timerfd_create
        settime_fn = libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create_fn.argtypes = [ctypes.c_int, ctypes.c_int]
    create_fn.restype = ctypes.c_int
    settime_fn.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    ]
    settime_fn.restype = ctypes.c_int

    def create() -> int:
        fd: int = create_fn(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        return fd

    def arm(fd: int, deadline_ns: int) -> None:
        spec = _Itimerspec()
        # A zero it_value disarms the timer; a deadline of 0 ns is long past anyway.
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(max(deadline_ns, 1), 1_000_000_000)
        if settime_fn(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return create, arm


_TIMERFD = _libc_timerfd()


class _Timer:
    """One run's timerfd, its heap of deadlines, and the task that fires them."""

    def __init__(self, create: Callable[[], int], arm: Callable[[int, int], None]) -> None:
        self._arm_fd = arm
        self.fd = create()
        self._heap: list[tuple[int, int, trio.Event]] = []
        self._order = itertools.count()
        self._armed_ns: int | None = None

    def add(self, deadline_ns: int) -> trio.Event:
        woken = trio.Event()
        heapq.heappush(self._heap, (deadline_ns, next(self._order), woken))
        if self._armed_ns is None or deadline_ns < self._armed_ns:
            self._arm(deadline_ns)
        return woken

    def _arm(self, deadline_ns: int) -> None:
        self._arm_fd(self.fd, deadline_ns)
        self._armed_ns = deadline_ns

    async def serve(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                # Re-armed for later after it fired: then there is nothing to read yet.
                with contextlib.suppress(BlockingIOError):
                    os.read(self.fd, 8)
                self._armed_ns = None
                now = time.monotonic_ns()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    heapq.heappop(heap)[2].set()
                if heap:
                    self._arm(heap[0][0])
        finally:
            os.close(self.fd)


#: The run's timer; None where this run cannot have one (another clock, no timerfd).
_RUN_TIMER: trio.lowlevel.RunVar[_Timer | None] = trio.lowlevel.RunVar("precise_sleep_timer")


def _timer() -> _Timer | None:
    try:
        return _RUN_TIMER.get()
    except LookupError:
        pass
    timer: _Timer | None = None
    # trio's own clock reads time.perf_counter (CLOCK_MONOTONIC here) plus an
    # offset; any other clock (MockClock) has a time of its own to follow.
    if _TIMERFD is not None and type(trio.lowlevel.current_clock()).__name__ == "SystemClock":
        try:
            timer = _Timer(*_TIMERFD)
        except OSError:
            timer = None
    _RUN_TIMER.set(timer)
    if timer is not None:
        # A system task: the timer serves every task of the run, and ends with it.
        trio.lowlevel.spawn_system_task(timer.serve, name="precise_sleep_timer")
    return timer


async def sleep(seconds: float) -> None:
    """Sleep ``seconds``, ending within tens of microseconds of the deadline, never before it.

    A checkpoint, like ``trio.sleep``, also for 0; a negative length is a ValueError.
    """
    if seconds < 0:
        raise ValueError(f"a sleep cannot last {seconds} s")
    if seconds == 0:
        await trio.lowlevel.checkpoint()
        return
    timer = _timer()
    if timer is None:
        await trio.sleep(seconds)
        return
    deadline_ns = time.monotonic_ns() + max(1, round(seconds * 1e9))
    await timer.add(deadline_ns).wait()
