"""The simulated devices' clock: never early, armed for each deadline, virtual under MockClock.

How late it ends against trio.sleep is measured in bench/sleep_lateness.py.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Iterator

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


class _FakeTimerfd:
    """A pipe in the timerfd's place, on a clock the test sets.

    The test decides what time it is and when the timer fires; ``armed``
    records every deadline the timer was armed for.
    """

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns
        self.armed: list[int] = []
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)

    def create(self) -> int:
        return self.read_fd

    def arm(self, fd: int, deadline_ns: int) -> None:
        assert fd == self.read_fd
        self.armed.append(deadline_ns)

    def monotonic_ns(self) -> int:
        return self.now_ns

    def fire(self, now_ns: int) -> None:
        """The timer expires (the kernel writes its expiry count), and it is ``now_ns``."""
        self.now_ns = now_ns
        os.write(self._write_fd, (1).to_bytes(8, "little"))

    def close(self) -> None:
        os.close(self._write_fd)  # the read end is the timer's: closed when the run ends


@pytest.fixture
def fake_timerfd(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeTimerfd]:
    fake = _FakeTimerfd(now_ns=1_000_000_000)
    monkeypatch.setattr(precise_sleep, "_TIMERFD", (fake.create, fake.arm))
    monkeypatch.setattr(precise_sleep, "time", fake)
    yield fake
    fake.close()


def test_the_timer_is_armed_for_the_earliest_deadline_and_loop_wakeups_leave_it(
    fake_timerfd: _FakeTimerfd,
) -> None:
    # The reason this module exists: trio.sleep's end is recomputed, rounded
    # up to a whole millisecond, each time anything wakes the loop.  Here the
    # deadline is armed once, exactly, and only the timer's firing ends a sleep.
    fake = fake_timerfd
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await sleep(seconds)
        woke.append(name)

    async def start(nursery: trio.Nursery, name: str, seconds: float) -> None:
        nursery.start_soon(sleeper, name, seconds)
        await trio.testing.wait_all_tasks_blocked()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start(nursery, "1ms", 0.001)
            assert fake.armed == [1_001_000_000]  # its deadline, to the nanosecond
            await start(nursery, "3ms", 0.003)
            assert fake.armed == [1_001_000_000]  # a later deadline leaves the timer alone
            await start(nursery, "500us", 0.0005)
            assert fake.armed == [1_001_000_000, 1_000_500_000]  # an earlier one re-arms it

            # The loop woken again and again (a reader thread posting frames),
            # while time goes on short of the first deadline: no sleep ends
            # and the timer is not re-armed, neither later nor at all.
            token = trio.lowlevel.current_trio_token()
            for now_ns in range(1_000_000_000, 1_000_500_000, 10_000):
                fake.now_ns = now_ns
                token.run_sync_soon(lambda: None)
                await trio.testing.wait_all_tasks_blocked()
            assert woke == []
            assert fake.armed == [1_001_000_000, 1_000_500_000]

            fake.fire(now_ns=1_000_500_000)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == ["500us"]
            assert fake.armed[2:] == [1_001_000_000]  # the next deadline, exactly

            # Readable before any deadline is due (it fired, then was re-armed
            # for later): nobody wakes, and the timer is re-armed for the same
            # deadline, not a later one.
            fake.fire(now_ns=1_000_999_999)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == ["500us"]
            assert fake.armed[3:] == [1_001_000_000]

            fake.fire(now_ns=1_003_000_000)  # late: both remaining sleepers are due
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woke) == ["1ms", "3ms", "500us"]
            assert len(fake.armed) == 4  # nothing left to arm for
        timer = precise_sleep._RUN_TIMER.get()
        assert timer is not None and not timer._heap

    trio.run(main)


@needs_timerfd
def test_the_timerfd_is_armed_for_the_sleeps_own_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    assert precise_sleep._TIMERFD is not None
    create, arm = precise_sleep._TIMERFD
    armed: list[int] = []

    def recording_arm(fd: int, deadline_ns: int) -> None:
        armed.append(deadline_ns)
        arm(fd, deadline_ns)

    monkeypatch.setattr(precise_sleep, "_TIMERFD", (create, recording_arm))

    async def main() -> None:
        before = time.monotonic_ns()
        await sleep(0.002)
        after = time.monotonic_ns()
        # Armed once, for the deadline sleep computed (its start plus 2 ms),
        # which had passed when it woke.
        (deadline,) = armed
        assert before + 2_000_000 <= deadline <= after

    trio.run(main)


def test_under_a_mock_clock_sleep_is_virtual() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    seen: dict[str, float] = {}

    async def main() -> None:
        before = trio.current_time()
        await sleep(3600)
        seen["virtual"] = trio.current_time() - before
        seen["timer"] = precise_sleep._RUN_TIMER.get() is None

    # No timer for this run, and an hour passed on the mock clock alone: a real
    # sleep would not have returned before the suite's timeout.
    trio.run(main, clock=clock)
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
