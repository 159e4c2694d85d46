"""The simulated devices' clock: never early, not a millisecond late, virtual under MockClock."""

from __future__ import annotations

import errno
import os
import random
import statistics
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from orchestrator.backends import precise_sleep
from orchestrator.backends.precise_sleep import sleep

needs_timerfd = pytest.mark.skipif(
    precise_sleep._TIMERFD is None, reason="no timerfd in this C library: sleep is trio.sleep"
)


@needs_timerfd
async def test_a_sleep_never_ends_before_its_deadline() -> None:
    lengths = [50e-6, 200e-6, 1e-3, 2.5e-3]
    for length in lengths * 5:
        start = time.monotonic_ns()
        await sleep(length)
        assert time.monotonic_ns() - start >= length * 1e9
    assert precise_sleep._RUN_TIMER.get() is not None


@needs_timerfd
async def test_concurrent_sleepers_share_the_timer_and_none_wakes_early() -> None:
    rng = random.Random(7)
    lengths = [rng.uniform(0.0002, 0.004) for _ in range(64)]
    woke: list[tuple[int, int]] = []
    start = time.monotonic_ns()

    async def sleeper(index: int, length: float) -> None:
        await sleep(length)
        woke.append((time.monotonic_ns() - start, index))

    async with trio.open_nursery() as nursery:
        for index, length in enumerate(lengths):
            nursery.start_soon(sleeper, index, length)
    assert len(woke) == len(lengths)
    for elapsed_ns, index in woke:
        assert elapsed_ns >= lengths[index] * 1e9
    timer = precise_sleep._RUN_TIMER.get()
    assert timer is not None and not timer._heap


async def _lateness_while_woken(sleep_fn: Callable[[float], Awaitable[None]]) -> float:
    """Median lateness (s) of 1 ms sleeps while a thread wakes the loop every 300 us."""
    token = trio.lowlevel.current_trio_token()
    stop = threading.Event()

    def poke() -> None:
        while not stop.wait(0.0003):
            try:
                token.run_sync_soon(lambda: None)
            except trio.RunFinishedError:
                return

    thread = threading.Thread(target=poke, daemon=True)
    thread.start()
    late: list[float] = []
    try:
        for _ in range(25):
            start = time.monotonic()
            await sleep_fn(0.001)
            late.append(time.monotonic() - start - 0.001)
    finally:
        stop.set()
        thread.join()
    return statistics.median(late)


@needs_timerfd
async def test_a_woken_loop_does_not_stretch_a_sleep_as_trio_sleep_does() -> None:
    # The reason this module exists: trio's epoll timeout counts whole
    # milliseconds, rounded up, so every wake-up during a trio.sleep pushes its
    # end to a millisecond after that wake-up.  Compared side by side, in the
    # same run, so that a busy machine slows both.
    # Measured here: 35-50 us late against 160-250 us, idle or with both cores
    # busy; half is the margin.
    ours = await _lateness_while_woken(sleep)
    theirs = await _lateness_while_woken(trio.sleep)
    assert ours * 2 < theirs


def test_under_a_mock_clock_sleep_is_virtual() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    seen: dict[str, float] = {}

    async def main() -> None:
        before = trio.current_time()
        await sleep(3600)
        seen["virtual"] = trio.current_time() - before
        seen["timer"] = precise_sleep._RUN_TIMER.get() is None

    wall = time.monotonic()
    trio.run(main, clock=clock)
    assert time.monotonic() - wall < 10
    assert seen == {"virtual": 3600, "timer": True}


@needs_timerfd
def test_the_timer_descriptor_is_closed_when_the_run_ends() -> None:
    fds: list[int] = []

    async def main() -> None:
        await sleep(0.0001)
        timer = precise_sleep._RUN_TIMER.get()
        assert timer is not None
        fds.append(timer.fd)
        os.fstat(timer.fd)

    trio.run(main)
    with pytest.raises(OSError, match="Bad file descriptor") as caught:
        os.fstat(fds[0])
    assert caught.value.errno == errno.EBADF


@needs_timerfd
async def test_a_cancelled_sleep_ends_at_once_and_the_timer_goes_on() -> None:
    with trio.move_on_after(0.001) as scope:
        await sleep(60)
    assert scope.cancelled_caught
    start = time.monotonic_ns()
    await sleep(0.0005)
    assert time.monotonic_ns() - start >= 500_000


async def test_zero_is_a_checkpoint_and_a_negative_length_is_refused() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await sleep(0)
        pytest.fail("sleep(0) did not checkpoint")
    with pytest.raises(ValueError, match="cannot last"):
        await sleep(-1)
